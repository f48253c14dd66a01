//! The `cpu` backend's kernels: quantized matrix times int8-quantized
//! activations, with SIMD paths chosen at run time by CPU feature detection
//! (AVX-512 VNNI, AVX2, scalar), never by a build flag.
//!
//! Decode is a GEMV that reads every weight byte once per step; with several
//! tokens in a batch each weight row is loaded once and reused for every
//! token while it sits in L1. Rows are split across rayon's worker threads.

use std::sync::OnceLock;

use half::f16;
use crate::error::EngineError;
use crate::formats::filebuf::FileBuf;
use rayon::prelude::*;
use std::sync::Arc;

use crate::formats::quant::{dequantize_row, dot_scalar, ActRow, QType, QuantizedActs, QK};

mod layout;
pub use layout::Layout;

/// Instruction-set path of the dot-product kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512Vnni,
    /// AVX-512 VNNI, and AMX-INT8 tiles for prompts (or batches) through
    /// K-quant and 8-bit matrices, from 32-64 tokens by format
    /// (`amx::min_tokens`).
    Amx,
}

impl Isa {
    /// The path the kernels take: the best this CPU supports, or the one
    /// `MLX_SERVING_ISA` names (`scalar`, `avx2`, `avx512-vnni`, `amx`) to
    /// compare paths or work around a CPU problem. A name that is unknown
    /// or above this CPU is refused by `Isa::check_env` at load; here it
    /// falls back.
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| Isa::from_env().unwrap_or_else(|_| Self::best()))
    }

    /// Refuses a `MLX_SERVING_ISA` that names no path this CPU can run.
    pub fn check_env() -> Result<(), EngineError> {
        Isa::from_env().map(drop)
    }

    fn from_env() -> Result<Isa, EngineError> {
        std::env::var("MLX_SERVING_ISA").map_or(Ok(Self::best()), |wanted| Isa::parse(&wanted))
    }

    /// The path a `MLX_SERVING_ISA` value names, where this CPU runs it.
    fn parse(wanted: &str) -> Result<Isa, EngineError> {
        let known = Isa::all().map(Isa::name).join(", ");
        // `avx512vnni` too: the spelling earlier docs used.
        let isa = Isa::all().into_iter().find(|i| i.name() == wanted || i.name().replace('-', "") == wanted);
        match isa {
            Some(i) if Isa::available().contains(&i) => Ok(i),
            Some(Isa::Amx) if Isa::available().contains(&Isa::Avx512Vnni) => Err(EngineError::InvalidParams(format!("MLX_SERVING_ISA=amx: {}", Isa::amx_missing().unwrap_or_default()))),
            Some(i) => Err(EngineError::InvalidParams(format!("MLX_SERVING_ISA={wanted}: this cpu has no {} (its best path is {})", i.name(), Self::best().name()))),
            None => Err(EngineError::InvalidParams(format!("MLX_SERVING_ISA={wanted:?} names no kernel path; known: {known}"))),
        }
    }

    fn all() -> [Isa; 4] {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni, Isa::Amx]
    }

    /// The vector kernels this path runs: AMX runs prompts on tiles and
    /// everything else on AVX-512 VNNI.
    pub fn vector(self) -> Isa {
        if self == Isa::Amx { Isa::Avx512Vnni } else { self }
    }

    /// Why prompts do not run on AMX tiles here (`None` where they do).
    pub fn amx_note() -> Option<String> {
        match Isa::detect() {
            Isa::Amx => None,
            other => Some(Isa::amx_missing().unwrap_or_else(|| format!("MLX_SERVING_ISA={} turns the amx tiles off", other.name()))),
        }
    }

    /// Why this process cannot run AMX tiles at all (`None` where it can).
    fn amx_missing() -> Option<String> {
        #[cfg(target_arch = "x86_64")]
        if !Isa::available().contains(&Isa::Avx512Vnni) {
            return Some(format!("amx tiles need avx512-vnni too; this cpu's best path is {}", Isa::best().name()));
        } else {
            return amx::grant().err();
        }
        #[cfg(not(target_arch = "x86_64"))]
        Some("amx tiles are x86-64 only".into())
    }

    /// The path a load takes by default: the fastest this CPU runs, AMX
    /// tiles for prompts where granted. On the Intel Xeon measured (2
    /// cores), 512-token prefill: 1B Q4_K_M 1822 ms against 2358 on
    /// AVX-512 VNNI; the 4-bit block formats run VNNI on both paths (1B
    /// Q4_0 2156 against 2163, the default model 396 against 395;
    /// docs/performance.md).
    fn best() -> Isa {
        Isa::available().into_iter().max().unwrap_or(Isa::Scalar)
    }

    /// Every path this CPU can run (for tests and benchmarks).
    pub fn available() -> Vec<Isa> {
        static ISAS: OnceLock<Vec<Isa>> = OnceLock::new();
        ISAS.get_or_init(|| {
            let mut isas = vec![Isa::Scalar];
            #[cfg(target_arch = "x86_64")]
            {
                let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
                let vnni = avx2
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni");
                let paths = [(avx2, Isa::Avx2), (vnni, Isa::Avx512Vnni), (vnni && amx::grant().is_ok(), Isa::Amx)];
                isas.extend(paths.iter().filter(|(ok, _)| *ok).map(|(_, i)| *i));
            }
            isas
        })
        .clone()
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512-vnni",
            Isa::Amx => "amx",
        }
    }
}

