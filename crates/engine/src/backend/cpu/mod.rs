//! The `cpu` backend: our own kernels (`crate::backend::cpu::kernels`) on host memory.
//! Activations are `Vec<f32>` rows reused across layers, weights stay in
//! their file format (`QMatrix`), and the KV cache is the host `KvStore`.

mod attention;
pub mod kernels;

use super::{AttnParams, Backend, Rope, R};
use crate::backend::cpu::kernels::{matmul, matmul_many, QMatrix};
use crate::error::EngineError;
use crate::engine::kv::{BlockId, KvStore};
use crate::models::decoder::{Activation, RopeStyle};
use crate::models::{ops, BatchToken};
use crate::formats::quant::QuantizedActs;

pub struct Cpu;

pub struct CpuPass {
    batch: Vec<BatchToken>,
    xq: QuantizedActs,
    style: RopeStyle,
    head_dim: usize,
    /// Each rope's `(cos, sin)` per token and pair.
    tables: Vec<(Vec<f32>, Vec<f32>)>,
}

impl Backend for Cpu {
    type Matrix = QMatrix;
    type Vector = Vec<f32>;
    type Tensor = Vec<f32>;
    type Pass = CpuPass;

    fn matrix(&self, m: QMatrix) -> Result<QMatrix, EngineError> {
        // The panels this machine's kernels read (`Layout::for_kernels`).
        Ok(m.into_panels())
    }

    fn vector(&self, v: Vec<f32>) -> Result<Vec<f32>, EngineError> {
        Ok(v)
    }

    fn matrix_bytes(m: &QMatrix) -> usize {
        m.n_bytes()
    }

    fn new_kv_store(&self, n_layers: usize, kv_dim: usize, block_size: usize, n_blocks: usize) -> KvStore {
        KvStore::new(n_layers, kv_dim, block_size, n_blocks)
    }

    fn begin(&self, batch: &[BatchToken], ropes: &[Rope]) -> Result<CpuPass, EngineError> {
        let first = ropes.first().ok_or_else(|| EngineError::Internal("a forward pass needs a rope".into()))?;
        let tables = ropes.iter().map(|r| r.tables(batch)).collect();
        Ok(CpuPass { batch: batch.to_vec(), xq: QuantizedActs::default(), style: first.style, head_dim: first.head_dim, tables })
    }

    fn embed(&self, p: &mut CpuPass, table: &QMatrix, scale: Option<f32>, out: &mut Vec<f32>) -> R {
        let dim = table.cols;
        out.resize(p.batch.len() * dim, 0.0);
        for (bt, row) in p.batch.iter().zip(out.chunks_exact_mut(dim)) {
            table.dequantize_row_into(bt.token as usize, row);
            if let Some(s) = scale {
                row.iter_mut().for_each(|v| *v *= s);
            }
        }
        Ok(())
    }

    fn rms_norm(&self, _: &mut CpuPass, x: &Vec<f32>, w: &Vec<f32>, eps: f32, out: &mut Vec<f32>) -> R {
        out.resize(x.len(), 0.0);
        ops::rms_norm(x, w, eps, out);
        Ok(())
    }

    fn rms_norm_in_place(&self, _: &mut CpuPass, x: &mut Vec<f32>, w: &Vec<f32>, eps: f32) -> R {
        ops::rms_norm_in_place(x, w, eps);
        Ok(())
    }

    fn linear(&self, p: &mut CpuPass, w: &QMatrix, x: &Vec<f32>, out: &mut Vec<f32>) -> R {
        out.resize(x.len() / w.cols * w.rows, 0.0);
        matmul(w, x, &mut p.xq, out);
        Ok(())
    }

    /// One quantization of `x` and one parallel split for all of them: a
    /// layer of a small model otherwise wakes the worker threads for each.
    fn linear_many<const N: usize>(&self, p: &mut CpuPass, ws: [&QMatrix; N], x: &Vec<f32>, mut outs: [&mut Vec<f32>; N]) -> R {
        for (w, out) in ws.iter().zip(outs.iter_mut()) {
            out.resize(x.len() / w.cols * w.rows, 0.0);
        }
        matmul_many(&ws, x, &mut p.xq, &mut outs.map(|o| o.as_mut_slice()));
        Ok(())
    }

