//! Weights for the MLX backend: a loaded `QMatrix` as MLX arrays. Q4_0,
//! Q4_1, Q8_0 and MLX-A8 blocks are MLX affine groups of 32 already (the
//! mapping `convert.rs` writes to disk, `affine::blocks_to_affine`), so they
//! become `quantized_matmul` weights exactly; every other format (dense
//! floats, K-quants, Q5_x) is widened to float16 rows, as `convert` does.

use half::f16;
use mlx_serving_mlx::{Array, Dtype, MlxError, QuantizedWeight};

use crate::affine::blocks_to_affine;
use crate::cpu::QMatrix;
use crate::error::EngineError;
use crate::quant::QType;

/// One weight matrix (rows = output features) on the MLX side.
pub enum MlxMatrix {
    Quantized(QuantizedWeight),
    /// Float16, stored transposed-ready as `rows x cols`.
    Dense(Array),
}

fn mlx_error(e: MlxError) -> EngineError {
    EngineError::Internal(format!("mlx backend: {e}"))
}

impl MlxMatrix {
    pub fn from_qmatrix(w: &QMatrix) -> Result<MlxMatrix, EngineError> {
        if matches!(w.qtype, QType::Q4_0 | QType::Q4_1 | QType::Q8_0 | QType::A8) {
            let (mut words, mut scales, mut biases) = (Vec::new(), Vec::new(), Vec::new());
            let mut bits = 0;
            for r in 0..w.rows {
                let (b, wr, s, m) = blocks_to_affine(w.qtype, w.row(r), w.cols).map_err(EngineError::Internal)?;
                bits = b as usize;
                words.extend_from_slice(&wr);
                scales.extend(s.into_iter().map(f16::from_f32));
                biases.extend(m.into_iter().map(f16::from_f32));
            }
            let groups = w.cols / 32;
            let q = QuantizedWeight {
                w: Array::from_bytes(&words, Dtype::U32, &[w.rows, w.cols * bits / 32]).map_err(mlx_error)?,
                scales: Array::from_slice(&scales, &[w.rows, groups]).map_err(mlx_error)?,
                biases: Array::from_slice(&biases, &[w.rows, groups]).map_err(mlx_error)?,
                group_size: 32,
                bits,
            };
            return Ok(MlxMatrix::Quantized(q));
        }
        let mut row = vec![0f32; w.cols];
        let mut dense = Vec::with_capacity(w.rows * w.cols);
        for r in 0..w.rows {
            w.dequantize_row_into(r, &mut row);
            dense.extend(row.iter().map(|&v| f16::from_f32(v)));
        }
        Ok(MlxMatrix::Dense(Array::from_slice(&dense, &[w.rows, w.cols]).map_err(mlx_error)?))
    }

    /// `x @ W^T` for activations `x` of shape `(tokens, cols)`.
    pub fn matmul(&self, x: &Array) -> Result<Array, EngineError> {
        match self {
            MlxMatrix::Quantized(q) => q.matmul(x),
            MlxMatrix::Dense(w) => x.matmul(&w.transpose(&[1, 0]).map_err(mlx_error)?),
        }
        .map_err(mlx_error)
    }
}

/// One sequence's keys and values for every layer, as MLX arrays of shape
/// `(1, kv_heads, capacity, head_dim)` in float16, grown `step` positions at
/// a time and written in place with `slice_update` (MLX reuses the buffer
/// when nothing else holds it). Positions `0..len` hold data; a step
/// writes every layer's new positions, then `advance`s.
pub struct MlxKvCache {
    layers: Vec<Option<(Array, Array)>>,
    len: usize,
    cap: usize,
    kv_heads: usize,
    head_dim: usize,
    step: usize,
}