/// Worker threads the kernels split work across.
pub fn n_threads() -> usize {
    rayon::current_num_threads()
}

/// GB/s of reading a buffer of `mib` MiB with the kernels' worker threads,
/// each summing its contiguous share (best of 5): the ceiling for decode,
/// which reads every weight byte once per step.
pub fn read_bandwidth(mib: usize) -> f64 {
    // In a buffer like a model's (huge pages where Linux gives them), so
    // that the ceiling is the machine's and not its 4 KiB page walks.
    let file = FileBuf::filled(mib << 20, 1);
    // SAFETY: 64-byte aligned, a whole number of u64s.
    let buf: &[u64] = unsafe { std::slice::from_raw_parts(file.as_ptr() as *const u64, file.len() / 8) };
    let share = buf.len().div_ceil(n_threads());
    (0..5)
        .map(|_| {
            let t = std::time::Instant::now();
            let s: u64 = buf.par_chunks(share).map(|c| c.iter().fold(0u64, |a, &v| a.wrapping_add(v))).sum();
            std::hint::black_box(s);
            (buf.len() * 8) as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
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
/// its (possibly quantized) format, its bytes arranged as `layout` says.
pub struct QMatrix {
    pub qtype: QType,
    pub rows: usize,
    pub cols: usize,
    pub data: Bytes,
    pub layout: Layout,
}

impl QMatrix {
    pub fn new(qtype: QType, rows: usize, cols: usize, data: Bytes) -> QMatrix {
        QMatrix { qtype, rows, cols, data, layout: Layout::Rows }
    }
    pub fn row_bytes(&self) -> usize {
        self.qtype.row_bytes(self.cols)
    }
    /// Rows in full panels (the rest are stored as in the file).
    fn panel_rows(&self) -> usize {
        self.rows / self.layout.group() * self.layout.group()
    }
    /// Row `r` in its format (gathered from its panel when rearranged).
    pub fn row(&self, r: usize) -> std::borrow::Cow<'_, [u8]> {
        let (rb, data, g) = (self.row_bytes(), self.data.as_slice(), self.layout.group());
        if r >= self.panel_rows() {
            return data[r * rb..(r + 1) * rb].into();
        }
        self.layout.gather(self.qtype, &data[r / g * g * rb..(r / g + 1) * g * rb], r % g).into()
    }
    /// Dequantized copy of one row (embedding lookup).
    pub fn dequantize_row_into(&self, r: usize, out: &mut [f32]) {
        dequantize_row(self.qtype, &self.row(r), out);
    }
    /// The same matrix rearranged in place into the layout this machine's
    /// kernels read (`Layout::for_kernels`).
    pub fn into_panels(self) -> QMatrix {
        let layout = Layout::for_kernels(Isa::detect(), self.qtype);
        self.into_layout(layout)
    }
    /// The same matrix rearranged in place into `layout`, from the file's.
    pub fn into_layout(mut self, layout: Layout) -> QMatrix {
        if self.layout != Layout::Rows || self.rows < layout.group() || !layout.fits(self.qtype) {
            return self;
        }
        let (qtype, rb) = (self.qtype, self.row_bytes());
        match &mut self.data {
            Bytes::Owned(v) => layout.pack(qtype, rb, v),
            // SAFETY: load time, one thread, and this matrix owns its
            // tensor's bytes (a tied embedding is this same matrix).
            Bytes::File { file, offset, len } => layout.pack(qtype, rb, unsafe { file.range_mut(*offset, *len) }),
        }
        self.layout = layout;
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
    matmul_many_with(isa, &[w], x, xq, &mut [out])
}

/// `matmul` of several matrices with the same input (q, k and v; gate
/// and up): the input is quantized once for all of them, and their rows
/// are one parallel split, so the worker threads are woken once. Each
/// output is bit-identical to its `matmul` alone.
pub fn matmul_many(ws: &[&QMatrix], x: &[f32], xq: &mut QuantizedActs, outs: &mut [&mut [f32]]) {
    matmul_many_with(Isa::detect(), ws, x, xq, outs)
}

pub fn matmul_many_with(isa: Isa, ws: &[&QMatrix], x: &[f32], xq: &mut QuantizedActs, outs: &mut [&mut [f32]]) {
    assert_eq!(ws.len(), outs.len());
    let Some(first) = ws.first() else { return };
    let (cols, group) = (first.cols, first.qtype.act_group());
    let n = x.len() / cols;
    assert_eq!(x.len(), n * cols);
    for (w, out) in ws.iter().zip(outs.iter()) {
        assert_eq!(out.len(), n * w.rows);
    }
    // Float matrices, or inputs quantized differently: one at a time.
    let shared = ws.iter().all(|w| w.cols == cols && w.qtype.is_quantized() && w.qtype.act_group() == group);
    if !shared {
        if ws.len() > 1 {
            return ws.iter().zip(outs.iter_mut()).for_each(|(w, out)| matmul_many_with(isa, &[w], x, xq, &mut [out]));
        }
        return float_matmul(first, x, outs[0]);
    }
    xq.quantize(x, cols, group);
    let xq = &*xq;
    // Tasks of one size across the matrices, as if their rows were one matrix's.
    let chunk = chunk_rows(ws.iter().map(|w| w.rows).sum()).next_multiple_of(MAX_GROUP);
    let jobs: Vec<Job> = ws.iter().zip(outs.iter_mut()).map(|(w, out)| Job::new(isa, w, n, OutPtr(out.as_mut_ptr()), chunk)).collect();
    // Prompts: each full group of 16 tokens on AMX tiles, where granted,
    // the rest of the tokens on the vector kernels (the same bits).
    #[cfg(target_arch = "x86_64")]
    let tile_acts = amx::Acts::new(xq, jobs.iter().map(|j| j.n_amx).max().unwrap_or(0), first.qtype);
    #[cfg(not(target_arch = "x86_64"))]
    let tile_acts = ();
    // Task i: chunk i - starts[j] of job j.
    let starts: Vec<usize> = jobs.iter().scan(0, |s, j| Some(std::mem::replace(s, *s + j.n_chunks()))).collect();
    let total = starts.last().unwrap_or(&0) + jobs.last().map_or(0, Job::n_chunks);
    (0..total).into_par_iter().for_each(|i| {
        let j = starts.partition_point(|&s| s <= i) - 1;
        jobs[j].run(xq, i - starts[j], &tile_acts);
    });
}

/// Unquantized (f32, f16, bf16) weights: each row dequantized once, then
/// plain dot products.
fn float_matmul(w: &QMatrix, x: &[f32], out: &mut [f32]) {
    let (n, rows) = (x.len() / w.cols, w.rows);
    let outp = OutPtr(out.as_mut_ptr());
    (0..rows).into_par_iter().with_min_len(chunk_rows(rows)).for_each_init(
        || vec![0.0f32; w.cols],
        |buf, r| {
            w.dequantize_row_into(r, buf);
            for t in 0..n {
                let v: f32 = dot_f32(buf, &x[t * w.cols..(t + 1) * w.cols]);
                // SAFETY: (t, r) pairs are distinct across workers.
                unsafe { *outp.at(t * rows + r) = v };
            }
        },
    );
}

/// Rows per parallel task: enough tasks to balance two or more workers,
/// few enough that the scheduling cost stays small next to the work.
fn chunk_rows(rows: usize) -> usize {
    rows.div_ceil(rayon::current_num_threads() * 4).max(16)
}

#[cfg(target_arch = "x86_64")]
type TileActs<'a> = amx::Acts<'a>;
#[cfg(not(target_arch = "x86_64"))]
type TileActs<'a> = ();

/// One matrix of a `matmul_many`: its kernels, and how its rows split
/// into tasks.
struct Job<'a> {
    w: &'a QMatrix,
    n: usize,
    out: OutPtr,
    tile: TileFn,
    panel: Option<PanelFn>,
    #[cfg(target_arch = "x86_64")]
    unpacked: Option<UnpackedFns>,
    /// Rows in full panels that `panel` takes (0 without a panel kernel:
    /// the scalar reference gathers each row for the one-row tile).
    full: usize,
    /// Tokens on AMX tiles (a multiple of 16; 0 where tiles do not run).
    n_amx: usize,
    /// Rows per task (a whole number of panels).
    chunk: usize,
}

impl<'a> Job<'a> {
    fn new(isa: Isa, w: &'a QMatrix, n: usize, out: OutPtr, chunk: usize) -> Job<'a> {
        let panel = panel_fn(isa, w.qtype, w.layout);
        Job {
            w,
            n,
            out,
            tile: tile_fn(isa, w.qtype),
            panel,
            #[cfg(target_arch = "x86_64")]
            unpacked: unpacked_fn(isa, w.qtype, w.layout),
            full: if panel.is_some() { w.panel_rows() } else { 0 },
            n_amx: if amx_fits(isa, w, n) { n / TILE_TOKENS * TILE_TOKENS } else { 0 },
            chunk,
        }
    }

    fn n_chunks(&self) -> usize {
        self.w.rows.div_ceil(self.chunk)
    }

    /// Rows `c * chunk..` for every token.
    fn run(&self, xq: &QuantizedActs, c: usize, tile_acts: &TileActs) {
        let (r0, r1) = (c * self.chunk, ((c + 1) * self.chunk).min(self.w.rows));
        if self.n_amx == 0 {
            return self.tiles(xq, 0..self.n, r0..r1);
        }
        // The chunk's full panels: tiles for the first `n_amx` tokens.
        let end = r1.min(self.full).max(r0);
        #[cfg(target_arch = "x86_64")]
        {
            let (g, rb, wdata) = (self.w.layout.group(), self.w.row_bytes(), self.w.data.as_slice());
            let mut p = amx::Panel::take();
            for r in (r0..end).step_by(g) {
                // SAFETY: `amx_fits` checked the grant and the features.
                unsafe {
                    amx::decode(self.w.qtype, &wdata[r * rb..(r + g) * rb], &mut p);
                    amx::multiply(&p, tile_acts, |t0, res| self.put_panel(t0, r, res));
                }
            }
            p.keep();
        }
        let _ = tile_acts;
        self.tiles(xq, self.n_amx..self.n, r0..end);
        self.tiles(xq, 0..self.n, end..r1);
    }

    /// A panel's results for tokens t0.. (the first `g` of each row of
    /// `res`) into rows r..r + g of the output.
    fn put_panel(&self, t0: usize, r: usize, res: &[[f32; MAX_GROUP]]) {
        let g = self.w.layout.group();
        for (i, v) in res.iter().enumerate() {
            // SAFETY: row ranges are disjoint across tasks.
            unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), self.out.at((t0 + i) * self.w.rows + r), g) };
        }
    }

    /// `tokens` times `rows` on the vector kernels. Up to `step` tokens
    /// share each unpacked weight block; the chunk's rows stay in cache
    /// across the token tiles.
    fn tiles(&self, xq: &QuantizedActs, tokens: std::ops::Range<usize>, rows: std::ops::Range<usize>) {
        let n = tokens.len();
        if n == 0 || rows.is_empty() {
            return;
        }
        let (w, g, rb, wdata) = (self.w, self.w.layout.group(), self.w.row_bytes(), self.w.data.as_slice());
        // A batch of up to MAX_TILE tokens (a decode step, with speculative
        // guesses) goes through in one pass; longer ones in as few tiles as
        // that allows, balanced (15 tokens: 8 + 7). Measured against tiles
        // of 4: prefill of 15 tokens 52 -> 44 ms, 128 tokens 452 -> 416 ms,
        // 512 tokens 2250 -> 2040 ms (each weight block unpacked once per 8).
        let step = n.div_ceil(n.div_ceil(MAX_TILE));
        let mut res = [0.0f32; MAX_TILE];
        // K-quant prompts: each panel unpacked once for all the tiles of
        // tokens (where a kernel does), not once per tile.
        let mut r_panels = rows.start;
        #[cfg(target_arch = "x86_64")]
        if let (Some((unpack, multiply)), true) = (self.unpacked, n > step) {
            let mut subs = avx512::Unpacked::default();
            let mut res_g = [[0.0f32; MAX_GROUP]; MAX_TILE];
            while r_panels + g <= rows.end.min(self.full) {
                let r = r_panels;
                unpack(&wdata[r * rb..(r + g) * rb], &mut subs);
                for t0 in tokens.clone().step_by(step) {
                    let nt = step.min(tokens.end - t0);
                    let acts: [ActRow; MAX_TILE] = std::array::from_fn(|i| xq.row(t0 + i.min(nt - 1)));
                    multiply(&subs, &acts[..nt], &mut res_g[..nt]);
                    self.put_panel(t0, r, &res_g[..nt]);
                }
                r_panels += g;
            }
        }
        for t0 in tokens.clone().step_by(step) {
            let nt = step.min(tokens.end - t0);
            let acts: [ActRow; MAX_TILE] = std::array::from_fn(|i| xq.row(t0 + i.min(nt - 1)));
            let mut r = r_panels;
            if let Some(panel) = self.panel {
                let mut res_g = [[0.0f32; MAX_GROUP]; MAX_TILE];
                // Only the first tile of tokens reads the rows from DRAM
                // (after AMX tiles it reads them from L2, a harmless hint).
                let stream = t0 == tokens.start;
                while r + g <= rows.end.min(self.full) {
                    panel(&wdata[r * rb..(r + g) * rb], &acts[..nt], &mut res_g[..nt], stream);
                    self.put_panel(t0, r, &res_g[..nt]);
                    r += g;
                }
            }
            for r in r..rows.end {
                (self.tile)(&w.row(r), &acts[..nt], &mut res[..nt]);
                for (i, &v) in res[..nt].iter().enumerate() {
                    // SAFETY: row ranges are disjoint across tasks.
                    unsafe { *self.out.at((t0 + i) * w.rows + r) = v };
                }
            }
        }
    }
}

