//! Parity with mlx-lm: every fixture under `tests/fixtures/` is a tiny random
//! model of one architecture, saved as an MLX folder and (where llama.cpp has
//! the architecture) as a GGUF file with the same weights, with reference
//! logits that mlx-lm computed (`scripts/make_fixtures.py`). Each format must
//! give mlx-lm's logits within the tolerance below, for the whole prompt in
//! one forward pass and then token by token with the KV cache.
//!
//! Tolerance: with quantized weights our kernels quantize activations to int8
//! per block of 32 (as llama.cpp does) where mlx-lm keeps them in f32; on
//! these random models that moves logits by up to ~0.15 of their standard
//! deviation (measured: 0.04 to 0.15 by architecture). Dense weights take the
//! float path and agree to ~0.003. A real bug (rotary layout, a norm, a
//! default) shows as an error of 1 to 3 standard deviations: that is what the
//! tolerances below separate. GGUF and MLX forms of one fixture give the same
//! numbers, since both load into the same blocks and layout.
//!
//! Gemma 2's sliding window is wider than these sequences: mlx-lm attends
//! over the whole context, so the window is not what is compared here.
//!
//! The `mlx` backend runs each fixture too: on MLX folders it computes what
//! mlx-lm computes (float activations through MLX's own quantized matmul),
//! so it is held to a tolerance 10x tighter than our int8-activation
//! kernels, and its greedy tokens must be the `cpu` backend's.

use std::path::{Path, PathBuf};

use mlx_serving_engine::engine::kv::{BlockId, KvStore};
use mlx_serving_engine::backend::BackendKind;
use mlx_serving_engine::models::{open_on, BatchToken, Model};
use serde_json::Value;

/// Largest logit error allowed, as a fraction of the reference logits'
/// standard deviation, for quantized weights and for dense ones.
const REL_TOL_QUANTIZED: f32 = 0.25;
const REL_TOL_DENSE: f32 = 0.01;
/// The `mlx` backend on quantized weights (float activations, like mlx-lm).
const REL_TOL_MLX: f32 = 0.025;

/// Whether the `mlx` backend can run here; CI sets MLX_REQUIRED so it must.
fn have_mlx() -> bool {
    let ok = mlx_serving_mlx::available();
    assert!(ok || std::env::var_os("MLX_REQUIRED").is_none(), "MLX_REQUIRED is set but MLX is unavailable: {:?}", mlx_serving_mlx::unavailable_reason());
    ok
}

fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/fixtures")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("reference.json").is_file())
        .collect();
    v.sort();
    v
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn std_dev(x: &[f32]) -> f32 {
    let m = x.iter().sum::<f32>() / x.len() as f32;
    (x.iter().map(|v| (v - m) * (v - m)).sum::<f32>() / x.len() as f32).sqrt()
}

/// The largest error of `got` against `want`, relative to `want`'s spread.
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "vocabulary sizes differ");
    let d = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    d / std_dev(want).max(1e-6)
}

/// Gap between the two largest values.
fn margin(x: &[f32]) -> f32 {
    let mut v = x.to_vec();
    v.sort_by(|a, b| b.total_cmp(a));
    v[0] - v[1]
}

fn argmax(x: &[f32]) -> usize {
    x.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0
}

struct Checked {
    worst: f32,
    /// Top token after the prompt and after each decode step.
    tops: Vec<usize>,
    /// What failed, if anything.
    failure: Option<String>,
}

