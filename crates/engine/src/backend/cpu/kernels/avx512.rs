//! The 512-bit VNNI kernels over `Layout::Vnni16` panels. Callers must
//! have checked the CPU features (see `Isa::detect`).
//!
//! A panel block is 16 rows' f16 scales (and mins), then 64-byte vectors
//! whose 32-bit lane r holds 4 consecutive weights of row r: each load is a
//! `vpdpbusd` operand as it stands, a broadcast group of 4 activation bytes
//! multiplies all 16 rows at once, and results land one row per lane, so a
//! batch of one spends a few instructions per 64 weight bytes and no
//! shuffles or horizontal sums.
//!
//! `stream` says whether the panel comes from DRAM (a decode step, or a
//! prompt's first tile of tokens), where the kernels prefetch ahead, or
//! from L2 (a prompt's later tiles re-reading the same rows), where the
//! hardware prefetcher keeps up and a software one only takes issue slots
//! (1B Q4_K_M 512-token prefill 2531-2552 -> 2365-2392 ms without it).

use std::arch::x86_64::*;

use crate::formats::quant::{ActRow, QK, QK_K};

/// How far ahead of the block being multiplied the panel stream is
/// fetched. The hardware prefetchers alone leave a batch of one waiting on
/// L3 and DRAM: 2048 x 2048 Q4_0 GEMV 140-154 -> 54-63 us from L3, 200-235
/// -> 157-176 us from DRAM, with distances of 2-8 KiB about alike.
///
/// Fetched into L2 (`T1`), not L1: on an Intel Xeon (2 cores), 8192 x 2048
/// GEMV from DRAM, Q4_0 18.3 -> 22.5 GB/s, Q4_K 15.9 -> 20.6, Q6_K 15.8
/// -> 21.0 (of a 31-32 GB/s read probe). An L1 prefetch holds one of the
/// few line-fill buffers for the whole trip to DRAM; L2 tracks more misses
/// at once, and the line moves on to L1 from there in a few cycles.
const PREFETCH: usize = 4096;

/// How many panel blocks ahead the K-quant kernels fetch (4.5-6.6 KiB):
/// on an AMD EPYC (Zen 4), 2048 x 2048 GEMV from DRAM, Q6_K 290-375 ->
/// 138-183 us and Q4_K 149-181 -> 99-121 us against one burst per block;
/// one and three blocks ahead were about alike.
pub(super) const KQ_AHEAD: usize = 2;

/// Asks for the cache lines `PREFETCH` bytes past `len` bytes at `p`.
#[inline(always)]
pub(super) unsafe fn prefetch(p: *const u8, len: usize) {
    for l in (0..len).step_by(64) {
        // A hint: past the matrix's end it reads nothing and cannot fault.
        _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(PREFETCH + l) as *const i8);
    }
}

/// Asks for the `part`-th of `n` slices of the cache lines `ahead` bytes
/// past the `len` bytes at `p`. K-quant panel blocks are 2-3 KiB: asked
/// for at once, their 36-53 lines overflow the line-fill buffers and most
/// requests are dropped, so those kernels spread them over the sub-blocks.
#[inline(always)]
pub(super) unsafe fn prefetch_part(p: *const u8, len: usize, ahead: usize, part: usize, n: usize) {
    let lines = len.div_ceil(64);
    for l in lines * part / n..lines * (part + 1) / n {
        _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(ahead + 64 * l) as *const i8);
    }
}

