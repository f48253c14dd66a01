//! The `cpu` backend's kernels: quantized matrix times int8-quantized
//! activations, with SIMD paths chosen at run time by CPU feature detection
//! (AVX-512 VNNI, AVX2, scalar), never by a build flag.
//!
//! Decode is a GEMV that reads every weight byte once per step; with several
//! tokens in a batch each weight row is loaded once and reused for every
//! token while it sits in L1. Rows are split across rayon's worker threads.

use std::sync::OnceLock;

use half::f16;
use crate::filebuf::FileBuf;
use rayon::prelude::*;
use std::sync::Arc;

use crate::quant::{dequantize_row, dot_scalar, ActRow, QType, QuantizedActs, QK};

/// Instruction-set path of the dot-product kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512Vnni,
}

impl Isa {
    /// The path the kernels take: the best this CPU supports, or a lower one
    /// named by `MLX_SERVING_ISA` (`scalar`, `avx2`, `avx512vnni`) to compare
    /// paths or work around a CPU problem.
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Self::best();
            let wanted = std::env::var("MLX_SERVING_ISA").ok();
            match wanted.as_deref().and_then(|w| Isa::all().into_iter().find(|i| i.name() == w)) {
                Some(i) if i as u8 <= best as u8 => i,
                _ => best,
            }
        })
    }

    fn all() -> [Isa; 3] {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni]
    }

    /// The best path this CPU supports.
    fn best() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                let avx2 = is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c");
                if avx2
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
                {
                    return Isa::Avx512Vnni;
                }
                if avx2 {
                    return Isa::Avx2;
                }
            }
            Isa::Scalar
        })
    }

    /// Every path this CPU can run (for tests and benchmarks).
    pub fn available() -> Vec<Isa> {
        let best = Isa::best();
        Isa::all().into_iter().filter(|&i| i as u8 <= best as u8).collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512-vnni",
        }
    }
}

/// Worker threads the kernels split work across.
pub fn n_threads() -> usize {
    rayon::current_num_threads()
}

/// Weight bytes: a range of the model file read at load, or owned.
pub enum Bytes {
    File { file: Arc<FileBuf>, offset: usize, len: usize },
    Owned(Vec<u8>),
}

impl Bytes {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::File { file, offset, len } => &file[*offset..*offset + *len],
            Bytes::Owned(v) => v,
        }
    }
}

/// A weight matrix of `rows` output features by `cols` input features in
/// its (possibly quantized) format: each row stored contiguously, or with
/// `panels` each group of 8 rows interleaved block by block (block b of
/// rows 8g..8g+8, then block b + 1, ...; rows past the last full group
/// stay plain), so the 8-row kernels read one stream.
pub struct QMatrix {
    pub qtype: QType,
    pub rows: usize,
    pub cols: usize,
    pub data: Bytes,
    pub panels: bool,
}

impl QMatrix {
    pub fn new(qtype: QType, rows: usize, cols: usize, data: Bytes) -> QMatrix {
        QMatrix { qtype, rows, cols, data, panels: false }
    }
    pub fn row_bytes(&self) -> usize {
        self.qtype.row_bytes(self.cols)
    }
    /// Row `r` in its format (gathered from its panel when interleaved).
    pub fn row(&self, r: usize) -> std::borrow::Cow<'_, [u8]> {
        let (rb, data) = (self.row_bytes(), self.data.as_slice());
        if !self.panels || r >= self.rows / 8 * 8 {
            return data[r * rb..(r + 1) * rb].into();
        }
        let bb = self.qtype.block_bytes();
        let panel = &data[r / 8 * 8 * rb..(r / 8 + 1) * 8 * rb];
        panel.chunks_exact(8 * bb).flat_map(|blocks| &blocks[r % 8 * bb..(r % 8 + 1) * bb]).copied().collect::<Vec<u8>>().into()
    }
    /// Dequantized copy of one row (embedding lookup).
    pub fn dequantize_row_into(&self, r: usize, out: &mut [f32]) {
        dequantize_row(self.qtype, &self.row(r), out);
    }
    /// The same matrix with its groups of 8 rows interleaved (`panels`),
    /// rearranged in place, where this machine has an 8-row kernel for the
    /// format; otherwise unchanged.
    pub fn into_panels(mut self) -> QMatrix {
        if self.panels || tile8_fn(Isa::detect(), self.qtype).is_none() || self.rows < 8 {
            return self;
        }
        let (rb, bb) = (self.row_bytes(), self.qtype.block_bytes());
        let interleave = |data: &mut [u8]| {
            let mut plain = vec![0u8; 8 * rb];
            for panel in data[..self.rows / 8 * 8 * rb].chunks_exact_mut(8 * rb) {
                plain.copy_from_slice(panel);
                for (b, blocks) in panel.chunks_exact_mut(8 * bb).enumerate() {
                    for (r, blk) in blocks.chunks_exact_mut(bb).enumerate() {
                        blk.copy_from_slice(&plain[r * rb + b * bb..r * rb + (b + 1) * bb]);
                    }
                }
            }
        };
        match &mut self.data {
            Bytes::Owned(v) => interleave(v),
            // SAFETY: load time, one thread, and this matrix owns its
            // tensor's bytes (a tied embedding is this same matrix).
            Bytes::File { file, offset, len } => interleave(unsafe { file.range_mut(*offset, *len) }),
        }
        self.panels = true;
        self
    }
    pub fn n_bytes(&self) -> usize {
        self.row_bytes() * self.rows
    }
}

/// Raw pointer that may be shared across the workers of one matmul: each
/// worker writes a disjoint set of output elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A method (not field access) so closures capture the Send wrapper.
    fn at(self, i: usize) -> *mut f32 {
        unsafe { self.0.add(i) }
    }
}

