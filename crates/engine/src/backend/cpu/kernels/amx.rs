//! AMX-INT8 tiles for prompts: 16 tokens times 16 weight rows per tile
//! multiply, over the same `Vnni16` panels the AVX-512 kernels stream.
//! Callers must have checked `grant()` (see `Isa::available`).
//!
//! A panel of 16 rows is decoded once per matrix call into B tiles (a
//! sub-block's `sub / 4` rows of 64 bytes, lane r: 4 unsigned weights of
//! row r, exactly what `avx512::block16` and friends return) and the
//! rows' scale vectors. Then each group of 16 tokens runs, per sub-block,
//! one `tdpbsud` (signed activations times unsigned weights, exact int32
//! sums) and the AVX-512 kernels' float chain on the result: the same
//! integer sums scaled in the same order, so a token's logits are
//! bit-identical whether its batch went through tiles or vectors.
//!
//! Opt-in (`MLX_SERVING_ISA=amx`), not the default: a block format needs
//! every 16 x 16 x 32 product stored and scaled in AVX-512 (16 vectors,
//! four operations each), and on the Xeon measured (2 cores) tile
//! instructions and vector ones did not overlap: 512 tokens by a 2048 x
//! 2048 Q4_0 matrix took 3.4 ms of tiles plus 3.2 ms of scaling, against
//! 6.2 ms on VNNI alone (docs/performance.md).

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::avx512::{self, A8, Q4_0, Q4_1, Q8_0};
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

/// The formats the tiles take (those with `Vnni16` panels).
pub fn supports(qtype: QType) -> bool {
    matches!(qtype, QType::Q4_0 | QType::Q4_1 | QType::Q8_0 | QType::A8 | QType::Q4_K | QType::Q5_K | QType::Q6_K)
}

/// One panel of 16 rows decoded for the tiles.
#[derive(Default)]
pub struct Panel {
    /// Values per sub-block: 32, or 16 for Q6_K.
    sub: usize,
    /// Per sub-block, its B tile: `sub / 4` rows of 64 bytes.
    q: Vec<u8>,
    /// What the integer sums gain per unit of the activations' sum over
    /// the sub-block: the stored weights' excess over their signed value
    /// (Q8_0 and MLX 8-bit + 128, Q6_K + 32), negated; 0 for the rest.
    offset: i32,
    /// Per sub-block, the 16 rows' factor on the integer sum.
    scale: Vec<[f32; 16]>,
    /// Per sub-block, the 16 rows' factor on the activations' block sum
    /// (`s`); empty for formats without one (Q8_0, Q6_K).
    min: Vec<[f32; 16]>,
}

/// Decodes the `Vnni16` panel `w` (16 rows of `qtype`) into `p`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn decode(qtype: QType, w: &[u8], p: &mut Panel) {
    p.q.clear();
    p.scale.clear();
    p.min.clear();
    (p.sub, p.offset) = match qtype {
        QType::Q6_K => (16, -32),
        QType::Q8_0 | QType::A8 => (QK, -128),
        _ => (QK, 0),
    };
    let store = |p: &mut Panel, scale: __m512, min: Option<__m512>, q: &[__m512i]| {
        for v in q {
            let mut b = [0u8; 64];
            _mm512_storeu_si512(b.as_mut_ptr() as *mut _, *v);
            p.q.extend_from_slice(&b);
        }
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
        QType::Q4_0 => generic::<Q4_0>(w, p, store),
        QType::Q4_1 => generic::<Q4_1>(w, p, store),
        QType::Q8_0 => generic::<Q8_0>(w, p, store),
        QType::A8 => generic::<A8>(w, p, store),
        QType::Q4_K | QType::Q5_K => {
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
            unsafe fn kq<const K5: bool>(w: &[u8], p: &mut Panel, store: impl Fn(&mut Panel, __m512, Option<__m512>, &[__m512i])) {
                for blk in w.chunks_exact(avx512::kq_bytes16(K5)) {
                    for j in 0..QK_K / QK {
                        let (scale, min, q) = avx512::kq_sub16::<K5>(blk.as_ptr(), j);
                        // `fnmadd(min, s, acc)` is `fma(-min, s, acc)`, bit for bit.
                        store(p, scale, Some(_mm512_sub_ps(_mm512_setzero_ps(), min)), &q);
                    }
                }
            }
            if qtype == QType::Q5_K { kq::<true>(w, p, store) } else { kq::<false>(w, p, store) }
        }
        QType::Q6_K => {
            for blk in w.chunks_exact(avx512::Q6K_BYTES16) {
                for j in 0..QK_K / 16 {
                    let (scale, q) = avx512::q6k_sub16(blk.as_ptr(), j);
                    store(p, scale, None, &q);
                }
            }
        }
        other => unreachable!("no tiles for {other:?}"),
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
/// `res[t][r]` row r of the decoded panel `p` times token `t0 + t`. The
/// sub-block size (32, or 16 for Q6_K) sets the tiles.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn multiply(p: &Panel, acts: &Acts, mut out: impl FnMut(usize, &[[f32; 16]; TOKENS])) {
    let sub = p.sub;
    let cfg = TileConfig::new(sub);
    asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
    for t0 in (0..acts.tiles.len() / acts.xq.n_cols).step_by(TOKENS) {
        let r = if sub == 16 { tokens::<16>(p, acts, t0) } else { tokens::<QK>(p, acts, t0) };
        out(t0, &r);
    }
    asm!("tilerelease", options(nostack, nomem));
}

