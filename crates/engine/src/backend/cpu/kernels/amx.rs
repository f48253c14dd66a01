//! AMX-INT8 tiles for prompts: 16 tokens times 16 weight rows per tile
//! multiply, over the same `Vnni16` panels the AVX-512 kernels stream.
//! Callers must have checked `grant()` (see `Isa::available`).
//!
//! A panel of 16 rows is decoded once per matrix call into B tiles (rows
//! of 64 bytes, lane r: 4 weights of row r, as `avx512::block16` and
//! friends give them) and the rows' scales. Then each group of 16 tokens
//! runs the tiles and the AVX-512 kernels' float steps on the exact int32
//! sums: the same integers scaled in the same order, so a token's logits
//! are bit-identical whether its batch went through tiles or vectors.
//!
//! - Block formats (Q4_0, Q4_1, Q8_0, MLX 8-bit): one `tdpbsud` per block
//!   of 32, then four vector operations per token to scale it (the
//!   activations have a scale per 32 too).
//! - K-quants (`decode_k`): activations with one scale per super-block
//!   let the tiles sum a whole super-block in integers, 64 values a step,
//!   and the vectors scale once per 256 values.
//!
//! Where tiles pay is measured in `docs/performance.md`: a tile row that
//! straddles two cache lines made tile loads 3x slower, so every buffer
//! here is whole 64-byte vectors.

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::avx512::{self, A8, Q8_0};
use crate::formats::quant::{QType, QuantizedActs, QK, QK_K};

/// Tokens per tile: a prompt goes through the tiles 16 tokens at a time,
/// the rest of it through the vector kernels.
pub const TOKENS: usize = 16;

/// Whether this process may run AMX-INT8 tiles, or why not: the CPU must
/// have AMX-TILE and AMX-INT8, and Linux must grant the tile state
/// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, once per process).
pub fn grant() -> Result<(), String> {
    static GRANT: OnceLock<Result<(), String>> = OnceLock::new();
    GRANT.get_or_init(|| {
        let edx = __cpuid_count(7, 0).edx;
        if edx >> 24 & 1 == 0 || edx >> 25 & 1 == 0 {
            return Err("this cpu has no amx-int8".into());
        }
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        const SYS_ARCH_PRCTL: i64 = 158;
        let ret: i64;
        // SAFETY: a syscall that only changes this process's permissions;
        // the kernel clobbers rcx and r11.
        unsafe {
            asm!("syscall", inlateout("rax") SYS_ARCH_PRCTL => ret, in("rdi") ARCH_REQ_XCOMP_PERM, in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _, lateout("r11") _, options(nostack));
        }
        match ret {
            0 => Ok(()),
            e => Err(format!("the kernel refused the AMX tile state (arch_prctl errno {})", -e)),
        }
    })
    .clone()
}

/// The fewest tokens a matrix call needs for the tiles to take its prompt
/// (or batch), by format; `None` where they never pay. Each call decodes
/// every panel once into B tiles (3 bytes a weight for Q4_K and Q5_K, 2
/// for Q6_K, 1 for the 8-bit formats), a cost its groups of 16 tokens
/// share: on the Intel Xeon measured (`kernel_speed`, 2048 x 2048, GFLOP/s
/// on tiles against VNNI), Q4_K 270 / 465 / 614 / 712 against 525 / 588 /
/// 658 / 674 at 16 / 32 / 48 / 64 tokens, Q5_K alike, Q6_K 242 / 412 /
/// 601 against 313 / 428 / 464, Q8_0 443 / 588 against 448 / 539; at 512
/// tokens the tiles run 1040-1190 against 507-668. (A 1B Q4_K_M forward
/// pass over 16 tokens took 118 ms on tiles, 80 on VNNI.) The 4-bit and
/// 5-bit block formats scale every 32 values, and whole forward passes ran
/// faster without tiles at every length: 1B Q4_0 512-token prefill
/// 2163-2195 against 2278-2340 ms, the default model (Q4_1) 413-416
/// against 458-461 (docs/performance.md).
pub fn min_tokens(qtype: QType) -> Option<usize> {
    match qtype {
        QType::Q8_0 | QType::A8 => Some(32),
        QType::Q6_K => Some(48),
        QType::Q4_K | QType::Q5_K => Some(64),
        _ => None,
    }
}