impl MlxKvCache {
    pub fn new(n_layers: usize, kv_heads: usize, head_dim: usize, step: usize) -> Self {
        MlxKvCache { layers: (0..n_layers).map(|_| None).collect(), len: 0, cap: 0, kv_heads, head_dim, step: step.max(1) }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes layer `layer`'s keys and values `(1, kv_heads, n, head_dim)`
    /// for positions `len..len + n`.
    pub fn write(&mut self, layer: usize, k: &Array, v: &Array) -> Result<(), EngineError> {
        let n = k.shape().get(2).copied().unwrap_or(0);
        let (h, d) = (self.kv_heads, self.head_dim);
        if k.shape() != [1, h, n, d] || v.shape() != [1, h, n, d] {
            return Err(EngineError::Internal(format!("kv write: expected (1, {h}, n, {d}), got {:?} and {:?}", k.shape(), v.shape())));
        }
        let need = self.len + n;
        let cap = need.div_ceil(self.step) * self.step;
        let slot = &mut self.layers[layer];
        let (mut ck, mut cv) = match slot.take() {
            Some(kv) => kv,
            None => (zeros(h, cap.max(self.cap), d)?, zeros(h, cap.max(self.cap), d)?),
        };
        let have = ck.shape()[2];
        if have < need {
            let more = zeros(h, cap - have, d)?;
            ck = mlx_serving_mlx::concatenate(&[&ck, &more], 2).map_err(mlx_error)?;
            cv = mlx_serving_mlx::concatenate(&[&cv, &more], 2).map_err(mlx_error)?;
        }
        let (start, stop) = ([0, 0, self.len, 0], [1, h, need, d]);
        let (k16, v16) = (k.astype(Dtype::F16).map_err(mlx_error)?, v.astype(Dtype::F16).map_err(mlx_error)?);
        ck = ck.slice_update(&k16, &start, &stop).map_err(mlx_error)?;
        cv = cv.slice_update(&v16, &start, &stop).map_err(mlx_error)?;
        self.cap = self.cap.max(ck.shape()[2]);
        *slot = Some((ck, cv));
        Ok(())
    }

    /// Counts the `n` positions every layer has written this step.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Attention of queries `(1, heads, n, head_dim)` at the last `n` of
    /// the `len` positions (after `advance`), each seeing itself and what
    /// came before (grouped-query heads share keys).
    pub fn attend(&self, layer: usize, q: &Array, scale: f32) -> Result<Array, EngineError> {
        let Some((k, v)) = &self.layers[layer] else {
            return Err(EngineError::Internal(format!("kv attend: layer {layer} holds nothing")));
        };
        let (h, d) = (self.kv_heads, self.head_dim);
        let keys = k.slice(&[0, 0, 0, 0], &[1, h, self.len, d]).map_err(mlx_error)?;
        let values = v.slice(&[0, 0, 0, 0], &[1, h, self.len, d]).map_err(mlx_error)?;
        let q16 = q.astype(Dtype::F16).map_err(mlx_error)?;
        mlx_serving_mlx::scaled_dot_product_attention(&q16, &keys, &values, scale, true).map_err(mlx_error)
    }
}

fn zeros(h: usize, n: usize, d: usize) -> Result<Array, EngineError> {
    Array::from_slice(&vec![f16::ZERO; h * n * d], &[1, h, n, d]).map_err(mlx_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::Bytes;
    use crate::quant::quantize_row;
    use crate::quant::tests::{rand_vec, random_k_row};

    /// MLX on the mapped weights computes what the dequantized weights
    /// compute in plain f64 (float activations on both sides, so the only
    /// difference is float16 activations inside MLX's kernels).
    #[test]
    fn every_format_maps_to_mlx_weights_with_the_same_values() {
        if !mlx_serving_mlx::available() {
            assert!(std::env::var_os("MLX_REQUIRED").is_none(), "MLX_REQUIRED: {:?}", mlx_serving_mlx::unavailable_reason());
            return;
        }
        let (rows, cols, n) = (24, 256, 3);
        let x = rand_vec(n * cols, 5);
        for qtype in [QType::Q4_0, QType::Q4_1, QType::Q8_0, QType::A8, QType::F16, QType::Q4_K, QType::Q6_K] {
            let row_of = |r: usize| match qtype {
                QType::Q4_K | QType::Q6_K => random_k_row(qtype, cols / qtype.block_size(), r as u64 + 11),
                _ => quantize_row(qtype, &rand_vec(cols, r as u64 + 11)),
            };
            let data: Vec<u8> = (0..rows).flat_map(row_of).collect();
            let w = QMatrix { qtype, rows, cols, data: Bytes::Owned(data) };
            let m = MlxMatrix::from_qmatrix(&w).unwrap();
            let exact = !matches!(qtype, QType::Q4_K | QType::Q6_K);
            assert_eq!(matches!(m, MlxMatrix::Quantized(_)), matches!(qtype, QType::Q4_0 | QType::Q4_1 | QType::Q8_0 | QType::A8));
            let got = m.matmul(&Array::from_slice(&x, &[n, cols]).unwrap()).unwrap().to_vec_f32().unwrap();
            let mut row = vec![0f32; cols];
            for r in 0..rows {
                w.dequantize_row_into(r, &mut row);
                for t in 0..n {
                    let terms = row.iter().zip(&x[t * cols..]).map(|(&a, &b)| a as f64 * b as f64);
                    let (want, magnitude) = terms.fold((0.0, 0.0), |(s, m), v| (s + v, m + v.abs()));
                    let g = got[t * rows + r] as f64;
                    // Exact formats: only summation order differs. Widened ones also
                    // round each weight to float16 (relative 2^-11).
                    let tol = if exact { 2e-3 * (1.0 + want.abs()) } else { magnitude / 2048.0 + 1e-3 };
                    assert!((g - want).abs() <= tol, "{qtype:?} row {r} token {t}: {g} vs {want}");
                }
            }
        }
    }

    /// Keys and values written in uneven steps across growth boundaries
    /// give the attention a plain computation over all of them gives.
    #[test]
    fn the_kv_cache_grows_and_attends_like_the_reference() {
        if !mlx_serving_mlx::available() {
            return;
        }
        let (heads, kv_heads, d, layers) = (4, 2, 16, 2);
        let mut cache = MlxKvCache::new(layers, kv_heads, d, 4);
        let (mut all_k, mut all_v): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (vec![Vec::new(); layers], vec![Vec::new(); layers]);
        let scale = 1.0 / (d as f32).sqrt();
        for (step, n) in [3usize, 1, 5, 1, 2].into_iter().enumerate() {
            let mut outs = Vec::new();
            for l in 0..layers {
                let seed = (step * 10 + l) as u64;
                // Values rounded to f16 up front, as the cache stores them.
                let r16 = |v: Vec<f32>| -> Vec<f32> { v.into_iter().map(|x| f16::from_f32(x).to_f32()).collect() };
                let (k, v, q) = (r16(rand_vec(kv_heads * n * d, seed)), r16(rand_vec(kv_heads * n * d, seed + 1000)), r16(rand_vec(heads * n * d, seed + 2000)));
                let arr = |x: &[f32], h: usize| Array::from_slice(x, &[1, h, n, d]).unwrap();
                cache.write(l, &arr(&k, kv_heads), &arr(&v, kv_heads)).unwrap();
                // Host copies as (head, position, dim), appended per head.
                for (store, new) in [(&mut all_k[l], &k), (&mut all_v[l], &v)] {
                    let old_len = store.len() / (kv_heads * d);
                    let mut merged = Vec::new();
                    for hh in 0..kv_heads {
                        merged.extend_from_slice(&store[hh * old_len * d..(hh + 1) * old_len * d]);
                        merged.extend_from_slice(&new[hh * n * d..(hh + 1) * n * d]);
                    }
                    *store = merged;
                }
                outs.push((l, q));
            }
            cache.advance(n);
            let len = cache.len();
            for (l, q) in outs {
                let got = cache.attend(l, &Array::from_slice(&q, &[1, heads, n, d]).unwrap(), scale).unwrap().to_vec_f32().unwrap();
                for hq in 0..heads {
                    let g = hq / (heads / kv_heads);
                    for i in 0..n {
                        let visible = len - n + i + 1;
                        let qi = &q[(hq * n + i) * d..][..d];
                        let s: Vec<f32> = (0..visible).map(|j| qi.iter().zip(&all_k[l][(g * len + j) * d..][..d]).map(|(a, b)| a * b).sum::<f32>() * scale).collect();
                        let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
                        let z: f32 = e.iter().sum();
                        for t in 0..d {
                            let want: f32 = e.iter().enumerate().map(|(j, w)| w / z * all_v[l][(g * len + j) * d + t]).sum();
                            let have = got[(hq * n + i) * d + t];
                            assert!((have - want).abs() < 1e-2, "step {step} layer {l} head {hq} pos {i} dim {t}: {have} vs {want}");
                        }
                    }
                }
            }
        }
        assert_eq!(cache.len(), 12);
    }
}
