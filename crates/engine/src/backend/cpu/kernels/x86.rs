//! The one-row 256-bit tiles (AVX2), for rows past a matrix's last full
//! panel on the AVX2 and AVX-512 paths. Callers must have checked the CPU
//! features (see `Isa::detect`).

use super::*;
use std::arch::x86_64::*;

#[inline(always)]
unsafe fn f16_to_f32(p: *const u8) -> f32 {
    let bits = u16::from_le_bytes([*p, *p.add(1)]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// The 32 nibbles of a Q4 block as bytes: low nibbles are elements 0..16,
/// high nibbles 16..32.
#[inline(always)]
unsafe fn unpack_nibbles(p: *const u8) -> __m256i {
    let raw = _mm_loadu_si128(p as *const __m128i);
    let both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn f16_to_f32_slice(src: &[f16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let mut i = 0;
    while i + 8 <= n {
        let v = _mm256_cvtph_ps(_mm_loadu_si128(src.as_ptr().add(i) as *const __m128i));
        _mm256_storeu_ps(dst.as_mut_ptr().add(i), v);
        i += 8;
    }
    for j in i..n {
        dst[j] = src[j].to_f32();
    }
}

/// The sum of the 8 lanes (exact: integers).
#[inline(always)]
unsafe fn hsum_i32(v: __m128i) -> i32 {
    let s = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0b01_00_11_10));
    _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01)))
}

/// The 8 i32 lanes of a block's int8 products, summed.
#[inline(always)]
unsafe fn isum8(p: __m256i) -> i32 {
    hsum_i32(_mm_add_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1)))
}

/// Unsigned weight bytes times signed activation bytes: 8 i32 lanes, each
/// the sum of 4 adjacent products.
#[inline(always)]
unsafe fn mul8(w: __m256i, a: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1))
}

/// Block `b`'s terms for every token, in `quant::dot_scalar`'s order:
/// the integer sum `prod(activations)` reduced across lanes, then
/// `fma(isum, d * da, acc)` and, with an offset `m`, `fma(m, s, acc)`.
#[inline(always)]
unsafe fn block_terms<const NT: usize>(acc: &mut [f32; NT], a: &[ActRow; NT], b: usize, d: f32, m: Option<f32>, prod: impl Fn(__m256i) -> __m256i) {
    for t in 0..NT {
        let av = _mm256_loadu_si256(a[t].qs.as_ptr().add(b * QK) as *const __m256i);
        let isum = isum8(prod(av)) as f32;
        acc[t] = isum.mul_add(d * *a[t].d.get_unchecked(b), acc[t]);
        if let Some(m) = m {
            acc[t] = m.mul_add(*a[t].s.get_unchecked(b), acc[t]);
        }
    }
}

/// One row's tiles (rows past the last panel, and the formats without
/// panels on a path) keep `quant::dot_scalar`'s order, the order of every
/// path: per block the integer sum reduced across lanes (exact), then the
/// block's two fused multiply-adds, so a token's logits do not depend on
/// the host. Each token's chain is serial; several tokens interleave.
///
/// Q4_0/Q4_1: each weight block is unpacked once for `NT` activation rows.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q4_avx2<const Q4_1: bool, const NT: usize>(w: &[u8], a: &[ActRow; NT]) -> [f32; NT] {
    let bb = if Q4_1 { 20 } else { 18 };
    let head = bb - 16;
    let mut acc = [0.0f32; NT];
    let wp = w.as_ptr();
    for b in 0..a[0].d.len() {
        let blk = wp.add(b * bb);
        let wv = unpack_nibbles(blk.add(head));
        let d = f16_to_f32(blk);
        let m = if Q4_1 { f16_to_f32(blk.add(2)) } else { d * -8.0 };
        block_terms(&mut acc, a, b, d, Some(m), |av| mul8(wv, av));
    }
    acc
}