/// The integer products of 32 activation bytes at `x` with the 16 rows'
/// 32 weights in `q` (vector u, lane r: row r's weights 4u..4u+4), in two
/// chains so that a batch of one is not bound by `vpdpbusd`'s latency.
#[inline(always)]
unsafe fn dot32(q: &[__m512i; 8], x: *const i8) -> __m512i {
    let x = |u: usize| _mm512_set1_epi32((x as *const i32).add(u).read_unaligned());
    let (mut s0, mut s1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
    for u in (0..8).step_by(2) {
        s0 = _mm512_dpbusd_epi32(s0, q[u], x(u));
        s1 = _mm512_dpbusd_epi32(s1, q[u + 1], x(u + 1));
    }
    _mm512_add_epi32(s0, s1)
}

/// Each token's 16 lanes as the 16 rows' results.
#[inline(always)]
unsafe fn per_row<const NT: usize>(acc: [__m512; NT]) -> [[f32; 16]; NT] {
    // A loop, not `map`: a closure would not inherit the caller's features,
    // and each store would become a call.
    let mut out = [[0.0f32; 16]; NT];
    for (o, v) in out.iter_mut().zip(acc) {
        _mm512_storeu_ps(o.as_mut_ptr(), v);
    }
    out
}

/// The formats `vnni16` reads (its `F` parameter).
pub const Q4_0: u8 = 0;
pub const Q4_1: u8 = 1;
pub const Q8_0: u8 = 2;
pub const A8: u8 = 3;
pub const Q5_0: u8 = 4;
pub const Q5_1: u8 = 5;

/// Whether format `F`'s weights are signed 8-bit, stored + 128.
pub const fn signed8(f: u8) -> bool {
    f == Q8_0 || f == A8
}

/// The sum of activation block `b`'s 32 bytes.
#[inline(always)]
pub unsafe fn sum32(a: &ActRow, b: usize) -> i32 {
    *a.sum16.get_unchecked(2 * b) + *a.sum16.get_unchecked(2 * b + 1)
}

/// Bytes of f16 fields (the scale, then a min or bias) before a block's
/// quants in a `Vnni16` panel of format `F`.
const fn head16(f: u8) -> usize {
    if f == Q4_1 || f == A8 || f == Q5_1 { 4 } else { 2 }
}

/// Bytes of one block of 16 rows of format `F` in a `Vnni16` panel.
pub const fn block_bytes16(f: u8) -> usize {
    16 * (head16(f)
        + match f {
            Q4_0 | Q4_1 => QK / 2,
            Q5_0 | Q5_1 => 4 + QK / 2,
            _ => QK,
        })
}

/// Sets the fifth bit of the Q5 weights in `q` (lane r of `q[u]`: row r's
/// weights 4u..4u+4) from `qh`, lane r: row r's 32 high bits. Bits
/// 4u..4u+4 sit in byte u / 2 of the lane: that byte is copied to the
/// lane's 4 bytes, byte i tests its bit i (or i + 4), and the bytes whose
/// bit is set gain 16. Three instructions per vector of 64 weights.
#[inline(always)]
unsafe fn q5_high_bits(qh: __m512i, q: &mut [__m512i; 8]) {
    // Within each 128-bit lane: dword k's bytes all take byte 4k + c.
    let base = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12));
    let bits = [_mm512_set1_epi32(0x0804_0201), _mm512_set1_epi32(0x8040_2010u32 as i32)];
    let sixteen = _mm512_set1_epi8(16);
    for c in 0..4 {
        let bytes = _mm512_shuffle_epi8(qh, _mm512_add_epi8(base, _mm512_set1_epi8(c as i8)));
        for h in 0..2 {
            let u = 2 * c + h;
            let set = _mm512_test_epi8_mask(bytes, bits[h]);
            q[u] = _mm512_mask_add_epi8(q[u], set, q[u], sixteen);
        }
    }
}

/// Block `blk` of a panel of format `F`: the 16 rows' `d` and `m`, and
/// `q[j]`, lane r: row r's unsigned weights 4j..4j+4.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn block16<const F: u8>(blk: *const u8) -> (__m512, __m512, [__m512i; 8]) {
    let five = F == Q5_0 || F == Q5_1;
    let nibbles = F == Q4_0 || F == Q4_1 || five;
    let d = _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i));
    let m = match F {
        Q4_0 => _mm512_mul_ps(d, _mm512_set1_ps(-8.0)),
        Q5_0 => _mm512_mul_ps(d, _mm512_set1_ps(-16.0)),
        Q8_0 => _mm512_setzero_ps(),
        // MLX's unsigned q is stored q - 128: its bias gains 128 d.
        A8 => _mm512_fmadd_ps(d, _mm512_set1_ps(128.0), _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(32) as *const __m256i))),
        _ => _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(32) as *const __m256i)),
    };
    // Q5 blocks: the 16 rows' high bits (one dword per row), then the
    // nibbles as Q4's.
    let qp = blk.add(16 * head16(F) + if five { 64 } else { 0 });
    let mut q = [_mm512_setzero_si512(); 8];
    if nibbles {
        // Byte k of a Q4 block holds weights k (low nibble) and k + 16.
        let low = _mm512_set1_epi8(0x0F);
        for j in 0..4 {
            let v = _mm512_loadu_si512(qp.add(64 * j) as *const _);
            q[j] = _mm512_and_si512(v, low);
            q[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        }
    } else {
        for (j, q) in q.iter_mut().enumerate() {
            *q = _mm512_loadu_si512(qp.add(64 * j) as *const _);
        }
    }
    if five {
        q5_high_bits(_mm512_loadu_si512(blk.add(16 * head16(F)) as *const _), &mut q);
    }
    (d, m, q)
}

