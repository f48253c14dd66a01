//! Its own test binary: MLX's memory counter is process-wide, so no other
//! test may hold MLX arrays while this one measures.

use std::path::Path;

use mlx_serving_engine::backend::BackendKind;
use mlx_serving_engine::engine::ModelOptions;
use mlx_serving_engine::{Engine, Event, GenerateRequest, Input};

/// A model on the `mlx` backend holds its weights (and, from the load-time
/// warmup on, its KV cache) in MLX memory, and unloading it after requests
/// (the second a prefix-cache hit) gives every byte back.
#[test]
fn unloading_an_mlx_model_gives_its_memory_back() {
    if !mlx_serving_mlx::available() {
        assert!(std::env::var_os("MLX_REQUIRED").is_none(), "MLX_REQUIRED is set but MLX is unavailable: {:?}", mlx_serving_mlx::unavailable_reason());
        return;
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        assert!(std::env::var_os("MLX_REQUIRED").is_none(), "the default model is missing: run scripts/setup.sh");
        return;
    }
    let before = mlx_serving_mlx::active_memory();
    let e = Engine::default();
    let info = e.load_model_with(&path, Some("m".into()), ModelOptions { backend: BackendKind::Mlx, ..Default::default() }).unwrap();
    let loaded = mlx_serving_mlx::active_memory();
    assert!(loaded >= before + info.weight_bytes, "weights live in MLX: {before} -> {loaded} bytes for {} of weights", info.weight_bytes);
    for _ in 0..2 {
        let mut r = GenerateRequest { max_tokens: Some(3), ..GenerateRequest::new("m", Input::Prompt("The capital of France is".into())) };
        r.ignore_eos = true;
        let mut h = e.submit(r).unwrap();
        let mut n = 0;
        while let Some(ev) = h.blocking_recv() {
            match ev {
                Event::Token { .. } => n += 1,
                Event::ToolCall(c) => panic!("no tools were offered: {c:?}"),
                Event::Done(_) => break,
                Event::Error(err) => panic!("{err}"),
            }
        }
        assert_eq!(n, 3);
    }
    e.unload_model("m").unwrap();
    assert_eq!(mlx_serving_mlx::active_memory(), before);
}
