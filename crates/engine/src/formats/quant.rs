//! Weight formats (ggml block layouts) and the scalar reference math over them.
//!
//! Activations are quantized to int8 per block of 32 (per super-block of 256
//! for K-quant weights, `QType::act_group`), so a weight block times an
//! activation block is one integer dot product plus a couple of float
//! multiplies. The SIMD versions live in `cpu::kernels` and are
//! tested against the scalar functions here.

use half::{bf16, f16};

/// Elements per block of the 32-element formats (Q4_0, Q4_1, Q8_0, A8) and
/// of the activation blocks.
pub const QK: usize = 32;
/// Elements per K-quant super-block.
pub const QK_K: usize = 256;

#[allow(non_camel_case_types)] // ggml's names
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    /// 5-bit blocks of 32 (the fifth bits in a 32-bit word): `d * (q - 16)`
    /// and `d * q + m`; K-quant files use them for rows that are not a
    /// multiple of 256.
    Q5_0,
    Q5_1,
    Q8_0,
    /// ggml's "K" super-blocks of 256 (the mix in Q4_K_M files).
    Q4_K,
    Q5_K,
    Q6_K,
    /// MLX 8-bit affine groups of 32 (no ggml id): f16 scale `d`, f16 bias
    /// `m`, then 32 signed bytes `q - 128`, so `w = d * (q' + 128) + m` and the
    /// signed-int8 kernels apply with one extra per-block term.
    A8,
}

impl QType {
    pub fn from_ggml(id: u32) -> Option<QType> {
        Some(match id {
            0 => QType::F32,
            1 => QType::F16,
            2 => QType::Q4_0,
            3 => QType::Q4_1,
            6 => QType::Q5_0,
            7 => QType::Q5_1,
            8 => QType::Q8_0,
            12 => QType::Q4_K,
            13 => QType::Q5_K,
            14 => QType::Q6_K,
            30 => QType::BF16,
            _ => return None,
        })
    }
    /// The ggml type id; `A8` has none (it never goes into a GGUF file).
    pub fn ggml_id(self) -> u32 {
        match self {
            QType::A8 => panic!("A8 is not a GGUF type"),
            QType::Q4_K => 12,
            QType::Q5_K => 13,
            QType::Q6_K => 14,
            QType::F32 => 0,
            QType::F16 => 1,
            QType::Q4_0 => 2,
            QType::Q4_1 => 3,
            QType::Q5_0 => 6,
            QType::Q5_1 => 7,
            QType::Q8_0 => 8,
            QType::BF16 => 30,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            QType::F32 => "F32",
            QType::F16 => "F16",
            QType::BF16 => "BF16",
            QType::Q4_0 => "Q4_0",
            QType::Q4_1 => "Q4_1",
            QType::Q5_0 => "Q5_0",
            QType::Q5_1 => "Q5_1",
            QType::Q8_0 => "Q8_0",
            QType::A8 => "MLX-A8",
            QType::Q4_K => "Q4_K",
            QType::Q5_K => "Q5_K",
            QType::Q6_K => "Q6_K",
        }
    }
    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            QType::F32 | QType::F16 | QType::BF16 => 1,
            QType::Q4_K | QType::Q5_K | QType::Q6_K => QK_K,
            _ => QK,
        }
    }
    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            QType::F32 => 4,
            QType::F16 | QType::BF16 => 2,
            QType::Q4_0 => 2 + QK / 2,
            QType::Q4_1 => 4 + QK / 2,
            QType::Q5_0 => 2 + 4 + QK / 2,
            QType::Q5_1 => 4 + 4 + QK / 2,
            QType::Q8_0 => 2 + QK,
            QType::A8 => 4 + QK,
            QType::Q4_K => 4 + 12 + QK_K / 2,
            QType::Q5_K => 4 + 12 + QK_K / 8 + QK_K / 2,
            QType::Q6_K => QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
        }
    }
    pub fn row_bytes(self, n_cols: usize) -> usize {
        n_cols / self.block_size() * self.block_bytes()
    }
    /// Activation values per int8 scale for a matrix of this format: the
    /// K-quants' super-block, so that each super-block's sub-block sums
    /// add up as exact integers (fewer float steps, and AMX tiles that
    /// run a whole super-block), as ggml's Q8_K does; 32 for the rest.
    pub fn act_group(self) -> usize {
        match self {
            QType::Q4_K | QType::Q5_K | QType::Q6_K => QK_K,
            _ => QK,
        }
    }
    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }
}