/// Every format here is, per block, `d * Σ q a + m * Σ a`, in the order
/// `quant::dot_scalar` sets for every path: per block and token the exact
/// integer sum in 16 lanes (row by row), `acc = fma(isum, d * da, acc)`,
/// then `acc = fma(m, s, acc)`. Q4_0 (`m = -8 d`), Q4_1 (`m` stored),
/// Q5_0 (`m = -16 d`) and Q5_1 multiply unsigned weights; Q8_0 (no `m`)
/// and MLX 8-bit (`m` its bias + 128 d) signed ones: they are stored + 128
/// for `vpdpbusd`, and the integer sum starts at -128 times the
/// activations' sum to take that off. (The AMX tiles apply the same chain.)
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn vnni16<const F: u8, const NT: usize>(w: &[u8], a: &[ActRow; NT], stream: bool) -> [[f32; 16]; NT] {
    let bb = block_bytes16(F);
    let nb = a[0].d.len();
    debug_assert_eq!(w.len(), nb * bb);
    let wp = w.as_ptr();
    let mut acc = [_mm512_setzero_ps(); NT];
    for b in 0..nb {
        let blk = wp.add(b * bb);
        if stream {
            prefetch(blk, bb);
        }
        let (d, m, q) = block16::<F>(blk);
        for (acc, a) in acc.iter_mut().zip(a) {
            let mut isum = dot32(&q, a.qs.as_ptr().add(b * QK));
            if signed8(F) {
                isum = _mm512_add_epi32(isum, _mm512_set1_epi32(-128 * sum32(a, b)));
            }
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(d, _mm512_set1_ps(*a.d.get_unchecked(b))), *acc);
            if F != Q8_0 {
                *acc = _mm512_fmadd_ps(m, _mm512_set1_ps(*a.s.get_unchecked(b)), *acc);
            }
        }
    }
    per_row(acc)
}

/// Bytes of one Q6_K super-block of 16 rows in a `Vnni16` panel.
pub const Q6K_BYTES16: usize = 16 * 210;

/// The 16 rows' super-block scale `d` (and `dmin`) of the K-quant
/// super-block at `blk`: Q4_K and Q5_K keep both first, Q6_K its `d`.
#[inline(always)]
pub unsafe fn k_head16(blk: *const u8, q6k: bool) -> (__m512, __m512) {
    if q6k {
        return (_mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i)), _mm512_setzero_ps());
    }
    (_mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i)), _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(32) as *const __m256i)))
}

/// Sub-block `j` (values 16j..16j+16) of the Q6_K super-block of 16 rows
/// at `blk`: the rows' integer scales, and `q[u]`, lane r: row r's 6-bit
/// values 4u..4u+4 of the sub-block, unsigned (stored + 32).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn q6k_sub16(blk: *const u8, j: usize) -> (__m512i, [__m512i; 4]) {
    let (low, top) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x30));
    let (scales, ql, qh) = (blk.add(32), blk.add(288), blk.add(288 + 32 * 64));
    // Half h = j / 8 of the super-block, its quarter i (low or high
    // nibbles of the first or second 32 `ql` bytes, the i-th bit pair of
    // `qh`), dwords 4g..4g+4.
    let (h, i, g) = (j / 8, j % 8 / 2, j % 2);
    let sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(scales.add(16 * j) as *const __m128i));
    let q = std::array::from_fn(|u| {
        let l4 = 4 * g + u;
        let l = _mm512_loadu_si512(ql.add(64 * (16 * h + 8 * (i % 2) + l4)) as *const _);
        let hb = _mm512_loadu_si512(qh.add(64 * (8 * h + l4)) as *const _);
        let l = if i >= 2 { _mm512_srli_epi16(l, 4) } else { l };
        let hb = match i {
            0 => _mm512_slli_epi16(hb, 4),
            1 => _mm512_slli_epi16(hb, 2),
            2 => hb,
            _ => _mm512_srli_epi16(hb, 2),
        };
        _mm512_or_si512(_mm512_and_si512(l, low), _mm512_and_si512(hb, top))
    });
    (sc, q)
}

