//! Speed of each weight format on each instruction-set path, beside what the
//! machine can do: `cargo run --release --example kernel_speed [FORMAT ...]`.
//!
//! - The machine's read bandwidth: summing a 512 MiB buffer on every core
//!   (the ceiling for decode, which reads every weight byte once per step).
//! - GEMV (one token, decode) on 2048 x 2048 weights, from cache (the matrix
//!   fits in L3) and from memory (cycling through copies that do not), in
//!   microseconds and GB/s of weight bytes, each path on the layout it
//!   gets at load.
//! - GEMM of prompts (or batches) of 16 to 512 tokens on the same weights,
//!   in GFLOP/s: where the AMX tiles start to pay against the vectors.
//! - The worker pool's cost per parallel split, which every matmul and
//!   attention call of a forward pass pays once.

use std::time::Instant;

use mlx_serving_engine::backend::cpu::kernels::{matmul_with, read_bandwidth, Bytes, Isa, Layout, QMatrix};
use mlx_serving_engine::formats::quant::{quantize_row, QType, QuantizedActs};
use rayon::prelude::*;

/// Microseconds one parallel split costs beyond its work when made from
/// inside the pool, as the forward pass makes them: four tasks per thread,
/// each 5 us of busy work (a small decode matmul is about 25 us in all).
fn split_overhead() -> f64 {
    let task = std::time::Duration::from_micros(5);
    let threads = rayon::current_num_threads();
    rayon::scope(|_| {
        let n = 5_000;
        let t = Instant::now();
        for _ in 0..n {
            (0..threads * 4).into_par_iter().for_each(|_| {
                let t = Instant::now();
                while t.elapsed() < task {}
            });
        }
        let ideal = task.as_secs_f64() * 4.0;
        (t.elapsed().as_secs_f64() / n as f64 - ideal) * 1e6
    })
}

/// Tokens of the GEMMs (prompts, or batches of decode steps).
const GEMMS: [usize; 6] = [16, 32, 48, 64, 128, 512];
const PROMPT: usize = 512;

fn main() {
    let (rows, cols) = (2048, 2048);
    let mut s = 1u64;
    let mut rnd = move || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let w: Vec<f32> = (0..rows * cols).map(|_| rnd() * 0.05).collect();
    let x: Vec<f32> = (0..PROMPT * cols).map(|_| rnd()).collect();
    println!("machine: {} threads, read bandwidth {:.1} GB/s (all cores, 512 MiB)", rayon::current_num_threads(), read_bandwidth(512));
    println!("pool: {:.1} us per parallel split beyond its work (a decode step of a 30-layer model makes about 250)", split_overhead());
    println!("{:<7} {:<12} {:>12} {:>9} {:>12} {:>9}   GEMM GFLOP/s at {GEMMS:?} tokens", "format", "path", "GEMV cache", "GB/s", "GEMV memory", "GB/s");
    // Formats named on the command line (`Q4_0 Q6_K`), or all of them.
    let only: Vec<String> = std::env::args().skip(1).collect();
    let formats = [QType::Q4_0, QType::Q4_1, QType::Q5_0, QType::Q5_1, QType::Q8_0, QType::A8, QType::Q4_K, QType::Q5_K, QType::Q6_K];
    for qtype in formats.into_iter().filter(|q| only.is_empty() || only.iter().any(|o| o == q.name())) {
        let data: Vec<u8> = match qtype {
            // Formats only read from files: random bytes with small f16 scales.
            QType::Q4_K | QType::Q5_K | QType::Q6_K | QType::Q5_0 | QType::Q5_1 => (0..rows * qtype.row_bytes(cols))
                .map(|i| {
                    let at = i % qtype.block_bytes();
                    let d_at = if qtype == QType::Q6_K { 208 } else { 0 };
                    let has_min = matches!(qtype, QType::Q4_K | QType::Q5_K | QType::Q5_1);
                    if at == d_at + 1 || (has_min && at == 3) { 0x20 } else { (rnd() * 127.0 + 128.0) as u8 }
                })
                .collect(),
            _ => w.chunks(cols).flat_map(|r| quantize_row(qtype, r)).collect(),
        };
        // Enough copies to overflow a server's last-level cache (up to 260 MiB) twice.
        let copies = (512usize << 20).div_ceil(data.len());
        for isa in Isa::available() {
            // In the layout a model gets at load on this path.
            let layout = Layout::for_kernels(isa, qtype);
            let mats: Vec<QMatrix> = (0..copies).map(|_| QMatrix::new(qtype, rows, cols, Bytes::Owned(data.clone())).into_layout(layout)).collect();
            let m = &mats[0];
            let mut out = vec![0.0; PROMPT * rows];
            let mut xq = QuantizedActs::default();
            let x1 = &x[..cols];
            matmul_with(isa, m, x1, &mut xq, &mut out[..rows]);
            let time = |n: usize, f: &mut dyn FnMut(usize)| {
                let t = Instant::now();
                (0..n).for_each(&mut *f);
                t.elapsed().as_secs_f64() / n as f64
            };
            let cached = time(200, &mut |_| matmul_with(isa, m, x1, &mut xq, &mut out[..rows]));
            let n_mem = if isa == Isa::Scalar { copies } else { 4 * copies };
            let memory = time(n_mem, &mut |i| matmul_with(isa, &mats[i % copies], x1, &mut xq, &mut out[..rows]));
            let gemms: Vec<String> = GEMMS
                .iter()
                .map(|&n| {
                    let reps = if isa == Isa::Scalar { 1 } else { 5 * PROMPT / n };
                    let t = time(reps, &mut |_| matmul_with(isa, m, &x[..n * cols], &mut xq, &mut out[..n * rows]));
                    format!("{:>6.0}", 2.0 * (rows * cols * n) as f64 / t / 1e9)
                })
                .collect();
            let gb = |t: f64| m.n_bytes() as f64 / t / 1e9;
            println!(
                "{:<7} {:<12} {:>9.1} us {:>9.1} {:>9.1} us {:>9.1}   {}",
                qtype.name(),
                isa.name(),
                cached * 1e6,
                gb(cached),
                memory * 1e6,
                gb(memory),
                gemms.join(" ")
            );
        }
    }
}