#[inline]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Dequantizes one row of `n` elements (a multiple of the block size).
pub fn dequantize_row(qtype: QType, src: &[u8], dst: &mut [f32]) {
    match qtype {
        QType::F32 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        QType::F16 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        QType::BF16 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        QType::Q4_0 | QType::Q4_1 => {
            let bb = qtype.block_bytes();
            let head = bb - QK / 2;
            for (out, blk) in dst.chunks_exact_mut(QK).zip(src.chunks_exact(bb)) {
                let d = f16_at(blk, 0);
                let (m, off) = if qtype == QType::Q4_1 { (f16_at(blk, 2), 0.0) } else { (0.0, -8.0) };
                for j in 0..QK / 2 {
                    let q = blk[head + j];
                    out[j] = ((q & 0x0F) as f32 + off) * d + m;
                    out[j + QK / 2] = ((q >> 4) as f32 + off) * d + m;
                }
            }
        }
        QType::Q8_0 => {
            for (out, blk) in dst.chunks_exact_mut(QK).zip(src.chunks_exact(2 + QK)) {
                let d = f16_at(blk, 0);
                for j in 0..QK {
                    out[j] = blk[2 + j] as i8 as f32 * d;
                }
            }
        }
        QType::Q5_0 | QType::Q5_1 => {
            let mut q = [0i8; QK];
            for (out, blk) in dst.chunks_exact_mut(QK).zip(src.chunks_exact(qtype.block_bytes())) {
                let (d, m) = q5_unpack(qtype, blk, &mut q);
                for (o, &v) in out.iter_mut().zip(&q) {
                    *o = d * v as f32 + m;
                }
            }
        }
        QType::Q4_K | QType::Q5_K | QType::Q6_K => {
            let mut k = KBlock::default();
            for (out, blk) in dst.chunks_exact_mut(QK_K).zip(src.chunks_exact(qtype.block_bytes())) {
                k.unpack(qtype, blk);
                for (i, o) in out.iter_mut().enumerate() {
                    let j = i / k.sub;
                    *o = k.d * k.sc[j] as f32 * k.q[i] as f32 - k.dmin * k.mn[j] as f32;
                }
            }
        }
        QType::A8 => {
            for (out, blk) in dst.chunks_exact_mut(QK).zip(src.chunks_exact(4 + QK)) {
                let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
                for j in 0..QK {
                    out[j] = d * (blk[4 + j] as i8 as f32 + 128.0) + m;
                }
            }
        }
    }
}

/// Quantizes `n` floats (a multiple of 32) into ggml's block layout; used to
/// write test models and to check the kernels on real block data.
pub fn quantize_row(qtype: QType, src: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(qtype.row_bytes(src.len()));
    match qtype {
        QType::F32 => src.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        QType::F16 => src.iter().for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        QType::BF16 => src.iter().for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        QType::Q4_0 => {
            for blk in src.chunks_exact(QK) {
                // Like ggml: the value of largest magnitude maps to -8.
                let mx = blk.iter().copied().fold(0.0f32, |a, v| if v.abs() > a.abs() { v } else { a });
                let d = mx / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                for j in 0..QK / 2 {
                    let q0 = ((blk[j] * id + 8.5) as i32).clamp(0, 15) as u8;
                    let q1 = ((blk[j + QK / 2] * id + 8.5) as i32).clamp(0, 15) as u8;
                    out.push(q0 | (q1 << 4));
                }
            }
        }
        QType::Q4_1 => {
            for blk in src.chunks_exact(QK) {
                let mn = blk.iter().copied().fold(f32::INFINITY, f32::min);
                let mx = blk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (mx - mn) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(mn).to_le_bytes());
                for j in 0..QK / 2 {
                    let q0 = (((blk[j] - mn) * id + 0.5) as i32).clamp(0, 15) as u8;
                    let q1 = (((blk[j + QK / 2] - mn) * id + 0.5) as i32).clamp(0, 15) as u8;
                    out.push(q0 | (q1 << 4));
                }
            }
        }
        QType::Q5_0 | QType::Q5_1 | QType::Q4_K | QType::Q5_K | QType::Q6_K => panic!("{} is read from files, never written", qtype.name()),
        QType::A8 => {
            for blk in src.chunks_exact(QK) {
                let mn = blk.iter().copied().fold(f32::INFINITY, f32::min);
                let mx = blk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = f16::from_f32((mx - mn) / 255.0);
                let m = f16::from_f32(mn);
                let id = if d.to_f32() != 0.0 { 1.0 / d.to_f32() } else { 0.0 };
                out.extend_from_slice(&d.to_le_bytes());
                out.extend_from_slice(&m.to_le_bytes());
                for v in blk {
                    let q = (((v - m.to_f32()) * id).round() as i32).clamp(0, 255);
                    out.push((q - 128) as i8 as u8);
                }
            }
        }
        QType::Q8_0 => {
            for blk in src.chunks_exact(QK) {
                let amax = blk.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                for v in blk {
                    out.push((v * id).round() as i8 as u8);
                }
            }
        }
    }
    out
}

