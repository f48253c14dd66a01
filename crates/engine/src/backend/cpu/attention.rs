//! The `cpu` backend's attention over the paged f16 KV cache.
//!
//! Queries of consecutive positions of one sequence are taken in tiles of up
//! to `TILE_TOKENS` tokens, together with every query head that shares a KV
//! head, so each key and value a tile reads is widened from f16 once and then
//! used by all the tile's query rows. Scores are a small GEMM (rows x
//! head_dim times head_dim x keys) and the weighted sum of values another;
//! both run as register-blocked kernels (six query rows by sixteen keys or
//! sixteen dimensions per block), with no horizontal sums. A decode step is
//! the same code with tiles of one token.
//!
//! Numerics follow llama.cpp's f16 cache: queries and softmax weights are
//! rounded to f16 before they meet f16 keys and values.

use std::cell::RefCell;
use std::cmp::Reverse;

use half::f16;
use rayon::prelude::*;

use crate::backend::AttnParams;
use crate::backend::cpu::kernels::{f16_to_f32, Isa};
use crate::engine::kv::{BlockId, KvStore};
use crate::models::BatchToken;

/// Tokens per tile. Each widened key is used `TILE_TOKENS * group` times;
/// the tile's scores (rows x context) must stay small enough for L2.
const TILE_TOKENS: usize = 16;
/// Keys per panel of the score kernel: two AVX2 registers.
const KEYS: usize = 16;
/// Query rows per register block (6 x 2 accumulators + 3 operands fit the
/// 16 AVX2 registers).
const ROWS: usize = 6;

/// One unit of parallel work: tokens `t0..t0 + nt` of the batch (one
/// sequence, consecutive positions), KV head `kvh`, and query heads
/// `h0..h0 + gs` of that KV head's group.
#[derive(Clone, Copy)]
struct Task {
    t0: usize,
    nt: usize,
    kvh: usize,
    h0: usize,
    gs: usize,
}

