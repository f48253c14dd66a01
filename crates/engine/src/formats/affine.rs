//! MLX affine quantization and the kernels' block formats, both ways.
//!
//! MLX stores a row as `bits`-bit unsigned values `q`, packed into
//! little-endian `u32` words (element `j` of a word at bit `bits * j`), with a
//! scale and a bias per group of `group_size` columns: `w = scale * q + bias`.
//! Q4_1 is the same math on groups of 32 (`d`, `m` as f16; byte `j` holds
//! element `j` in its low nibble and `j + 16` in its high one), so 4-bit MLX
//! weights become Q4_1 exactly, and Q4_0 (`d * (q - 8)`) and Q8_0 (`d * q`,
//! signed) become MLX groups of 32 exactly.

use half::f16;

use crate::formats::quant::{QType, QK};

/// `v` as f16: exact, or rounded when `v` is below f16's normal range, or an
/// error. MLX gives an all-zero group the scale 1e-7, which bfloat16 folders
/// store with more bits than f16 keeps down there; rounding it moves a weight
/// by at most 2^-25 per step of its quantized value (every weight of such a
/// group is 0 either way), where refusing would refuse the model.
fn exact_f16(v: f32, what: &str) -> Result<f16, String> {
    let h = f16::from_f32(v);
    if h.to_f32() == v || (v.is_nan() && h.is_nan()) || v.abs() < f16::MIN_POSITIVE.to_f32() {
        Ok(h)
    } else {
        Err(format!("{what} {v:e} is not exactly representable in f16"))
    }
}

/// Value `j` of a row of packed words.
#[inline]
fn unpack(words: &[u8], bits: u32, j: usize) -> u8 {
    let per = 32 / bits as usize;
    let w = u32::from_le_bytes(words[(j / per) * 4..(j / per) * 4 + 4].try_into().unwrap());
    ((w >> (bits as usize * (j % per))) & ((1u32 << bits) - 1)) as u8
}

/// One MLX-quantized row (`cols` values) as kernel blocks: Q4_1 for 4-bit,
/// A8 for 8-bit.
pub fn affine_to_blocks(bits: u32, group_size: usize, words: &[u8], scales: &[f32], biases: &[f32], cols: usize) -> Result<(QType, Vec<u8>), String> {
    let qtype = match bits {
        4 => QType::Q4_1,
        8 => QType::A8,
        _ => return Err(format!("{bits}-bit MLX weights are not supported (4 and 8 bits are)")),
    };
    if group_size % QK != 0 || cols % group_size != 0 || words.len() * 8 != cols * bits as usize || scales.len() * group_size != cols || biases.len() != scales.len() {
        return Err(format!("{cols} columns in groups of {group_size} do not fit {} packed bytes and {} scales", words.len(), scales.len()));
    }
    let mut out = Vec::with_capacity(qtype.row_bytes(cols));
    for b in 0..cols / QK {
        let g = b * QK / group_size;
        out.extend_from_slice(&exact_f16(scales[g], "scale")?.to_le_bytes());
        out.extend_from_slice(&exact_f16(biases[g], "bias")?.to_le_bytes());
        if bits == 4 {
            for j in 0..QK / 2 {
                out.push(unpack(words, 4, b * QK + j) | (unpack(words, 4, b * QK + j + QK / 2) << 4));
            }
        } else {
            out.extend(words[b * QK..(b + 1) * QK].iter().map(|&q| q.wrapping_sub(128)));
        }
    }
    Ok((qtype, out))
}