fn check(model: &dyn Model, reference: &Value, tol: f32, what: &str) -> Checked {
    let prompt: Vec<u32> = reference["prompt"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let greedy: Vec<u32> = reference["greedy"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let vocab = model.config().vocab_size;
    let block = 4;
    let n_blocks = (prompt.len() + greedy.len()).div_ceil(block) + 1;
    let table: Vec<BlockId> = (0..n_blocks as BlockId).rev().collect();
    let mut worst = 0.0f32;
    let mut failure = None;

    // The whole prompt in one forward pass.
    let mut kv: KvStore = model.new_kv_store(block, n_blocks);
    let batch: Vec<BatchToken> = prompt.iter().enumerate().map(|(pos, &token)| BatchToken { token, pos, seq: 0, logits: true }).collect();
    let logits = model.forward(&batch, &mut kv, &[&table]).unwrap();
    for (pos, want) in reference["prefill_logits"].as_array().unwrap().iter().enumerate() {
        let e = rel_err(&logits[pos * vocab..(pos + 1) * vocab], &floats(want));
        worst = worst.max(e);
        if e >= tol && failure.is_none() {
            failure = Some(format!("{what}: prompt position {pos}: logits off by {e:.4} of their spread (tolerance {tol})"));
        }
    }

    // Then mlx-lm's greedy continuation, one token at a time.
    let mut pos = prompt.len();
    let mut last = argmax(&logits[(prompt.len() - 1) * vocab..]);
    let mut tops = vec![last];
    for (step, want) in reference["decode_logits"].as_array().unwrap().iter().enumerate() {
        let want = floats(want);
        // Our top token must be mlx-lm's wherever mlx-lm's choice is clear.
        let prev: Vec<f32> = if step == 0 { floats(&reference["prefill_logits"][prompt.len() - 1]) } else { floats(&reference["decode_logits"][step - 1]) };
        if margin(&prev) > tol * std_dev(&prev) * 2.0 && last as u32 != greedy[step] && failure.is_none() {
            failure = Some(format!("{what}: greedy token {step} is {last}, mlx-lm's {}", greedy[step]));
        }
        let one = model.forward(&[BatchToken { token: greedy[step], pos, seq: 0, logits: true }], &mut kv, &[&table]).unwrap();
        let e = rel_err(&one, &want);
        worst = worst.max(e);
        if e >= tol && failure.is_none() {
            failure = Some(format!("{what}: decode step {step}: logits off by {e:.4} of their spread (tolerance {tol})"));
        }
        last = argmax(&one);
        tops.push(last);
        pos += 1;
    }
    Checked { worst, tops, failure }
}

#[test]
fn every_architecture_matches_mlx_lm_in_both_formats() {
    let all = fixtures();
    assert!(!all.is_empty(), "no fixtures found");
    let mut seen = Vec::new();
    let mut failures = Vec::new();
    for dir in all {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let reference: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        let config: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("mlx/config.json")).unwrap()).unwrap();
        let dense = config["quantization"].is_null();
        let tol = if dense { REL_TOL_DENSE } else { REL_TOL_QUANTIZED };
        for (format, path) in [("mlx", dir.join("mlx")), ("gguf", dir.join("model.gguf"))] {
            if !path.exists() {
                continue;
            }
            let opened = open_on(&path, BackendKind::Cpu).unwrap_or_else(|e| panic!("{name} ({format}): {e}"));
            let c = check(opened.model.as_ref(), &reference, tol, &format!("{name} ({format})"));
            eprintln!("{name:<14} {format:<5} cpu worst logit error {:.4} of the spread (tolerance {tol})", c.worst);
            failures.extend(c.failure);
            // The folder's model_type and the file's architecture (gemma3_text folders, gemma3 GGUF).
            seen.push(reference["model_type"].as_str().unwrap().to_owned());
            seen.push(opened.model.config().architecture.clone());
            if !have_mlx() {
                continue;
            }
            let on_mlx = open_on(&path, BackendKind::Mlx).unwrap_or_else(|e| panic!("{name} ({format}) on mlx: {e}"));
            let mlx_tol = if dense { REL_TOL_DENSE } else { REL_TOL_MLX };
            let m = check(on_mlx.model.as_ref(), &reference, mlx_tol, &format!("{name} ({format}) on mlx"));
            eprintln!("{name:<14} {format:<5} mlx worst logit error {:.4} of the spread (tolerance {mlx_tol})", m.worst);
            failures.extend(m.failure);
            // Same top token wherever the reference's choice is clear (near-ties
            // fall either way under the cpu kernels' int8 activations).
            let clear = |i: usize| {
                let r = if i == 0 { floats(reference["prefill_logits"].as_array().unwrap().last().unwrap()) } else { floats(&reference["decode_logits"][i - 1]) };
                margin(&r) > tol * std_dev(&r) * 2.0
            };
            if let Some(i) = (0..c.tops.len()).find(|&i| clear(i) && c.tops[i] != m.tops[i]) {
                failures.push(format!("{name} ({format}): top token {i} differs between backends: cpu {:?}, mlx {:?}", c.tops, m.tops));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    for arch in mlx_serving_engine::models::SUPPORTED {
        assert!(seen.iter().any(|s| s == arch), "no fixture covers {arch}");
    }
}
