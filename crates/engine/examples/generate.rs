//! Streams a greedy chat reply from a GGUF model and prints timing; handy for
//! profiling the engine without Node (`perf record cargo run --release
//! --example generate -- model.gguf "prompt" 128`).

use std::io::Write;

use mlx_serving_engine::chat::ChatMessage;
use mlx_serving_engine::{Engine, Event, GenerateRequest, Input};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let prompt = args.next().unwrap_or_else(|| "Write a short poem about the sea.".into());
    let max_tokens: i64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(128);
    // DRAFT=<model>: speculative decoding with that draft model.
    let draft = std::env::var_os("DRAFT");
    let mut config = mlx_serving_engine::config::RuntimeConfig::default();
    config.speculative.enabled = draft.is_some();
    let engine = Engine::with_config(config);
    let info = engine.load_model(&path, Some("m".into()))?;
    eprintln!("loaded {} ({}, {} MB of weights)", info.id, info.architecture, info.weight_bytes >> 20);
    if let Some(d) = draft {
        let d = engine.load_draft_model("m", d, None)?;
        eprintln!("drafting with {} ({} MB)", d.id, d.weight_bytes >> 20);
    }
    let mut h = engine.submit(GenerateRequest {
        max_tokens: Some(max_tokens),
        ..GenerateRequest::new("m", Input::Messages(vec![ChatMessage { role: "user".into(), content: prompt }]))
    })?;
    while let Some(ev) = h.blocking_recv() {
        match ev {
            Event::Token { text, .. } => {
                print!("{text}");
                std::io::stdout().flush()?;
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