/// Q8_0, or with `A8` the MLX 8-bit block (a bias after the scale, and
/// `bias + 128 d` times the activation sum per block).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q8_avx2<const A8: bool, const NT: usize>(w: &[u8], a: &[ActRow; NT]) -> [f32; NT] {
    let (bb, head) = if A8 { (36, 4) } else { (34, 2) };
    let mut acc = [0.0f32; NT];
    let wp = w.as_ptr();
    for b in 0..a[0].d.len() {
        let blk = wp.add(b * bb);
        let wv = _mm256_loadu_si256(blk.add(head) as *const __m256i);
        // The int8 products need one unsigned operand: move w's sign onto a.
        let wabs = _mm256_sign_epi8(wv, wv);
        let d = f16_to_f32(blk);
        let m = A8.then(|| d.mul_add(128.0, f16_to_f32(blk.add(2))));
        block_terms(&mut acc, a, b, d, m, |av| mul8(wabs, _mm256_sign_epi8(av, wv)));
    }
    acc
}

/// Q5_0/Q5_1 one-row tile: each block is unpacked in registers once for
/// all `NT` tokens (its nibbles as a Q4 block's, bit j of the 32-bit `qh`
/// the fifth bit of element j), then one int8 product per token.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q5_avx2<const Q5_1: bool, const NT: usize>(w: &[u8], a: &[ActRow; NT]) -> [f32; NT] {
    let qtype = if Q5_1 { QType::Q5_1 } else { QType::Q5_0 };
    let at = if Q5_1 { 4 } else { 2 };
    let mut acc = [0.0f32; NT];
    // Byte i of the block's 32 values takes byte i / 8 of qh, then its bit i % 8.
    let spread = _mm256_set_epi64x(0x0303_0303_0303_0303, 0x0202_0202_0202_0202, 0x0101_0101_0101_0101, 0);
    let bits = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    for (b, blk) in w.chunks_exact(qtype.block_bytes()).enumerate() {
        let p = blk.as_ptr();
        // Q5_0 stores its values + 16: the offset becomes a min of -16 d.
        let d = f16_to_f32(p);
        let m = if Q5_1 { f16_to_f32(p.add(2)) } else { d * -16.0 };
        let qh = _mm256_shuffle_epi8(_mm256_set1_epi32((p.add(at) as *const i32).read_unaligned()), spread);
        let fifth = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bits), bits), _mm256_set1_epi8(0x10));
        let qv = _mm256_or_si256(unpack_nibbles(p.add(at + 4)), fifth);
        block_terms(&mut acc, a, b, d, Some(m), |av| mul8(qv, av));
    }
    acc
}

pub const K4: u8 = 0;
pub const K5: u8 = 1;
pub const K6: u8 = 2;

/// The K-quant format of a kernel's `K` parameter.
const fn k_type(k: u8) -> QType {
    match k {
        K4 => QType::Q4_K,
        K5 => QType::Q5_K,
        _ => QType::Q6_K,
    }
}

/// The super-block at `p`: `d` and `dmin`, and its sub-blocks' integer
/// scales and mins (per 32: Q4_K, Q5_K; per 16, 16 of them and no mins:
/// Q6_K).
#[inline(always)]
unsafe fn k_scales<const K: u8>(p: *const u8) -> (f32, f32, [i32; 16], [i32; 8]) {
    let (mut sc, mut mn) = ([0i32; 16], [0i32; 8]);
    if K == K6 {
        for (j, s) in sc.iter_mut().enumerate() {
            *s = *p.add(192 + j) as i8 as i32;
        }
        return (f16_to_f32(p.add(208)), 0.0, sc, mn);
    }
    let scales = std::slice::from_raw_parts(p.add(4), 12);
    for j in 0..8 {
        let (s, m) = crate::formats::quant::k4_scale_min(scales, j);
        (sc[j], mn[j]) = (s as i32, m as i32);
    }
    (f16_to_f32(p), f16_to_f32(p.add(2)), sc, mn)
}

/// A super-block's min term for one token: the mins times the
/// activations' block sums (an exact integer).
#[inline(always)]
fn k_min_sum(mn: &[i32; 8], a: &ActRow, sb: usize) -> i32 {
    (0..8).map(|j| mn[j] * a.bsum[sb * 8 + j] as i32).sum()
}