/// One panel of 16 rows decoded for the tiles.
#[derive(Default)]
pub struct Panel {
    /// K-quants: B tiles per step of 64 values (the scaled values' low
    /// bytes, their high bytes, and for Q4_K and Q5_K the mins), 0 for the
    /// block formats.
    k_tiles: usize,
    /// K-quants: per super-block, the rows' `d` and `dmin`.
    heads: Vec<[[f32; 16]; 2]>,
    /// Block formats: per block, its B tile (8 rows of 64 bytes);
    /// K-quants: per step of 64 values, `k_tiles` B tiles of 16 rows.
    /// Vectors, so that every tile row is one cache line: rows that
    /// straddle two made tile loads 3x slower.
    q: Vec<__m512i>,
    /// What the integer sums gain per unit of the activations' sum over
    /// the block: the stored weights' excess over their signed value
    /// (Q8_0 and MLX 8-bit + 128), negated; 0 for the rest.
    offset: i32,
    /// Per sub-block, the 16 rows' factor on the integer sum.
    scale: Vec<[f32; 16]>,
    /// Per sub-block, the 16 rows' factor on the activations' block sum
    /// (`s`); empty for formats without one (Q8_0).
    min: Vec<[f32; 16]>,
}

thread_local! {
    /// A decoded panel's buffers, one per worker thread, kept between
    /// matrices (see `Acts::new`).
    static PANEL: std::cell::Cell<Panel> = std::cell::Cell::new(Panel::default());
}

impl Panel {
    /// This thread's panel buffers; `keep` hands them back.
    pub fn take() -> Panel {
        PANEL.with(|p| p.take())
    }
    pub fn keep(self) {
        PANEL.with(|p| p.set(self));
    }
}

/// Decodes the `Vnni16` panel `w` (16 rows of `qtype`) into `p`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn decode(qtype: QType, w: &[u8], p: &mut Panel) {
    p.q.clear();
    p.scale.clear();
    p.min.clear();
    p.heads.clear();
    p.k_tiles = 0;
    p.offset = if matches!(qtype, QType::Q8_0 | QType::A8) { -128 } else { 0 };
    let store = |p: &mut Panel, scale: __m512, min: Option<__m512>, q: &[__m512i]| {
        p.q.extend_from_slice(q);
        let mut f = [0.0f32; 16];
        _mm512_storeu_ps(f.as_mut_ptr(), scale);
        p.scale.push(f);
        if let Some(m) = min {
            _mm512_storeu_ps(f.as_mut_ptr(), m);
            p.min.push(f);
        }
    };
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn generic<const F: u8>(w: &[u8], p: &mut Panel, store: impl Fn(&mut Panel, __m512, Option<__m512>, &[__m512i])) {
        for blk in w.chunks_exact(avx512::block_bytes16(F)) {
            let (d, m, q) = avx512::block16::<F>(blk.as_ptr());
            store(p, d, (F != Q8_0).then_some(m), &q);
        }
    }
    match qtype {
        QType::Q8_0 => generic::<Q8_0>(w, p, store),
        QType::A8 => generic::<A8>(w, p, store),
        QType::Q4_K | QType::Q5_K | QType::Q6_K => decode_k(qtype, w, p),
        other => unreachable!("no tiles for {other:?}"),
    }
}