/// Activations of `n_rows` vectors quantized to int8 per block of 32:
/// value ≈ `q * d`; `s = d * Σq` serves the min/offset terms of Q4_1 and Q4_0.
#[derive(Default, Debug, Clone)]
pub struct QuantizedActs {
    pub n_rows: usize,
    pub n_cols: usize,
    pub qs: Vec<i8>,
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    /// The integer sum of each 16 quantized values (Q6_K's sub-blocks).
    pub sum16: Vec<i32>,
    /// The integer sum of each block of 32, as f32 (exact): the K-quants'
    /// min term, summed in float FMAs that stay exact below 2^24.
    pub bsum: Vec<f32>,
}

impl QuantizedActs {
    /// Quantizes `x` (`n_rows * n_cols` floats, `n_cols` a multiple of
    /// `group`) with one scale per `group` values (`QType::act_group`: 32,
    /// or 256 for the K-quants), reusing this buffer's allocations.
    pub fn quantize(&mut self, x: &[f32], n_cols: usize, group: usize) {
        debug_assert!(group == QK || group == QK_K);
        debug_assert_eq!(n_cols % group, 0);
        let n_rows = x.len() / n_cols;
        let nb = x.len() / QK;
        self.n_rows = n_rows;
        self.n_cols = n_cols;
        self.qs.resize(x.len(), 0);
        self.d.resize(nb, 0.0);
        self.s.resize(nb, 0.0);
        self.bsum.resize(nb, 0.0);
        self.sum16.resize(2 * nb, 0);
        let nbr = n_cols / QK;
        let rows = x
            .chunks_exact(n_cols)
            .zip(self.qs.chunks_exact_mut(n_cols))
            .zip(self.d.chunks_exact_mut(nbr).zip(self.s.chunks_exact_mut(nbr)))
            .zip(self.sum16.chunks_exact_mut(2 * nbr).zip(self.bsum.chunks_exact_mut(nbr)))
            .map(|(((x, qs), (d, s)), (sum16, bsum))| ActRowMut { qs, d, s, sum16, bsum, x });
        // Prompt batches are large enough to be worth splitting across cores.
        if n_rows >= 8 {
            use rayon::prelude::*;
            rows.collect::<Vec<_>>().into_par_iter().for_each(|r| quantize_row_q8(r, group));
        } else {
            rows.for_each(|r| quantize_row_q8(r, group));
        }
    }

    pub fn row(&self, r: usize) -> ActRow<'_> {
        let nb = self.n_cols / QK;
        ActRow {
            qs: &self.qs[r * self.n_cols..(r + 1) * self.n_cols],
            d: &self.d[r * nb..(r + 1) * nb],
            s: &self.s[r * nb..(r + 1) * nb],
            sum16: &self.sum16[2 * r * nb..2 * (r + 1) * nb],
            bsum: &self.bsum[r * nb..(r + 1) * nb],
        }
    }
}

/// One row of `QuantizedActs` being written, and its floats.
struct ActRowMut<'a> {
    x: &'a [f32],
    qs: &'a mut [i8],
    d: &'a mut [f32],
    s: &'a mut [f32],
    sum16: &'a mut [i32],
    bsum: &'a mut [f32],
}

