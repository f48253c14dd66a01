//! The 256-bit AVX2 kernels over `Layout::Vnni16` panels, the layout the
//! 512-bit kernels read (`avx512.rs`). A panel vector of 64 bytes holds 4
//! consecutive weights of each of 16 rows, one row per 32-bit lane: its
//! low 32 bytes are rows 0-7 and its high 32 bytes rows 8-15, so each half
//! is a `maddubs` operand for 8 rows as it stands. A broadcast group of 4
//! activation bytes multiplies 8 rows at once and results land one row per
//! lane: no transposes in registers (the 8-row `Panels8` kernels spent 24
//! shuffles per block on them) and no horizontal sums.
//!
//! AVX2 has no `vpdpbusd`: `maddubs` sums pairs of products into i16
//! lanes, which saturate, so each kernel adds only as many of them in i16
//! as its value range allows before widening to i32 (`madd`), and signed
//! values (Q8_0, MLX 8-bit, Q6_K) move their sign onto the activations.
//!
//! Every kernel keeps `quant::dot_scalar`'s order (per block the exact
//! integer sum, then its float steps), so the bits match every other path.

use std::arch::x86_64::*;

use super::avx512::{block_bytes16, kq_bytes16, prefetch, prefetch_part, A8, KQ_AHEAD, Q4_0, Q4_1, Q5_0, Q5_1, Q6K_BYTES16, Q8_0};
use crate::formats::quant::{ActRow, QK, QK_K};

/// The 4 activation bytes `4u..4u+4` at `x`, in every lane.
#[inline(always)]
unsafe fn bcast(x: *const i8, u: usize) -> __m256i {
    _mm256_set1_epi32((x as *const i32).add(u).read_unaligned())
}

/// Weights as `maddubs` takes them: unsigned values as they are, signed
/// ones with their magnitude here and their sign moved onto the
/// activations (`signed`).
#[derive(Clone, Copy)]
struct Vals {
    mag: __m256i,
    signed: Option<__m256i>,
}

impl Vals {
    #[inline(always)]
    unsafe fn unsigned(v: __m256i) -> Vals {
        Vals { mag: v, signed: None }
    }
    #[inline(always)]
    unsafe fn signed(v: __m256i) -> Vals {
        Vals { mag: _mm256_sign_epi8(v, v), signed: Some(v) }
    }
    /// Pair sums of the products with activation bytes `av` (i16 lanes).
    #[inline(always)]
    unsafe fn mul(self, av: __m256i) -> __m256i {
        let av = match self.signed {
            Some(v) => _mm256_sign_epi8(av, v),
            None => av,
        };
        _mm256_maddubs_epi16(self.mag, av)
    }
}

/// Σ over `q` of its products with the activations at `x` (vector u takes
/// bytes 4u..4u+4), as i32 lanes times `scale` (i16 pairs): `per` products'
/// pair sums are added in i16 before each widening, as many as the values'
/// range lets i16 hold.
#[inline(always)]
unsafe fn dot<const N: usize>(q: &[Vals; N], x: *const i8, per: usize, scale: __m256i) -> __m256i {
    let mut s32 = _mm256_setzero_si256();
    for g in (0..N).step_by(per) {
        let mut s16 = q[g].mul(bcast(x, g));
        for u in g + 1..(g + per).min(N) {
            s16 = _mm256_add_epi16(s16, q[u].mul(bcast(x, u)));
        }
        s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(s16, scale));
    }
    s32
}

/// Pair sums that fit i16 together: pairs of u4 x i8 products are at most
/// 3810 in size, u5 7874, |i8| x i8 (Q8_0, sign moved) 32512, |Q6_K - 32|
/// (at most 32) x i8 8128.
const fn per_i16(f: u8) -> usize {
    match f {
        Q4_0 | Q4_1 => 8,
        Q5_0 | Q5_1 => 4,
        _ => 1,
    }
}