/// The activations' scale of super-block `sb` (one per 256 for K-quant
/// weights, `QType::act_group`), times the rows' `d` (or `dmin`).
#[inline(always)]
unsafe fn times_act_scale(a: &ActRow, sb: usize, d: __m512) -> __m512 {
    _mm512_mul_ps(d, _mm512_set1_ps(*a.d.get_unchecked(sb * (QK_K / QK))))
}

/// A K-quant super-block's float steps for one token, after its exact
/// integer sums: `c1` (the sub-blocks' integer sums times their scales)
/// and, for Q4_K and Q5_K, `c2` (their mins times the activations' block
/// sums, exact in f32), in `quant::dot_scalar`'s order.
#[inline(always)]
unsafe fn k_steps(acc: __m512, a: &ActRow, sb: usize, (d, dmin): (__m512, __m512), c1: __m512i, c2: Option<__m512>) -> __m512 {
    let acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c1), times_act_scale(a, sb, d), acc);
    match c2 {
        Some(c2) => _mm512_fnmadd_ps(c2, times_act_scale(a, sb, dmin), acc),
        None => acc,
    }
}

/// Q6_K over `Vnni16` panels. Per sub-block of 16 weights: the 6-bit values
/// (a nibble of `ql`, two bits of `qh`; stored + 32) rebuilt for 16 rows in
/// a few vector operations, multiplied unsigned, the + 32 taken off by
/// starting the integer sum at -32 times the activations' sum, then times
/// the rows' integer scales; per super-block, `k_steps`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn q6k_vnni16<const NT: usize>(w: &[u8], a: &[ActRow; NT], stream: bool) -> [[f32; 16]; NT] {
    let wp = w.as_ptr();
    let mut acc = [_mm512_setzero_ps(); NT];
    for sb in 0..w.len() / Q6K_BYTES16 {
        let blk = wp.add(sb * Q6K_BYTES16);
        let mut c1 = [_mm512_setzero_si512(); NT];
        for j in 0..QK_K / 16 {
            if stream {
                prefetch_part(blk, Q6K_BYTES16, KQ_AHEAD * Q6K_BYTES16, j, QK_K / 16);
            }
            let (sc, q) = q6k_sub16(blk, j);
            for (c1, a) in c1.iter_mut().zip(a) {
                *c1 = _mm512_add_epi32(*c1, _mm512_mullo_epi32(q6k_isum(&q, a, sb * QK_K + 16 * j), sc));
            }
        }
        let head = k_head16(blk, true);
        for ((acc, a), c1) in acc.iter_mut().zip(a).zip(c1) {
            *acc = k_steps(*acc, a, sb, head, c1, None);
        }
    }
    per_row(acc)
}

/// The integer sums of Q6_K values `v..v + 16` (`q` as `q6k_sub16` gives
/// them) times the activations there, the + 32 taken off.
#[inline(always)]
unsafe fn q6k_isum(q: &[__m512i; 4], a: &ActRow, v: usize) -> __m512i {
    let ap = a.qs.as_ptr().add(v) as *const i32;
    let mut s = _mm512_set1_epi32(-32 * *a.sum16.get_unchecked(v / 16));
    for (u, q) in q.iter().enumerate() {
        s = _mm512_dpbusd_epi32(s, *q, _mm512_set1_epi32(ap.add(u).read_unaligned()));
    }
    s
}

/// Bytes of one Q4_K (`K5` false) or Q5_K super-block of 16 rows in a
/// `Vnni16` panel.
pub const fn kq_bytes16(k5: bool) -> usize {
    16 * if k5 { 176 } else { 144 }
}