impl ActRowMut<'_> {
    /// Block `b`'s scale and its two sums of 16, with what follows from them.
    fn set_block(&mut self, b: usize, d: f32, lo: i32, hi: i32) {
        (self.sum16[2 * b], self.sum16[2 * b + 1]) = (lo, hi);
        self.d[b] = d;
        self.s[b] = d * (lo + hi) as f32;
        self.bsum[b] = (lo + hi) as f32;
    }
}

/// Adding then subtracting 1.5 * 2^23 rounds an f32 below 2^22 in magnitude
/// to the nearest integer, ties to even, in plain adds that vectorize on any
/// x86-64 (`round` would be a libm call per element without SSE4.1).
const ROUND_MAGIC: f32 = 12_582_912.0;

/// One row to int8, one scale per `group` values. Rounds half to even,
/// as llama.cpp's SIMD quantizer does.
fn quantize_row_q8(r: ActRowMut, group: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { quantize_row_q8_avx2(r, group) };
    }
    quantize_row_q8_scalar(r, group)
}

fn quantize_row_q8_scalar(mut r: ActRowMut, group: usize) {
    for g in 0..r.x.len() / group {
        let x = &r.x[g * group..(g + 1) * group];
        let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for (k, blk) in x.chunks_exact(QK).enumerate() {
            let b = g * group / QK + k;
            let q = &mut r.qs[b * QK..(b + 1) * QK];
            for (q, v) in q.iter_mut().zip(blk) {
                *q = ((v * id + ROUND_MAGIC) - ROUND_MAGIC) as i32 as i8;
            }
            let sum = |h: &[i8]| h.iter().map(|&v| v as i32).sum::<i32>();
            let (lo, hi) = (sum(&q[..QK / 2]), sum(&q[QK / 2..]));
            r.set_block(b, d, lo, hi);
        }
    }
}

/// `quantize_row_q8_scalar` in 256-bit vectors, to the same bits: the
/// group's absolute maximum is exact in any order, `d` and `1 / d` are the
/// same operations, and `cvtps` rounds half to even as the scalar's magic
/// constant does. A prompt's activations are quantized before every
/// matrix; written plainly this took 13% of a 512-token GEMM.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_row_q8_avx2(mut r: ActRowMut, group: usize) {
    use std::arch::x86_64::*;
    let sign = _mm256_set1_ps(-0.0);
    let hsum = |v: __m256i| {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01)))
    };
    let x = r.x;
    for g in 0..x.len() / group {
        let xg = x.as_ptr().add(g * group);
        let mut m = _mm256_setzero_ps();
        for i in (0..group).step_by(8) {
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(xg.add(i))));
        }
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        for k in 0..group / QK {
            let b = g * group / QK + k;
            let q: [__m256i; 4] = std::array::from_fn(|i| _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg.add(k * QK + 8 * i)), id)));
            // Packing works within 128-bit lanes; the permute puts the 32 bytes back in order.
            let q16 = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            let q8 = _mm256_permutevar8x32_epi32(q16, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(r.qs.as_mut_ptr().add(b * QK) as *mut __m256i, q8);
            let (lo, hi) = (hsum(_mm256_add_epi32(q[0], q[1])), hsum(_mm256_add_epi32(q[2], q[3])));
            r.set_block(b, d, lo, hi);
        }
    }
}

#[derive(Clone, Copy)]
pub struct ActRow<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub sum16: &'a [i32],
    pub bsum: &'a [f32],
}

