//! Canary rollout between two loaded models (arms): requests for the
//! canary's name go to the candidate when the MD5 bucket of their request id
//! (the feature-flag rule, with the canary's own seed) falls inside the
//! stage's percentage, else to the baseline; so a request id always lands on
//! the same arm within a stage, and arms only grow by whole buckets.
//!
//! Stages (1% -> 10% -> 50% -> 100% by default) advance by API, or on a
//! schedule once the candidate has served enough requests in the stage.
//! Every evaluation compares the arms over the current stage, and rolls back
//! (all traffic to the baseline) when any trigger fires: error rate above
//! `errorRateRatio` x the baseline's, P95 latency above `latencyP95Ratio` x
//! the baseline's, memory growing faster than `memoryGrowthPerHour`, or
//! crash rate (requests whose model failed) above `crashRate`.
//!
//! Pure state machine over `(time, arm statistics)`; the engine routes,
//! measures and calls it from its control thread.

use serde::Deserialize;

use crate::control::flags;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct Triggers {
    pub error_rate_ratio: f64,
    /// Error rates at or below this never trigger (one timeout in a hundred
    /// requests against a baseline with none is noise, not a regression).
    pub error_rate_floor: f64,
    pub latency_p95_ratio: f64,
    /// Fraction per hour, judged once the canary has run `memoryMinMs`.
    pub memory_growth_per_hour: f64,
    pub memory_min_ms: u64,
    pub crash_rate: f64,
    /// Requests each arm needs in the stage before the ratios are judged
    /// (crashes are judged from the first request).
    pub min_samples: u64,
}

