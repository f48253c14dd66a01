//! Engine tests on a tiny random llama written by the tests themselves.

use super::*;
use crate::formats::gguf::MetaValue;
use crate::models::llama::tests::{tiny_llama_gguf, TinyLlama};
use crate::text::tokenizer::tests::tiny_tokenizer_metadata;

pub(super) fn tiny_engine() -> (Engine, tempfile::TempDir) {
    tiny_engine_with(RuntimeConfig::default())
}

pub(super) fn tiny_engine_with(config: RuntimeConfig) -> (Engine, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let md: Vec<(&'static str, MetaValue)> = tiny_tokenizer_metadata();
    let n_vocab = md.iter().find(|(k, _)| *k == "tokenizer.ggml.tokens").unwrap().1.as_array().unwrap().len();
    let bytes = tiny_llama_gguf(&TinyLlama { vocab: n_vocab, dim: 64, n_layers: 2 }, md);
    std::fs::write(dir.path().join("tiny.gguf"), bytes).unwrap();
    let e = Engine::with_config(config);
    e.load_model(dir.path().join("tiny.gguf"), None).unwrap();
    (e, dir)
}

pub(super) fn req(input: Input) -> GenerateRequest {
    GenerateRequest { max_tokens: Some(8), ..GenerateRequest::new("tiny", input) }
}

pub(super) fn collect(mut h: RequestHandle) -> (Vec<u32>, String, Result<Stats, EngineError>) {
    collect_from(&mut h)
}

fn collect_from(h: &mut RequestHandle) -> (Vec<u32>, String, Result<Stats, EngineError>) {
    let (mut ids, mut text) = (vec![], String::new());
    while let Some(ev) = h.blocking_recv() {
        match ev {
            Event::Token { text: t, token_id, .. } => {
                ids.push(token_id);
                text.push_str(&t);
            }
            Event::ToolCall(_) => {}
            Event::Done(s) => return (ids, text, Ok(s)),
            Event::Error(e) => return (ids, text, Err(e)),
        }
    }
    panic!("stream ended without Done or Error");
}

#[test]
fn greedy_generation_is_deterministic_and_concurrent_streams_match_solo_runs() {
    let (e, _d) = tiny_engine();
    let solo = collect(e.submit(req(Input::Prompt("hello world".into()))).unwrap());
    assert_eq!(solo.2.as_ref().unwrap().n_generated_tokens, solo.0.len());
    let handles: Vec<_> = (0..4).map(|_| e.submit(req(Input::Prompt("hello world".into()))).unwrap()).collect();
    for h in handles {
        assert_eq!(collect(h).0, solo.0);
    }
}

#[test]
fn bad_input_gets_invalid_params_and_unknown_model_not_loaded() {
    let (e, _d) = tiny_engine();
    let mut r = req(Input::Prompt("x".into()));
    r.max_tokens = Some(0);
    assert_eq!(e.submit(r).err().unwrap().code(), "InvalidParams");
    let mut r = req(Input::Prompt("x".into()));
    r.sampling.temperature = f32::NAN;
    assert_eq!(e.submit(r).err().unwrap().code(), "InvalidParams");
    assert_eq!(e.submit(req(Input::Prompt("".into()))).err().unwrap().code(), "InvalidParams");
    assert_eq!(e.submit(req(Input::Tokens(vec![1_000_000]))).err().unwrap().code(), "InvalidParams");
    assert_eq!(e.submit(req(Input::Prompt("x ".repeat(300)))).err().unwrap().code(), "InvalidParams");
    let mut r = req(Input::Prompt("x".into()));
    r.model = "nope".into();
    assert_eq!(e.submit(r).err().unwrap().code(), "ModelNotLoaded");
    // The engine still works afterwards.
    assert!(collect(e.submit(req(Input::Prompt("hello".into()))).unwrap()).2.is_ok());
}

#[test]
fn cancel_and_timeout_end_a_stream_and_free_it() {
    let (e, _d) = tiny_engine();
    let mut r = req(Input::Prompt("hello".into()));
    r.max_tokens = Some(200);
    let h = e.submit(r.clone()).unwrap();
    h.canceller().cancel();
    drop(h);
    r.timeout_ms = Some(0);
    let (_, _, res) = collect(e.submit(r).unwrap());
    assert_eq!(res.unwrap_err().code(), "Timeout");
    for _ in 0..100 {
        if e.stats().n_running == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(e.stats().n_running, 0);
}

pub(super) fn config(f: impl FnOnce(&mut RuntimeConfig)) -> RuntimeConfig {
    let mut c = RuntimeConfig::default();
    f(&mut c);
    c
}

fn long(e: &Engine) -> RequestHandle {
    let mut r = req(Input::Prompt("hello".into()));
    r.max_tokens = Some(200);
    r.ignore_eos = true;
    e.submit(r).unwrap()
}

#[test]
fn past_max_batch_size_requests_wait_then_run() {
    let (e, _d) = tiny_engine_with(config(|c| c.batching.max_batch_size = 1));
    let a = long(&e);
    let b = long(&e);
    let mut saw_waiting = false;
    for _ in 0..200 {
        let s = e.stats();
        if s.n_running == 1 && s.n_waiting == 1 {
            saw_waiting = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(saw_waiting, "{:?}", e.stats());
    for _ in 0..200 {
        if e.stats().kv_bytes > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(e.stats().kv_bytes > 0);
    // Both finish: the waiting one runs once the first is done.
    assert_eq!(collect(a).2.unwrap().n_generated_tokens, 200);
    assert_eq!(collect(b).2.unwrap().n_generated_tokens, 200);
    assert_eq!(e.stats().n_waiting, 0);
    // Finished sequences give their KV cache back (the counter is
    // updated just after the last event is sent).
    for _ in 0..200 {
        if e.stats().kv_bytes == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(e.stats().kv_bytes, 0);
}

#[test]
fn admission_refuses_past_max_concurrent_streams_and_caps_max_tokens() {
    let (e, _d) = tiny_engine_with(config(|c| {
        c.streaming.max_concurrent_streams = 2;
        c.streaming.max_tokens = Some(300);
    }));
    let (a, b) = (long(&e), long(&e));
    assert_eq!(e.submit(req(Input::Prompt("x".into()))).err().unwrap().code(), "Overloaded");
    drop(a);
    drop(b);
    // Cancelled jobs leave flight once the worker drops them.
    let mut admitted = None;
    for _ in 0..200 {
        if let Ok(h) = e.submit(req(Input::Prompt("x".into()))) {
            admitted = Some(h);
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(collect(admitted.expect("never admitted again")).2.is_ok());
    let mut r = req(Input::Prompt("x".into()));
    r.max_tokens = Some(301);
    assert!(e.submit(r).err().unwrap().to_string().contains("streaming.maxTokens"));
}

#[test]
fn model_cache_evicts_the_least_recently_used_idle_model() {
    let (e, d) = tiny_engine_with(config(|c| c.model_cache.max_models = 2));
    let path = d.path().join("tiny.gguf");
    e.load_model(&path, Some("b".into())).unwrap();
    // "tiny" is older and idle: loading a third model evicts it.
    e.load_model(&path, Some("c".into())).unwrap();
    let ids: Vec<String> = e.list_models().into_iter().map(|m| m.id).collect();
    assert_eq!(ids, ["b", "c"]);
    // A model with a request in flight is never evicted.
    let mut rb = req(Input::Prompt("x".into()));
    rb.model = "b".into();
    rb.max_tokens = Some(200);
    rb.ignore_eos = true;
    let hb = e.submit(rb.clone()).unwrap();
    rb.model = "c".into();
    let hc = e.submit(rb).unwrap();
    assert_eq!(e.load_model(&path, Some("d".into())).unwrap_err().code(), "Overloaded");
    drop((hb, hc));
}

#[test]
fn model_cache_holds_under_concurrent_loads_evictions_and_generation() {
    let (e, d) = tiny_engine_with(config(|c| c.model_cache.max_models = 2));
    let e = Arc::new(e);
    let path = d.path().join("tiny.gguf");
    let want = collect(e.submit(req(Input::Prompt("hello".into()))).unwrap()).0;
    let ids = ["m0", "m1", "m2", "m3"];
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (e, path, want) = (e.clone(), path.clone(), want.clone());
            std::thread::spawn(move || {
                let (mut served, mut gone) = (0, 0);
                for round in 0..6 {
                    let id = ids[(t + round) % ids.len()];
                    // A load either succeeds (maybe returning the model another
                    // thread loaded) or finds every slot busy.
                    match e.load_model(&path, Some(id.into())) {
                        Ok(info) => assert_eq!(info.id, id),
                        Err(err) => assert_eq!(err.code(), "Overloaded", "{err}"),
                    }
                    let mut r = req(Input::Prompt("hello".into()));
                    r.model = id.into();
                    // The model may be evicted between load and submit, or
                    // while queued: that is ModelNotLoaded, never a wrong answer.
                    match e.submit(r).map(collect) {
                        Ok((ids, _, Ok(_))) => {
                            assert_eq!(ids, want);
                            served += 1;
                        }
                        Ok((_, _, Err(err))) | Err(err) => {
                            assert!(["ModelNotLoaded", "Overloaded", "Cancelled"].contains(&err.code()), "{err}");
                            gone += 1;
                        }
                    }
                }
                (served, gone)
            })
        })
        .collect();
    let served: usize = threads.into_iter().map(|t| t.join().unwrap().0).sum();
    assert!(served > 0);
    let loaded = e.list_models();
    assert!(loaded.len() <= 2, "{} models loaded with maxModels 2", loaded.len());
    // Loading a loaded model again returns the same model, and last access moves on use.
    let m = &loaded[0];
    let again = e.load_model(&path, Some(m.id.clone())).unwrap();
    assert_eq!(again.path, m.path);
    let before = e.model_info(&m.id).unwrap().last_access_ms;
    std::thread::sleep(Duration::from_millis(5));
    let mut r = req(Input::Prompt("x".into()));
    r.model = m.id.clone();
    assert!(collect(e.submit(r).unwrap()).2.is_ok());
    assert!(e.model_info(&m.id).unwrap().last_access_ms > before);
}

#[test]
fn chat_messages_use_the_template_and_unload_stops_the_model() {
    let (e, _d) = tiny_engine();
    let msgs = vec![ChatMessage::new("user", "hi")];
    assert!(e.apply_chat_template("tiny", &msgs).unwrap().ends_with("<|im_start|>assistant\n"));
    assert!(collect(e.submit(req(Input::Messages(msgs))).unwrap()).2.is_ok());
    assert_eq!(e.submit(req(Input::Messages(vec![]))).err().unwrap().code(), "InvalidParams");
    e.unload_model("tiny").unwrap();
    assert_eq!(e.unload_model("tiny").unwrap_err().code(), "ModelNotLoaded");
    assert!(e.list_models().is_empty());
}

/// Waits (briefly) until the worker has published a state that satisfies `ok`.
pub(super) fn wait_for(e: &Engine, ok: impl Fn(&EngineStats) -> bool) -> EngineStats {
    for _ in 0..500 {
        let s = e.stats();
        if ok(&s) {
            return s;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    e.stats()
}

pub(super) fn idle(s: &EngineStats) -> bool {
    s.n_running == 0 && s.n_waiting == 0 && s.kv_blocks_used == 0
}

fn greedy(prompt: &str, n: i64) -> GenerateRequest {
    let mut r = req(Input::Prompt(prompt.into()));
    r.max_tokens = Some(n);
    r.ignore_eos = true;
    r
}

#[test]
fn prefix_cache_hit_gives_the_cold_output_and_is_counted() {
    let (e, _d) = tiny_engine_with(config(|c| c.kv_cache.block_size = 4));
    let prompt = "hello world, this is a long shared prefix of several blocks; then a question";
    let cold = collect(e.submit(greedy(prompt, 12)).unwrap());
    let s0 = wait_for(&e, idle);
    assert!(s0.prefix_cache_queries > 0 && s0.prefix_cache_hits == 0, "{s0:?}");
    assert!(s0.kv_blocks_cached > 0, "finished blocks stay cached: {s0:?}");
    let warm = collect(e.submit(greedy(prompt, 12)).unwrap());
    assert_eq!(warm.0, cold.0);
    let s1 = wait_for(&e, idle);
    let n_prompt = cold.2.unwrap().n_prompt_tokens as u64;
    // All full blocks but the one holding the last prompt token are reused.
    assert_eq!(s1.prefix_cache_hits, (n_prompt - 1) / 4 * 4, "{s1:?}");
    // Another salt shares nothing, and still gives the same output.
    let mut salted = greedy(prompt, 12);
    salted.cache_salt = Some("tenant-b".into());
    assert_eq!(collect(e.submit(salted).unwrap()).0, cold.0);
    assert_eq!(wait_for(&e, idle).prefix_cache_hits, s1.prefix_cache_hits);
}

#[test]
fn kv_prefetch_fills_the_cache_for_waiting_requests_without_changing_outputs() {
    let prompt = "a waiting request with a prompt long enough to fill several cache blocks before it runs";
    let run = |prefetch: bool| {
        let (e, _d) = tiny_engine_with(config(|c| {
            c.kv_cache.block_size = 4;
            c.batching.max_batch_size = 1;
            c.scheduler.prefill_chunk = 64;
            c.scheduler.prefetch_waiting = prefetch;
        }));
        // One slot: a long generation holds it while the second request waits.
        let mut long = greedy("hello", 40);
        long.ignore_eos = true;
        let first = e.submit(long).unwrap();
        let waiting = e.submit(greedy(prompt, 12)).unwrap();
        let (first, waiting) = (collect(first), collect(waiting));
        assert!(first.2.is_ok() && waiting.2.is_ok());
        let s = wait_for(&e, idle);
        (waiting.0, s)
    };
    let (with, s_on) = run(true);
    let (without, s_off) = run(false);
    assert_eq!(with, without, "prefetching changes nothing in the output");
    assert_eq!(s_off.n_prefetched_tokens, 0);
    assert!(s_on.n_prefetched_tokens >= 4 && s_on.n_prefetched_tokens % 4 == 0, "{s_on:?}");
    // The prefetched blocks were found again when the request was scheduled.
    assert!(s_on.prefix_cache_hits >= s_on.n_prefetched_tokens, "{s_on:?}");
    assert!(s_off.prefix_cache_hits < s_on.prefix_cache_hits, "{s_off:?} vs {s_on:?}");
    assert_eq!(s_on.kv_blocks_used, 0);
}

#[test]
fn preemption_when_blocks_run_out_keeps_outputs_and_frees_every_block() {
    let prompts = ["hello", "world wide", "x y z", "a longer prompt here"];
    let (solo_e, _d0) = tiny_engine();
    let solo: Vec<_> = prompts.iter().map(|p| collect(solo_e.submit(greedy(p, 60)).unwrap()).0).collect();
    // 12 blocks of 16 positions: four sequences of ~65 positions need 20.
    let (e, _d) = tiny_engine_with(config(|c| {
        c.kv_cache.block_size = 16;
        c.kv_cache.memory_mib = (12 * 16 * 256) as f64 / 1048576.0;
    }));
    assert_eq!(e.stats().kv_blocks_total, 12);
    let handles: Vec<_> = prompts.iter().map(|p| e.submit(greedy(p, 60)).unwrap()).collect();
    for (h, want) in handles.into_iter().zip(&solo) {
        assert_eq!(&collect(h).0, want);
    }
    let s = wait_for(&e, idle);
    assert!(s.n_preemptions > 0, "{s:?}");
    assert!(idle(&s), "{s:?}");
}

#[test]
fn urgent_requests_jump_the_queue_and_background_waits() {
    let (e, _d) = tiny_engine_with(config(|c| c.batching.max_batch_size = 1));
    let first = long(&e);
    wait_for(&e, |s| s.n_running == 1);
    let mut bg = greedy("hello", 4);
    bg.priority = Priority::Background;
    let bg = e.submit(bg).unwrap();
    let mut urgent = greedy("hello", 4);
    urgent.priority = Priority::Urgent;
    let urgent = e.submit(urgent).unwrap();
    let (_, _, u) = collect(urgent);
    let (_, _, b) = collect(bg);
    // Both waited for `first`; the urgent one then ran first.
    assert!(u.unwrap().t_total_ms < b.unwrap().t_total_ms);
    drop(first);
}

#[test]
fn an_urgent_prompt_is_prefilled_before_a_background_one() {
    let (e, _d) = tiny_engine_with(config(|c| c.scheduler.prefill_chunk = 1));
    // The race this sets up (a ~225-step prefill against one short request)
    // is lost when the machine stalls this thread for the whole prefill; an
    // urgent request that waited behind the background one would lose it
    // every time.
    let won = (0..5).any(|_| {
        let mut bg = greedy(&"word ".repeat(75), 1);
        bg.priority = Priority::Background;
        let mut bg = e.submit(bg).unwrap();
        wait_for(&e, |s| s.n_running == 1);
        let mut urgent = greedy("hello", 1);
        urgent.priority = Priority::Urgent;
        let (_, _, u) = collect(e.submit(urgent).unwrap());
        assert!(u.is_ok());
        // Ended while the background prompt was still being prefilled: its first token is yet to come.
        let first = bg.try_recv().is_none();
        assert!(collect_from(&mut bg).2.is_ok());
        first
    });
    assert!(won, "the background request ran first in 5 tries");
}

#[test]
fn the_queue_is_bounded_in_requests_and_tokens() {
    let (e, _d) = tiny_engine_with(config(|c| {
        c.batching.max_batch_size = 1;
        c.scheduler.max_queued_requests = 2;
        c.scheduler.max_queued_tokens = 40;
    }));
    let running = long(&e);
    wait_for(&e, |s| s.n_running == 1);
    let q1 = e.submit(greedy("hello", 2)).unwrap();
    let err = e.submit(greedy(&"word ".repeat(45), 2)).err().unwrap();
    assert_eq!(err.code(), "Overloaded");
    assert!(err.to_string().contains("maxQueuedTokens"), "{err}");
    let q2 = e.submit(greedy("hello", 2)).unwrap();
    let err = e.submit(greedy("hello", 2)).err().unwrap();
    assert!(err.to_string().contains("maxQueuedRequests"), "{err}");
    drop(running);
    assert!(collect(q1).2.is_ok() && collect(q2).2.is_ok());
    assert!(idle(&wait_for(&e, idle)));
}

#[test]
fn a_consumer_that_stops_reading_pauses_only_its_own_stream() {
    let (e, _d) = tiny_engine_with(config(|c| c.scheduler.stream_buffer = 4));
    let mut slow = e.submit(greedy("hello", 100)).unwrap();
    // The other stream runs to the end while `slow` is never read.
    let fast = collect(e.submit(greedy("world", 50)).unwrap());
    assert_eq!(fast.0.len(), 50);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(slow.unread.load(Ordering::Relaxed), 4, "the worker stops at the buffer's size");
    assert_eq!(e.stats().n_running, 1, "paused, not dropped");
    // Reading resumes it, and it completes.
    let (ids, _, res) = collect_from(&mut slow);
    assert_eq!(ids.len(), 100);
    assert!(res.is_ok());
    assert!(idle(&wait_for(&e, idle)));
}

#[test]
fn cancelled_and_timed_out_requests_leave_no_blocks_in_use() {
    // A small stream buffer: unread requests pause after 4 tokens, so the
    // timed one is still running when its deadline passes, however fast
    // the host (200 tokens of the tiny model can take under 20 ms).
    let (e, _d) = tiny_engine_with(config(|c| c.scheduler.stream_buffer = 4));
    let handles: Vec<_> = (0..6).map(|_| long(&e)).collect();
    wait_for(&e, |s| s.n_running == 6 && s.kv_blocks_used > 0);
    let mut r = greedy("hello", 200);
    r.timeout_ms = Some(20);
    let timed = e.submit(r).unwrap();
    std::thread::sleep(Duration::from_millis(40));
    assert_eq!(collect(timed).2.unwrap_err().code(), "Timeout");
    drop(handles);
    let s = wait_for(&e, idle);
    assert!(idle(&s), "{s:?}");
    let h = e.latency_histograms();
    assert!(h.ttft.count >= 7 && h.itl.count > 0, "{h:?}");
}

#[test]
fn feature_flags_gate_the_prefix_cache_per_request_id() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flags.yaml");
    std::fs::write(
        &path,
        "phase5: {enabled: true, rollout_percentage: 100, hash_seed: p}\n\
         features:\n  ttft_pipeline: {enabled: true, rollout_percentage: 50, hash_seed: t, kv_prefetch: true}\n",
    )
    .unwrap();
    let (e, _d) = tiny_engine_with(config(|c| c.kv_cache.block_size = 4));
    let e = e.with_feature_flags(crate::control::flags::FlagStore::open(&path).unwrap());
    let flags = e.feature_flags().unwrap().current();
    let id_with = |on: bool| (0..).map(|i| format!("r{i}")).find(|id| flags.evaluate("ttft_pipeline.kv_prefetch", id).enabled == on).unwrap();
    let prompt = "hello world, this is a long shared prefix of several blocks";
    let run = |rid: String| {
        let mut r = greedy(prompt, 4);
        r.request_id = Some(rid);
        let out = collect(e.submit(r).unwrap());
        (out.0, out.2.unwrap().features)
    };
    // Baseline requests neither feed nor use the cache.
    let (base, f) = run(id_with(false));
    assert!(f.is_empty());
    let (again, _) = run(id_with(false));
    let s = wait_for(&e, idle);
    assert_eq!((s.prefix_cache_queries, s.prefix_cache_hits, s.kv_blocks_cached), (0, 0, 0), "{s:?}");
    // Phase 5 requests do, with the same output.
    let (p1, f) = run(id_with(true));
    assert_eq!(f, ["ttft_pipeline.kv_prefetch"]);
    let (p2, _) = run(id_with(true));
    assert!(wait_for(&e, idle).prefix_cache_hits > 0);
    assert!(base == again && again == p1 && p1 == p2);
    let counts = e.feature_flag_counts();
    assert_eq!(
        counts,
        [
            // Not in this file: off for everyone.
            ("batching.priority_scheduling".to_string(), false, 4),
            ("ttft_pipeline.kv_prefetch".to_string(), false, 2),
            ("ttft_pipeline.kv_prefetch".to_string(), true, 2),
            ("ttft_pipeline.speculative".to_string(), false, 4),
        ]
    );
}

#[test]
fn load_warms_up_and_pinned_prefixes_survive_eviction() {
    // 24 blocks of 4 positions.
    let (e, _d) = tiny_engine_with(config(|c| {
        c.kv_cache.block_size = 4;
        c.kv_cache.memory_mib = (24 * 4 * 256) as f64 / 1048576.0;
    }));
    assert!(e.model_info("tiny").unwrap().warmup_ms > 0.0);
    let system = "you are a helpful assistant who answers briefly";
    let mut pin = greedy(system, 1);
    pin.pin_prefix = true;
    collect(e.submit(pin).unwrap()).2.unwrap();
    let pinned = wait_for(&e, |s| s.kv_blocks_pinned > 0).kv_blocks_pinned;
    assert!(pinned >= 2, "{pinned}");
    // Other prompts churn through every unpinned block, evicting the rest of the cache.
    for i in 0..12 {
        collect(e.submit(greedy(&format!("unrelated prompt number {i} with some words"), 20)).unwrap()).2.unwrap();
    }
    let before = wait_for(&e, idle).prefix_cache_hits;
    collect(e.submit(greedy(&format!("{system} and more"), 2)).unwrap()).2.unwrap();
    let s = wait_for(&e, idle);
    assert!(s.prefix_cache_hits >= before + pinned as u64 * 4, "{s:?}");
    assert_eq!(s.kv_blocks_used, pinned, "pinned blocks stay referenced, nothing else: {s:?}");
}

#[test]
fn per_request_limits_give_invalid_params_naming_the_limit() {
    let (e, _d) = tiny_engine_with(config(|c| {
        c.limits.max_prompt_tokens = 20;
        c.limits.max_prompt_chars = 200;
        c.limits.max_messages = 2;
        c.limits.max_stop_sequences = 2;
        c.limits.max_stop_sequence_chars = 5;
        c.limits.max_stop_token_ids = 1;
    }));
    let msg = |role: &str| ChatMessage::new(role, "hi");
    let cases: Vec<(GenerateRequest, &str)> = vec![
        (req(Input::Tokens(vec![1; 21])), "limits.maxPromptTokens"),
        (req(Input::Prompt("word ".repeat(30))), "limits.maxPromptTokens"),
        (req(Input::Prompt("x".repeat(201))), "limits.maxPromptChars"),
        (req(Input::Messages(vec![msg("system"), msg("user"), msg("user")])), "limits.maxMessages"),
        (GenerateRequest { stop_sequences: vec!["a".into(), "b".into(), "c".into()], ..req(Input::Prompt("x".into())) }, "limits.maxStopSequences"),
        (GenerateRequest { stop_sequences: vec!["toolong".into()], ..req(Input::Prompt("x".into())) }, "limits.maxStopSequenceChars"),
        (GenerateRequest { stop_token_ids: vec![1, 2], ..req(Input::Prompt("x".into())) }, "limits.maxStopTokenIds"),
    ];
    for (r, key) in cases {
        let err = e.submit(r).err().unwrap();
        assert_eq!(err.code(), "InvalidParams");
        assert!(err.to_string().contains(key), "{err}");
    }
    assert!(collect(e.submit(req(Input::Prompt("hello".into()))).unwrap()).2.is_ok());
    assert!(idle(&wait_for(&e, idle)));
}

#[test]
fn the_circuit_breaker_opens_on_consecutive_failures_then_a_probe_closes_it() {
    let (e, _d) = tiny_engine_with(config(|c| {
        c.qos.circuit_breaker.failure_threshold = 3;
        c.qos.circuit_breaker.open_ms = 150;
    }));
    let counters = e.shared.models.lock().unwrap()["tiny"].counters.clone();
    counters.inject_failures.store(3, Ordering::Relaxed);
    for _ in 0..3 {
        assert_eq!(collect(e.submit(greedy("hello", 4)).unwrap()).2.unwrap_err().code(), "GenerationError");
    }
    // Open: fail fast, without running anything.
    let err = e.submit(greedy("hello", 4)).err().unwrap();
    assert_eq!(err.code(), "Overloaded");
    assert!(err.to_string().contains("circuit breaker"), "{err}");
    assert_eq!(e.stats().n_breakers_open, 1);
    // Cancelled and timed-out requests never counted: after open_ms one probe runs and closes it.
    std::thread::sleep(Duration::from_millis(200));
    assert!(collect(e.submit(greedy("hello", 4)).unwrap()).2.is_ok());
    let s = e.stats();
    assert_eq!(s.n_breakers_open, 0, "settled before the final event");
    assert_eq!(s.n_breaker_transitions, 3);
    assert!(collect(e.submit(greedy("hello", 4)).unwrap()).2.is_ok());
}

fn qos_policies(yaml: &str) -> RuntimeConfig {
    RuntimeConfig::from_yaml(&format!("qos:\n  cooldownMs: 0\n  recoverAfter: 1\n  policies:\n{yaml}")).unwrap()
}

#[test]
fn a_qos_policy_acts_on_the_running_engine_and_a_reload_lifts_it() {
    // Throughput below an unreachable bar: breached at the first evaluation.
    let shed = "    - {name: shed, metric: throughput_tps, op: below, threshold: 1.0e9, action: shed_background}\n";
    let small = "    - {name: small, metric: throughput_tps, op: below, threshold: 1.0e9, action: reduce_concurrency, factor: 0.01}\n";
    let (e, _d) = tiny_engine_with(qos_policies(&format!("{shed}{small}")));
    let background = || GenerateRequest { priority: Priority::Background, ..greedy("hello", 2) };
    assert!(collect(e.submit(background()).unwrap()).2.is_ok(), "nothing active yet");
    e.evaluate_control();
    let status = e.qos_status();
    assert!(status.enabled && !status.dry_run);
    assert_eq!(status.active_policies, ["shed", "small"]);
    assert_eq!((status.max_concurrent_streams, status.shedding_background), (1, true));
    let err = e.submit(background()).err().unwrap();
    assert_eq!(err.code(), "Overloaded");
    assert!(err.to_string().contains("QoS"), "{err}");
    // One stream in flight at most: a second concurrent request is refused.
    let first = e.submit(greedy("hello", 200)).unwrap();
    assert_eq!(e.submit(greedy("hello", 2)).err().unwrap().code(), "Overloaded");
    drop(first);
    let events = e.drain_control_events();
    assert_eq!(events.len(), 2);
    assert!(events.iter().all(|ev| matches!(ev, ControlEvent::Qos(q) if q.kind == crate::control::qos::EventKind::Fired)));

    // A reload without the policies lifts their actions at the next evaluation.
    assert!(e.reload_config(RuntimeConfig::default()).is_empty());
    e.evaluate_control();
    let status = e.qos_status();
    assert!(status.active_policies.is_empty() && !status.shedding_background);
    assert_eq!(status.max_concurrent_streams, RuntimeConfig::default().streaming.max_concurrent_streams);
    wait_for(&e, idle);
    assert!(collect(e.submit(background()).unwrap()).2.is_ok());
}

#[test]
fn a_dry_run_policy_reports_without_acting() {
    let mut cfg = qos_policies("    - {name: shed, metric: throughput_tps, op: below, threshold: 1.0e9, action: shed_background}\n");
    cfg.qos.dry_run = true;
    let (e, _d) = tiny_engine_with(cfg);
    e.evaluate_control();
    let events = e.drain_control_events();
    assert!(matches!(&events[..], [ControlEvent::Qos(q)] if q.dry_run && q.action == crate::control::qos::Action::ShedBackground));
    assert!(!e.qos_status().shedding_background);
    let r = GenerateRequest { priority: Priority::Background, ..greedy("hello", 2) };
    assert!(collect(e.submit(r).unwrap()).2.is_ok());
}

#[test]
fn reloading_reports_the_settings_that_wait_for_the_next_load() {
    let (e, _d) = tiny_engine();
    let mut c = RuntimeConfig::default();
    c.limits.max_stop_sequences = 1;
    c.kv_cache.memory_mib = 8.0;
    assert_eq!(e.reload_config(c), ["kv_cache"]);
    // The new limit applies to the next request at once.
    let r = GenerateRequest { stop_sequences: vec!["a".into(), "b".into()], ..greedy("hello", 2) };
    assert!(e.submit(r).err().unwrap().to_string().contains("limits.maxStopSequences"));
}

#[test]
fn a_canary_routes_by_request_id_and_rolls_back_when_its_candidate_fails() {
    let (e, d) = tiny_engine();
    e.load_model(d.path().join("tiny.gguf"), Some("candidate".into())).unwrap();
    let cfg = crate::control::canary::CanaryConfig {
        name: "tiny".into(),
        baseline: "tiny".into(),
        candidate: "candidate".into(),
        stages: vec![50.0, 100.0],
        // Latencies of a few milliseconds on a shared machine differ by more
        // than 1.5x between arms by chance; this test is about routing and
        // the crash trigger (the latency trigger has unit tests in canary.rs).
        triggers: crate::control::canary::Triggers { min_samples: 1, latency_p95_ratio: 1e9, ..Default::default() },
        ..Default::default()
    };
    assert_eq!(e.start_canary(cfg.clone()).unwrap().kind, "started");
    assert!(e.start_canary(cfg).is_err(), "one canary at a time");
    let routed = |rid: &str| {
        let r = GenerateRequest { request_id: Some(rid.into()), ..greedy("hello", 2) };
        collect(e.submit(r).unwrap()).2
    };
    // Sticky: the same id lands on the same arm every time.
    let arms: Vec<String> = (0..20).map(|i| routed(&format!("user-{i}")).unwrap().features.join(",")).collect();
    for i in 0..20 {
        assert_eq!(routed(&format!("user-{i}")).unwrap().features.join(","), arms[i]);
    }
    assert!(arms.iter().any(|a| a == "canary.candidate") && arms.iter().any(|a| a == "canary.baseline"), "{arms:?}");
    e.evaluate_control();
    let s = e.canary_status().unwrap();
    assert_eq!((s.state.as_str(), s.percent), ("running", 50.0));
    assert!(s.candidate_stats.requests > 0 && s.baseline_stats.requests > 0);

    // The candidate's model starts failing: the next evaluation rolls back.
    let cand = e.shared.models.lock().unwrap()["candidate"].counters.clone();
    cand.inject_failures.store(1, Ordering::Relaxed);
    let failing = (0..20).map(|i| format!("user-{i}")).find(|id| arms[id[5..].parse::<usize>().unwrap()] == "canary.candidate").unwrap();
    assert_eq!(routed(&failing).unwrap_err().code(), "GenerationError");
    e.evaluate_control();
    let s = e.canary_status().unwrap();
    assert_eq!((s.state.as_str(), s.percent), ("rolled_back", 0.0));
    assert!(s.reason.unwrap().contains("crash rate"));
    // Every request goes to the baseline now, and succeeds.
    for i in 0..20 {
        assert_eq!(routed(&format!("user-{i}")).unwrap().features, ["canary.baseline"]);
    }
    let kinds: Vec<&str> = e
        .drain_control_events()
        .iter()
        .filter_map(|ev| match ev {
            ControlEvent::Canary(c) => Some(c.kind),
            _ => None,
        })
        .collect();
    assert_eq!(kinds, ["started", "rolled_back"]);
    assert!(e.advance_canary().is_err(), "a rolled-back canary does not advance");
}

#[test]
fn the_batching_flag_gates_priority_classes_per_request_id() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flags.yaml");
    std::fs::write(
        &path,
        "phase5: {enabled: true, rollout_percentage: 100, hash_seed: p}\n\
         features:\n  batching: {enabled: true, rollout_percentage: 50, hash_seed: b, priority_scheduling: true}\n  \
         qos_policy: {enabled: true, rollout_percentage: 100, hash_seed: q, dry_run: false}\n",
    )
    .unwrap();
    let shed = "    - {name: shed, metric: throughput_tps, op: below, threshold: 1.0e9, action: shed_background}\n";
    let (e, _d) = tiny_engine_with(qos_policies(shed));
    let e = e.with_feature_flags(crate::control::flags::FlagStore::open(&path).unwrap());
    e.evaluate_control();
    assert!(e.qos_status().shedding_background);
    let flags = e.feature_flags().unwrap().current();
    let id_with = |on: bool| {
        (0..).map(|i| format!("r{i}")).find(|id| flags.evaluate("batching.priority_scheduling", id).enabled == on).unwrap()
    };
    let background = |rid: String| GenerateRequest { priority: Priority::Background, request_id: Some(rid), ..greedy("hello", 2) };
    // Inside the rollout the class applies (and is shed); outside it runs as `default`.
    assert_eq!(e.submit(background(id_with(true))).err().unwrap().code(), "Overloaded");
    let stats = collect(e.submit(background(id_with(false))).unwrap()).2.unwrap();
    assert!(stats.features.is_empty(), "{:?}", stats.features);
    let urgent = GenerateRequest { priority: Priority::Urgent, request_id: Some(id_with(true)), ..greedy("hello", 2) };
    assert_eq!(collect(e.submit(urgent).unwrap()).2.unwrap().features, ["batching.priority_scheduling"]);
}

#[test]
fn speculative_decoding_keeps_greedy_and_seeded_outputs_and_accepts_guesses() {
    let plain = tiny_engine().0;
    let (spec, _d) = tiny_engine_with(config(|c| {
        c.speculative.enabled = true;
        c.speculative.ngram_min = 1;
    }));
    let prompts = ["hello world hello world hello", "a b c a b c a b", "the cat the cat the", "x"];
    for p in prompts {
        for seed in [None, Some(7u64), Some(11)] {
            let mut r = greedy(p, 24);
            if let Some(s) = seed {
                r.sampling.temperature = 1.0;
                r.sampling.seed = Some(s);
            }
            let a = collect(plain.submit(r.clone()).unwrap());
            let b = collect(spec.submit(r).unwrap());
            assert_eq!(a.0, b.0, "prompt {p:?} seed {seed:?}");
            assert_eq!(a.1, b.1);
        }
    }
    let s = wait_for(&spec, idle);
    assert!(s.n_spec_drafted > 0, "{s:?}");
    assert!(s.n_spec_accepted > 0 && s.n_spec_accepted <= s.n_spec_drafted, "{s:?}");
    assert_eq!(plain.stats().n_spec_drafted, 0);
    // Several sequences at once (batch <= speculative.maxBatch) still match.
    let handles: Vec<_> = prompts.iter().map(|p| spec.submit(greedy(p, 24)).unwrap()).collect();
    for (p, h) in prompts.iter().zip(handles) {
        assert_eq!(collect(h).0, collect(plain.submit(greedy(p, 24)).unwrap()).0);
    }
    assert!(idle(&wait_for(&spec, idle)));
}

/// Writes a tiny llama with the test tokenizer (optionally edited) next to
/// the engine's model: a draft candidate for it.
fn tiny_draft(dir: &std::path::Path, name: &str, dim: usize, n_layers: usize, edit: impl FnOnce(&mut Vec<MetaValue>)) -> std::path::PathBuf {
    let mut md = tiny_tokenizer_metadata();
    let tokens = md.iter_mut().find(|(k, _)| *k == "tokenizer.ggml.tokens").unwrap();
    let MetaValue::Array(list) = &mut tokens.1 else { unreachable!() };
    edit(list);
    let n_vocab = list.len();
    let types = md.iter_mut().find(|(k, _)| *k == "tokenizer.ggml.token_type").unwrap();
    let MetaValue::Array(types) = &mut types.1 else { unreachable!() };
    types.resize(n_vocab, MetaValue::I32(1));
    let path = dir.join(format!("{name}.gguf"));
    std::fs::write(&path, tiny_llama_gguf(&TinyLlama { vocab: n_vocab, dim, n_layers }, md)).unwrap();
    path
}

pub(super) fn speculative_on() -> RuntimeConfig {
    config(|c| c.speculative.enabled = true)
}

#[test]
fn draft_model_keeps_greedy_output_alone_and_batched() {
    let plain = tiny_engine().0;
    let (spec, d) = tiny_engine_with(speculative_on());
    let draft = tiny_draft(d.path(), "small", 32, 1, |_| {});
    let info = spec.load_draft_model("tiny", &draft, None).unwrap();
    assert_eq!(info.id, "small");
    assert_eq!(spec.model_info("tiny").unwrap().draft_model.as_deref(), Some("small"));
    let prompts = ["hello world hello world hello", "a b c a b c a b", "the cat sat", "x"];
    for p in prompts {
        assert_eq!(collect(spec.submit(greedy(p, 24)).unwrap()).0, collect(plain.submit(greedy(p, 24)).unwrap()).0, "{p:?}");
    }
    let s = wait_for(&spec, idle);
    assert!(s.n_spec_drafted > 0 && s.n_spec_accepted <= s.n_spec_drafted, "{s:?}");
    let handles: Vec<_> = prompts.iter().map(|p| spec.submit(greedy(p, 24)).unwrap()).collect();
    for (p, h) in prompts.iter().zip(handles) {
        assert_eq!(collect(h).0, collect(plain.submit(greedy(p, 24)).unwrap()).0, "{p:?} batched");
    }

    // The primary as its own draft: nearly every greedy guess is kept
    // (the two can differ only where batch shapes round differently).
    spec.load_draft_model("tiny", d.path().join("tiny.gguf"), Some("self".into())).unwrap();
    let before = spec.stats();
    assert_eq!(collect(spec.submit(greedy("hello world", 40)).unwrap()).0, collect(plain.submit(greedy("hello world", 40)).unwrap()).0);
    let after = wait_for(&spec, idle);
    let (drafted, kept) = (after.n_spec_drafted - before.n_spec_drafted, after.n_spec_accepted - before.n_spec_accepted);
    assert!(drafted >= 30 && kept as f64 >= 0.9 * drafted as f64, "kept {kept} of {drafted}");

    // Detached: plain decoding again, and nothing left in the draft's cache.
    assert_eq!(spec.unload_draft_model(Some("self")).unwrap(), ["self"]);
    assert_eq!(spec.model_info("tiny").unwrap().draft_model, None);
    assert_eq!(collect(spec.submit(greedy("x", 8)).unwrap()).0, collect(plain.submit(greedy("x", 8)).unwrap()).0);
    assert!(spec.unload_draft_model(None).unwrap().is_empty());
    assert_eq!(spec.unload_draft_model(Some("nope")).unwrap_err().code(), "ModelNotLoaded");
}

/// Sampled output with a draft model keeps the primary's distribution: the
/// tokens at the positions that guesses decide (2nd to 4th) are compared
/// with plain sampling by a two-sample chi-square test.
#[test]
fn draft_model_sampling_keeps_the_primary_distribution() {
    let plain = tiny_engine().0;
    let (spec, d) = tiny_engine_with(speculative_on());
    spec.load_draft_model("tiny", tiny_draft(d.path(), "small", 32, 1, |_| {}), None).unwrap();
    let n = 1500;
    let run = |e: &Engine| {
        let mut out: Vec<Vec<u32>> = Vec::new();
        for wave in 0..n / 4 {
            let handles: Vec<_> = (0..4)
                .map(|j| {
                    let mut r = greedy("the cat", 4);
                    r.sampling.temperature = 0.8;
                    r.sampling.seed = Some((wave * 4 + j) as u64);
                    e.submit(r).unwrap()
                })
                .collect();
            out.extend(handles.into_iter().map(|h| collect(h).0));
        }
        out
    };
    let (a, b) = (run(&plain), run(&spec));
    let s = wait_for(&spec, idle);
    assert!(s.n_spec_drafted > 1000, "{s:?}");
    // Reject only what the rule should never do: few kept means the draft
    // disagrees, which is fine; the distribution test below is the check.
    for pos in 1..4 {
        let mut counts: HashMap<u32, (u64, u64)> = HashMap::new();
        for v in &a {
            counts.entry(v[pos]).or_default().0 += 1;
        }
        for v in &b {
            counts.entry(v[pos]).or_default().1 += 1;
        }
        // Cells with few samples are pooled so the chi-square approximation holds.
        let (mut cells, mut rest) = (Vec::new(), (0u64, 0u64));
        for (_, c) in counts {
            if c.0 + c.1 >= 20 {
                cells.push(c);
            } else {
                rest = (rest.0 + c.0, rest.1 + c.1);
            }
        }
        if rest.0 + rest.1 > 0 {
            cells.push(rest);
        }
        let (na, nb) = (a.len() as f64, b.len() as f64);
        let x2: f64 = cells
            .iter()
            .map(|&(x, y)| {
                let (x, y) = (x as f64, y as f64);
                let (ea, eb) = ((x + y) * na / (na + nb), (x + y) * nb / (na + nb));
                (x - ea).powi(2) / ea + (y - eb).powi(2) / eb
            })
            .sum();
        // 99.9th percentile of chi-square (Wilson-Hilferty approximation).
        let k = (cells.len() - 1) as f64;
        let crit = k * (1.0 - 2.0 / (9.0 * k) + 3.09 * (2.0 / (9.0 * k)).sqrt()).powi(3);
        assert!(x2 < crit, "token {pos}: chi-square {x2:.1} over {} cells (critical {crit:.1})", cells.len());
    }
}

#[test]
fn a_draft_must_share_the_vocabulary() {
    let (e, d) = tiny_engine_with(speculative_on());
    let bigger = tiny_draft(d.path(), "bigger", 32, 1, |t| t.push(MetaValue::Str("extra".into())));
    let err = e.load_draft_model("tiny", &bigger, None).unwrap_err();
    assert_eq!(err.code(), "InvalidParams");
    assert!(err.to_string().contains("vocabulary sizes differ"), "{err}");
    let renamed = tiny_draft(d.path(), "renamed", 32, 1, |t| t[0] = MetaValue::Str("<|end|>".into()));
    let err = e.load_draft_model("tiny", &renamed, None).unwrap_err();
    assert!(err.to_string().contains("differ at token 0"), "{err}");
    assert_eq!(e.model_info("tiny").unwrap().draft_model, None);
    assert_eq!(e.load_draft_model("nope", &renamed, None).unwrap_err().code(), "ModelNotLoaded");
    assert_eq!(e.load_draft_model("tiny", d.path().join("missing.gguf"), None).unwrap_err().code(), "ModelLoadError");

    // The report: a loaded model checked as a draft of another.
    e.load_model(&renamed, None).unwrap();
    e.load_model(tiny_draft(d.path(), "small", 32, 1, |_| {}), None).unwrap();
    let r = e.draft_compatibility("tiny", "renamed").unwrap();
    assert!(!r.compatible && r.errors.len() == 1, "{r:?}");
    let r = e.draft_compatibility("tiny", "small").unwrap();
    assert!(r.compatible && r.errors.is_empty() && r.warnings.is_empty(), "{r:?}");
    // The primary drafting for itself works but cannot be faster.
    let r = e.draft_compatibility("tiny", "tiny").unwrap();
    assert!(r.compatible && r.warnings.iter().any(|w| w.contains("not smaller")), "{r:?}");
    assert_eq!(e.draft_compatibility("tiny", "nope").unwrap_err().code(), "ModelNotLoaded");
}

#[test]
fn a_draft_catches_up_on_a_long_prompt_a_chunk_per_step() {
    let chunked = |spec: bool| {
        config(move |c| {
            c.scheduler.prefill_chunk = 8;
            c.speculative.enabled = spec;
        })
    };
    let plain = tiny_engine_with(chunked(false)).0;
    let (spec, d) = tiny_engine_with(chunked(true));
    spec.load_draft_model("tiny", tiny_draft(d.path(), "small", 32, 1, |_| {}), None).unwrap();
    let prompt = "hello world the cat sat on the mat ".repeat(3);
    let (a, b) = (collect(plain.submit(greedy(&prompt, 40)).unwrap()), collect(spec.submit(greedy(&prompt, 40)).unwrap()));
    assert_eq!(a.0, b.0);
    // The first steps only caught up; guesses came once the draft had the prompt.
    let s = wait_for(&spec, idle);
    assert!(s.n_spec_drafted > 0 && s.n_spec_drafted < 4 * 39, "{s:?}");
}

/// The `mlx` backend under the scheduler: concurrent streams, prefix-cache
/// hits, prefill in chunks across block boundaries and prompt-lookup
/// guesses (several tokens of a sequence per step) and a draft model all
/// give what each prompt gives alone on a fresh engine.
#[test]
fn the_mlx_backend_gives_solo_results_under_batching_prefix_hits_and_chunks() {
    if !mlx_serving_mlx::available() {
        assert!(std::env::var_os("MLX_REQUIRED").is_none(), "MLX_REQUIRED: {:?}", mlx_serving_mlx::unavailable_reason());
        return;
    }
    let (cpu, d) = tiny_engine_with(config(|c| {
        c.kv_cache.block_size = 4;
        c.scheduler.prefill_chunk = 8;
        c.speculative.enabled = true;
        c.speculative.ngram_min = 1;
    }));
    let e = Engine::with_config(cpu.config().as_ref().clone());
    let options = ModelOptions { backend: crate::backend::BackendKind::Mlx, ..Default::default() };
    assert_eq!(e.load_model_with(d.path().join("tiny.gguf"), None, options.clone()).unwrap().backend.name(), "mlx");
    // Same file, same id, other backend: refused, not silently shared.
    assert_eq!(cpu.load_model_with(d.path().join("tiny.gguf"), None, options).unwrap_err().code(), "InvalidParams");
    let prompts = ["hello world, a shared start of several blocks then one", "hello world, a shared start of several blocks then two", "hello", "world hello world hello world hello world"];
    let solo: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let fresh = Engine::with_config(e.config().as_ref().clone());
            fresh.load_model_with(d.path().join("tiny.gguf"), None, ModelOptions { backend: crate::backend::BackendKind::Mlx, ..Default::default() }).unwrap();
            collect(fresh.submit(greedy(p, 10)).unwrap()).0
        })
        .collect();
    let handles: Vec<_> = prompts.iter().map(|p| e.submit(greedy(p, 10)).unwrap()).collect();
    for (h, want) in handles.into_iter().zip(&solo) {
        let (got, _, result) = collect(h);
        assert_eq!(&got, want, "{result:?}");
    }
    // Again: now every prompt's full blocks come from the prefix cache.
    for (p, want) in prompts.iter().zip(&solo) {
        assert_eq!(&collect(e.submit(greedy(p, 10)).unwrap()).0, want);
    }
    let s = wait_for(&e, idle);
    assert!(s.prefix_cache_hits > 0 && s.n_spec_drafted > 0, "{s:?}");
    // A draft model (the model itself) runs on the primary's backend, with its own MLX cache.
    assert_eq!(e.load_draft_model("tiny", d.path().join("tiny.gguf"), Some("draft".into())).unwrap().backend.name(), "mlx");
    for (p, want) in prompts.iter().zip(&solo) {
        assert_eq!(&collect(e.submit(greedy(p, 10)).unwrap()).0, want);
    }
    assert!(wait_for(&e, idle).n_spec_drafted > s.n_spec_drafted);
}