/// `out[t][r] = Σ_c w[r][c] * x[t][c]` for `n = x.len() / cols` tokens.
/// `xq` is scratch for the quantized activations.
pub fn matmul(w: &QMatrix, x: &[f32], xq: &mut QuantizedActs, out: &mut [f32]) {
    matmul_with(Isa::detect(), w, x, xq, out)
}

pub fn matmul_with(isa: Isa, w: &QMatrix, x: &[f32], xq: &mut QuantizedActs, out: &mut [f32]) {
    let n = x.len() / w.cols;
    assert_eq!(x.len(), n * w.cols);
    assert_eq!(out.len(), n * w.rows);
    let rows = w.rows;
    let outp = OutPtr(out.as_mut_ptr());
    // Enough chunks to balance two or more workers, few enough that the
    // scheduling cost stays small next to the work.
    let chunk = rows.div_ceil(rayon::current_num_threads() * 4).max(16);

    if !w.qtype.is_quantized() {
        (0..rows).into_par_iter().with_min_len(chunk).for_each_init(
            || vec![0.0f32; w.cols],
            |buf, r| {
                w.dequantize_row_into(r, buf);
                for t in 0..n {
                    let xr = &x[t * w.cols..(t + 1) * w.cols];
                    let v: f32 = dot_f32(buf, xr);
                    // SAFETY: (t, r) pairs are distinct across workers.
                    unsafe { *outp.at(t * rows + r) = v };
                }
            },
        );
        return;
    }

    xq.quantize(x, w.cols);
    let xq = &*xq;
    let tile = tile_fn(isa, w.qtype);
    let rb = w.row_bytes();
    let wdata = w.data.as_slice();
    // A batch of up to MAX_TILE tokens (a decode step, with speculative
    // guesses) goes through in one pass; longer ones in as few tiles as
    // that allows, balanced (15 tokens: 8 + 7). Measured against tiles of
    // 4: prefill of 15 tokens 52 -> 44 ms, 128 tokens 452 -> 416 ms, 512
    // tokens 2250 -> 2040 ms (each weight block unpacked once per 8 tokens).
    let step = n.div_ceil(n.div_ceil(MAX_TILE)).max(1);
    // Panels go through the 8-row kernel; without one on this path (the
    // scalar reference) each of their rows is gathered for the one-row tile.
    let tile8 = tile8_fn(isa, w.qtype).filter(|_| w.panels);
    let full = if w.panels { rows / 8 * 8 } else { 0 };
    let chunk = chunk.next_multiple_of(8);
    (0..rows.div_ceil(chunk)).into_par_iter().for_each(|c| {
        let mut res = [0.0f32; MAX_TILE];
        let (r0, r1) = (c * chunk, ((c + 1) * chunk).min(rows));
        // Up to `step` tokens share each unpacked weight block; the chunk's
        // rows stay in cache across the token tiles.
        for t0 in (0..n).step_by(step) {
            let nt = step.min(n - t0);
            let acts: [ActRow; MAX_TILE] = std::array::from_fn(|i| xq.row(t0 + i.min(nt - 1)));
            let mut r = r0;
            if let Some(tile8) = tile8 {
                let mut res8 = [[0.0f32; 8]; MAX_TILE];
                // Chunks start on a panel (`chunk` is a multiple of 8).
                while r + 8 <= r1.min(full) {
                    tile8(&wdata[r * rb..(r + 8) * rb], &acts[..nt], &mut res8[..nt]);
                    for (i, v8) in res8[..nt].iter().enumerate() {
                        // SAFETY: row ranges are disjoint across workers.
                        unsafe { std::ptr::copy_nonoverlapping(v8.as_ptr(), outp.at((t0 + i) * rows + r), 8) };
                    }
                    r += 8;
                }
            }
            for r in r..r1 {
                tile(&w.row(r), &acts[..nt], &mut res[..nt]);
                for (i, &v) in res[..nt].iter().enumerate() {
                    // SAFETY: row ranges are disjoint across workers.
                    unsafe { *outp.at((t0 + i) * rows + r) = v };
                }
            }
        }
    });
}

/// The widest tile (tokens multiplied against one weight row at a time)
/// the kernels are built for.
pub const MAX_TILE: usize = 8;

/// Plain f32 dot product, written so that LLVM vectorizes it.
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Widens f16 values (a KV-cache row) into `dst`.
#[inline]
pub fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if Isa::detect() != Isa::Scalar {
        return unsafe { x86::f16_to_f32_slice(src, dst) };
    }
    dst.iter_mut().zip(src).for_each(|(d, s)| *d = s.to_f32());
}

/// `out[i] = w · acts[i]` for up to `MAX_TILE` activation rows.
pub type TileFn = fn(&[u8], &[ActRow], &mut [f32]);

/// `out[i][r] = w_r · acts[i]` for 8 weight rows at once.
type Tile8Fn = fn(&[u8], &[ActRow], &mut [[f32; 8]]);

/// An 8-row kernel, where one beats 8 calls of the one-row tile. Which
/// kernel a row gets depends only on its place in its chunk, never on the
/// batch, so results stay batch-invariant.
fn tile8_fn(isa: Isa, qtype: QType) -> Option<Tile8Fn> {
    #[cfg(target_arch = "x86_64")]
    match (isa, qtype) {
        (Isa::Avx2, QType::Q4_0) => return Some(|w, a, o| tile!(x86::q4x8_avx2 [false], w, a, o)),
        (Isa::Avx2, QType::Q4_1) => return Some(|w, a, o| tile!(x86::q4x8_avx2 [true], w, a, o)),
        (Isa::Avx2, QType::Q4_K) => return Some(|w, a, o| tile!(x86::q4k_x8_avx2 [], w, a, o)),
        (Isa::Avx2, QType::Q8_0) => return Some(|w, a, o| tile!(x86::q8x8_avx2 [false], w, a, o)),
        (Isa::Avx2, QType::A8) => return Some(|w, a, o| tile!(x86::q8x8_avx2 [true], w, a, o)),
        _ => {}
    }
    let _ = (isa, qtype);
    None
}