/// Eight f16 values at `p`, widened.
#[inline(always)]
unsafe fn f16x8(p: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

/// Each token's two halves as the 16 rows' results.
#[inline(always)]
unsafe fn per_row<const NT: usize>(acc: [[__m256; 2]; NT]) -> [[f32; 16]; NT] {
    // A loop, not `map`: a closure would not inherit the caller's features,
    // and each store became a call.
    let mut out = [[0.0f32; 16]; NT];
    for (o, [lo, hi]) in out.iter_mut().zip(acc) {
        _mm256_storeu_ps(o.as_mut_ptr(), lo);
        _mm256_storeu_ps(o.as_mut_ptr().add(8), hi);
    }
    out
}

/// Sets the fifth bit of the Q5 weights in `q` (lane r of `q[u]`: row r's
/// weights 4u..4u+4) from `qh`, lane r: row r's 32 high bits, as
/// `avx512::q5_high_bits` does with compares in place of mask registers.
#[inline(always)]
unsafe fn q5_high_bits(qh: __m256i, q: &mut [__m256i; 8]) {
    let base = _mm256_broadcastsi128_si256(_mm_setr_epi8(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12));
    let bits = [_mm256_set1_epi32(0x0804_0201), _mm256_set1_epi32(0x8040_2010u32 as i32)];
    let sixteen = _mm256_set1_epi8(16);
    for c in 0..4 {
        let bytes = _mm256_shuffle_epi8(qh, _mm256_add_epi8(base, _mm256_set1_epi8(c as i8)));
        for h in 0..2 {
            let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bits[h]), bits[h]);
            q[2 * c + h] = _mm256_or_si256(q[2 * c + h], _mm256_and_si256(set, sixteen));
        }
    }
}

/// Rows 8h..8h+8 of block `blk` of a panel of format `F`: their `d` and
/// `m`, and the weights (lane r of vector u: row 8h + r's weights
/// 4u..4u+4), signed ones back from their + 128.
// Not `inline(always)`: its closures need the features to inline the intrinsics.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half_block<const F: u8>(blk: *const u8, h: usize) -> (__m256, __m256, [Vals; 8]) {
    let five = F == Q5_0 || F == Q5_1;
    let head = if F == Q4_1 || F == A8 || F == Q5_1 { 4 } else { 2 };
    let d = f16x8(blk.add(16 * h));
    let m = match F {
        Q4_0 => _mm256_mul_ps(d, _mm256_set1_ps(-8.0)),
        Q5_0 => _mm256_mul_ps(d, _mm256_set1_ps(-16.0)),
        Q8_0 => _mm256_setzero_ps(),
        A8 => _mm256_fmadd_ps(d, _mm256_set1_ps(128.0), f16x8(blk.add(32 + 16 * h))),
        _ => f16x8(blk.add(32 + 16 * h)),
    };
    let qp = blk.add(16 * head + if five { 64 } else { 0 } + 32 * h);
    let load = |j: usize| _mm256_loadu_si256(qp.add(64 * j) as *const __m256i);
    if F == Q8_0 || F == A8 {
        let flip = _mm256_set1_epi8(-128);
        return (d, m, std::array::from_fn(|j| Vals::signed(_mm256_xor_si256(load(j), flip))));
    }
    let low = _mm256_set1_epi8(0x0F);
    let mut q = [_mm256_setzero_si256(); 8];
    for j in 0..4 {
        let v = load(j);
        q[j] = _mm256_and_si256(v, low);
        q[j + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    }
    if five {
        q5_high_bits(_mm256_loadu_si256(blk.add(16 * head + 32 * h) as *const __m256i), &mut q);
    }
    (d, m, q.map(|v| Vals::unsigned(v)))
}

/// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and MLX 8-bit (`avx512`'s format numbers)
/// over `Vnni16` panels: per block and half panel, the exact integer sums
/// of 8 rows, `acc = fma(isum, d * da, acc)`, then `acc = fma(m, s, acc)`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn panel16<const F: u8, const NT: usize>(w: &[u8], a: &[ActRow; NT], stream: bool) -> [[f32; 16]; NT] {
    let bb = block_bytes16(F);
    let nb = a[0].d.len();
    debug_assert_eq!(w.len(), nb * bb);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); 2]; NT];
    for b in 0..nb {
        let blk = w.as_ptr().add(b * bb);
        if stream {
            prefetch(blk, bb);
        }
        for h in 0..2 {
            let (d, m, q) = half_block::<F>(blk, h);
            for (acc, a) in acc.iter_mut().zip(a) {
                let isum = dot(&q, a.qs.as_ptr().add(b * QK), per_i16(F), ones);
                let acc = &mut acc[h];
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(d, _mm256_set1_ps(*a.d.get_unchecked(b))), *acc);
                if F != Q8_0 {
                    *acc = _mm256_fmadd_ps(m, _mm256_set1_ps(*a.s.get_unchecked(b)), *acc);
                }
            }
        }
    }
    per_row(acc)
}

