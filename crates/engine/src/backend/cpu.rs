//! The `cpu` backend: our own kernels (`crate::cpu`) on host memory.
//! Activations are `Vec<f32>` rows reused across layers, weights stay in
//! their file format (`QMatrix`), and the KV cache is the host `KvStore`.

use half::f16;
use rayon::prelude::*;

use super::{AttnParams, Backend, Rope, R};
use crate::cpu::{dot_f32, f16_to_f32, matmul, QMatrix};
use crate::error::EngineError;
use crate::kv::{BlockId, KvStore};
use crate::models::decoder::{Activation, RopeStyle, MAX_GROUP, MAX_HEAD_DIM};
use crate::models::{ops, BatchToken};
use crate::quant::QuantizedActs;

pub struct Cpu;

pub struct CpuPass {
    batch: Vec<BatchToken>,
    xq: QuantizedActs,
    style: RopeStyle,
    head_dim: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Backend for Cpu {
    type Matrix = QMatrix;
    type Vector = Vec<f32>;
    type Tensor = Vec<f32>;
    type Pass = CpuPass;

    fn matrix(&self, m: QMatrix) -> Result<QMatrix, EngineError> {
        Ok(m)
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

    fn begin(&self, batch: &[BatchToken], rope: &Rope) -> Result<CpuPass, EngineError> {
        let (cos, sin) = rope.tables(batch);
        Ok(CpuPass { batch: batch.to_vec(), xq: QuantizedActs::default(), style: rope.style, head_dim: rope.head_dim, cos, sin })
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

    fn add_bias(&self, _: &mut CpuPass, x: &mut Vec<f32>, b: &Vec<f32>) -> R {
        x.chunks_exact_mut(b.len()).for_each(|r| ops::add_in_place(r, b));
        Ok(())
    }

    fn rope(&self, p: &mut CpuPass, x: &mut Vec<f32>, n_heads: usize) -> R {
        let hd = p.head_dim;
        let half = hd / 2;
        let (stride, pair) = match p.style {
            RopeStyle::Adjacent => (2, 1),
            RopeStyle::Half => (1, half),
        };
        for (t, row) in x.chunks_exact_mut(n_heads * hd).enumerate() {
            for i in 0..half {
                let (cos, sin) = (p.cos[t * half + i], p.sin[t * half + i]);
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
        attend(a, q, &p.batch, kv, tables, out);
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

/// Causal attention of every token over its sequence's cache. Work is
/// split by (token, KV head) so each cached key and value is converted
/// from f16 once for all the query heads that share it.
fn attend(a: &AttnParams, q: &[f32], batch: &[BatchToken], kv: &KvStore, tables: &[&[BlockId]], out: &mut [f32]) {
    let (hd, n_kv, layer) = (a.head_dim, a.n_kv_heads, a.layer);
    let group = a.n_heads / n_kv;
    let bs = kv.block_size();
    // Few tasks (decode of one or two sequences): split each KV head's
    // query heads apart too, so every core gets work; the shared key and
    // value rows are then widened once per query head instead of once.
    let split = if batch.len() * n_kv < 4 * crate::cpu::n_threads() { group } else { 1 };
    let gs = group / split;
    out.par_chunks_mut(gs * hd).enumerate().for_each_init(
        || (Vec::new(), vec![0.0f32; hd]),
        |(scores, row): &mut (Vec<f32>, Vec<f32>), (j, o)| {
            let (t, rem) = (j / (n_kv * split), j % (n_kv * split));
            let (kvh, sub) = (rem / split, rem % split);
            let bt = batch[t];
            let n_pos = bt.pos + 1;
            // Positions before `first` are outside the sliding window.
            let first = a.window.map_or(0, |w| n_pos.saturating_sub(w));
            let blocks = &tables[bt.seq][..n_pos.div_ceil(bs)];
            // Queries rounded to f16 like the f16 cache, as llama.cpp does.
            let mut qg = [0.0f32; MAX_HEAD_DIM * MAX_GROUP];
            let qg = &mut qg[..gs * hd];
            let q0 = (t * a.n_heads + kvh * group + sub * gs) * hd;
            for (d, &v) in qg.iter_mut().zip(&q[q0..q0 + gs * hd]) {
                *d = f16::from_f32(v).to_f32();
            }
            let off = kvh * hd;
            scores.clear();
            scores.resize(gs * n_pos, f32::NEG_INFINITY);
            for_each_position(kv, layer, blocks, first, n_pos, false, off, hd, |p, key| {
                f16_to_f32(key, row);
                for g in 0..gs {
                    let s = dot_f32(&qg[g * hd..(g + 1) * hd], row) * a.scale;
                    scores[g * n_pos + p] = match a.softcap {
                        Some(c) => c * (s / c).tanh(),
                        None => s,
                    };
                }
            });
            for g in 0..gs {
                let sg = &mut scores[g * n_pos + first..(g + 1) * n_pos];
                ops::softmax(sg);
                // Weights rounded to f16 too (llama.cpp multiplies them with f16 values).
                sg.iter_mut().for_each(|w| *w = f16::from_f32(*w).to_f32());
            }
            o.fill(0.0);
            for_each_position(kv, layer, blocks, first, n_pos, true, off, hd, |p, value| {
                f16_to_f32(value, row);
                for g in 0..gs {
                    let w = scores[g * n_pos + p];
                    o[g * hd..(g + 1) * hd].iter_mut().zip(row.iter()).for_each(|(a, &v)| *a += w * v);
                }
            });
        },
    );
}

/// Calls `f(position, row)` for positions `first..n_pos` of a sequence, with
/// the `hd` elements at `off` of each position's key (or value) row of `layer`.
#[allow(clippy::too_many_arguments)]
#[inline]
fn for_each_position(kv: &KvStore, layer: usize, blocks: &[BlockId], first: usize, n_pos: usize, values: bool, off: usize, hd: usize, mut f: impl FnMut(usize, &[f16])) {
    let bs = kv.block_size();
    for (bi, &b) in blocks.iter().enumerate().skip(first / bs) {
        let (k, v) = kv.block(layer, b);
        let rows = if values { v } else { k };
        let stride = rows.len() / bs;
        for slot in first.saturating_sub(bi * bs)..bs.min(n_pos - bi * bs) {
            f(bi * bs + slot, &rows[slot * stride + off..slot * stride + off + hd]);
        }
    }
}