/// The 32 values of sub-block `j` of the super-block at `p`, as bytes:
/// unsigned for Q4_K / Q5_K, signed for Q6_K. The formats keep a
/// sub-block in 32 consecutive bytes or nibbles, so no shuffles:
/// - Q4_K / Q5_K: 4 x 32 bytes whose low nibbles are sub-block 2c and
///   high nibbles 2c + 1 (after d, dmin, 12 scale bytes and, for Q5_K,
///   32 bytes whose bit j is sub-block j's fifth bit);
/// - Q6_K: each half of 128 takes the low / high nibbles of two 32-byte
///   `ql` rows, the top two bits from successive bit pairs of 32 `qh`
///   bytes; values are stored + 32.
#[inline(always)]
unsafe fn k_sub<const K: u8>(p: *const u8, j: usize) -> __m256i {
    let load = |p: *const u8| _mm256_loadu_si256(p as *const __m256i);
    let nibble = _mm256_set1_epi8(0x0F);
    let low_or_high = |v: __m256i, high: bool| _mm256_and_si256(if high { _mm256_srli_epi16(v, 4) } else { v }, nibble);
    if K == K6 {
        let (half, run) = (j / 4, j % 4);
        let ql = load(p.add(half * 64 + 32 * (run % 2)));
        let qh = load(p.add(128 + half * 32));
        let top = match run {
            0 => _mm256_slli_epi16(qh, 4),
            1 => _mm256_slli_epi16(qh, 2),
            2 => qh,
            _ => _mm256_srli_epi16(qh, 2),
        };
        let v = _mm256_or_si256(low_or_high(ql, run >= 2), _mm256_and_si256(top, _mm256_set1_epi8(0x30)));
        return _mm256_sub_epi8(v, _mm256_set1_epi8(32));
    }
    let qs = p.add(if K == K5 { 48 } else { 16 });
    let v = low_or_high(load(qs.add(32 * (j / 2))), j % 2 == 1);
    if K != K5 {
        return v;
    }
    let bit = _mm256_set1_epi8((1u8 << j) as i8);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(load(p.add(16)), bit), bit);
    _mm256_or_si256(v, _mm256_and_si256(set, _mm256_set1_epi8(0x10)))
}

/// K-quant one-row tile: each super-block of 256 weights is unpacked in
/// registers once for all `NT` tokens; every 32 weights times 32
/// activations is one int8 product, times its sub-block's integer scale
/// (per 32, or per 16 for Q6_K: each 128-bit half), summed in integer
/// lanes over the super-block, then `quant::dot_scalar`'s two float steps.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn kquant_avx2<const K: u8, const NT: usize>(w: &[u8], a: &[ActRow; NT]) -> [f32; NT] {
    use crate::formats::quant::QK_K;
    let mut acc = [0.0f32; NT];
    for (sb, blk) in w.chunks_exact(k_type(K).block_bytes()).enumerate() {
        let p = blk.as_ptr();
        let (d, dmin, sc, mn) = k_scales::<K>(p);
        let mut c1 = [_mm256_setzero_si256(); NT];
        for j in 0..QK_K / QK {
            let b = sb * (QK_K / QK) + j;
            let qv = k_sub::<K>(p, j);
            // Unsigned values multiply the signed activations directly;
            // Q6_K's signed ones move their sign onto the activations.
            let qabs = if K == K6 { _mm256_sign_epi8(qv, qv) } else { qv };
            let scale = if K == K6 { _mm256_setr_m128i(_mm_set1_epi32(sc[2 * j]), _mm_set1_epi32(sc[2 * j + 1])) } else { _mm256_set1_epi32(sc[j]) };
            for t in 0..NT {
                let av = _mm256_loadu_si256(a[t].qs.as_ptr().add(b * QK) as *const __m256i);
                let av = if K == K6 { _mm256_sign_epi8(av, qv) } else { av };
                c1[t] = _mm256_add_epi32(c1[t], _mm256_mullo_epi32(mul8(qabs, av), scale));
            }
        }
        for t in 0..NT {
            let da = *a[t].d.get_unchecked(sb * (QK_K / QK));
            acc[t] = (isum8(c1[t]) as f32).mul_add(d * da, acc[t]);
            if K != K6 {
                acc[t] = (k_min_sum(&mn, &a[t], sb) as f32).mul_add(-(dmin * da), acc[t]);
            }
        }
    }
    acc
}