/// Sub-block `j` (values 32j..32j+32) of the Q4_K or Q5_K super-block of
/// 16 rows at `blk`: the rows' integer scales, their mins (as f32), and
/// `q[u]`, lane r: row r's values 4u..4u+4 of the sub-block (nibbles, and
/// for Q5_K bit j of the rows' `qh` bytes 4u..4u+4 as the fifth bit).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn kq_sub16<const K5: bool>(blk: *const u8, j: usize) -> (__m512i, __m512, [__m512i; 8]) {
    // Scale byte k of the 16 rows, one row per 32-bit lane.
    let byte = |k: usize| _mm512_cvtepu8_epi32(_mm_loadu_si128(blk.add(64 + 16 * k) as *const __m128i));
    // quant::k4_scale_min, 16 rows at once.
    let (sc, mn) = if j < 4 {
        let six = _mm512_set1_epi32(63);
        (_mm512_and_si512(byte(j), six), _mm512_and_si512(byte(j + 4), six))
    } else {
        let (hi, nib) = (byte(j + 4), _mm512_set1_epi32(0x0F));
        let top = |k: usize| _mm512_slli_epi32(_mm512_srli_epi32(byte(k), 6), 4);
        (_mm512_or_si512(_mm512_and_si512(hi, nib), top(j - 4)), _mm512_or_si512(_mm512_srli_epi32(hi, 4), top(j)))
    };
    // Sub-blocks 2c and 2c + 1 are the low and high nibbles of dwords 8c..8c+8.
    let (qh, qs, low) = (blk.add(256), blk.add(if K5 { 768 } else { 256 }), _mm512_set1_epi8(0x0F));
    let q = std::array::from_fn(|u| {
        let v = _mm512_loadu_si512(qs.add(64 * (8 * (j / 2) + u)) as *const _);
        let v = _mm512_and_si512(if j % 2 == 1 { _mm512_srli_epi16(v, 4) } else { v }, low);
        if !K5 {
            return v;
        }
        let set = _mm512_test_epi8_mask(_mm512_loadu_si512(qh.add(64 * u) as *const _), _mm512_set1_epi8((1u8 << j) as i8));
        _mm512_mask_add_epi8(v, set, v, _mm512_set1_epi8(16))
    });
    (sc, _mm512_cvtepi32_ps(mn), q)
}

/// Q4_K and Q5_K over `Vnni16` panels: per sub-block of 32, the 16 rows'
/// 6-bit scale and min decoded in vector lanes once for every token, 8
/// vectors of values multiplied unsigned, the integer sum times the
/// scale, and the min times the activations' block sum; per super-block,
/// `k_steps`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn kq_vnni16<const K5: bool, const NT: usize>(w: &[u8], a: &[ActRow; NT], stream: bool) -> [[f32; 16]; NT] {
    let (wp, bytes) = (w.as_ptr(), kq_bytes16(K5));
    let mut acc = [_mm512_setzero_ps(); NT];
    for sb in 0..w.len() / bytes {
        let blk = wp.add(sb * bytes);
        let (mut c1, mut c2) = ([_mm512_setzero_si512(); NT], [_mm512_setzero_ps(); NT]);
        for j in 0..QK_K / QK {
            if stream {
                prefetch_part(blk, bytes, KQ_AHEAD * bytes, j, QK_K / QK);
            }
            let (sc, mn, q) = kq_sub16::<K5>(blk, j);
            let b = sb * (QK_K / QK) + j;
            for ((c1, c2), a) in c1.iter_mut().zip(&mut c2).zip(a) {
                *c1 = _mm512_add_epi32(*c1, _mm512_mullo_epi32(dot32(&q, a.qs.as_ptr().add(b * QK)), sc));
                *c2 = _mm512_fmadd_ps(mn, _mm512_set1_ps(*a.bsum.get_unchecked(b)), *c2);
            }
        }
        let head = k_head16(blk, false);
        for (t, acc) in acc.iter_mut().enumerate() {
            *acc = k_steps(*acc, &a[t], sb, head, c1[t], Some(c2[t]));
        }
    }
    per_row(acc)
}

/// A K-quant panel unpacked once for a prompt's tiles of tokens to share:
/// per super-block its `k_head16`, per sub-block a `KqSub`.
#[derive(Default)]
pub struct Unpacked {
    heads: Vec<(__m512, __m512)>,
    subs: Vec<KqSub>,
}

/// One sub-block of a K-quant panel, unpacked: the rows' integer scales,
/// and its vectors of values; Q4_K and Q5_K (`kq_sub16`): 32 values in 8
/// vectors, and the rows' mins; Q6_K (`q6k_sub16`): 16 values in the
/// first 4.
#[derive(Clone, Copy)]
struct KqSub {
    sc: __m512i,
    mn: __m512,
    q: [__m512i; 8],
}