    fn add_bias(&self, _: &mut CpuPass, x: &mut Vec<f32>, b: &Vec<f32>) -> R {
        x.chunks_exact_mut(b.len()).for_each(|r| ops::add_in_place(r, b));
        Ok(())
    }

    fn rope(&self, p: &mut CpuPass, x: &mut Vec<f32>, n_heads: usize, which: usize) -> R {
        let (cos_t, sin_t) = &p.tables[which];
        let hd = p.head_dim;
        let half = hd / 2;
        let (stride, pair) = match p.style {
            RopeStyle::Adjacent => (2, 1),
            RopeStyle::Half => (1, half),
        };
        for (t, row) in x.chunks_exact_mut(n_heads * hd).enumerate() {
            for i in 0..half {
                let (cos, sin) = (cos_t[t * half + i], sin_t[t * half + i]);
                for h in 0..n_heads {
                    let j = h * hd + stride * i;
                    let (a, b) = (row[j], row[j + pair]);
                    row[j] = a * cos - b * sin;
                    row[j + pair] = a * sin + b * cos;
                }
            }
        }
        Ok(())
    }

    fn attention(&self, p: &mut CpuPass, a: &AttnParams, q: &Vec<f32>, k: &Vec<f32>, v: &Vec<f32>, kv: &mut KvStore, tables: &[&[BlockId]], out: &mut Vec<f32>) -> R {
        let kv_dim = a.n_kv_heads * a.head_dim;
        for (t, bt) in p.batch.iter().enumerate() {
            kv.write(a.layer, tables[bt.seq], bt.pos, &k[t * kv_dim..(t + 1) * kv_dim], &v[t * kv_dim..(t + 1) * kv_dim]);
        }
        out.resize(q.len(), 0.0);
        attention::attend(a, q, &p.batch, kv, tables, out);
        Ok(())
    }

    fn activate(&self, _: &mut CpuPass, act: Activation, gate: &mut Vec<f32>, up: &Vec<f32>) -> R {
        match act {
            Activation::Silu => ops::silu_mul(gate, up),
            Activation::GeluTanh => ops::gelu_tanh_mul(gate, up),
        }
        Ok(())
    }

    fn add(&self, _: &mut CpuPass, x: &mut Vec<f32>, y: &Vec<f32>) -> R {
        ops::add_in_place(x, y);
        Ok(())
    }

    fn soft_cap(&self, _: &mut CpuPass, x: &mut Vec<f32>, cap: f32) -> R {
        x.iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
        Ok(())
    }

    fn zeros(&self, _: &mut CpuPass, rows: usize, width: usize, out: &mut Vec<f32>) -> R {
        out.clear();
        out.resize(rows * width, 0.0);
        Ok(())
    }

    fn select_rows(&self, _: &mut CpuPass, x: &Vec<f32>, rows: &[usize], width: usize, out: &mut Vec<f32>) -> R {
        out.clear();
        rows.iter().for_each(|&r| out.extend_from_slice(&x[r * width..(r + 1) * width]));
        Ok(())
    }

    fn add_rows_weighted(&self, _: &mut CpuPass, out: &mut Vec<f32>, y: &Vec<f32>, rows: &[usize], weights: &[f32], width: usize) -> R {
        for ((&r, &w), yr) in rows.iter().zip(weights).zip(y.chunks_exact(width)) {
            out[r * width..(r + 1) * width].iter_mut().zip(yr).for_each(|(o, &v)| *o += w * v);
        }
        Ok(())
    }

    fn to_host(&self, _: &mut CpuPass, x: Vec<f32>) -> Result<Vec<f32>, EngineError> {
        Ok(x)
    }

    fn finish(&self, _: CpuPass, _: &mut KvStore, logits: Option<Vec<f32>>) -> Result<Vec<f32>, EngineError> {
        Ok(logits.unwrap_or_default())
    }
}