/// An i32 scale in both i16 halves of its lane, so that `madd` of pair
/// sums with it is the scale times their sum.
#[inline(always)]
unsafe fn i16_pairs(sc: __m256i) -> __m256i {
    _mm256_blend_epi16::<0xAA>(sc, _mm256_slli_epi32(sc, 16))
}

/// A K-quant super-block's float steps for one token and half panel
/// (`avx512::k_steps` on 8 rows): `c1` the sub-blocks' integer sums times
/// their scales, `c2` the mins times the activations' block sums.
#[inline(always)]
unsafe fn k_steps(acc: __m256, a: &ActRow, sb: usize, d: __m256, dmin: __m256, c1: __m256i, c2: Option<__m256>) -> __m256 {
    let da = _mm256_set1_ps(*a.d.get_unchecked(sb * (QK_K / QK)));
    let acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c1), _mm256_mul_ps(d, da), acc);
    match c2 {
        Some(c2) => _mm256_fnmadd_ps(c2, _mm256_mul_ps(dmin, da), acc),
        None => acc,
    }
}

/// Sub-block `j` of the Q4_K or Q5_K super-block at `blk`, rows 8h..8h+8:
/// their integer scales (as i16 pairs), mins, and values (`avx512::kq_sub16`
/// on half a panel).
// Not `inline(always)`: its closures need the features to inline the intrinsics.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn kq_sub8<const K5: bool>(blk: *const u8, j: usize, h: usize) -> (__m256i, __m256, [Vals; 8]) {
    let byte = |k: usize| _mm256_cvtepu8_epi32(_mm_loadl_epi64(blk.add(64 + 16 * k + 8 * h) as *const __m128i));
    // quant::k4_scale_min, 8 rows at once.
    let (sc, mn) = if j < 4 {
        let six = _mm256_set1_epi32(63);
        (_mm256_and_si256(byte(j), six), _mm256_and_si256(byte(j + 4), six))
    } else {
        let (hi, nib) = (byte(j + 4), _mm256_set1_epi32(0x0F));
        let top = |k: usize| _mm256_slli_epi32(_mm256_srli_epi32(byte(k), 6), 4);
        (_mm256_or_si256(_mm256_and_si256(hi, nib), top(j - 4)), _mm256_or_si256(_mm256_srli_epi32(hi, 4), top(j)))
    };
    let (qh, qs, low) = (blk.add(256 + 32 * h), blk.add(if K5 { 768 } else { 256 } + 32 * h), _mm256_set1_epi8(0x0F));
    let q = std::array::from_fn(|u| {
        let v = _mm256_loadu_si256(qs.add(64 * (8 * (j / 2) + u)) as *const __m256i);
        let v = _mm256_and_si256(if j % 2 == 1 { _mm256_srli_epi16(v, 4) } else { v }, low);
        if !K5 {
            return Vals::unsigned(v);
        }
        let bit = _mm256_set1_epi8((1u8 << j) as i8);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_loadu_si256(qh.add(64 * u) as *const __m256i), bit), bit);
        Vals::unsigned(_mm256_or_si256(v, _mm256_and_si256(set, _mm256_set1_epi8(16))))
    });
    (i16_pairs(sc), _mm256_cvtepi32_ps(mn), q)
}

