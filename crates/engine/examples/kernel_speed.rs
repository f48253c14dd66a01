//! GEMV speed of each weight format on each instruction-set path, on a
//! 2048 x 2048 matrix (decode-sized): `cargo run --release --example kernel_speed`.
//! Prints GB/s of weight bytes read and the time per multiply.

use std::time::Instant;

use mlx_serving_engine::cpu::{matmul_with, Bytes, Isa, QMatrix};
use mlx_serving_engine::quant::{quantize_row, QType, QuantizedActs};

fn main() {
    let (rows, cols) = (2048, 2048);
    let mut s = 1u64;
    let mut rnd = move || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let w: Vec<f32> = (0..rows * cols).map(|_| rnd() * 0.05).collect();
    let x: Vec<f32> = (0..cols).map(|_| rnd()).collect();
    for qtype in [QType::Q4_0, QType::Q4_1, QType::Q5_0, QType::Q5_1, QType::Q8_0, QType::A8, QType::Q4_K, QType::Q5_K, QType::Q6_K] {
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
        let m = QMatrix { qtype, rows, cols, data: Bytes::Owned(data) };
        for isa in Isa::available() {
            let mut out = vec![0.0; rows];
            let mut xq = QuantizedActs::default();
            matmul_with(isa, &m, &x, &mut xq, &mut out);
            let n = 200;
            let t = Instant::now();
            for _ in 0..n {
                matmul_with(isa, &m, &x, &mut xq, &mut out);
            }
            let per = t.elapsed().as_secs_f64() / n as f64;
            println!("{:<7} {:<12} {:>8.1} us  {:>6.1} GB/s", qtype.name(), isa.name(), per * 1e6, m.n_bytes() as f64 / per / 1e9);
        }
    }
}