impl Default for Triggers {
    fn default() -> Self {
        Triggers {
            error_rate_ratio: 2.0,
            error_rate_floor: 0.01,
            latency_p95_ratio: 1.5,
            memory_growth_per_hour: 0.2,
            memory_min_ms: 600_000,
            crash_rate: 0.001,
            min_samples: 20,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct CanaryConfig {
    /// The model id clients ask for.
    pub name: String,
    pub baseline: String,
    pub candidate: String,
    /// Percentages of traffic for the candidate, increasing, ending at 100.
    pub stages: Vec<f64>,
    pub hash_seed: String,
    /// Candidate requests a stage needs before it may advance.
    pub min_samples: u64,
    /// Advance automatically after this long in a stage (with enough
    /// samples); 0: only by API.
    pub stage_ms: u64,
    pub triggers: Triggers,
}

impl Default for CanaryConfig {
    fn default() -> Self {
        CanaryConfig {
            name: String::new(),
            baseline: String::new(),
            candidate: String::new(),
            stages: vec![1.0, 10.0, 50.0, 100.0],
            hash_seed: "canary-v1".into(),
            min_samples: 50,
            stage_ms: 0,
            triggers: Triggers::default(),
        }
    }
}

impl CanaryConfig {
    pub fn validate(&self) -> Result<(), String> {
        for (k, v) in [("name", &self.name), ("baseline", &self.baseline), ("candidate", &self.candidate)] {
            if v.is_empty() {
                return Err(format!("canary.{k}: must not be empty"));
            }
        }
        if self.baseline == self.candidate {
            return Err("canary.candidate: must differ from canary.baseline".into());
        }
        let ok = !self.stages.is_empty()
            && self.stages.iter().all(|p| p.is_finite() && *p > 0.0 && *p <= 100.0)
            && self.stages.windows(2).all(|w| w[0] < w[1])
            && *self.stages.last().unwrap() == 100.0;
        if !ok {
            return Err(format!("canary.stages: must increase, each above 0, ending at 100; got {:?}", self.stages));
        }
        let t = &self.triggers;
        for (k, v) in [
            ("errorRateRatio", t.error_rate_ratio),
            ("latencyP95Ratio", t.latency_p95_ratio),
            ("memoryGrowthPerHour", t.memory_growth_per_hour),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("canary.triggers.{k}: must be a positive number, got {v}"));
            }
        }
        for (k, v) in [("errorRateFloor", t.error_rate_floor), ("crashRate", t.crash_rate)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("canary.triggers.{k}: must be 0 to 1, got {v}"));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arm {
    Baseline,
    Candidate,
}

impl Arm {
    pub fn as_str(self) -> &'static str {
        match self {
            Arm::Baseline => "baseline",
            Arm::Candidate => "candidate",
        }
    }
}

/// One arm over the current stage.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ArmStats {
    pub requests: u64,
    pub errors: u64,
    /// Requests whose model failed (a forward that errored or panicked).
    pub failures: u64,
    pub latency_p95_ms: Option<f64>,
}

impl ArmStats {
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 { 0.0 } else { self.errors as f64 / self.requests as f64 }
    }
    pub fn crash_rate(&self) -> f64 {
        if self.requests == 0 { 0.0 } else { self.failures as f64 / self.requests as f64 }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum State {
    Running,
    /// Every stage passed: all traffic on the candidate.
    Promoted,
    RolledBack { reason: String },
}

impl State {
    pub fn as_str(&self) -> &'static str {
        match self {
            State::Running => "running",
            State::Promoted => "promoted",
            State::RolledBack { .. } => "rolled_back",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CanaryEvent {
    pub at_ms: u64,
    /// `started`, `advanced`, `promoted` or `rolled_back`.
    pub kind: &'static str,
    pub percent: f64,
    pub automatic: bool,
    pub reason: String,
}

#[derive(Debug)]
pub struct Canary {
    pub cfg: CanaryConfig,
    stage: usize,
    pub state: State,
    stage_started_ms: u64,
    started_ms: u64,
    /// Process memory beside the KV caches when the canary started.
    memory_start: Option<u64>,
}

impl Canary {
    pub fn start(cfg: CanaryConfig, now_ms: u64, memory: Option<u64>) -> (Canary, CanaryEvent) {
        let c = Canary { cfg, stage: 0, state: State::Running, stage_started_ms: now_ms, started_ms: now_ms, memory_start: memory };
        let ev = c.event(now_ms, "started", false, String::new());
        (c, ev)
    }

    /// The candidate's share of traffic now.
    pub fn percent(&self) -> f64 {
        match self.state {
            State::Running => self.cfg.stages[self.stage],
            State::Promoted => 100.0,
            State::RolledBack { .. } => 0.0,
        }
    }

    pub fn stage_started_ms(&self) -> u64 {
        self.stage_started_ms
    }

    /// The arm a request id goes to.
    pub fn route(&self, request_id: &str) -> Arm {
        if flags::includes(self.percent(), &self.cfg.hash_seed, request_id).0 {
            Arm::Candidate
        } else {
            Arm::Baseline
        }
    }

    pub fn model(&self, arm: Arm) -> &str {
        match arm {
            Arm::Baseline => &self.cfg.baseline,
            Arm::Candidate => &self.cfg.candidate,
        }
    }

    fn event(&self, at_ms: u64, kind: &'static str, automatic: bool, reason: String) -> CanaryEvent {
        CanaryEvent { at_ms, kind, percent: self.percent(), automatic, reason }
    }

    /// Moves to the next stage (or promotes after the last).
    pub fn advance(&mut self, now_ms: u64, automatic: bool) -> Result<CanaryEvent, String> {
        if self.state != State::Running {
            return Err(format!("the canary is {}, not running", self.state.as_str()));
        }
        if self.stage + 1 < self.cfg.stages.len() {
            self.stage += 1;
            self.stage_started_ms = now_ms;
            Ok(self.event(now_ms, "advanced", automatic, String::new()))
        } else {
            self.state = State::Promoted;
            Ok(self.event(now_ms, "promoted", automatic, String::new()))
        }
    }

    pub fn rollback(&mut self, now_ms: u64, reason: String, automatic: bool) -> Result<CanaryEvent, String> {
        if self.state != State::Running {
            return Err(format!("the canary is {}, not running", self.state.as_str()));
        }
        self.state = State::RolledBack { reason: reason.clone() };
        Ok(self.event(now_ms, "rolled_back", automatic, reason))
    }

    /// The first trigger that fires, if any.
    pub fn trigger(&self, now_ms: u64, base: &ArmStats, cand: &ArmStats, memory: Option<u64>) -> Option<String> {
        let t = &self.cfg.triggers;
        if cand.requests > 0 && cand.crash_rate() > t.crash_rate {
            return Some(format!(
                "crash rate {:.2}% above {:.2}% ({} of {} candidate requests failed in the model)",
                cand.crash_rate() * 100.0,
                t.crash_rate * 100.0,
                cand.failures,
                cand.requests
            ));
        }
        if cand.requests >= t.min_samples && base.requests >= t.min_samples {
            let (ce, be) = (cand.error_rate(), base.error_rate());
            if ce > t.error_rate_floor && ce > t.error_rate_ratio * be {
                return Some(format!(
                    "error rate {:.1}% above {}x the baseline's {:.1}%",
                    ce * 100.0,
                    t.error_rate_ratio,
                    be * 100.0
                ));
            }
            if let (Some(cl), Some(bl)) = (cand.latency_p95_ms, base.latency_p95_ms) {
                if cl > t.latency_p95_ratio * bl {
                    return Some(format!("P95 latency {cl:.0} ms above {}x the baseline's {bl:.0} ms", t.latency_p95_ratio));
                }
            }
        }
        let ran = now_ms.saturating_sub(self.started_ms);
        if let (Some(m0), Some(m)) = (self.memory_start, memory) {
            if ran >= t.memory_min_ms && m0 > 0 && ran > 0 {
                let per_hour = (m as f64 - m0 as f64) / m0 as f64 * 3_600_000.0 / ran as f64;
                if per_hour > t.memory_growth_per_hour {
                    return Some(format!(
                        "memory grew {:.0}% per hour ({} -> {} MiB), above {:.0}%",
                        per_hour * 100.0,
                        m0 >> 20,
                        m >> 20,
                        t.memory_growth_per_hour * 100.0
                    ));
                }
            }
        }
        None
    }

    /// One evaluation: roll back when a trigger fires, else advance when the
    /// stage's time is up and the candidate has enough samples.
    pub fn evaluate(&mut self, now_ms: u64, base: &ArmStats, cand: &ArmStats, memory: Option<u64>) -> Option<CanaryEvent> {
        if self.state != State::Running {
            return None;
        }
        if let Some(reason) = self.trigger(now_ms, base, cand, memory) {
            return self.rollback(now_ms, reason, true).ok();
        }
        let due = self.cfg.stage_ms > 0 && now_ms >= self.stage_started_ms + self.cfg.stage_ms;
        if due && cand.requests >= self.cfg.min_samples {
            return self.advance(now_ms, true).ok();
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> CanaryConfig {
        let c = CanaryConfig {
            name: "chat".into(),
            baseline: "a".into(),
            candidate: "b".into(),
            min_samples: 10,
            stage_ms: 1000,
            ..Default::default()
        };
        c.validate().unwrap();
        c
    }
    fn arm(requests: u64, errors: u64, failures: u64, p95: f64) -> ArmStats {
        ArmStats { requests, errors, failures, latency_p95_ms: Some(p95) }
    }

    #[test]
    fn routing_is_sticky_and_follows_the_stage_share() {
        let (mut c, ev) = Canary::start(cfg(), 0, None);
        assert_eq!((ev.kind, ev.percent), ("started", 1.0));
        let ids: Vec<String> = (0..10_000).map(|i| format!("req-{i}")).collect();
        let share = |c: &Canary| ids.iter().filter(|id| c.route(id) == Arm::Candidate).count();
        let at_1 = share(&c);
        assert!((50..=150).contains(&at_1), "{at_1}");
        let cand_at_1: Vec<&String> = ids.iter().filter(|id| c.route(id) == Arm::Candidate).collect();
        c.advance(10, false).unwrap();
        assert!((900..=1100).contains(&share(&c)));
        // Growing a stage only adds requests to the candidate.
        assert!(cand_at_1.iter().all(|id| c.route(id) == Arm::Candidate));
        c.advance(20, false).unwrap();
        let e = c.advance(30, false).unwrap();
        assert_eq!((e.kind, e.percent), ("advanced", 100.0));
        assert_eq!(share(&c), 10_000);
        assert_eq!(c.advance(40, false).unwrap().kind, "promoted");
        assert!(c.advance(50, false).is_err());
    }

    #[test]
    fn advances_on_schedule_only_with_enough_samples() {
        let (mut c, _) = Canary::start(cfg(), 0, None);
        let good = arm(100, 0, 0, 100.0);
        assert_eq!(c.evaluate(500, &good, &arm(50, 0, 0, 100.0), None), None, "stage not over");
        assert_eq!(c.evaluate(1500, &good, &arm(5, 0, 0, 100.0), None), None, "too few samples");
        let e = c.evaluate(1500, &good, &arm(10, 0, 0, 100.0), None).unwrap();
        assert_eq!((e.kind, e.percent, e.automatic), ("advanced", 10.0, true));
        assert_eq!(c.stage_started_ms(), 1500);
    }

    #[test]
    fn each_trigger_rolls_back() {
        let t = Triggers::default();
        let base = arm(100, 2, 0, 100.0);
        for (cand, memory, want) in [
            (arm(100, 5, 0, 100.0), None, "error rate 5.0% above 2x the baseline's 2.0%"),
            (arm(100, 0, 0, 160.0), None, "P95 latency 160 ms above 1.5x"),
            (arm(1, 0, 1, 100.0), None, "crash rate"),
            (arm(100, 0, 0, 100.0), Some(1300u64 << 20), "memory grew 30% per hour"),
        ] {
            let (mut c, _) = Canary::start(CanaryConfig { triggers: t.clone(), ..cfg() }, 0, Some(1000 << 20));
            let now = 3_600_000;
            let e = c.evaluate(now, &base, &cand, memory).expect(want);
            assert_eq!(e.kind, "rolled_back");
            assert!(e.reason.contains(want), "{} / {want}", e.reason);
            assert_eq!(c.percent(), 0.0);
            assert_eq!(c.route("anything"), Arm::Baseline);
            assert!(c.evaluate(now + 1, &base, &cand, memory).is_none(), "rolls back once");
        }
    }

    #[test]
    fn no_trigger_within_bounds_or_before_enough_samples() {
        let (mut c, _) = Canary::start(CanaryConfig { stage_ms: 0, ..cfg() }, 0, Some(1000));
        let base = arm(100, 2, 0, 100.0);
        assert_eq!(c.evaluate(10, &base, &arm(100, 4, 0, 150.0), Some(1000)), None, "exactly at the ratios");
        assert_eq!(c.evaluate(10, &base, &arm(19, 19, 0, 900.0), None), None, "19 samples: not judged yet");
        assert_eq!(c.evaluate(10, &arm(100, 0, 0, 100.0), &arm(100, 1, 0, 100.0), None), None, "1% is at the floor");
        assert_eq!(c.evaluate(60_000, &base, &arm(100, 0, 0, 100.0), Some(5000)), None, "memory judged after memoryMinMs");
        assert_eq!(c.state, State::Running);
    }

    #[test]
    fn manual_rollback_and_bad_configs() {
        let (mut c, _) = Canary::start(cfg(), 0, None);
        let e = c.rollback(5, "operator".into(), false).unwrap();
        assert_eq!((e.kind, e.automatic, e.reason.as_str()), ("rolled_back", false, "operator"));
        assert!(c.rollback(6, "again".into(), false).is_err());
        for (bad, want) in [
            (CanaryConfig { stages: vec![10.0, 5.0, 100.0], ..cfg() }, "canary.stages"),
            (CanaryConfig { stages: vec![1.0, 50.0], ..cfg() }, "canary.stages"),
            (CanaryConfig { candidate: "a".into(), ..cfg() }, "canary.candidate"),
            (CanaryConfig { name: String::new(), ..cfg() }, "canary.name"),
        ] {
            assert!(bad.validate().unwrap_err().contains(want));
        }
    }
}
