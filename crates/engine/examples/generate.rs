//! Streams a greedy chat reply from a model and prints timing; handy for
//! profiling the engine without Node (`perf record cargo run --release
//! --example generate -- model.gguf "prompt" 128`).
//!
//! Environment: `BACKEND=cpu|mlx|auto`; `DRAFT=<model>` for speculative
//! decoding with that draft model; `STREAMS=N` sends N requests at once
//! (each its own reply to the prompt, end-of-generation ignored so each
//! makes `max_tokens`) and prints their aggregate tokens per second, the
//! continuous-batching figure, where Node is not at hand (a GPU host).

use std::io::Write;
use std::time::Instant;

use mlx_serving_engine::backend::BackendKind;
use mlx_serving_engine::text::chat::ChatMessage;
use mlx_serving_engine::engine::ModelOptions;
use mlx_serving_engine::{Engine, Event, GenerateRequest, Input};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let prompt = args.next().unwrap_or_else(|| "Write a short poem about the sea.".into());
    let max_tokens: i64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(128);
    let draft = std::env::var_os("DRAFT");
    let backend = BackendKind::parse(&std::env::var("BACKEND").unwrap_or_else(|_| "cpu".into()))?;
    let streams: usize = std::env::var("STREAMS").ok().map(|s| s.parse()).transpose()?.unwrap_or(1);
    let mut config = mlx_serving_engine::control::config::RuntimeConfig::default();
    config.speculative.enabled = draft.is_some();
    let engine = Engine::with_config(config);
    let info = engine.load_model_with(&path, Some("m".into()), ModelOptions { backend, ..Default::default() })?;
    eprintln!("loaded {} ({}, {} MB of weights, {} backend)", info.id, info.architecture, info.weight_bytes >> 20, info.backend.name());
    if let Some(d) = draft {
        let d = engine.load_draft_model("m", d, None)?;
        eprintln!("drafting with {} ({} MB)", d.id, d.weight_bytes >> 20);
    }
    let request = |content: String| GenerateRequest {
        max_tokens: Some(max_tokens),
        ignore_eos: streams > 1,
        ..GenerateRequest::new("m", Input::Messages(vec![ChatMessage::new("user", content)]))
    };
    if streams > 1 {
        // A warm-up reply first, so the timed streams do not pay for first use.
        let mut h = engine.submit(GenerateRequest { max_tokens: Some(2), ..request(prompt.clone()) })?;
        while h.blocking_recv().is_some() {}
        let t = Instant::now();
        let handles = (0..streams).map(|i| engine.submit(request(format!("{prompt} (reply {i})")))).collect::<Result<Vec<_>, _>>()?;
        let mut tokens = 0;
        for mut h in handles {
            while let Some(ev) = h.blocking_recv() {
                match ev {
                    Event::Done(s) => tokens += s.n_generated_tokens,
                    Event::Error(e) => return Err(e.into()),
                    Event::Token { .. } | Event::ToolCall(_) => {}
                }
            }
        }
        let secs = t.elapsed().as_secs_f64();
        println!("{streams} streams: {tokens} tokens in {secs:.2} s, aggregate {:.1} tok/s", tokens as f64 / secs);
        return Ok(());
    }
    let mut h = engine.submit(request(prompt))?;
    while let Some(ev) = h.blocking_recv() {
        match ev {
            Event::Token { text, reasoning, .. } => {
                print!("{reasoning}{text}");
                std::io::stdout().flush()?;
            }
            Event::ToolCall(c) => {
                if c.arguments.is_empty() {
                    print!("\n[tool call {}: {}] ", c.index, c.name);
                }
                print!("{}", c.arguments);
            }
            Event::Done(s) => {
                eprintln!(
                    "\n{} prompt tokens, {} generated, TTFT {:.1} ms, decode {:.1} tok/s ({:?})",
                    s.n_prompt_tokens, s.n_generated_tokens, s.t_first_token_ms, s.decode_tokens_per_s, s.finish_reason
                );
            }
            Event::Error(e) => return Err(e.into()),
        }
    }
    Ok(())
}