/// Per-thread buffers, kept across calls so the tiles reuse them (each call
/// allocates only its small task list).
#[derive(Default)]
struct Scratch {
    q: Vec<f32>,
    /// Keys widened into panels of `KEYS` keys: `[panel][dim][key]`.
    keys: Vec<f32>,
    /// Values widened: `[key][dim]`.
    values: Vec<f32>,
    /// Scores, then softmax weights: `[row][key]`, rows `stride` apart.
    scores: Vec<f32>,
    /// Keys visible to each row, counted from the tile's first key.
    ends: Vec<usize>,
    out: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Causal attention of every token of `batch` over its sequence's cache
/// (keys and values of this pass already written). `out` is `tokens x
/// n_heads x head_dim`.
pub fn attend(a: &AttnParams, q: &[f32], batch: &[BatchToken], kv: &KvStore, tables: &[&[BlockId]], out: &mut [f32]) {
    attend_with(Isa::detect(), a, q, batch, kv, tables, out)
}

pub(crate) fn attend_with(isa: Isa, a: &AttnParams, q: &[f32], batch: &[BatchToken], kv: &KvStore, tables: &[&[BlockId]], out: &mut [f32]) {
    let path = Path::for_isa(isa, a.head_dim);
    let tasks = tasks(a, batch);
    let outp = OutPtr(out.as_mut_ptr());
    tasks.par_iter().with_max_len(1).for_each(|t| {
        SCRATCH.with_borrow_mut(|s| run(path, a, q, batch, kv, tables, *t, s, outp));
    });
}

/// Splits the batch into tiles and tiles into tasks, heaviest first so the
/// last task to start is a short one.
fn tasks(a: &AttnParams, batch: &[BatchToken]) -> Vec<Task> {
    let group = a.n_heads / a.n_kv_heads;
    let mut tiles = Vec::new();
    let mut t0 = 0;
    while t0 < batch.len() {
        let mut nt = 1;
        while nt < TILE_TOKENS
            && t0 + nt < batch.len()
            && batch[t0 + nt].seq == batch[t0].seq
            && batch[t0 + nt].pos == batch[t0].pos + nt
        {
            nt += 1;
        }
        tiles.push((t0, nt));
        t0 += nt;
    }
    // Few tiles (decode of one or two sequences): split each group's query
    // heads apart too so every core gets work; the shared keys and values
    // are then widened once per part instead of once.
    let split = if tiles.len() * a.n_kv_heads < 4 * crate::backend::cpu::kernels::n_threads() { group } else { 1 };
    let gs = group / split;
    let mut tasks: Vec<Task> = tiles
        .iter()
        .flat_map(|&(t0, nt)| {
            (0..a.n_kv_heads).flat_map(move |kvh| (0..split).map(move |p| Task { t0, nt, kvh, h0: p * gs, gs }))
        })
        .collect();
    tasks.sort_by_key(|t| Reverse(t.nt * t.gs * (batch[t.t0 + t.nt - 1].pos + 1)));
    tasks
}

#[allow(clippy::too_many_arguments)]
fn run(path: Path, a: &AttnParams, q: &[f32], batch: &[BatchToken], kv: &KvStore, tables: &[&[BlockId]], t: Task, s: &mut Scratch, out: OutPtr) {
    let hd = a.head_dim;
    let group = a.n_heads / a.n_kv_heads;
    let rows = t.nt * t.gs;
    let pos0 = batch[t.t0].pos;
    let last = batch[t.t0 + t.nt - 1].pos + 1;
    // Positions before a token's window start are not seen by it.
    let window_start = |pos: usize| a.window.map_or(0, |w| (pos + 1).saturating_sub(w));
    // Whole panels from the first key any row sees: key j of the tile is
    // position first + j, in lane j % KEYS of panel j / KEYS.
    let first = window_start(pos0) / KEYS * KEYS;
    let n_keys = last - first;
    let stride = n_keys.next_multiple_of(KEYS);
    // Row r is token r / gs, head r % gs of the task's heads.
    let head_row = |r: usize| ((t.t0 + r / t.gs) * a.n_heads + t.kvh * group + t.h0 + r % t.gs) * hd;

    grow(&mut s.q, rows * hd);
    for r in 0..rows {
        s.q[r * hd..(r + 1) * hd].copy_from_slice(&q[head_row(r)..head_row(r) + hd]);
    }
    // Queries rounded to f16 like the f16 cache, as llama.cpp does.
    path.round_to_f16(&mut s.q[..rows * hd]);
    s.ends.clear();
    s.ends.extend((0..rows).map(|r| pos0 + r / t.gs + 1 - first));

    // Widen the keys and values the tile sees. Padding past the last key
    // is zeroed: its scores are dropped, but a weight of zero times a stale
    // NaN value would not be.
    grow(&mut s.keys, stride * hd);
    grow(&mut s.values, stride * hd);
    s.keys[(stride - KEYS) * hd..stride * hd].fill(0.0);
    s.values[n_keys * hd..stride * hd].fill(0.0);
    let bs = kv.block_size();
    let off = t.kvh * hd;
    for (bi, &b) in tables[batch[t.t0].seq][..last.div_ceil(bs)].iter().enumerate().skip(first / bs) {
        let (keys, values) = kv.block(a.layer, b);
        let kv_dim = values.len() / bs;
        let (lo, hi) = (first.saturating_sub(bi * bs), bs.min(last - bi * bs));
        for slot in lo..hi {
            let j = bi * bs + slot - first;
            f16_to_f32(&values[slot * kv_dim + off..][..hd], &mut s.values[j * hd..(j + 1) * hd]);
        }
        // Keys are stored by dimension, so each dimension's run of slots
        // inside one panel is a contiguous copy.
        let mut slot = lo;
        while slot < hi {
            let j = bi * bs + slot - first;
            let n = (hi - slot).min(KEYS - j % KEYS);
            let panel = &mut s.keys[(j / KEYS) * hd * KEYS..][..hd * KEYS];
            if n == bs && bs == KEYS {
                // The default block size: a head's keys of a block are one panel.
                f16_to_f32(&keys[off * bs..][..hd * bs], panel);
                break;
            }
            for d in 0..hd {
                f16_to_f32(&keys[(off + d) * bs + slot..][..n], &mut panel[d * KEYS + j % KEYS..][..n]);
            }
            slot += n;
        }
    }

    grow(&mut s.scores, rows * stride);
    path.scores(&s.q, hd, &s.keys, &mut s.scores, stride, &s.ends);
    for r in 0..rows {
        let row = &mut s.scores[r * stride..(r + 1) * stride];
        let (lo, hi) = (window_start(pos0 + r / t.gs) - first, s.ends[r]);
        let seen = &mut row[lo..hi];
        let scale = match a.softcap {
            Some(c) => {
                seen.iter_mut().for_each(|v| *v = c * (*v * a.scale / c).tanh());
                1.0
            }
            None => a.scale,
        };
        // Weights rounded to f16 too (llama.cpp multiplies them with f16 values).
        path.softmax_to_f16(seen, scale);
        // The value kernel runs each row block to its last row's end.
        row[..lo].fill(0.0);
        row[hi..].fill(0.0);
    }
    grow(&mut s.out, rows * hd);
    path.weighted_values(&s.scores, stride, &s.ends, &s.values, hd, &mut s.out);
    for r in 0..rows {
        // SAFETY: every (token, head) output row belongs to exactly one task.
        let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add(head_row(r)), hd) };
        dst.copy_from_slice(&s.out[r * hd..(r + 1) * hd]);
    }
}