/// The tile kernel for a weight format on an instruction-set path.
pub fn tile_fn(isa: Isa, qtype: QType) -> TileFn {
    #[cfg(target_arch = "x86_64")]
    {
        match (isa, qtype) {
            (Isa::Avx2, QType::Q4_0) => return |w, a, o| tile!(x86::q4_avx2 [false], w, a, o),
            (Isa::Avx2, QType::Q4_1) => return |w, a, o| tile!(x86::q4_avx2 [true], w, a, o),
            (Isa::Avx2, QType::Q8_0) => return |w, a, o| tile!(x86::q8_avx2 [false], w, a, o),
            (Isa::Avx2, QType::A8) => return |w, a, o| tile!(x86::q8_avx2 [true], w, a, o),
            (Isa::Avx512Vnni, QType::Q4_0) => return |w, a, o| tile!(x86::q4_avx512 [false], w, a, o),
            (Isa::Avx512Vnni, QType::Q4_1) => return |w, a, o| tile!(x86::q4_avx512 [true], w, a, o),
            (Isa::Avx512Vnni, QType::Q8_0) => return |w, a, o| tile!(x86::q8_vnni [false], w, a, o),
            (Isa::Avx512Vnni, QType::A8) => return |w, a, o| tile!(x86::q8_vnni [true], w, a, o),
            (Isa::Avx2 | Isa::Avx512Vnni, QType::Q5_0) => return |w, a, o| tile!(x86::q5_avx2 [false], w, a, o),
            (Isa::Avx2 | Isa::Avx512Vnni, QType::Q5_1) => return |w, a, o| tile!(x86::q5_avx2 [true], w, a, o),
            (Isa::Avx2 | Isa::Avx512Vnni, QType::Q4_K) => return |w, a, o| tile!(x86::kquant_avx2 [{ x86::K4 }], w, a, o),
            (Isa::Avx2 | Isa::Avx512Vnni, QType::Q5_K) => return |w, a, o| tile!(x86::kquant_avx2 [{ x86::K5 }], w, a, o),
            (Isa::Avx2 | Isa::Avx512Vnni, QType::Q6_K) => return |w, a, o| tile!(x86::kquant_avx2 [{ x86::K6 }], w, a, o),
            _ => {}
        }
    }
    let _ = isa;
    match qtype {
        QType::Q4_0 => |w, a, o| scalar_tile(QType::Q4_0, w, a, o),
        QType::Q4_1 => |w, a, o| scalar_tile(QType::Q4_1, w, a, o),
        QType::Q8_0 => |w, a, o| scalar_tile(QType::Q8_0, w, a, o),
        QType::A8 => |w, a, o| scalar_tile(QType::A8, w, a, o),
        QType::Q5_0 => |w, a, o| scalar_tile(QType::Q5_0, w, a, o),
        QType::Q5_1 => |w, a, o| scalar_tile(QType::Q5_1, w, a, o),
        QType::Q4_K => |w, a, o| scalar_tile(QType::Q4_K, w, a, o),
        QType::Q5_K => |w, a, o| scalar_tile(QType::Q5_K, w, a, o),
        QType::Q6_K => |w, a, o| scalar_tile(QType::Q6_K, w, a, o),
        other => panic!("no integer kernel for {other:?}"),
    }
}

fn scalar_tile(qtype: QType, w: &[u8], acts: &[ActRow], out: &mut [f32]) {
    for (o, a) in out.iter_mut().zip(acts) {
        *o = dot_scalar(qtype, w, *a);
    }
}

