//! The load / generate / abort / unload cycle in one short test, run under
//! valgrind by `scripts/leakcheck.sh` (which selects it by name): every
//! allocation a model, a request or a worker makes must be freed by the time
//! the engine is gone. Small on purpose: valgrind runs it ~50x slower.

use crate::text::chat::ChatMessage;
use crate::control::config::RuntimeConfig;
use crate::engine::{Engine, Event, GenerateRequest, Input, RequestHandle, Stats};
use crate::error::EngineError;
use crate::formats::gguf::MetaValue;
use crate::models::llama::tests::{tiny_llama_gguf, TinyLlama};
use crate::sampler::SamplingParams;
use crate::text::tokenizer::tests::tiny_tokenizer_metadata;

/// Reads a stream to its end: the tokens, then `Done`, `Error`, or `None`
/// when the worker dropped the request without a final event (abandoned).
fn drain(h: &mut RequestHandle) -> (usize, Option<Result<Stats, EngineError>>) {
    let mut n = 0;
    while let Some(ev) = h.blocking_recv() {
        match ev {
            Event::Token { .. } => n += 1,
            Event::ToolCall(_) => {}
            Event::Done(s) => return (n, Some(Ok(s))),
            Event::Error(e) => return (n, Some(Err(e))),
        }
    }
    (n, None)
}

fn req(input: Input, max_tokens: i64) -> GenerateRequest {
    GenerateRequest { max_tokens: Some(max_tokens), ..GenerateRequest::new("tiny", input) }
}

/// A stream that cannot finish on its own before it is aborted: the small
/// stream buffer pauses it after a few unread tokens.
fn long(e: &Engine) -> RequestHandle {
    let mut r = req(Input::Prompt("hello world".into()), 200);
    r.ignore_eos = true;
    let mut h = e.submit(r).unwrap();
    assert!(matches!(h.blocking_recv(), Some(Event::Token { .. })));
    h
}

fn generate(e: &Engine, r: GenerateRequest) -> Stats {
    let mut h = e.submit(r).unwrap();
    let (n, end) = drain(&mut h);
    let stats = end.expect("stream ended without a final event").unwrap();
    // One more event when a stop sequence's held-back text is flushed.
    assert!(n >= stats.n_generated_tokens);
    stats
}

#[test]
fn leak_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let md: Vec<(&'static str, MetaValue)> = tiny_tokenizer_metadata();
    let vocab = md.iter().find(|(k, _)| *k == "tokenizer.ggml.tokens").unwrap().1.as_array().unwrap().len();
    std::fs::write(&path, tiny_llama_gguf(&TinyLlama { vocab, dim: 64, n_layers: 2 }, md)).unwrap();

    let mut config = RuntimeConfig::default();
    // Memcheck shadows every byte of the KV pool: keep it small.
    config.kv_cache.memory_mib = 1.0;
    config.scheduler.stream_buffer = 2;
    let e = Engine::with_config(config);
    e.load_model(&path, None).unwrap();

    // To completion: greedy, sampled with alternatives and a stop sequence, chat.
    let mut r = req(Input::Prompt("hello world".into()), 16);
    r.ignore_eos = true;
    assert_eq!(generate(&e, r).n_generated_tokens, 16);
    for seed in 0..2 {
        let mut r = req(Input::Prompt("hello".into()), 12);
        r.sampling = SamplingParams { temperature: 0.9, top_k: 20, top_p: 0.9, seed: Some(seed), ..Default::default() };
        r.top_logprobs = 3;
        r.stop_sequences = vec!["lo w".into()];
        generate(&e, r);
    }
    let chat = vec![ChatMessage::new("user", "hello")];
    generate(&e, req(Input::Messages(chat), 8));

    // Cancelled mid-stream.
    let mut h = long(&e);
    h.canceller().cancel();
    assert!(!matches!(drain(&mut h).1, Some(Ok(_))));

    // A timeout that has passed before the request runs.
    let mut r = req(Input::Prompt("hello".into()), 8);
    r.timeout_ms = Some(0);
    let mut h = e.submit(r).unwrap();
    assert_eq!(drain(&mut h).1.unwrap().unwrap_err().code(), "Timeout");

    // Handles dropped unread: one still queued, one mid-stream.
    drop(e.submit(req(Input::Prompt("hello".into()), 8)).unwrap());
    drop(long(&e));

    // Unloaded with a stream in flight, then loaded again.
    let mut h = long(&e);
    e.unload_model("tiny").unwrap();
    assert!(!matches!(drain(&mut h).1, Some(Ok(_))));
    assert!(e.list_models().is_empty());
    e.load_model(&path, None).unwrap();
    generate(&e, req(Input::Prompt("hello world".into()), 8));

    e.shutdown();
    drop(e);
}
