//! Times MLX's affine quantized matmul for one token (a GEMV, as in decode)
//! and for a 64-token chunk (prefill), on whatever device MLX runs by default,
//! beside `examples/kernel_speed.rs` of the engine for the CPU kernels.
//!
//!   cargo run --release -p mlx-serving-mlx --example qmm_speed [-- 2048 2048]

use std::time::Instant;

use mlx_serving_mlx::*;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>().expect("sizes are integers"));
    let (rows, cols) = (args.next().unwrap_or(2048), args.next().unwrap_or(2048));
    println!("MLX {} (GPU: {}), W {rows}x{cols}", version().unwrap_or_default(), has_gpu());
    let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
    let w = Array::from_slice(&w, &[rows, cols])?;
    for (group, bits) in [(32, 4), (64, 4), (64, 8)] {
        let q = QuantizedWeight::quantize(&w, group, bits)?;
        eval(&[&q.w, &q.scales, &q.biases])?;
        for tokens in [1, 64] {
            let x = Array::from_slice(&vec![0.01f32; tokens * cols], &[tokens, cols])?;
            let mut times = Vec::new();
            for _ in 0..50 {
                let t = Instant::now();
                let y = q.matmul(&x)?;
                eval(&[&y])?;
                times.push(t.elapsed().as_secs_f64() * 1e6);
            }
            times.sort_by(f64::total_cmp);
            println!("{bits}-bit/{group}, {tokens:>2} token(s): median {:.0} us", times[times.len() / 2]);
        }
    }
    Ok(())
}