/// Makes `v` at least `n` long without clearing what it holds.
fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

/// Which kernels run: AVX2 with FMA where the CPU has it and the head size
/// is a multiple of 16, plain code otherwise.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Path {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Path {
    fn for_isa(isa: Isa, head_dim: usize) -> Path {
        #[cfg(target_arch = "x86_64")]
        if isa != Isa::Scalar && head_dim % 16 == 0 {
            return Path::Avx2;
        }
        let _ = (isa, head_dim);
        Path::Scalar
    }

    fn round_to_f16(self, x: &mut [f32]) {
        match self {
            Path::Scalar => x.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32()),
            // SAFETY: the CPU has AVX2, FMA and F16C (`Isa`).
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => unsafe { x86::round_to_f16(x) },
        }
    }

    /// `x = softmax(x * scale)`, each weight rounded to f16.
    fn softmax_to_f16(self, x: &mut [f32], scale: f32) {
        match self {
            Path::Scalar => {
                // `x86::softmax_to_f16`'s operations in its order: sums in 8
                // lanes (element i in lane i % 8), then the lanes in order.
                let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let mut lanes = [0.0f32; 8];
                for (i, v) in x.iter_mut().enumerate() {
                    *v = exp((*v - max) * scale);
                    lanes[i % 8] += *v;
                }
                let inv = 1.0 / lanes.iter().sum::<f32>();
                x.iter_mut().for_each(|v| *v = f16::from_f32(*v * inv).to_f32());
            }
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => unsafe { x86::softmax_to_f16(x, scale) },
        }
    }

    /// `s[r][k] = q[r] · key k` for `k < ends[r]` at least (rounded up to
    /// whole panels, and up to the end of the row's block of `ROWS` rows).
    fn scores(self, q: &[f32], hd: usize, keys: &[f32], s: &mut [f32], stride: usize, ends: &[usize]) {
        assert!(q.len() >= ends.len() * hd && s.len() >= ends.len() * stride && ends.iter().all(|&e| e <= stride));
        assert!(keys.len() >= stride * hd && stride % KEYS == 0 && (self == Path::Scalar || hd % 16 == 0));
        match self {
            Path::Scalar => scores_scalar(q, hd, keys, s, stride, ends),
            // SAFETY: the CPU has AVX2 and FMA (`Isa`), and the bounds are checked above.
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => unsafe { x86::scores(q, hd, keys, s, stride, ends) },
        }
    }

    /// `o[r] = Σ_k w[r][k] v[k]` over `k < ends[r]`; weights past a row's end
    /// up to its block's last end must be zero.
    fn weighted_values(self, w: &[f32], stride: usize, ends: &[usize], v: &[f32], hd: usize, o: &mut [f32]) {
        assert!(w.len() >= ends.len() * stride && o.len() >= ends.len() * hd && ends.iter().all(|&e| e <= stride));
        assert!(v.len() >= stride * hd && (self == Path::Scalar || hd % 16 == 0));
        match self {
            Path::Scalar => weighted_values_scalar(w, stride, ends, v, hd, o),
            // SAFETY: as for `scores`.
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => unsafe { x86::weighted_values(w, stride, ends, v, hd, o) },
        }
    }
}