/// A K-quant panel for tiles that run whole super-blocks. A super-block's
/// result is `d * c1 - dmin * c2` times the activations' scale (one per
/// super-block, `QType::act_group`), where `c1`, the values times their
/// sub-blocks' integer scales times the activations, and `c2`, the mins
/// times the activations, are exact integer sums, so the tiles can run
/// 64 values a step: B tiles hold each value times its scale (up to 11
/// bits in size) as a low byte and a high byte (two products, the second
/// worth 256), and each value's min (Q4_K, Q5_K). Q6_K's values are
/// centred first (`q - 32`), so it has no min and signed high bytes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn decode_k(qtype: QType, w: &[u8], p: &mut Panel) {
    let q6k = qtype == QType::Q6_K;
    p.k_tiles = if q6k { 2 } else { 3 };
    let sb_bytes = if q6k { avx512::Q6K_BYTES16 } else { avx512::kq_bytes16(qtype == QType::Q5_K) };
    let even = _mm512_set1_epi16(0x00FF);
    // Vectors of values (4 bytes of row r in lane r) times `sc` (lane r:
    // row r's scale), as low-byte and high-byte vectors of the products.
    let scaled = |q: &[__m512i], sc: __m512i, lo: &mut Vec<__m512i>, hi: &mut Vec<__m512i>| {
        // Both 16-bit halves of each lane take the row's scale.
        let sc16 = _mm512_or_si512(_mm512_and_si512(sc, _mm512_set1_epi32(0xFFFF)), _mm512_slli_epi32(sc, 16));
        for &v in q {
            let v = if q6k { _mm512_sub_epi8(v, _mm512_set1_epi8(32)) } else { v };
            // Even and odd bytes widened to 16 bits (Q6_K's signed).
            let (e, o) = if q6k {
                (_mm512_srai_epi16(_mm512_slli_epi16(v, 8), 8), _mm512_srai_epi16(v, 8))
            } else {
                (_mm512_and_si512(v, even), _mm512_srli_epi16(v, 8))
            };
            let (pe, po) = (_mm512_mullo_epi16(e, sc16), _mm512_mullo_epi16(o, sc16));
            lo.push(_mm512_or_si512(_mm512_and_si512(pe, even), _mm512_slli_epi16(po, 8)));
            hi.push(_mm512_or_si512(_mm512_srli_epi16(pe, 8), _mm512_andnot_si512(even, po)));
        }
    };
    let push = |p: &mut Panel, v: &[__m512i]| p.q.extend_from_slice(v);
    let (mut lo, mut hi, mut mn) = (Vec::with_capacity(16), Vec::with_capacity(16), Vec::with_capacity(16));
    for blk in w.chunks_exact(sb_bytes) {
        let (d, dmin) = avx512::k_head16(blk.as_ptr(), q6k);
        let mut head = [[0f32; 16]; 2];
        _mm512_storeu_ps(head[0].as_mut_ptr(), d);
        _mm512_storeu_ps(head[1].as_mut_ptr(), dmin);
        p.heads.push(head);
        // Steps of 64 values: 2 sub-blocks of 32 (Q4_K, Q5_K), 4 of 16 (Q6_K).
        for step in 0..QK_K / 64 {
            (lo.clear(), hi.clear(), mn.clear());
            if q6k {
                for j in 4 * step..4 * step + 4 {
                    let (sc, q) = avx512::q6k_sub16(blk.as_ptr(), j);
                    scaled(&q, sc, &mut lo, &mut hi);
                }
            } else {
                for j in 2 * step..2 * step + 2 {
                    let (sc, m, q) = if qtype == QType::Q5_K { avx512::kq_sub16::<true>(blk.as_ptr(), j) } else { avx512::kq_sub16::<false>(blk.as_ptr(), j) };
                    scaled(&q, sc, &mut lo, &mut hi);
                    // The row's min in each of its lane's 4 bytes.
                    let m4 = _mm512_mullo_epi32(_mm512_cvtps_epi32(m), _mm512_set1_epi32(0x0101_0101));
                    mn.extend(std::iter::repeat_n(m4, 8));
                }
            }
            push(p, &lo);
            push(p, &hi);
            push(p, &mn);
        }
    }
}

