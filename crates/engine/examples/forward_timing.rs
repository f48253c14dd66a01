//! Times the model's forward pass alone (no engine, no sampling): prefill of
//! N prompt tokens and single-token decode steps, median of several runs.
//! `cargo run --release --example forward_timing -- model.gguf 512 [cpu|mlx] [cold]`
//!
//! `cold` reads 1 GiB before each prefill, so the weights come from DRAM
//! as they do after other work (another process, other tenants of a shared
//! L3) pushed them out: the case of a server's first request after a pause.
//! (Reads, not a `fill`: large fills use streaming stores that leave the
//! caches as they were.)

use std::time::Instant;

use mlx_serving_engine::backend::BackendKind;
use mlx_serving_engine::models::{open_on, BatchToken};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let n_prompt: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(512);
    let backend = BackendKind::parse(&args.next().unwrap_or_else(|| "cpu".into()))?;
    let evict = (args.next().as_deref() == Some("cold")).then(|| vec![1u64; 1 << 27]);
    let runs = 5;
    let t = Instant::now();
    let m = open_on(path.as_ref(), backend)?.model;
    println!("loaded in {:.0} ms; kernels: {}", t.elapsed().as_secs_f64() * 1e3, mlx_serving_engine::backend::cpu::kernels::Isa::detect().name());
    if let Some(note) = mlx_serving_engine::backend::cpu::kernels::Isa::amx_note() {
        println!("amx: {note}");
    }
    let vocab = m.config().vocab_size as u32;
    let prompt: Vec<u32> = (0..n_prompt as u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let bs = 16;
        let n_blocks = (n_prompt + 32).div_ceil(bs);
        let mut kv = m.new_kv_store(bs, n_blocks);
        let table: Vec<u32> = (0..n_blocks as u32).collect();
        let batch: Vec<_> =
            prompt.iter().enumerate().map(|(pos, &token)| BatchToken { token, pos, seq: 0, logits: pos + 1 == n_prompt }).collect();
        if let Some(buf) = &evict {
            std::hint::black_box(buf.iter().fold(0u64, |a, &v| a.wrapping_add(v)));
        }
        let t = Instant::now();
        rayon::scope(|_| m.forward(&batch, &mut kv, &[&table]))?;
        prefill.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        for i in 0..32 {
            let bt = BatchToken { token: (i * 31 + 5) % vocab, pos: n_prompt + i as usize, seq: 0, logits: true };
            rayon::scope(|_| m.forward(&[bt], &mut kv, &[&table]))?;
        }
        decode.push(32.0 / t.elapsed().as_secs_f64());
    }
    let temp = if evict.is_some() { "cold " } else { "" };
    println!("{}: {temp}prefill {n_prompt} tokens: {:.1} ms; decode after it: {:.1} tok/s (median of {runs})", backend.name(), median(prefill), median(decode));
    Ok(())
}