/// Q4_K and Q5_K over `Vnni16` panels, half a panel at a time: per
/// sub-block of 32 the 8 rows' scales and mins decoded once for every
/// token, the integer sums times the scales (`madd` multiplies by them),
/// the mins times the activations' block sums; per super-block `k_steps`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn kq_panel16<const K5: bool, const NT: usize>(w: &[u8], a: &[ActRow; NT], stream: bool) -> [[f32; 16]; NT] {
    let bytes = kq_bytes16(K5);
    let mut acc = [[_mm256_setzero_ps(); 2]; NT];
    for sb in 0..w.len() / bytes {
        let blk = w.as_ptr().add(sb * bytes);
        for h in 0..2 {
            let (mut c1, mut c2) = ([_mm256_setzero_si256(); NT], [_mm256_setzero_ps(); NT]);
            for j in 0..QK_K / QK {
                if stream && h == 0 {
                    prefetch_part(blk, bytes, KQ_AHEAD * bytes, j, QK_K / QK);
                }
                let (sc, mn, q) = kq_sub8::<K5>(blk, j, h);
                let b = sb * (QK_K / QK) + j;
                for ((c1, c2), a) in c1.iter_mut().zip(&mut c2).zip(a) {
                    *c1 = _mm256_add_epi32(*c1, dot(&q, a.qs.as_ptr().add(b * QK), if K5 { 4 } else { 8 }, sc));
                    *c2 = _mm256_fmadd_ps(mn, _mm256_set1_ps(*a.bsum.get_unchecked(b)), *c2);
                }
            }
            let (d, dmin) = (f16x8(blk.add(16 * h)), f16x8(blk.add(32 + 16 * h)));
            for (t, acc) in acc.iter_mut().enumerate() {
                acc[h] = k_steps(acc[h], &a[t], sb, d, dmin, c1[t], Some(c2[t]));
            }
        }
    }
    per_row(acc)
}

/// Sub-block `j` (values 16j..16j+16) of the Q6_K super-block at `blk`,
/// rows 8hh..8hh+8: their integer scales (as i16 pairs), and the values,
/// signed (`avx512::q6k_sub16` on half a panel, less the + 32).
// Not `inline(always)`: its closures need the features to inline the intrinsics.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_sub8(blk: *const u8, j: usize, hh: usize) -> (__m256i, [Vals; 4]) {
    let (low, top) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
    let (scales, ql, qh) = (blk.add(32), blk.add(288 + 32 * hh), blk.add(288 + 32 * 64 + 32 * hh));
    let (h, i, g) = (j / 8, j % 8 / 2, j % 2);
    let sc = _mm256_cvtepi8_epi32(_mm_loadl_epi64(scales.add(16 * j + 8 * hh) as *const __m128i));
    let q = std::array::from_fn(|u| {
        let l4 = 4 * g + u;
        let l = _mm256_loadu_si256(ql.add(64 * (16 * h + 8 * (i % 2) + l4)) as *const __m256i);
        let hb = _mm256_loadu_si256(qh.add(64 * (8 * h + l4)) as *const __m256i);
        let l = if i >= 2 { _mm256_srli_epi16(l, 4) } else { l };
        let hb = match i {
            0 => _mm256_slli_epi16(hb, 4),
            1 => _mm256_slli_epi16(hb, 2),
            2 => hb,
            _ => _mm256_srli_epi16(hb, 2),
        };
        let v = _mm256_or_si256(_mm256_and_si256(l, low), _mm256_and_si256(hb, top));
        Vals::signed(_mm256_sub_epi8(v, _mm256_set1_epi8(32)))
    });
    (i16_pairs(sc), q)
}

/// Q6_K over `Vnni16` panels, half a panel at a time: per sub-block of 16
/// the 8 rows' values rebuilt once for every token, the integer sums
/// (4 pair sums of at most 8128 fit i16) times the rows' scales; per
/// super-block `k_steps`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q6k_panel16<const NT: usize>(w: &[u8], a: &[ActRow; NT], stream: bool) -> [[f32; 16]; NT] {
    let mut acc = [[_mm256_setzero_ps(); 2]; NT];
    for sb in 0..w.len() / Q6K_BYTES16 {
        let blk = w.as_ptr().add(sb * Q6K_BYTES16);
        for hh in 0..2 {
            let mut c1 = [_mm256_setzero_si256(); NT];
            for j in 0..QK_K / 16 {
                if stream && hh == 0 {
                    prefetch_part(blk, Q6K_BYTES16, KQ_AHEAD * Q6K_BYTES16, j, QK_K / 16);
                }
                let (sc, q) = q6k_sub8(blk, j, hh);
                for (c1, a) in c1.iter_mut().zip(a) {
                    *c1 = _mm256_add_epi32(*c1, dot(&q, a.qs.as_ptr().add(sb * QK_K + 16 * j), 4, sc));
                }
            }
            let d = f16x8(blk.add(16 * hh));
            for (t, acc) in acc.iter_mut().enumerate() {
                acc[hh] = k_steps(acc[hh], &a[t], sb, d, d, c1[t], None);
            }
        }
    }
    per_row(acc)
}