/// The tile shapes for sub-blocks of `sub` values (`ldtilecfg`'s operand).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new(sub: usize) -> TileConfig {
        let mut cfg = [0u8; 64];
        cfg[0] = 1; // palette 1
        // (bytes per row, rows) of tmm0-3 (C), tmm4-5 (A), tmm6-7 (B).
        let (c, a, b) = ((64, TOKENS), (sub, TOKENS), (64, sub / 4));
        for (t, &(colsb, rows)) in [c, c, c, c, a, a, b, b].iter().enumerate() {
            cfg[16 + 2 * t..18 + 2 * t].copy_from_slice(&(colsb as u16).to_le_bytes());
            cfg[48 + t] = rows as u8;
        }
        TileConfig(cfg)
    }
}

#[repr(C, align(64))]
struct Sums([[i32; 16]; TOKENS]);

/// Calls `out(t0, res)` for every group of 16 tokens in `acts`, with
/// `res[t][r]` row r of the decoded panel `p` times token `t0 + t`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn multiply(p: &Panel, acts: &Acts, mut out: impl FnMut(usize, &[[f32; 16]; TOKENS])) {
    let cfg = TileConfig::new(acts.width);
    asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
    for t0 in (0..acts.tiles.len() * 64 / acts.xq.n_cols).step_by(TOKENS) {
        let r = match p.k_tiles {
            0 => tokens(p, acts, t0),
            2 => k_tokens::<2>(p, acts, t0),
            _ => k_tokens::<3>(p, acts, t0),
        };
        out(t0, &r);
    }
    asm!("tilerelease", options(nostack, nomem));
}