/// The activations of every full group of 16 tokens rearranged for A
/// tiles: per group, per block of 32 values, the 16 tokens' 32 bytes
/// (512 contiguous bytes). Read in place, a tile's 16 rows would sit a
/// row of the matrix apart and fall into the same few L1 sets.
pub struct Acts<'a> {
    xq: &'a QuantizedActs,
    tiles: Vec<i8>,
}

impl<'a> Acts<'a> {
    pub fn new(xq: &'a QuantizedActs, n: usize) -> Acts<'a> {
        let cols = xq.n_cols;
        let mut tiles = vec![0i8; n / TOKENS * TOKENS * cols];
        for (g, group) in tiles.chunks_exact_mut(TOKENS * cols).enumerate() {
            for (b, blk) in group.chunks_exact_mut(TOKENS * QK).enumerate() {
                for (t, dst) in blk.chunks_exact_mut(QK).enumerate() {
                    let at = (g * TOKENS + t) * cols + b * QK;
                    dst.copy_from_slice(&xq.qs[at..at + QK]);
                }
            }
        }
        Acts { xq, tiles }
    }

    /// Sub-block `j` (of `sub` values) of group `t0 / 16`: an A tile's
    /// first row, its rows 32 bytes apart.
    fn tile(&self, t0: usize, j: usize, sub: usize) -> *const i8 {
        let v = j * sub;
        // SAFETY: inside `tiles` for every group and sub-block.
        unsafe { self.tiles.as_ptr().add(t0 * self.xq.n_cols + v / QK * TOKENS * QK + v % QK) }
    }
}

/// Multiplies the sub-blocks `b` and `b + 1` of the A tiles at `a` (the
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
unsafe fn tokens<const SUB: usize>(p: &Panel, acts: &Acts, t0: usize) -> [[f32; 16]; TOKENS] {
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
                        let v = row * n16 + j * SUB / 16;
                        let sum = if SUB == 16 { *xq.sum16.get_unchecked(v) } else { *xq.sum16.get_unchecked(v) + *xq.sum16.get_unchecked(v + 1) };
                        isum = _mm512_add_epi32(isum, _mm512_set1_epi32(p.offset * sum));
                    }
                    let da = *xq.d.get_unchecked(row * nb + j * SUB / QK);
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
    let n_sub = cols / SUB;
    let pairs = n_sub / 2;
    let at = |b: usize| (acts.tile(t0, b, SUB), p.q.as_ptr().add(b * SUB * 16));
    // The second sub-block of a pair: the next block, or Q6_K's other half of this one.
    const fn next(sub: usize) -> usize {
        if sub == QK { TOKENS * QK } else { sub }
    }
    let mut c = [[Sums([[0; 16]; TOKENS]), Sums([[0; 16]; TOKENS])], [Sums([[0; 16]; TOKENS]), Sums([[0; 16]; TOKENS])]];
    let bufs: [[*mut i32; 2]; 2] = std::array::from_fn(|k| std::array::from_fn(|h| c[k][h].0.as_mut_ptr() as *mut i32));
    if pairs > 0 {
        let (a, w) = at(0);
        pair!("0", "1", a, w, next(SUB), SUB);
    }
    // Iteration i scales pair i - 1, stores pair i and multiplies pair
    // i + 1, so that no step waits on the one just before it (measured
    // alike in the other order).
    for i in 0..=pairs {
        if i > 0 {
            let [c0, c1] = &c[(i - 1) % 2];
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
                pair!("2", "3", a, w, next(SUB), SUB);
            } else {
                pair!("0", "1", a, w, next(SUB), SUB);
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
        scale_in!(n_sub - 1, &c[0][0]);
    }
    acc.map(|v| {
        let mut o = [0.0f32; 16];
        _mm512_storeu_ps(o.as_mut_ptr(), v);
        o
    })
}
