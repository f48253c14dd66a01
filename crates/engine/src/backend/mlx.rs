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
}
