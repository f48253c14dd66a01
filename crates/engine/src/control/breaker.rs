//! A circuit breaker per model: after `failure_threshold` consecutive
//! engine failures (a forward that errors or panics) the model fails fast for
//! `open_ms`; then one probe request is let through (half-open): its success
//! closes the breaker, its failure opens it again. Client-side endings
//! (cancel, timeout, a vanished consumer) count neither way.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::control::config::CircuitBreakerConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug)]
enum Inner {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

#[derive(Debug)]
pub struct Breaker {
    cfg: CircuitBreakerConfig,
    inner: Mutex<(Inner, u64)>,
}

/// How a request was let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Normal,
    /// The half-open probe: its outcome decides the breaker's state.
    Probe,
}

/// How an admitted request ended, as far as the breaker is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    /// Ended by its client (cancel, timeout, gone): says nothing about the model.
    Neutral,
}

impl Breaker {
    pub fn new(cfg: CircuitBreakerConfig) -> Self {
        Breaker { cfg, inner: Mutex::new((Inner::Closed { failures: 0 }, 0)) }
    }

    /// Lets a request through, or says how long until the next probe.
    pub fn admit(&self, now: Instant) -> Result<Admission, Duration> {
        if !self.cfg.enabled {
            return Ok(Admission::Normal);
        }
        let mut g = self.inner.lock().unwrap();
        match g.0 {
            Inner::Closed { .. } => Ok(Admission::Normal),
            Inner::Open { until } if now < until => Err(until - now),
            Inner::Open { .. } | Inner::HalfOpen { probing: false } => {
                g.0 = Inner::HalfOpen { probing: true };
                g.1 += 1;
                Ok(Admission::Probe)
            }
            // One probe at a time; the others fail fast until it ends.
            Inner::HalfOpen { probing: true } => Err(Duration::ZERO),
        }
    }

    pub fn record(&self, admission: Admission, outcome: Outcome, now: Instant) {
        if !self.cfg.enabled {
            return;
        }
        let mut g = self.inner.lock().unwrap();
        let open = Inner::Open { until: now + Duration::from_millis(self.cfg.open_ms) };
        let next = match (&g.0, admission, outcome) {
            (_, Admission::Probe, Outcome::Success) => Inner::Closed { failures: 0 },
            (_, Admission::Probe, Outcome::Failure) => open,
            (_, Admission::Probe, Outcome::Neutral) => Inner::HalfOpen { probing: false },
            (Inner::Closed { failures }, Admission::Normal, Outcome::Failure) => {
                if failures + 1 >= self.cfg.failure_threshold {
                    open
                } else {
                    Inner::Closed { failures: failures + 1 }
                }
            }
            (Inner::Closed { .. }, Admission::Normal, Outcome::Success) => Inner::Closed { failures: 0 },
            // Stragglers admitted before the breaker opened change nothing.
            _ => return,
        };
        if std::mem::discriminant(&next) != std::mem::discriminant(&g.0) {
            g.1 += 1;
        }
        g.0 = next;
    }

    pub fn state(&self) -> BreakerState {
        match self.inner.lock().unwrap().0 {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// State changes since start.
    pub fn transitions(&self) -> u64 {
        self.inner.lock().unwrap().1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(CircuitBreakerConfig { enabled: true, failure_threshold: 3, open_ms: 1000 })
    }

    #[test]
    fn opens_after_consecutive_failures_probes_then_closes() {
        let b = breaker();
        let t = Instant::now();
        for _ in 0..2 {
            assert_eq!(b.admit(t), Ok(Admission::Normal));
            b.record(Admission::Normal, Outcome::Failure, t);
        }
        // A success in between resets the count.
        b.record(Admission::Normal, Outcome::Success, t);
        for _ in 0..3 {
            b.record(Admission::Normal, Outcome::Failure, t);
        }
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.admit(t + Duration::from_millis(400)), Err(Duration::from_millis(600)));
        // After open_ms: one probe, the rest fail fast while it runs.
        let later = t + Duration::from_millis(1000);
        assert_eq!(b.admit(later), Ok(Admission::Probe));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.admit(later), Err(Duration::ZERO));
        b.record(Admission::Probe, Outcome::Success, later);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.admit(later), Ok(Admission::Normal));
        assert_eq!(b.transitions(), 3);
    }

    #[test]
    fn a_failed_probe_reopens_and_a_neutral_one_lets_another_probe() {
        let b = breaker();
        let t = Instant::now();
        for _ in 0..3 {
            b.record(Admission::Normal, Outcome::Failure, t);
        }
        let t1 = t + Duration::from_secs(1);
        assert_eq!(b.admit(t1), Ok(Admission::Probe));
        b.record(Admission::Probe, Outcome::Neutral, t1);
        assert_eq!(b.admit(t1), Ok(Admission::Probe), "a cancelled probe says nothing");
        b.record(Admission::Probe, Outcome::Failure, t1);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.admit(t1 + Duration::from_millis(999)).is_err());
        // Client-side endings never open it.
        let c = breaker();
        for _ in 0..10 {
            c.record(Admission::Normal, Outcome::Neutral, t);
        }
        assert_eq!(c.state(), BreakerState::Closed);
    }

    #[test]
    fn disabled_never_refuses() {
        let b = Breaker::new(CircuitBreakerConfig { enabled: false, failure_threshold: 1, open_ms: 1000 });
        let t = Instant::now();
        b.record(Admission::Normal, Outcome::Failure, t);
        assert_eq!(b.admit(t), Ok(Admission::Normal));
    }
}
