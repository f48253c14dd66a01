use super::*;

fn settings(policies: &str) -> QosSettings {
    let s: QosSettings = serde_yaml_ng::from_str(&format!("policies:\n{policies}")).unwrap();
    s.validate().unwrap();
    s
}

#[test]
fn window_sums_the_last_seconds_and_forgets_old_ones() {
    let mut w = Window::default();
    w.ok(0, 100.0);
    w.error(5, false);
    w.error(9, true);
    w.ttft(9, 50.0);
    w.tokens(9, 30);
    let mut s = WindowSummary::default();
    w.summarize(10, 6, &mut s);
    assert_eq!((s.ok, s.errors, s.failures, s.tokens), (0, 2, 1, 30));
    assert_eq!(s.error_rate(), Some(1.0));
    assert_eq!(s.tokens_per_s(), 5.0);
    let mut all = WindowSummary::default();
    w.summarize(10, 11, &mut all);
    assert_eq!(all.requests(), 3);
    w.ok(MAX_WINDOW_S + 1, 1.0);
    assert_eq!(w.buckets.front().unwrap().sec, 5, "second 0 fell out of the window");
}

#[test]
fn percentile_is_nearest_rank() {
    let v: Vec<f32> = (1..=100).map(|x| x as f32).collect();
    assert_eq!(percentile(&v, 0.95), Some(95.0));
    assert_eq!(percentile(&v[..1], 0.95), Some(1.0));
    assert_eq!(percentile(&[], 0.95), None);
}

#[test]
fn fires_acts_and_restores_with_hysteresis_and_cooldown() {
    let cfg = QosSettings {
        cooldown_ms: 5000,
        recover_after: 2,
        hysteresis: 0.2,
        ..settings("  - {name: slow, metric: ttft_p95_ms, threshold: 500, action: reduce_batch, factor: 0.25}\n")
    };
    let mut ev = Evaluator::default();
    let run = |ev: &mut Evaluator, t: u64, v: f64| ev.evaluate(&cfg, t, false, |_, _, _| Some(v));
    assert!(run(&mut ev, 0, 400.0).is_empty());
    let e = run(&mut ev, 1000, 600.0);
    assert_eq!(e.len(), 1);
    assert_eq!((e[0].kind, e[0].action, e[0].value), (EventKind::Fired, Action::ReduceBatch, Some(600.0)));
    assert_eq!(ev.active(&cfg), [(Action::ReduceBatch, 0.25)]);
    let knobs = Knobs::default();
    knobs.apply(&ev.active(&cfg));
    assert_eq!(knobs.max_batch(32), 8);
    assert_eq!(knobs.max_streams(64), 64);
    // 450 is under the threshold but inside the 20% hysteresis band (> 400): stays active.
    for t in [2000, 3000, 4000, 5000, 6000, 7000] {
        assert!(run(&mut ev, t, 450.0).is_empty(), "t={t}");
    }
    // Healthy, but still cooling down (last change at 1000, cooldown 5000)? No: 8000 > 6000.
    assert!(run(&mut ev, 8000, 300.0).is_empty(), "first healthy evaluation");
    let e = run(&mut ev, 9000, 300.0);
    assert_eq!(e[0].kind, EventKind::Restored);
    assert!(ev.active(&cfg).is_empty());
    knobs.apply(&ev.active(&cfg));
    assert_eq!(knobs.max_batch(32), 32);
    // Breached again inside the cooldown: suppressed once, then fires when it ends.
    let e = run(&mut ev, 10_000, 900.0);
    assert_eq!(e[0].kind, EventKind::Suppressed);
    assert!(run(&mut ev, 11_000, 900.0).is_empty(), "reported once per breach");
    assert_eq!(run(&mut ev, 14_000, 900.0)[0].kind, EventKind::Fired);
}

#[test]
fn restoring_needs_consecutive_healthy_evaluations() {
    let cfg = QosSettings {
        cooldown_ms: 0,
        recover_after: 3,
        ..settings("  - {name: q, metric: queue_depth, threshold: 10, action: shed_background}\n")
    };
    let mut ev = Evaluator::default();
    let mut run = |t: u64, v: f64| ev.evaluate(&cfg, t, false, |_, _, _| Some(v)).first().map(|e| e.kind);
    assert_eq!(run(0, 20.0), Some(EventKind::Fired));
    assert_eq!(run(1, 0.0), None);
    assert_eq!(run(2, 0.0), None);
    assert_eq!(run(3, 20.0), None, "a relapse resets the streak");
    assert_eq!(run(4, 0.0), None);
    assert_eq!(run(5, 0.0), None);
    assert_eq!(run(6, 0.0), Some(EventKind::Restored));
}