/// Calls a kernel monomorphized for the tile's token count.
#[cfg(target_arch = "x86_64")]
macro_rules! tile {
    ($($seg:ident)::+ [$($g:tt),*], $w:expr, $a:expr, $o:expr) => {{
        // SAFETY: `tile_fn` hands out x86 kernels only for detected features.
        unsafe {
            match $a.len() {
                1 => $o.copy_from_slice(&$($seg)::+::<$($g,)* 1>($w, $a.try_into().unwrap())),
                2 => $o.copy_from_slice(&$($seg)::+::<$($g,)* 2>($w, $a.try_into().unwrap())),
                3 => $o.copy_from_slice(&$($seg)::+::<$($g,)* 3>($w, $a.try_into().unwrap())),
                4 => $o.copy_from_slice(&$($seg)::+::<$($g,)* 4>($w, $a.try_into().unwrap())),
                5 => $o.copy_from_slice(&$($seg)::+::<$($g,)* 5>($w, $a.try_into().unwrap())),
                6 => $o.copy_from_slice(&$($seg)::+::<$($g,)* 6>($w, $a.try_into().unwrap())),
                7 => $o.copy_from_slice(&$($seg)::+::<$($g,)* 7>($w, $a.try_into().unwrap())),
                _ => $o.copy_from_slice(&$($seg)::+::<$($g,)* 8>($w, $a.try_into().unwrap())),
            }
        }
    }};
}
#[cfg(target_arch = "x86_64")]
use tile;

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! Callers must have checked the CPU features (see `Isa::detect`).
    use super::*;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn f16_to_f32(p: *const u8) -> f32 {
        let bits = u16::from_le_bytes([*p, *p.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
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

    /// Q4_0/Q4_1 and Q8_0 tile kernels for one instruction set: each weight
    /// block is unpacked once and multiplied with `NT` activation rows.
    /// `$mul(w, a)` is the unsigned-by-signed int8 dot product into 8 i32 lanes.
    macro_rules! kernels {
        ($q4:ident, $q8:ident, $features:literal, $mul:expr) => {
            #[target_feature(enable = $features)]
            pub unsafe fn $q4<const Q4_1: bool, const NT: usize>(w: &[u8], a: &[ActRow; NT]) -> [f32; NT] {
                let bb = if Q4_1 { 20 } else { 18 };
                let head = bb - 16;
                let mut acc = [_mm256_setzero_ps(); NT];
                let mut corr = [0.0f32; NT];
                let nb = a[0].d.len();
                let wp = w.as_ptr();
                for b in 0..nb {
                    let blk = wp.add(b * bb);
                    let wv = unpack_nibbles(blk.add(head));
                    let d = f16_to_f32(blk);
                    let m = if Q4_1 { f16_to_f32(blk.add(2)) } else { -8.0 * d };
                    for t in 0..NT {
                        let av = _mm256_loadu_si256(a[t].qs.as_ptr().add(b * QK) as *const __m256i);
                        let p = $mul(wv, av);
                        let scale = _mm256_set1_ps(d * *a[t].d.get_unchecked(b));
                        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[t]);
                        corr[t] += m * *a[t].s.get_unchecked(b);
                    }
                }
                std::array::from_fn(|t| hsum(acc[t]) + corr[t])
            }

            /// Q8_0, or with `A8` the MLX 8-bit block (a bias after the scale,
            /// and `m + 128 d` times the activation sum per block).
            #[target_feature(enable = $features)]
            pub unsafe fn $q8<const A8: bool, const NT: usize>(w: &[u8], a: &[ActRow; NT]) -> [f32; NT] {
                let (bb, head) = if A8 { (36, 4) } else { (34, 2) };
                let mut acc = [_mm256_setzero_ps(); NT];
                let mut corr = [0.0f32; NT];
                let nb = a[0].d.len();
                let wp = w.as_ptr();
                for b in 0..nb {
                    let blk = wp.add(b * bb);
                    let wv = _mm256_loadu_si256(blk.add(head) as *const __m256i);
                    // The int8 products need one unsigned operand: move w's sign onto a.
                    let wabs = _mm256_sign_epi8(wv, wv);
                    let d = f16_to_f32(blk);
                    let m = if A8 { f16_to_f32(blk.add(2)) + 128.0 * d } else { 0.0 };
                    for t in 0..NT {
                        let av = _mm256_loadu_si256(a[t].qs.as_ptr().add(b * QK) as *const __m256i);
                        let p = $mul(wabs, _mm256_sign_epi8(av, wv));
                        let scale = _mm256_set1_ps(d * *a[t].d.get_unchecked(b));
                        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[t]);
                        if A8 {
                            corr[t] += m * *a[t].s.get_unchecked(b);
                        }
                    }
                }
                std::array::from_fn(|t| hsum(acc[t]) + corr[t])
            }
        };
    }

    /// Q4_0/Q4_1 for a panel of 8 weight rows (`QMatrix::panels`) times
    /// `NT` tokens. Each block of the 8 rows is unpacked and
    /// transposed so that 32-bit lane r of register j holds row r's weights
    /// 4j..4j+4; a broadcast group of 4 activation bytes then multiplies all
    /// 8 rows in one instruction, results land one row per lane (no
    /// horizontal sums), and one scale product per block and token covers
    /// the 8 rows. Faster than the one-row tile even for a single token
    /// (decode 83-85 -> 92-101 tok/s on the default model), and every batch
    /// size takes it, so a token's result never depends on its batch.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4x8_avx2<const Q4_1: bool, const NT: usize>(w: &[u8], a: &[ActRow; NT]) -> [[f32; 8]; NT] {
        let bb = if Q4_1 { 20 } else { 18 };
        let nb = a[0].d.len();
        debug_assert_eq!(w.len(), 8 * nb * bb);
        let wp = w.as_ptr();
        let mut acc = [_mm256_setzero_ps(); NT];
        for b in 0..nb {
            // A panel: block b of the 8 rows, one after the other.
            let blk = wp.add(b * 8 * bb);
            let mut u = [_mm256_setzero_si256(); 8];
            for (r, u) in u.iter_mut().enumerate() {
                *u = unpack_nibbles(blk.add(r * bb + bb - 16));
            }
            let t = transpose_8x8_epi32(u);
            let d = f16_x8(blk, bb);
            let m = if Q4_1 { f16_x8(blk.add(2), bb) } else { _mm256_mul_ps(d, _mm256_set1_ps(-8.0)) };
            for (acc, a) in acc.iter_mut().zip(a) {
                let ap = a.qs.as_ptr().add(b * QK) as *const i32;
                // Pair sums of u4 x i8 are at most 3810 in size: eight fit in i16.
                let mut s16 = _mm256_setzero_si256();
                for (j, tj) in t.iter().enumerate() {
                    s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(*tj, _mm256_set1_epi32(ap.add(j).read_unaligned())));
                }
                let s32 = _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(*a.d.get_unchecked(b)));
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), scale, *acc);
                *acc = _mm256_fmadd_ps(m, _mm256_set1_ps(*a.s.get_unchecked(b)), *acc);
            }
        }
        std::array::from_fn(|t| {
            let mut out = [0.0f32; 8];
            _mm256_storeu_ps(out.as_mut_ptr(), acc[t]);
            out
        })
    }

    /// Q8_0 (or with `A8` the MLX 8-bit block) for a panel of 8 rows, as
    /// `q4x8_avx2`: lane r of transposed register k holds row r's values
    /// 4k..4k+4. Signed values move their sign onto the activations; a pair
    /// sum of 127 x 127 products nearly fills an i16, so each is widened.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q8x8_avx2<const A8: bool, const NT: usize>(w: &[u8], a: &[ActRow; NT]) -> [[f32; 8]; NT] {
        let (bb, head) = if A8 { (36, 4) } else { (34, 2) };
        let nb = a[0].d.len();
        debug_assert_eq!(w.len(), 8 * nb * bb);
        let wp = w.as_ptr();
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); NT];
        for b in 0..nb {
            let blk = wp.add(b * 8 * bb);
            let t = transpose_8x8_epi32(std::array::from_fn(|r| _mm256_loadu_si256(blk.add(r * bb + head) as *const __m256i)));
            let tabs = t.map(|v| _mm256_sign_epi8(v, v));
            let d = f16_x8(blk, bb);
            // A8: `d * (q + 128) + m`, the offset and bias against the activation sum.
            let m = if A8 { _mm256_fmadd_ps(d, _mm256_set1_ps(128.0), f16_x8(blk.add(2), bb)) } else { _mm256_setzero_ps() };
            for (acc, a) in acc.iter_mut().zip(a) {
                let ap = a.qs.as_ptr().add(b * QK) as *const i32;
                let mut s32 = _mm256_setzero_si256();
                for k in 0..8 {
                    let av = _mm256_sign_epi8(_mm256_set1_epi32(ap.add(k).read_unaligned()), t[k]);
                    s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(_mm256_maddubs_epi16(tabs[k], av), ones));
                }
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), _mm256_mul_ps(d, _mm256_set1_ps(*a.d.get_unchecked(b))), *acc);
                if A8 {
                    *acc = _mm256_fmadd_ps(m, _mm256_set1_ps(*a.s.get_unchecked(b)), *acc);
                }
            }
        }
        std::array::from_fn(|t| {
            let mut out = [0.0f32; 8];
            _mm256_storeu_ps(out.as_mut_ptr(), acc[t]);
            out
        })
    }

    /// The f16 at `p`, `p + stride`, ... `p + 7 stride`, widened.
    #[inline(always)]
    unsafe fn f16_x8(p: *const u8, stride: usize) -> __m256 {
        let h = |r: usize| (p.add(r * stride) as *const i16).read_unaligned();
        _mm256_cvtph_ps(_mm_set_epi16(h(7), h(6), h(5), h(4), h(3), h(2), h(1), h(0)))
    }

    /// Register j of the result holds 32-bit element j of each input, input
    /// r in lane r.
    #[inline(always)]
    unsafe fn transpose_8x8_epi32(u: [__m256i; 8]) -> [__m256i; 8] {
        let (t0, t1) = (_mm256_unpacklo_epi32(u[0], u[1]), _mm256_unpackhi_epi32(u[0], u[1]));
        let (t2, t3) = (_mm256_unpacklo_epi32(u[2], u[3]), _mm256_unpackhi_epi32(u[2], u[3]));
        let (t4, t5) = (_mm256_unpacklo_epi32(u[4], u[5]), _mm256_unpackhi_epi32(u[4], u[5]));
        let (t6, t7) = (_mm256_unpacklo_epi32(u[6], u[7]), _mm256_unpackhi_epi32(u[6], u[7]));
        let (s0, s1) = (_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2));
        let (s2, s3) = (_mm256_unpacklo_epi64(t1, t3), _mm256_unpackhi_epi64(t1, t3));
        let (s4, s5) = (_mm256_unpacklo_epi64(t4, t6), _mm256_unpackhi_epi64(t4, t6));
        let (s6, s7) = (_mm256_unpacklo_epi64(t5, t7), _mm256_unpackhi_epi64(t5, t7));
        [
            _mm256_permute2x128_si256::<0x20>(s0, s4),
            _mm256_permute2x128_si256::<0x20>(s1, s5),
            _mm256_permute2x128_si256::<0x20>(s2, s6),
            _mm256_permute2x128_si256::<0x20>(s3, s7),
            _mm256_permute2x128_si256::<0x31>(s0, s4),
            _mm256_permute2x128_si256::<0x31>(s1, s5),
            _mm256_permute2x128_si256::<0x31>(s2, s6),
            _mm256_permute2x128_si256::<0x31>(s3, s7),
        ]
    }

    kernels!(q4_avx2, q8_avx2, "avx2,fma,f16c", |w, a| _mm256_madd_epi16(
        _mm256_maddubs_epi16(w, a),
        _mm256_set1_epi16(1)
    ));
    kernels!(q4_vnni, q8_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", |w, a| _mm256_dpbusd_epi32(
        _mm256_setzero_si256(),
        w,
        a
    ));

    /// Q5_0/Q5_1 tile: each block is unpacked in registers once for all
    /// `NT` tokens (its nibbles as a Q4 block's, bit j of the 32-bit `qh`
    /// the fifth bit of element j), then one int8 product per token.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q5_avx2<const Q5_1: bool, const NT: usize>(w: &[u8], a: &[ActRow; NT]) -> [f32; NT] {
        let qtype = if Q5_1 { QType::Q5_1 } else { QType::Q5_0 };
        let at = if Q5_1 { 4 } else { 2 };
        let mut acc = [_mm256_setzero_ps(); NT];
        let mut corr = [0.0f32; NT];
        let ones = _mm256_set1_epi16(1);
        // Byte i of the block's 32 values takes byte i / 8 of qh, then its bit i % 8.
        let spread = _mm256_set_epi64x(0x0303_0303_0303_0303, 0x0202_0202_0202_0202, 0x0101_0101_0101_0101, 0);
        let bits = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        for (b, blk) in w.chunks_exact(qtype.block_bytes()).enumerate() {
            let p = blk.as_ptr();
            // Q5_0 stores its values + 16: the offset becomes a min of -16 d.
            let d = f16_to_f32(p);
            let m = if Q5_1 { f16_to_f32(p.add(2)) } else { -16.0 * d };
            let qh = _mm256_shuffle_epi8(_mm256_set1_epi32((p.add(at) as *const i32).read_unaligned()), spread);
            let fifth = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bits), bits), _mm256_set1_epi8(0x10));
            let qv = _mm256_or_si256(unpack_nibbles(p.add(at + 4)), fifth);
            for t in 0..NT {
                let av = _mm256_loadu_si256(a[t].qs.as_ptr().add(b * QK) as *const __m256i);
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(qv, av), ones);
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * *a[t].d.get_unchecked(b)), acc[t]);
                corr[t] += m * *a[t].s.get_unchecked(b);
            }
        }
        std::array::from_fn(|t| hsum(acc[t]) + corr[t])
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

    /// The scales of the super-block at `p`: per sub-block of 32, `d * sc`
    /// and `dmin * m` (Q4_K, Q5_K); per 16, `d * sc` (Q6_K, 16 of them).
    #[inline(always)]
    unsafe fn k_scales<const K: u8>(p: *const u8, scale: &mut [f32; 16], min: &mut [f32; 8]) {
        if K == K6 {
            let d = f16_to_f32(p.add(208));
            for (j, s) in scale.iter_mut().enumerate() {
                *s = d * *p.add(192 + j) as i8 as f32;
            }
            return;
        }
        let (d, dmin) = (f16_to_f32(p), f16_to_f32(p.add(2)));
        let sc = std::slice::from_raw_parts(p.add(4), 12);
        for j in 0..8 {
            let (s, m) = crate::quant::k4_scale_min(sc, j);
            scale[j] = d * s as f32;
            min[j] = dmin * m as f32;
        }
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

    /// K-quant tile: each super-block of 256 weights is unpacked in
    /// registers once for all `NT` tokens, then every 32 weights times 32
    /// activations is one int8 product scaled per sub-block of 32 (Q4_K,
    /// Q5_K, with the min term) or 16 (Q6_K).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn kquant_avx2<const K: u8, const NT: usize>(w: &[u8], a: &[ActRow; NT]) -> [f32; NT] {
        use crate::quant::QK_K;
        let mut acc = [_mm256_setzero_ps(); NT];
        let mut corr = [_mm256_setzero_ps(); NT];
        let ones = _mm256_set1_epi16(1);
        let (mut scale, mut min) = ([0f32; 16], [0f32; 8]);
        for (sb, blk) in w.chunks_exact(k_type(K).block_bytes()).enumerate() {
            let p = blk.as_ptr();
            k_scales::<K>(p, &mut scale, &mut min);
            for j in 0..QK_K / QK {
                let b = sb * (QK_K / QK) + j;
                let qv = k_sub::<K>(p, j);
                // Unsigned values multiply the signed activations directly;
                // Q6_K's signed ones move their sign onto the activations.
                let qabs = if K == K6 { _mm256_sign_epi8(qv, qv) } else { qv };
                let (s_lo, s_hi) = if K == K6 { (scale[2 * j], scale[2 * j + 1]) } else { (scale[j], scale[j]) };
                for t in 0..NT {
                    let av = _mm256_loadu_si256(a[t].qs.as_ptr().add(b * QK) as *const __m256i);
                    let av = if K == K6 { _mm256_sign_epi8(av, qv) } else { av };
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(qabs, av), ones);
                    let da = *a[t].d.get_unchecked(b);
                    let scale = _mm256_set_m128(_mm_set1_ps(s_hi * da), _mm_set1_ps(s_lo * da));
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[t]);
                }
            }
            if K != K6 {
                // The mins of the 8 sub-blocks against their activation sums:
                // one vector product per super-block, off the scalar chain.
                let m = _mm256_loadu_ps(min.as_ptr());
                for t in 0..NT {
                    let s = _mm256_loadu_ps(a[t].s.as_ptr().add(sb * (QK_K / QK)));
                    corr[t] = _mm256_fnmadd_ps(m, s, corr[t]);
                }
            }
        }
        std::array::from_fn(|t| hsum(_mm256_add_ps(acc[t], corr[t])))
    }

    /// Q4_K tile for a panel of 8 rows (`QMatrix::panels`), as `q4x8_avx2`:
    /// each sub-block of the 8 rows is unpacked and transposed in registers
    /// (lane r of register k = row r's values 4k..4k+4), so a broadcast
    /// group of 4 activation bytes multiplies all 8 rows and results land
    /// one row per lane; a sub-block's scales and mins are one vector over
    /// the rows, computed once for all `NT` tokens. (The same tile for Q5_K
    /// and Q6_K was faster for prompts too but 8-15% slower than their
    /// one-row tiles for a token from DRAM, docs/performance.md.)
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4k_x8_avx2<const NT: usize>(w: &[u8], a: &[ActRow; NT]) -> [[f32; 8]; NT] {
        use crate::quant::QK_K;
        let bb = QType::Q4_K.block_bytes();
        let wp = w.as_ptr();
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); NT];
        // Per row, then per sub-block (lanes = rows).
        let (mut scale, mut min) = ([[0f32; 16]; 8], [[0f32; 8]; 8]);
        let (mut scale_t, mut min_t) = ([[0f32; 8]; 8], [[0f32; 8]; 8]);
        for sb in 0..w.len() / (8 * bb) {
            let p = |r: usize| wp.add((sb * 8 + r) * bb);
            for r in 0..8 {
                k_scales::<K4>(p(r), &mut scale[r], &mut min[r]);
                for j in 0..8 {
                    scale_t[j][r] = scale[r][j];
                    min_t[j][r] = min[r][j];
                }
            }
            for j in 0..QK_K / QK {
                let b = sb * (QK_K / QK) + j;
                let t = transpose_8x8_epi32(std::array::from_fn(|r| k_sub::<K4>(p(r), j)));
                let (sc, mn) = (_mm256_loadu_ps(scale_t[j].as_ptr()), _mm256_loadu_ps(min_t[j].as_ptr()));
                for (acc, a) in acc.iter_mut().zip(a) {
                    let ap = a.qs.as_ptr().add(b * QK) as *const i32;
                    // Pair sums of u4 x i8 are at most 3810 in size: eight fit in i16.
                    let mut s16 = _mm256_setzero_si256();
                    for (k, tk) in t.iter().enumerate() {
                        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(*tk, _mm256_set1_epi32(ap.add(k).read_unaligned())));
                    }
                    let s32 = _mm256_madd_epi16(s16, ones);
                    let da = _mm256_set1_ps(*a.d.get_unchecked(b));
                    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), _mm256_mul_ps(sc, da), *acc);
                    *acc = _mm256_fnmadd_ps(mn, _mm256_set1_ps(*a.s.get_unchecked(b)), *acc);
                }
            }
        }
        std::array::from_fn(|t| {
            let mut out = [0.0f32; 8];
            _mm256_storeu_ps(out.as_mut_ptr(), acc[t]);
            out
        })
    }

    /// Q4 tile on 512-bit registers: two blocks per multiply (their
    /// activations are contiguous), half the instructions of the 256-bit path.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn q4_avx512<const Q4_1: bool, const NT: usize>(w: &[u8], a: &[ActRow; NT]) -> [f32; NT] {
        let bb = if Q4_1 { 20 } else { 18 };
        let head = bb - 16;
        let nb = a[0].d.len();
        let wp = w.as_ptr();
        let mut acc = [_mm512_setzero_ps(); NT];
        let mut corr = [0.0f32; NT];
        let mut b = 0;
        while b + 2 <= nb {
            let (blk0, blk1) = (wp.add(b * bb), wp.add((b + 1) * bb));
            let wv = _mm512_inserti64x4(_mm512_castsi256_si512(unpack_nibbles(blk0.add(head))), unpack_nibbles(blk1.add(head)), 1);
            let (d0, d1) = (f16_to_f32(blk0), f16_to_f32(blk1));
            let (m0, m1) = if Q4_1 { (f16_to_f32(blk0.add(2)), f16_to_f32(blk1.add(2))) } else { (-8.0 * d0, -8.0 * d1) };
            for t in 0..NT {
                let av = _mm512_loadu_si512(a[t].qs.as_ptr().add(b * QK) as *const _);
                let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, av);
                let (ad, as_) = (a[t].d.as_ptr().add(b), a[t].s.as_ptr().add(b));
                let scale = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(d0 * *ad), _mm512_set1_ps(d1 * *ad.add(1)));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), scale, acc[t]);
                corr[t] += m0 * *as_ + m1 * *as_.add(1);
            }
            b += 2;
        }
        let mut out: [f32; NT] = std::array::from_fn(|t| _mm512_reduce_add_ps(acc[t]) + corr[t]);
        if b < nb {
            // Odd block count: the last block on the 256-bit path.
            let tail_w = &w[b * bb..];
            let tail_a: [ActRow; NT] = std::array::from_fn(|t| ActRow { qs: &a[t].qs[b * QK..], d: &a[t].d[b..], s: &a[t].s[b..] });
            let tail = q4_vnni::<Q4_1, NT>(tail_w, &tail_a);
            for t in 0..NT {
                out[t] += tail[t];
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::quantize_row;
    use crate::quant::tests::rand_vec;

    /// Random weights: quantized rows, or random K-quant blocks (those are
    /// read from files, never written).
    fn matrix(qtype: QType, rows: usize, cols: usize, seed: u64) -> QMatrix {
        use crate::quant::tests::random_k_row;
        let data = match qtype {
            QType::Q4_K | QType::Q5_K | QType::Q6_K => (0..rows).flat_map(|r| random_k_row(qtype, cols / qtype.block_size(), seed + r as u64)).collect(),
            _ => rand_vec(rows * cols, seed).chunks(cols).flat_map(|r| quantize_row(qtype, r)).collect(),
        };
        QMatrix::new(qtype, rows, cols, Bytes::Owned(data))
    }

    /// `w` times `n` random tokens on every path this CPU has equals the
    /// scalar reference.
    fn assert_paths_agree(w: &QMatrix, n: usize) {
        let x = rand_vec(n * w.cols, 99);
        let mut xq = QuantizedActs::default();
        let mut want = vec![0.0; n * w.rows];
        matmul_with(Isa::Scalar, w, &x, &mut xq, &mut want);
        for isa in Isa::available() {
            let mut got = vec![0.0; n * w.rows];
            matmul_with(isa, w, &x, &mut xq, &mut got);
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()), "{isa:?} {:?} {}x{}: {g} vs {e}", w.qtype, w.rows, w.cols);
            }
        }
    }

    #[test]
    fn every_simd_path_matches_the_scalar_reference() {
        for qtype in [QType::Q4_0, QType::Q4_1, QType::Q8_0, QType::A8] {
            // Odd sizes: a single block, a non-power-of-two block count, and
            // an output count that does not split evenly across workers.
            // Every tile width (1-8 tokens in one pass) and tiles of 4 beyond
            // that; from 4 tokens on, groups of 8 rows plus the rows left over.
            for (rows, cols, n) in [(1, 32, 1), (37, 96, 3), (130, 576, 1), (65, 1536, 5), (33, 64, 6), (33, 64, 7), (33, 64, 8), (19, 64, 11), (24, 96, 4), (130, 576, 8)] {
                let w = matrix(qtype, rows, cols, rows as u64 * 7 + cols as u64);
                assert_paths_agree(&w, n);
                // And in the 8-row kernels' layout, where this machine has them.
                assert_paths_agree(&w.into_panels(), n);
            }
        }
    }

    /// The engine promises a request the same output alone and batched:
    /// each token's products must be bit-identical whatever else is in the
    /// batch, on every path.
    #[test]
    fn a_tokens_result_does_not_depend_on_its_batch() {
        for qtype in [QType::Q4_0, QType::Q4_1, QType::Q8_0, QType::A8, QType::Q4_K, QType::Q6_K] {
            let (rows, cols, n) = (70, 256, 11);
            let x = rand_vec(n * cols, 5);
            let mut xq = QuantizedActs::default();
            for (isa, w) in Isa::available().into_iter().flat_map(|isa| [(isa, matrix(qtype, rows, cols, 3)), (isa, matrix(qtype, rows, cols, 3).into_panels())]) {
                let mut batch = vec![0.0; n * rows];
                matmul_with(isa, &w, &x, &mut xq, &mut batch);
                for t in 0..n {
                    let mut alone = vec![0.0; rows];
                    matmul_with(isa, &w, &x[t * cols..(t + 1) * cols], &mut xq, &mut alone);
                    assert_eq!(alone, batch[t * rows..(t + 1) * rows], "{isa:?} {qtype:?} token {t}");
                }
            }
        }
    }

    /// Panels are the rows rearranged in place, in owned and in file
    /// bytes alike, and every row reads back as it was.
    #[test]
    fn panels_keep_every_row() {
        for (qtype, rows) in [(QType::Q4_0, 21), (QType::Q4_1, 16), (QType::Q4_1, 5)] {
            let cols = 96;
            let plain = matrix(qtype, rows, cols, 11);
            let bytes = plain.data.as_slice().to_vec();
            let file = Arc::new(FileBuf::from_bytes(&[&[7u8; 64][..], &bytes, &[9u8; 64]].concat()));
            let in_file = QMatrix::new(qtype, rows, cols, Bytes::File { file: file.clone(), offset: 64, len: bytes.len() });
            for m in [QMatrix::new(qtype, rows, cols, Bytes::Owned(bytes.clone())).into_panels(), in_file.into_panels()] {
                assert_eq!(m.panels, rows >= 8 && tile8_fn(Isa::detect(), qtype).is_some(), "{qtype:?} {rows}");
                for r in 0..rows {
                    assert_eq!(m.row(r), plain.row(r), "{qtype:?} row {r} of {rows}");
                }
                let mut got = vec![0.0; cols];
                let mut want = vec![0.0; cols];
                m.dequantize_row_into(rows - 1, &mut got);
                plain.dequantize_row_into(rows - 1, &mut want);
                assert_eq!(got, want);
            }
            // The bytes around the tensor are untouched.
            assert!(file[..64].iter().all(|&b| b == 7) && file[64 + bytes.len()..].iter().all(|&b| b == 9));
        }
    }

    #[test]
    fn k_quant_paths_match_the_scalar_reference() {
        use crate::quant::tests::random_k_row;
        for qtype in [QType::Q4_K, QType::Q5_K, QType::Q6_K, QType::Q5_0, QType::Q5_1] {
            for (rows, cols, n) in [(1, 256, 1), (37, 512, 3), (20, 768, 9), (9, 256, 7)] {
                let data: Vec<u8> = (0..rows).flat_map(|r| random_k_row(qtype, cols / qtype.block_size(), r as u64 + 1)).collect();
                let w = QMatrix::new(qtype, rows, cols, Bytes::Owned(data));
                assert_paths_agree(&w, n);
                assert_paths_agree(&w.into_panels(), n);
            }
        }
    }

    #[test]
    fn f16_widening_matches_scalar() {
        for n in [1, 7, 8, 64, 70] {
            let src: Vec<f16> = rand_vec(n, 2).iter().map(|&v| f16::from_f32(v)).collect();
            let mut dst = vec![0.0; n];
            f16_to_f32(&src, &mut dst);
            assert!(src.iter().zip(&dst).all(|(a, b)| a.to_f32() == *b));
        }
    }

    #[test]
    fn float_matrices_use_an_exact_path() {
        for qtype in [QType::F32, QType::F16, QType::BF16] {
            let w = matrix(qtype, 9, 64, 5);
            let x = rand_vec(2 * 64, 6);
            let mut out = vec![0.0; 18];
            matmul(&w, &x, &mut QuantizedActs::default(), &mut out);
            let mut row = vec![0.0; 64];
            for r in 0..9 {
                w.dequantize_row_into(r, &mut row);
                for t in 0..2 {
                    let e: f32 = row.iter().zip(&x[t * 64..]).map(|(a, b)| a * b).sum();
                    assert!((out[t * 9 + r] - e).abs() < 1e-4);
                }
            }
        }
    }
}