/// The K-quant panel `p` (`decode_k`) times tokens `t0..t0 + 16`: per
/// super-block, four steps of 64 values into C tiles tmm0-2 (the low
/// bytes' sums, the high bytes', the mins'), stored, and scaled in
/// AVX-512 while the tiles run the next super-block (`NB`: B tiles per
/// step, 3 with mins, 2 without).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn k_tokens<const NB: usize>(p: &Panel, acts: &Acts, t0: usize) -> [[f32; 16]; TOKENS] {
    let xq = acts.xq;
    let (nb, n_sb) = (xq.n_cols / QK, xq.n_cols / QK_K);
    let mut acc = [_mm512_setzero_ps(); TOKENS];
    // Written by the tile stores before any read (not zeroed: that was
    // 14% of a prefill).
    let mut bufs = std::mem::MaybeUninit::<[[Sums; 3]; 2]>::uninit();
    let ptrs: [[*mut i32; 3]; 2] = std::array::from_fn(|k| std::array::from_fn(|h| (bufs.as_mut_ptr() as *mut Sums).add(3 * k + h) as *mut i32));
    // `quant::dot_scalar`'s two float steps for super-block `sb`, from
    // its sums in `c` (spelled out per token by a macro, so that the 16
    // accumulators stay in registers).
    macro_rules! scale_in {
        ($sb:expr, $c:expr) => {{
            let (sb, c): (usize, &[Sums; 3]) = ($sb, $c);
            let [d, dmin] = p.heads.get_unchecked(sb);
            let (d, dmin) = (_mm512_loadu_ps(d.as_ptr()), _mm512_loadu_ps(dmin.as_ptr()));
            macro_rules! one {
                ($t:literal) => {{
                    let lo = _mm512_loadu_si512(c[0].0[$t].as_ptr() as *const _);
                    let hi = _mm512_loadu_si512(c[1].0[$t].as_ptr() as *const _);
                    let c1 = _mm512_add_epi32(lo, _mm512_slli_epi32(hi, 8));
                    let da = _mm512_set1_ps(*xq.d.get_unchecked((t0 + $t) * nb + sb * (QK_K / QK)));
                    acc[$t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c1), _mm512_mul_ps(d, da), acc[$t]);
                    if NB == 3 {
                        let c2 = _mm512_cvtepi32_ps(_mm512_loadu_si512(c[2].0[$t].as_ptr() as *const _));
                        acc[$t] = _mm512_fnmadd_ps(c2, _mm512_mul_ps(dmin, da), acc[$t]);
                    }
                }};
            }
            one!(0); one!(1); one!(2); one!(3); one!(4); one!(5); one!(6); one!(7);
            one!(8); one!(9); one!(10); one!(11); one!(12); one!(13); one!(14); one!(15);
        }};
    }
    for sb in 0..=n_sb {
        if sb < n_sb {
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", options(nostack, nomem));
            for step in 0..QK_K / 64 {
                let a = acts.tile(t0, sb * QK_K + step * 64);
                let w = (p.q.as_ptr() as *const u8).add((sb * (QK_K / 64) + step) * NB * 1024);
                // The low bytes are unsigned; the high bytes (signed for
                // Q6_K) and the mins (below 64) multiply signed.
                asm!(
                    "tileloadd tmm3, [{a} + {s} * 1]",
                    "tileloadd tmm4, [{w} + {s} * 1]",
                    "tdpbsud tmm0, tmm3, tmm4",
                    "tileloadd tmm5, [{w} + {s} * 1 + 1024]",
                    "tdpbssd tmm1, tmm3, tmm5",
                    a = in(reg) a, w = in(reg) w, s = in(reg) 64usize, options(nostack, readonly),
                );
                if NB == 3 {
                    asm!(
                        "tileloadd tmm6, [{w} + {s} * 1 + 2048]",
                        "tdpbssd tmm2, tmm3, tmm6",
                        w = in(reg) w, s = in(reg) 64usize, options(nostack, readonly),
                    );
                }
            }
            let [c0, c1, c2] = ptrs[sb % 2];
            asm!(
                "tilestored [{c0} + {s} * 1], tmm0",
                "tilestored [{c1} + {s} * 1], tmm1",
                "tilestored [{c2} + {s} * 1], tmm2",
                c0 = in(reg) c0, c1 = in(reg) c1, c2 = in(reg) c2, s = in(reg) 64usize, options(nostack),
            );
        }
        if sb > 0 {
            // SAFETY: stored by the tiles of super-block sb - 1.
            scale_in!(sb - 1, &(*bufs.as_ptr())[(sb - 1) % 2]);
        }
    }
    acc.map(|v| {
        let mut o = [0.0f32; 16];
        _mm512_storeu_ps(o.as_mut_ptr(), v);
        o
    })
}

/// The activations of every full group of 16 tokens rearranged for A
/// tiles: per group, per step of `width` values (32 for the block
/// formats, 64 for the K-quants), the 16 tokens' bytes there (contiguous).
/// Read in place, a tile's 16 rows would sit a row of the matrix apart and
/// fall into the same few L1 sets.
pub struct Acts<'a> {
    xq: &'a QuantizedActs,
    width: usize,
    /// Whole cache lines, as `Panel::q`.
    tiles: Vec<__m512i>,
}

thread_local! {
    /// `Acts` buffers, one per thread, kept between matrices.
    static ACTS: std::cell::Cell<Vec<__m512i>> = const { std::cell::Cell::new(Vec::new()) };
}

impl Drop for Acts<'_> {
    fn drop(&mut self) {
        ACTS.with(|b| b.set(std::mem::take(&mut self.tiles)));
    }
}