/// Tokens per AMX tile multiply (1 where there are no tiles).
#[cfg(target_arch = "x86_64")]
const TILE_TOKENS: usize = amx::TOKENS;
#[cfg(not(target_arch = "x86_64"))]
const TILE_TOKENS: usize = 1;

/// Whether `w` times `n` tokens runs on AMX tiles on path `isa`.
fn amx_fits(isa: Isa, w: &QMatrix, n: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    return isa == Isa::Amx && w.layout == Layout::Vnni16 && amx::min_tokens(w.qtype).is_some_and(|m| n >= m);
    #[cfg(not(target_arch = "x86_64"))]
    false
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

/// The most rows a panel kernel computes at once.
const MAX_GROUP: usize = 16;

/// `out[i][r] = w_r · acts[i]` for the rows of one panel (`Layout::group`);
/// the flag says whether the panel comes from DRAM (prefetch) or cache.
type PanelFn = fn(&[u8], &[ActRow], &mut [[f32; MAX_GROUP]], bool);

/// The kernel for full panels of `layout`, where one beats a one-row tile
/// per row. Which kernel a row gets depends only on its place in its
/// matrix, never on the batch, so results stay batch-invariant.
fn panel_fn(isa: Isa, qtype: QType, layout: Layout) -> Option<PanelFn> {
    #[cfg(target_arch = "x86_64")]
    match (isa.vector(), layout, qtype) {
        (Isa::Avx2, Layout::Vnni16, QType::Q4_0) => return Some(|w, a, o, s| tile!(avx2::panel16 [{ avx512::Q4_0 }], w, a, o, s)),
        (Isa::Avx2, Layout::Vnni16, QType::Q4_1) => return Some(|w, a, o, s| tile!(avx2::panel16 [{ avx512::Q4_1 }], w, a, o, s)),
        (Isa::Avx2, Layout::Vnni16, QType::Q5_0) => return Some(|w, a, o, s| tile!(avx2::panel16 [{ avx512::Q5_0 }], w, a, o, s)),
        (Isa::Avx2, Layout::Vnni16, QType::Q5_1) => return Some(|w, a, o, s| tile!(avx2::panel16 [{ avx512::Q5_1 }], w, a, o, s)),
        (Isa::Avx2, Layout::Vnni16, QType::Q8_0) => return Some(|w, a, o, s| tile!(avx2::panel16 [{ avx512::Q8_0 }], w, a, o, s)),
        (Isa::Avx2, Layout::Vnni16, QType::A8) => return Some(|w, a, o, s| tile!(avx2::panel16 [{ avx512::A8 }], w, a, o, s)),
        (Isa::Avx2, Layout::Vnni16, QType::Q4_K) => return Some(|w, a, o, s| tile!(avx2::kq_panel16 [false], w, a, o, s)),
        (Isa::Avx2, Layout::Vnni16, QType::Q5_K) => return Some(|w, a, o, s| tile!(avx2::kq_panel16 [true], w, a, o, s)),
        (Isa::Avx2, Layout::Vnni16, QType::Q6_K) => return Some(|w, a, o, s| tile!(avx2::q6k_panel16 [], w, a, o, s)),
        (Isa::Avx512Vnni, Layout::Vnni16, QType::Q4_0) => return Some(|w, a, o, s| tile!(avx512::vnni16 [{ avx512::Q4_0 }], w, a, o, s)),
        (Isa::Avx512Vnni, Layout::Vnni16, QType::Q4_1) => return Some(|w, a, o, s| tile!(avx512::vnni16 [{ avx512::Q4_1 }], w, a, o, s)),
        (Isa::Avx512Vnni, Layout::Vnni16, QType::Q5_0) => return Some(|w, a, o, s| tile!(avx512::vnni16 [{ avx512::Q5_0 }], w, a, o, s)),
        (Isa::Avx512Vnni, Layout::Vnni16, QType::Q5_1) => return Some(|w, a, o, s| tile!(avx512::vnni16 [{ avx512::Q5_1 }], w, a, o, s)),
        (Isa::Avx512Vnni, Layout::Vnni16, QType::Q8_0) => return Some(|w, a, o, s| tile!(avx512::vnni16 [{ avx512::Q8_0 }], w, a, o, s)),
        (Isa::Avx512Vnni, Layout::Vnni16, QType::A8) => return Some(|w, a, o, s| tile!(avx512::vnni16 [{ avx512::A8 }], w, a, o, s)),
        (Isa::Avx512Vnni, Layout::Vnni16, QType::Q4_K) => return Some(|w, a, o, s| tile!(avx512::kq_vnni16 [false], w, a, o, s)),
        (Isa::Avx512Vnni, Layout::Vnni16, QType::Q5_K) => return Some(|w, a, o, s| tile!(avx512::kq_vnni16 [true], w, a, o, s)),
        (Isa::Avx512Vnni, Layout::Vnni16, QType::Q6_K) => return Some(|w, a, o, s| tile!(avx512::q6k_vnni16 [], w, a, o, s)),
        _ => {}
    }
    let _ = (isa, qtype, layout);
    None
}

/// A panel unpacked once for a prompt (`avx512::Unpacked`), and the kernel
/// that multiplies a tile of tokens against it.
#[cfg(target_arch = "x86_64")]
type UnpackedFns = (fn(&[u8], &mut avx512::Unpacked), fn(&avx512::Unpacked, &[ActRow], &mut [[f32; MAX_GROUP]]));

/// The unpack-once kernels of a format on a path, where it has them.
#[cfg(target_arch = "x86_64")]
fn unpacked_fn(isa: Isa, qtype: QType, layout: Layout) -> Option<UnpackedFns> {
    fn multiply(subs: &avx512::Unpacked, a: &[ActRow], o: &mut [[f32; MAX_GROUP]]) {
        tile!(avx512::kq_unpacked16 [], subs, a, o)
    }
    fn multiply_q6k(subs: &avx512::Unpacked, a: &[ActRow], o: &mut [[f32; MAX_GROUP]]) {
        tile!(avx512::q6k_unpacked16 [], subs, a, o)
    }
    // Where unpacking is more than a mask and a shift. Q4_K's unpacking
    // costs less than reading the unpacked panel back: 512-token GEMM on
    // the Intel Xeon, Q4_K 458/469/450 GFLOP/s packed against 465/452/423
    // unpacked, Q5_K 315/303/393 against 454/471/436 (docs/performance.md).
    // SAFETY (all): handed out only on the avx512-vnni path, whose features were detected.
    match (isa.vector(), layout, qtype) {
        (Isa::Avx512Vnni, Layout::Vnni16, QType::Q5_K) => Some((|w, out| unsafe { avx512::kq_unpack16::<true>(w, out) }, multiply)),
        (Isa::Avx512Vnni, Layout::Vnni16, QType::Q6_K) => Some((|w, out| unsafe { avx512::q6k_unpack16(w, out) }, multiply_q6k)),
        _ => None,
    }
}

/// The tile kernel for a weight format on an instruction-set path.
pub fn tile_fn(isa: Isa, qtype: QType) -> TileFn {
    #[cfg(target_arch = "x86_64")]
    {
        match (isa.vector(), qtype) {
            // Rows past the last full panel (every format has panels on these paths).
            (Isa::Avx2 | Isa::Avx512Vnni, QType::Q4_0) => return |w, a, o| tile!(x86::q4_avx2 [false], w, a, o),
            (Isa::Avx2 | Isa::Avx512Vnni, QType::Q4_1) => return |w, a, o| tile!(x86::q4_avx2 [true], w, a, o),
            (Isa::Avx2 | Isa::Avx512Vnni, QType::Q8_0) => return |w, a, o| tile!(x86::q8_avx2 [false], w, a, o),
            (Isa::Avx2 | Isa::Avx512Vnni, QType::A8) => return |w, a, o| tile!(x86::q8_avx2 [true], w, a, o),
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
    ($($seg:ident)::+ [$($g:tt),*], $w:expr, $a:expr, $o:expr $(, $arg:expr)*) => {{
        // SAFETY: `tile_fn` hands out x86 kernels only for detected features.
        unsafe {
            match $a.len() {
                1 => store($o, $($seg)::+::<$($g,)* 1>($w, $a.try_into().unwrap() $(, $arg)*)),
                2 => store($o, $($seg)::+::<$($g,)* 2>($w, $a.try_into().unwrap() $(, $arg)*)),
                3 => store($o, $($seg)::+::<$($g,)* 3>($w, $a.try_into().unwrap() $(, $arg)*)),
                4 => store($o, $($seg)::+::<$($g,)* 4>($w, $a.try_into().unwrap() $(, $arg)*)),
                5 => store($o, $($seg)::+::<$($g,)* 5>($w, $a.try_into().unwrap() $(, $arg)*)),
                6 => store($o, $($seg)::+::<$($g,)* 6>($w, $a.try_into().unwrap() $(, $arg)*)),
                7 => store($o, $($seg)::+::<$($g,)* 7>($w, $a.try_into().unwrap() $(, $arg)*)),
                _ => store($o, $($seg)::+::<$($g,)* 8>($w, $a.try_into().unwrap() $(, $arg)*)),
            }
        }
    }};
}
#[cfg(target_arch = "x86_64")]
use tile;

/// A kernel's result for one token: one row's value, or a panel's.
trait Put<V> {
    fn put(&mut self, v: V);
}
impl Put<f32> for f32 {
    fn put(&mut self, v: f32) {
        *self = v;
    }
}
impl<const G: usize> Put<[f32; G]> for [f32; MAX_GROUP] {
    fn put(&mut self, v: [f32; G]) {
        self[..G].copy_from_slice(&v);
    }
}
#[cfg(target_arch = "x86_64")]
fn store<T: Put<V>, V, const NT: usize>(out: &mut [T], v: [V; NT]) {
    out.iter_mut().zip(v).for_each(|(o, v)| o.put(v));
}

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod tests;