/// Scalar reference: dot product of one quantized weight row with one
/// quantized activation row, in the order every kernel path follows so
/// that all give the same bits (a greedy reply must not depend on the
/// host's instruction set): per block the exact integer sum of weights
/// times activation bytes, then `acc = fma(isum, w_scale * a_scale, acc)`,
/// then for formats with an offset `acc = fma(w_offset, a_sum, acc)`. Q4
/// and Q5 weights enter the integer sum unsigned (their centre goes into
/// the offset: `-8 d`, `-16 d`), Q8_0 and MLX 8-bit ones signed. The
/// K-quants take the same two steps per super-block (see below).
pub fn dot_scalar(qtype: QType, w: &[u8], a: ActRow) -> f32 {
    let nb = a.d.len();
    let mut acc = 0.0f32;
    // One block's (or sub-block's) terms.
    let mut step = |isum: i32, scale: f32, da: f32, offset: Option<(f32, f32)>| {
        acc = (isum as f32).mul_add(scale * da, acc);
        if let Some((m, s)) = offset {
            acc = m.mul_add(s, acc);
        }
    };
    let sum32 = |b: usize| a.sum16[2 * b] + a.sum16[2 * b + 1];
    match qtype {
        QType::Q4_0 | QType::Q4_1 => {
            let bb = qtype.block_bytes();
            let head = bb - QK / 2;
            for b in 0..nb {
                let blk = &w[b * bb..(b + 1) * bb];
                let qa = &a.qs[b * QK..(b + 1) * QK];
                let mut isum = 0i32;
                for j in 0..QK / 2 {
                    let q = blk[head + j];
                    isum += (q & 0x0F) as i32 * qa[j] as i32 + (q >> 4) as i32 * qa[j + QK / 2] as i32;
                }
                let d = f16_at(blk, 0);
                let m = if qtype == QType::Q4_1 { f16_at(blk, 2) } else { d * -8.0 };
                step(isum, d, a.d[b], Some((m, a.s[b])));
            }
        }
        QType::Q8_0 | QType::A8 => {
            let (bb, head) = if qtype == QType::A8 { (36, 4) } else { (34, 2) };
            for b in 0..nb {
                let blk = &w[b * bb..(b + 1) * bb];
                let qa = &a.qs[b * QK..(b + 1) * QK];
                let isum: i32 = (0..QK).map(|j| blk[head + j] as i8 as i32 * qa[j] as i32).sum();
                let d = f16_at(blk, 0);
                // MLX's unsigned q is stored q - 128: its bias gains 128 d.
                let offset = (qtype == QType::A8).then(|| (d.mul_add(128.0, f16_at(blk, 2)), a.s[b]));
                step(isum, d, a.d[b], offset);
            }
        }
        QType::Q5_0 | QType::Q5_1 => {
            let mut q = [0i8; QK];
            for (b, blk) in w.chunks_exact(qtype.block_bytes()).enumerate() {
                let (d, m) = q5_unpack(qtype, blk, &mut q);
                let isum: i32 = q.iter().zip(&a.qs[b * QK..(b + 1) * QK]).map(|(&x, &y)| x as i32 * y as i32).sum();
                // Q5_0's values unsigned (q + 16), its centre in the offset.
                let (isum, m) = if qtype == QType::Q5_0 { (isum + 16 * sum32(b), d * -16.0) } else { (isum, m) };
                step(isum, d, a.d[b], Some((m, a.s[b])));
            }
        }
        // Activations with one scale per super-block (`act_group`): the
        // sub-blocks' integer sums times their integer scales, and the
        // mins times the activations' block sums, are exact integers per
        // super-block, so any path may add them up in any order; then two
        // float steps per super-block.
        QType::Q4_K | QType::Q5_K | QType::Q6_K => {
            let mut k = KBlock::default();
            for (sb, blk) in w.chunks_exact(qtype.block_bytes()).enumerate() {
                k.unpack(qtype, blk);
                let (qa, da) = (&a.qs[sb * QK_K..(sb + 1) * QK_K], a.d[sb * QK_K / QK]);
                let (mut c1, mut c2) = (0i32, 0i32);
                for (j, part) in (0..QK_K).step_by(k.sub).enumerate() {
                    let isum: i32 = (part..part + k.sub).map(|l| k.q[l] as i32 * qa[l] as i32).sum();
                    c1 += k.sc[j] * isum;
                }
                if qtype != QType::Q6_K {
                    c2 = (0..QK_K / QK).map(|j| k.mn[j] * a.bsum[sb * QK_K / QK + j] as i32).sum();
                }
                acc = (c1 as f32).mul_add(k.d * da, acc);
                if qtype != QType::Q6_K {
                    acc = (c2 as f32).mul_add(-(k.dmin * da), acc);
                }
            }
        }
        QType::F32 | QType::F16 | QType::BF16 => unreachable!("float weights use the f32 path"),
    }
    acc
}