/// One row of kernel blocks as MLX affine groups of 32: `(bits, packed
/// words, scales, biases)`. Exact for Q4_0, Q4_1 and Q8_0.
pub fn blocks_to_affine(qtype: QType, row: &[u8], cols: usize) -> Result<(u32, Vec<u8>, Vec<f32>, Vec<f32>), String> {
    let bb = qtype.block_bytes();
    if cols % QK != 0 || row.len() != qtype.row_bytes(cols) {
        return Err(format!("{cols} columns do not fill {} blocks", qtype.name()));
    }
    let d_at = |blk: &[u8], i: usize| f16::from_le_bytes([blk[i], blk[i + 1]]).to_f32();
    let (bits, values): (u32, Vec<u8>) = match qtype {
        QType::Q4_0 | QType::Q4_1 => (4, row.chunks_exact(bb).flat_map(|blk| {
            let qs = &blk[bb - QK / 2..];
            (0..QK).map(move |j| if j < QK / 2 { qs[j] & 0x0F } else { qs[j - QK / 2] >> 4 })
        }).collect()),
        // Signed bytes shifted to unsigned; the bias takes the shift back.
        QType::Q8_0 => (8, row.chunks_exact(bb).flat_map(|blk| blk[2..].iter().map(|&q| q.wrapping_add(128))).collect()),
        QType::A8 => (8, row.chunks_exact(bb).flat_map(|blk| blk[4..].iter().map(|&q| q.wrapping_add(128))).collect()),
        other => return Err(format!("{} has no exact MLX affine equivalent", other.name())),
    };
    let (mut scales, mut biases) = (Vec::new(), Vec::new());
    for blk in row.chunks_exact(bb) {
        let d = d_at(blk, 0);
        let bias = match qtype {
            QType::Q4_1 | QType::A8 => d_at(blk, 2),
            QType::Q4_0 => -8.0 * d,
            _ => -128.0 * d,
        };
        scales.push(d);
        biases.push(bias);
    }
    let per = 32 / bits as usize;
    let words = values
        .chunks(per)
        .flat_map(|c| c.iter().enumerate().fold(0u32, |w, (j, &q)| w | (q as u32) << (bits as usize * j)).to_le_bytes())
        .collect();
    Ok((bits, words, scales, biases))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::quant::tests::rand_vec;
    use crate::formats::quant::{dequantize_row, quantize_row};

    fn dequant_affine(bits: u32, group: usize, words: &[u8], scales: &[f32], biases: &[f32], cols: usize) -> Vec<f32> {
        (0..cols).map(|j| scales[j / group] * unpack(words, bits, j) as f32 + biases[j / group]).collect()
    }

    #[test]
    fn ggml_blocks_become_mlx_groups_with_the_same_values() {
        let cols = 128;
        let x = rand_vec(cols, 7);
        for qt in [QType::Q4_0, QType::Q4_1, QType::Q8_0, QType::A8] {
            let row = quantize_row(qt, &x);
            let (bits, words, scales, biases) = blocks_to_affine(qt, &row, cols).unwrap();
            let mut want = vec![0.0; cols];
            dequantize_row(qt, &row, &mut want);
            assert_eq!(dequant_affine(bits, 32, &words, &scales, &biases, cols), want, "{qt:?}");
            // And back: MLX groups are Q4_1 / A8 blocks, byte for byte.
            if matches!(qt, QType::Q4_1 | QType::A8) {
                assert_eq!(affine_to_blocks(bits, 32, &words, &scales, &biases, cols).unwrap(), (qt, row.clone()));
            }
        }
    }

    #[test]
    fn q8_0_and_its_a8_twin_multiply_identically() {
        use crate::backend::cpu::kernels::{matmul_with, Bytes, Isa, Layout, QMatrix};
        use crate::formats::quant::QuantizedActs;
        let (rows, cols) = (40, 96);
        let w = rand_vec(rows * cols, 3);
        let q8: Vec<u8> = w.chunks(cols).flat_map(|r| quantize_row(QType::Q8_0, r)).collect();
        let a8: Vec<u8> = q8
            .chunks(QType::Q8_0.row_bytes(cols))
            .flat_map(|r| {
                let (bits, words, s, b) = blocks_to_affine(QType::Q8_0, r, cols).unwrap();
                affine_to_blocks(bits, 32, &words, &s, &b, cols).unwrap().1
            })
            .collect();
        // In every layout the kernels read.
        for layout in Layout::ALL {
            let m8 = QMatrix::new(QType::Q8_0, rows, cols, Bytes::Owned(q8.clone())).into_layout(layout);
            let ma = QMatrix::new(QType::A8, rows, cols, Bytes::Owned(a8.clone())).into_layout(layout);
            for isa in Isa::available() {
                for n in 1..=9 {
                    let x = rand_vec(n * cols, n as u64);
                    let (mut o8, mut oa) = (vec![0.0; n * rows], vec![0.0; n * rows]);
                    matmul_with(isa, &m8, &x, &mut QuantizedActs::default(), &mut o8);
                    matmul_with(isa, &ma, &x, &mut QuantizedActs::default(), &mut oa);
                    assert_eq!(o8, oa, "{isa:?} n={n} {layout:?}");
                }
            }
        }
    }

    #[test]
    fn wider_groups_repeat_their_scale_and_bias() {
        let cols = 256;
        for group in [64, 128] {
            let q: Vec<u8> = (0..cols).map(|j| ((j * 7 + group) % 16) as u8).collect();
            let words: Vec<u8> = q.chunks(8).flat_map(|c| c.iter().enumerate().fold(0u32, |w, (j, &v)| w | (v as u32) << (4 * j)).to_le_bytes()).collect();
            let scales: Vec<f32> = (0..cols / group).map(|g| 0.01 * (g + 1) as f32).map(|v| f16::from_f32(v).to_f32()).collect();
            let biases: Vec<f32> = (0..cols / group).map(|g| -0.05 * (g + 1) as f32).map(|v| f16::from_f32(v).to_f32()).collect();
            let (qt, blocks) = affine_to_blocks(4, group, &words, &scales, &biases, cols).unwrap();
            let mut got = vec![0.0; cols];
            dequantize_row(qt, &blocks, &mut got);
            assert_eq!(got, dequant_affine(4, group, &words, &scales, &biases, cols));
        }
    }

    /// The scale MLX gives an all-zero group, as a bfloat16 folder stores
    /// it: rounded to f16, and the group still holds zeros.
    #[test]
    fn an_all_zero_groups_tiny_scale_loads() {
        let scale = half::bf16::from_f32(1e-7).to_f32();
        assert_ne!(f16::from_f32(scale).to_f32(), scale, "the case needs rounding");
        let (qt, blocks) = affine_to_blocks(4, 32, &[0u8; 16], &[scale], &[0.0], 32).unwrap();
        let mut got = vec![1.0; 32];
        dequantize_row(qt, &blocks, &mut got);
        assert_eq!(got, vec![0.0; 32]);
        // Small but in f16's normal range: still exact or refused.
        assert!(affine_to_blocks(4, 32, &[0u8; 16], &[half::bf16::from_f32(1e-4).to_f32()], &[0.0], 32).is_ok());
    }

    #[test]
    fn inexact_scales_and_bad_shapes_are_refused() {
        let words = vec![0u8; 16];
        assert!(affine_to_blocks(4, 32, &words, &[1e-3 + 1e-9], &[0.0], 32).unwrap_err().contains("not exactly representable"));
        assert!(affine_to_blocks(4, 32, &words, &[0.5], &[1e5], 32).unwrap_err().contains("not exactly representable"));
        assert!(affine_to_blocks(4, 32, &words[..8], &[0.5], &[0.0], 32).is_err());
        assert!(affine_to_blocks(3, 32, &words, &[0.5], &[0.0], 32).is_err());
        assert!(affine_to_blocks(4, 32, &words, &[0.5, 0.5], &[0.0], 32).is_err());
        assert!(blocks_to_affine(QType::F16, &[0; 64], 32).is_err());
    }
}