fn scores_scalar(q: &[f32], hd: usize, keys: &[f32], s: &mut [f32], stride: usize, ends: &[usize]) {
    for (r, &end) in ends.iter().enumerate() {
        let qr = &q[r * hd..(r + 1) * hd];
        for k in 0..end {
            let panel = &keys[(k / KEYS) * hd * KEYS..];
            let mut acc = 0.0f32;
            for (d, &qv) in qr.iter().enumerate() {
                acc = qv.mul_add(panel[d * KEYS + k % KEYS], acc);
            }
            s[r * stride + k] = acc;
        }
    }
}

fn weighted_values_scalar(w: &[f32], stride: usize, ends: &[usize], v: &[f32], hd: usize, o: &mut [f32]) {
    for (r, &end) in ends.iter().enumerate() {
        let or = &mut o[r * hd..(r + 1) * hd];
        or.fill(0.0);
        for k in 0..end {
            let wk = w[r * stride + k];
            or.iter_mut().zip(&v[k * hd..(k + 1) * hd]).for_each(|(a, &x)| *a = wk.mul_add(x, *a));
        }
    }
}

/// `e^x` to about one ulp for x in [-87, 88]; below that, 0 (a NaN gives
/// e^-87). e^x = 2^n e^r with n = round(x / ln 2) and |r| <= ln 2 / 2,
/// where a degree-6 Taylor polynomial errs by under r^7 / 7! = 1.3e-7.
/// `x86::exp8` is the same operations in vector lanes: the paths agree bit
/// for bit (libm's `exp` would not).
fn exp(x: f32) -> f32 {
    let underflow = x < -87.0;
    let x = x.max(-87.0).min(88.0);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    // ln 2 in two parts (Cody and Waite), so n * ln2_hi is exact.
    let r = (-n).mul_add(0.693_359_4, x);
    let r = (-n).mul_add(-2.121_944_4e-4, r);
    let mut p = 1.0f32 / 720.0;
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p.mul_add(r, c);
    }
    if underflow { 0.0 } else { p * f32::from_bits(((n as i32 + 127) << 23) as u32) }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{KEYS, ROWS};

    /// Each lane rounded to the nearest f16.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn round8(v: __m256) -> __m256 {
        _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn round_to_f16(x: &mut [f32]) {
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            _mm256_storeu_ps(c.as_mut_ptr(), round8(_mm256_loadu_ps(c.as_ptr())));
        }
        let tail = chunks.into_remainder();
        let mut buf = [0.0f32; 8];
        buf[..tail.len()].copy_from_slice(tail);
        _mm256_storeu_ps(buf.as_mut_ptr(), round8(_mm256_loadu_ps(buf.as_ptr())));
        let n = tail.len();
        tail.copy_from_slice(&buf[..n]);
    }

    /// `super::exp` in 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(super) unsafe fn exp8(x: __m256) -> __m256 {
        let underflow = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(-87.0));
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0)), _mm256_set1_ps(88.0));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)));
        // ln 2 in two parts (Cody and Waite), so n * ln2_hi is exact.
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let two_n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127))));
        _mm256_andnot_ps(underflow, _mm256_mul_ps(p, two_n))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn softmax_to_f16(x: &mut [f32], scale: f32) {
        // Padding with -inf gives the tail's missing lanes e^-inf = 0.
        let (body, tail) = x.split_at_mut(x.len() - x.len() % 8);
        let mut buf = [f32::NEG_INFINITY; 8];
        buf[..tail.len()].copy_from_slice(tail);
        let chunks = || body.chunks_exact(8).map(|c| c.as_ptr()).chain([buf.as_ptr()]);
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        for c in chunks() {
            m = _mm256_max_ps(m, _mm256_loadu_ps(c));
        }
        let vmax = _mm256_set1_ps(lanes(m).into_iter().fold(f32::NEG_INFINITY, f32::max));
        let vscale = _mm256_set1_ps(scale);
        let mut sum = _mm256_setzero_ps();
        for c in body.chunks_exact_mut(8).map(|c| c.as_mut_ptr()).chain([buf.as_mut_ptr()]) {
            let e = exp8(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(c), vmax), vscale));
            _mm256_storeu_ps(c, e);
            sum = _mm256_add_ps(sum, e);
        }
        let inv = _mm256_set1_ps(1.0 / lanes(sum).iter().sum::<f32>());
        for c in body.chunks_exact_mut(8).map(|c| c.as_mut_ptr()).chain([buf.as_mut_ptr()]) {
            _mm256_storeu_ps(c, round8(_mm256_mul_ps(_mm256_loadu_ps(c), inv)));
        }
        let n = tail.len();
        tail.copy_from_slice(&buf[..n]);
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn lanes(v: __m256) -> [f32; 8] {
        let mut out = [0.0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), v);
        out
    }

    /// `$f::<n>(args)`: a kernel built for a block of `n` rows, 1 to `ROWS`.
    macro_rules! with_rows {
        ($n:expr, $f:ident($($arg:expr),*)) => {
            match $n {
                6 => $f::<6>($($arg),*),
                5 => $f::<5>($($arg),*),
                4 => $f::<4>($($arg),*),
                3 => $f::<3>($($arg),*),
                2 => $f::<2>($($arg),*),
                _ => $f::<1>($($arg),*),
            }
        };
    }

    /// Blocks of up to `ROWS` rows; each block runs to its last row's end.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scores(q: &[f32], hd: usize, keys: &[f32], s: &mut [f32], stride: usize, ends: &[usize]) {
        let (q, keys, s) = (q.as_ptr(), keys.as_ptr(), s.as_mut_ptr());
        for r0 in (0..ends.len()).step_by(ROWS) {
            let n = ROWS.min(ends.len() - r0);
            let panels = ends[r0 + n - 1].div_ceil(KEYS);
            let (q, s) = (q.add(r0 * hd), s.add(r0 * stride));
            with_rows!(n, scores_block(q, hd, keys, s, stride, panels));
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn scores_block<const RB: usize>(q: *const f32, hd: usize, keys: *const f32, s: *mut f32, stride: usize, panels: usize) {
        for p in 0..panels {
            let panel = keys.add(p * hd * KEYS);
            let mut acc = [[_mm256_setzero_ps(); 2]; RB];
            for d in 0..hd {
                let k0 = _mm256_loadu_ps(panel.add(d * KEYS));
                let k1 = _mm256_loadu_ps(panel.add(d * KEYS + 8));
                for (r, a) in acc.iter_mut().enumerate() {
                    let qv = _mm256_broadcast_ss(&*q.add(r * hd + d));
                    a[0] = _mm256_fmadd_ps(qv, k0, a[0]);
                    a[1] = _mm256_fmadd_ps(qv, k1, a[1]);
                }
            }
            for (r, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(s.add(r * stride + p * KEYS), a[0]);
                _mm256_storeu_ps(s.add(r * stride + p * KEYS + 8), a[1]);
            }
        }
    }

    /// Blocks of up to `ROWS` rows by 16 dimensions; `hd % 16 == 0`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn weighted_values(w: &[f32], stride: usize, ends: &[usize], v: &[f32], hd: usize, o: &mut [f32]) {
        let (w, v, o) = (w.as_ptr(), v.as_ptr(), o.as_mut_ptr());
        for r0 in (0..ends.len()).step_by(ROWS) {
            let n = ROWS.min(ends.len() - r0);
            let keys = ends[r0 + n - 1];
            let (w, o) = (w.add(r0 * stride), o.add(r0 * hd));
            with_rows!(n, values_block(w, stride, keys, v, hd, o));
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn values_block<const RB: usize>(w: *const f32, stride: usize, keys: usize, v: *const f32, hd: usize, o: *mut f32) {
        for d0 in (0..hd).step_by(16) {
            let mut acc = [[_mm256_setzero_ps(); 2]; RB];
            for k in 0..keys {
                let v0 = _mm256_loadu_ps(v.add(k * hd + d0));
                let v1 = _mm256_loadu_ps(v.add(k * hd + d0 + 8));
                for (r, a) in acc.iter_mut().enumerate() {
                    let wk = _mm256_broadcast_ss(&*w.add(r * stride + k));
                    a[0] = _mm256_fmadd_ps(wk, v0, a[0]);
                    a[1] = _mm256_fmadd_ps(wk, v1, a[1]);
                }
            }
            for (r, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(o.add(r * hd + d0), a[0]);
                _mm256_storeu_ps(o.add(r * hd + d0 + 8), a[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests;