/// A Q5_0/Q5_1 block as 32 small integers and `(d, m)`, element `j` being
/// `d * q[j] + m` (Q5_0 centres its values: `q - 16`, no `m`).
#[inline]
pub(crate) fn q5_unpack(qtype: QType, blk: &[u8], q: &mut [i8; QK]) -> (f32, f32) {
    let d = f16_at(blk, 0);
    let (m, at) = if qtype == QType::Q5_1 { (f16_at(blk, 2), 4) } else { (0.0, 2) };
    let qh = u32::from_le_bytes([blk[at], blk[at + 1], blk[at + 2], blk[at + 3]]);
    let qs = &blk[at + 4..at + 4 + QK / 2];
    let off = if qtype == QType::Q5_0 { 16 } else { 0 };
    for j in 0..QK / 2 {
        q[j] = ((qs[j] & 0x0F) | (((qh >> j) & 1) << 4) as u8) as i8 - off;
        q[j + QK / 2] = ((qs[j] >> 4) | (((qh >> (j + QK / 2)) & 1) << 4) as u8) as i8 - off;
    }
    (d, m)
}

/// One K-quant super-block unpacked: 256 small integers, the super-block's
/// `d` and `dmin`, and an integer scale and min per sub-block of `sub`
/// elements, so that element `i` is `d * sc[j] * q[i] - dmin * mn[j]`
/// (`j = i / sub`), as ggml dequantizes it. Q6_K has no mins.
pub(crate) struct KBlock {
    pub q: [i8; QK_K],
    pub sub: usize,
    pub d: f32,
    pub dmin: f32,
    pub sc: [i32; 16],
    pub mn: [i32; 16],
}

impl Default for KBlock {
    fn default() -> Self {
        KBlock { q: [0; QK_K], sub: 32, d: 0.0, dmin: 0.0, sc: [0; 16], mn: [0; 16] }
    }
}

/// The 6-bit scale and min of sub-block `j` (of 8) of a Q4_K / Q5_K
/// super-block, from its 12 scale bytes: the first four in the low bits of
/// bytes 0-7, the last four split across bytes 8-11 and the top bits of 0-7.
#[inline(always)]
pub(crate) fn k4_scale_min(sc: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (sc[j] & 63, sc[j + 4] & 63)
    } else {
        ((sc[j + 4] & 0x0F) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4))
    }
}

impl KBlock {
    pub fn unpack(&mut self, qtype: QType, b: &[u8]) {
        match qtype {
            QType::Q4_K | QType::Q5_K => {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                (self.d, self.dmin) = (d, dmin);
                for j in 0..8 {
                    let (s, m) = k4_scale_min(&b[4..16], j);
                    (self.sc[j], self.mn[j]) = (s as i32, m as i32);
                }
                let (qh, qs) = if qtype == QType::Q5_K { (&b[16..48], &b[48..176]) } else { (&b[16..16], &b[16..144]) };
                // Each 32 bytes of nibbles hold two sub-blocks: low nibbles
                // first; Q5_K's fifth bit of sub-block j is bit j of qh[l].
                for j in 0..8 {
                    for l in 0..32 {
                        let nib = if j % 2 == 0 { qs[(j / 2) * 32 + l] & 0x0F } else { qs[(j / 2) * 32 + l] >> 4 };
                        let high = if qtype == QType::Q5_K { ((qh[l] >> j) & 1) << 4 } else { 0 };
                        self.q[j * 32 + l] = (nib | high) as i8;
                    }
                }
                self.sub = 32;
            }
            QType::Q6_K => {
                let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = f16_at(b, 208);
                (self.d, self.dmin) = (d, 0.0);
                for (j, &s) in sc.iter().enumerate() {
                    (self.sc[j], self.mn[j]) = (s as i8 as i32, 0);
                }
                // Two halves of 128: four runs of 32 from the low/high nibbles
                // of 64 ql bytes and successive bit pairs of 32 qh bytes.
                for half in 0..2 {
                    let (ql, qh) = (&ql[half * 64..], &qh[half * 32..]);
                    for l in 0..32 {
                        let vals = [
                            (ql[l] & 0x0F) | ((qh[l] & 3) << 4),
                            (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4),
                            (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                            (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
                        ];
                        for (r, v) in vals.into_iter().enumerate() {
                            self.q[half * 128 + r * 32 + l] = v as i8 - 32;
                        }
                    }
                }
                self.sub = 16;
            }
            _ => unreachable!("not a K-quant"),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