/// Unpacks the Q6_K panel `w` into `out` (see `kq_unpack16`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn q6k_unpack16(w: &[u8], out: &mut Unpacked) {
    let wp = w.as_ptr();
    out.heads.clear();
    out.subs.clear();
    for sb in 0..w.len() / Q6K_BYTES16 {
        let blk = wp.add(sb * Q6K_BYTES16);
        out.heads.push(k_head16(blk, true));
        for j in 0..QK_K / 16 {
            prefetch_part(blk, Q6K_BYTES16, KQ_AHEAD * Q6K_BYTES16, j, QK_K / 16);
            let (sc, q) = q6k_sub16(blk, j);
            let z = _mm512_setzero_si512();
            out.subs.push(KqSub { sc, mn: _mm512_setzero_ps(), q: [q[0], q[1], q[2], q[3], z, z, z, z] });
        }
    }
}

/// `q6k_vnni16` over an unpacked panel: the same operations in the same
/// order, so the same bits.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn q6k_unpacked16<const NT: usize>(p: &Unpacked, a: &[ActRow; NT]) -> [[f32; 16]; NT] {
    let mut acc = [_mm512_setzero_ps(); NT];
    for (sb, (&head, subs)) in p.heads.iter().zip(p.subs.chunks_exact(QK_K / 16)).enumerate() {
        let mut c1 = [_mm512_setzero_si512(); NT];
        for (j, sub) in subs.iter().enumerate() {
            let q = [sub.q[0], sub.q[1], sub.q[2], sub.q[3]];
            for (c1, a) in c1.iter_mut().zip(a) {
                *c1 = _mm512_add_epi32(*c1, _mm512_mullo_epi32(q6k_isum(&q, a, sb * QK_K + 16 * j), sub.sc));
            }
        }
        for ((acc, a), c1) in acc.iter_mut().zip(a).zip(c1) {
            *acc = k_steps(*acc, a, sb, head, c1, None);
        }
    }
    per_row(acc)
}

/// Unpacks the Q4_K or Q5_K panel `w` into `out`, a sub-block at a time,
/// for a prompt's tiles of tokens to share: each tile then skips the scale
/// decoding and the nibble unpacking `kq_vnni16` does per tile.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn kq_unpack16<const K5: bool>(w: &[u8], out: &mut Unpacked) {
    let (wp, bytes) = (w.as_ptr(), kq_bytes16(K5));
    out.heads.clear();
    out.subs.clear();
    for sb in 0..w.len() / bytes {
        let blk = wp.add(sb * bytes);
        out.heads.push(k_head16(blk, false));
        for j in 0..QK_K / QK {
            prefetch_part(blk, bytes, KQ_AHEAD * bytes, j, QK_K / QK);
            let (sc, mn, q) = kq_sub16::<K5>(blk, j);
            out.subs.push(KqSub { sc, mn, q });
        }
    }
}

/// `kq_vnni16` over an unpacked panel: the same operations in the same
/// order, so the same bits.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn kq_unpacked16<const NT: usize>(p: &Unpacked, a: &[ActRow; NT]) -> [[f32; 16]; NT] {
    let mut acc = [_mm512_setzero_ps(); NT];
    for (sb, (&head, subs)) in p.heads.iter().zip(p.subs.chunks_exact(QK_K / QK)).enumerate() {
        let (mut c1, mut c2) = ([_mm512_setzero_si512(); NT], [_mm512_setzero_ps(); NT]);
        for (j, sub) in subs.iter().enumerate() {
            let b = sb * (QK_K / QK) + j;
            for ((c1, c2), a) in c1.iter_mut().zip(&mut c2).zip(a) {
                *c1 = _mm512_add_epi32(*c1, _mm512_mullo_epi32(dot32(&sub.q, a.qs.as_ptr().add(b * QK)), sub.sc));
                *c2 = _mm512_fmadd_ps(sub.mn, _mm512_set1_ps(*a.bsum.get_unchecked(b)), *c2);
            }
        }
        for (t, acc) in acc.iter_mut().enumerate() {
            *acc = k_steps(*acc, &a[t], sb, head, c1[t], Some(c2[t]));
        }
    }
    per_row(acc)
}