#[test]
fn below_policies_and_missing_samples() {
    let cfg = QosSettings {
        cooldown_ms: 0,
        recover_after: 1,
        hysteresis: 0.0,
        ..settings("  - {name: slow-tps, metric: throughput_tps, op: below, threshold: 50, action: alert}\n")
    };
    let mut ev = Evaluator::default();
    assert!(ev.evaluate(&cfg, 0, false, |_, _, _| None).is_empty(), "no samples: nothing to judge");
    assert_eq!(ev.evaluate(&cfg, 1, false, |_, _, _| Some(10.0))[0].kind, EventKind::Fired);
    // No samples while active counts as healthy (the load is gone).
    assert_eq!(ev.evaluate(&cfg, 2, false, |_, _, _| None)[0].kind, EventKind::Restored);
}

#[test]
fn the_per_minute_cap_holds_actions_back_but_never_restores() {
    let cfg = QosSettings {
        cooldown_ms: 0,
        recover_after: 1,
        max_actions_per_minute: 2,
        ..settings(
            "  - {name: a, metric: queue_depth, threshold: 1, action: alert}\n  - {name: b, metric: kv_usage, threshold: 0.5, action: reduce_concurrency}\n",
        )
    };
    let mut ev = Evaluator::default();
    let mut high = true; // toggled between rounds
    let kinds = |ev: &mut Evaluator, t: u64, high: bool| -> Vec<(String, EventKind)> {
        ev.evaluate(&cfg, t, false, |m, _, _| Some(if !high { 0.0 } else if m == Metric::KvUsage { 0.9 } else { 5.0 }))
            .into_iter()
            .map(|e| (e.policy, e.kind))
            .collect()
    };
    assert_eq!(kinds(&mut ev, 0, high).len(), 2);
    high = false;
    assert!(kinds(&mut ev, 1000, high).iter().all(|(_, k)| *k == EventKind::Restored));
    high = true;
    let e = kinds(&mut ev, 2000, high);
    assert!(e.iter().all(|(_, k)| *k == EventKind::Suppressed), "{e:?}");
    // A minute after the first actions the cap has room again.
    let e = kinds(&mut ev, 61_000, high);
    assert!(e.iter().all(|(_, k)| *k == EventKind::Fired), "{e:?}");
}

#[test]
fn dry_run_reports_the_same_decisions() {
    let cfg = settings("  - {name: e, metric: error_rate, threshold: 0.1, action: shed_background, severity: critical}\n");
    let mut ev = Evaluator::default();
    let e = ev.evaluate(&cfg, 0, true, |_, _, _| Some(0.5));
    assert!(e[0].dry_run && e[0].kind == EventKind::Fired && e[0].severity == Severity::Critical);
}

#[test]
fn removed_policies_lift_their_actions() {
    let cfg = settings("  - {name: e, metric: error_rate, threshold: 0.1, action: shed_background}\n");
    let mut ev = Evaluator::default();
    ev.evaluate(&cfg, 0, false, |_, _, _| Some(0.5));
    assert_eq!(ev.active_policies(), ["e"]);
    let none = QosSettings::default();
    ev.evaluate(&none, 1, false, |_, _, _| Some(0.5));
    assert!(ev.active(&none).is_empty() && ev.active_policies().is_empty());
}

#[test]
fn bad_policies_name_the_field() {
    for (yaml, want) in [
        ("  - {name: x, metric: ttft_p95_ms, threshold: 1, action: alert, windowSeconds: 0}\n", "qos.policies[0].windowSeconds"),
        ("  - {name: x, metric: ttft_p95_ms, threshold: 1, action: reduce_batch, factor: 0}\n", "qos.policies[0].factor"),
        ("  - {name: x, metric: ttft_p95_ms, threshold: .nan, action: alert}\n", "qos.policies[0].threshold"),
        (
            "  - {name: x, metric: queue_depth, threshold: 1, action: alert}\n  - {name: x, metric: kv_usage, threshold: 1, action: alert}\n",
            "qos.policies[1].name",
        ),
    ] {
        let s: QosSettings = serde_yaml_ng::from_str(&format!("policies:\n{yaml}")).unwrap();
        let err = s.validate().unwrap_err();
        assert!(err.contains(want), "{err}");
    }
}