impl<'a> Acts<'a> {
    pub fn new(xq: &'a QuantizedActs, n: usize, qtype: QType) -> Acts<'a> {
        let cols = xq.n_cols;
        let width = if qtype.act_group() == QK_K { 64 } else { QK };
        // The calling thread's buffer from its last matrix: a fresh one
        // per call cost page faults and zeroing (7% of a prefill).
        let mut tiles = ACTS.with(|b| b.take());
        tiles.clear();
        // Every byte is written below; a vector of any bits is valid.
        tiles.reserve(n / TOKENS * TOKENS * cols / 64);
        unsafe { tiles.set_len(n / TOKENS * TOKENS * cols / 64) };
        // SAFETY: the vectors' bytes, as many as they hold.
        let bytes = unsafe { std::slice::from_raw_parts_mut(tiles.as_mut_ptr() as *mut i8, tiles.len() * 64) };
        for (g, group) in bytes.chunks_exact_mut(TOKENS * cols).enumerate() {
            for (b, blk) in group.chunks_exact_mut(TOKENS * width).enumerate() {
                for (t, dst) in blk.chunks_exact_mut(width).enumerate() {
                    let at = (g * TOKENS + t) * cols + b * width;
                    dst.copy_from_slice(&xq.qs[at..at + width]);
                }
            }
        }
        Acts { xq, width, tiles }
    }

    /// Values `v..` of group `t0 / 16`: an A tile's first row, its rows
    /// `width` bytes apart (`v` a multiple of 16 inside one step).
    fn tile(&self, t0: usize, v: usize) -> *const i8 {
        let w = self.width;
        // SAFETY: inside `tiles` for every group and sub-block.
        unsafe { (self.tiles.as_ptr() as *const i8).add(t0 * self.xq.n_cols + v / w * TOKENS * w + v % w) }
    }
}

/// Multiplies the blocks `b` and `b + 1` of the A tiles at `a` (the
/// second `$next` bytes on) by the B tiles at `w` into C tiles `$c0` and
/// `$c1`.
macro_rules! pair {
    ($c0:literal, $c1:literal, $a:expr, $w:expr, $next:expr, $sub:expr) => {
        asm!(
            concat!("tilezero tmm", $c0),
            "tileloadd tmm4, [{a} + {s32} * 1]",
            "tileloadd tmm6, [{w} + {s64} * 1]",
            concat!("tdpbsud tmm", $c0, ", tmm4, tmm6"),
            concat!("tilezero tmm", $c1),
            "tileloadd tmm5, [{a} + {s32} * 1 + {next}]",
            "tileloadd tmm7, [{w} + {s64} * 1 + {sub16}]",
            concat!("tdpbsud tmm", $c1, ", tmm5, tmm7"),
            a = in(reg) $a, w = in(reg) $w, s32 = in(reg) 32usize, s64 = in(reg) 64usize,
            next = const $next, sub16 = const $sub * 16, options(nostack, readonly),
        )
    };
}

/// Stores C tiles `$c0` and `$c1` as 16 x 16 int32 at `$p0` and `$p1`.
macro_rules! store_pair {
    ($c0:literal, $c1:literal, $p0:expr, $p1:expr) => {
        asm!(
            concat!("tilestored [{p0} + {s64} * 1], tmm", $c0),
            concat!("tilestored [{p1} + {s64} * 1], tmm", $c1),
            p0 = in(reg) $p0, p1 = in(reg) $p1, s64 = in(reg) 64usize, options(nostack),
        )
    };
}

/// The 16 rows times tokens `t0..t0 + 16`. Sub-blocks go two at a time,
/// software-pipelined over two pairs of C tiles (tmm0-1, tmm2-3): a pair's
/// multiplies run while the pair before is stored and scaled.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tokens(p: &Panel, acts: &Acts, t0: usize) -> [[f32; 16]; TOKENS] {
    let xq = acts.xq;
    let cols = xq.n_cols;
    let (nb, n16) = (cols / QK, cols / 16);
    let mut acc = [_mm512_setzero_ps(); TOKENS];
    // The float chain of `avx512::vnni16` and friends for sub-block `j`
    // of every token, from its integer sums in `c` (a macro, spelled out
    // per token, so that the 16 accumulators stay in registers).
    macro_rules! scale_in {
        ($j:expr, $c:expr) => {{
            let (j, c): (usize, &Sums) = ($j, $c);
            let scale = _mm512_loadu_ps(p.scale.get_unchecked(j).as_ptr());
            let has_min = !p.min.is_empty();
            let min = if has_min { _mm512_loadu_ps(p.min.get_unchecked(j).as_ptr()) } else { scale };
            macro_rules! one {
                ($t:literal) => {{
                    let row = t0 + $t;
                    let mut isum = _mm512_loadu_si512(c.0[$t].as_ptr() as *const _);
                    if p.offset != 0 {
                        // The stored weights' excess, taken off as the vector kernels do.
                        let v = row * n16 + j * QK / 16;
                        let sum = *xq.sum16.get_unchecked(v) + *xq.sum16.get_unchecked(v + 1);
                        isum = _mm512_add_epi32(isum, _mm512_set1_epi32(p.offset * sum));
                    }
                    let da = *xq.d.get_unchecked(row * nb + j);
                    acc[$t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(scale, _mm512_set1_ps(da)), acc[$t]);
                    if has_min {
                        acc[$t] = _mm512_fmadd_ps(min, _mm512_set1_ps(*xq.s.get_unchecked(row * nb + j)), acc[$t]);
                    }
                }};
            }
            one!(0); one!(1); one!(2); one!(3); one!(4); one!(5); one!(6); one!(7);
            one!(8); one!(9); one!(10); one!(11); one!(12); one!(13); one!(14); one!(15);
        }};
    }
    let n_sub = cols / QK;
    let pairs = n_sub / 2;
    let at = |b: usize| (acts.tile(t0, b * QK), (p.q.as_ptr() as *const u8).add(b * QK * 16));
    // Written by the tile stores before any read, as in `k_tokens`.
    let mut c = std::mem::MaybeUninit::<[[Sums; 2]; 2]>::uninit();
    let bufs: [[*mut i32; 2]; 2] = std::array::from_fn(|k| std::array::from_fn(|h| (c.as_mut_ptr() as *mut Sums).add(2 * k + h) as *mut i32));
    if pairs > 0 {
        let (a, w) = at(0);
        pair!("0", "1", a, w, TOKENS * QK, QK);
    }
    // Iteration i scales pair i - 1, stores pair i and multiplies pair
    // i + 1, so that no step waits on the one just before it (measured
    // alike in the other order).
    for i in 0..=pairs {
        if i > 0 {
            // SAFETY: stored by the tiles of pair i - 1.
            let [c0, c1] = &(*c.as_ptr())[(i - 1) % 2];
            scale_in!(2 * i - 2, c0);
            scale_in!(2 * i - 1, c1);
        }
        if i < pairs {
            let [b0, b1] = bufs[i % 2];
            if i % 2 == 0 {
                store_pair!("0", "1", b0, b1);
            } else {
                store_pair!("2", "3", b0, b1);
            }
        }
        if i + 1 < pairs {
            let (a, w) = at(2 * i + 2);
            if i % 2 == 0 {
                pair!("2", "3", a, w, TOKENS * QK, QK);
            } else {
                pair!("0", "1", a, w, TOKENS * QK, QK);
            }
        }
    }
    if n_sub % 2 == 1 {
        // The last sub-block of an odd count, alone.
        let (a, w) = at(n_sub - 1);
        asm!(
            "tilezero tmm0",
            "tileloadd tmm4, [{a} + {s32} * 1]",
            "tileloadd tmm6, [{w} + {s64} * 1]",
            "tdpbsud tmm0, tmm4, tmm6",
            "tilestored [{c0} + {s64} * 1], tmm0",
            a = in(reg) a, w = in(reg) w, s32 = in(reg) 32usize, s64 = in(reg) 64usize, c0 = in(reg) bufs[0][0],
            options(nostack),
        );
        // SAFETY: stored just above.
        scale_in!(n_sub - 1, &(*c.as_ptr())[0][0]);
    }
    acc.map(|v| {
        let mut o = [0.0f32; 16];
        _mm512_storeu_ps(o.as_mut_ptr(), v);
        o
    })
}
