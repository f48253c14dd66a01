//! The `mlx` backend: the decoder's operations as MLX graphs (libmlx
//! through `crates/mlx`), built lazily through a forward pass and run when
//! the logits are read.
//!
//! - Weights: a loaded `QMatrix` as MLX arrays. Q4_0, Q4_1, Q8_0 and MLX-A8
//!   blocks are MLX affine groups of 32 already (the mapping `convert.rs`
//!   writes to disk, `affine::blocks_to_affine`), so they become
//!   `quantized_matmul` weights exactly; every other format (dense floats,
//!   K-quants, Q5_x) is widened to float16 rows, as `convert` does.
//! - KV cache: paged like the host one (same blocks, same tables, so prefix
//!   sharing and truncation need nothing new): per layer one float16 matrix
//!   of `block * block_size + slot` rows, grown as blocks are first used.
//!   A step scatters its keys and values into their rows and each sequence
//!   gathers its rows for MLX's fused attention.
//! - Activations are float32 (`tokens x width`), as on `cpu`.

use std::collections::hash_map::{Entry, HashMap};
use std::sync::{Mutex, MutexGuard};

use half::f16;
use mlx_serving_mlx::{Array, Dtype, MlxError, QuantizedWeight};

use super::{AttnParams, Backend, Rope, R};
use crate::formats::affine::blocks_to_affine;
use crate::backend::cpu::kernels::QMatrix;
use crate::error::EngineError;
use crate::engine::kv::{BlockId, KvStore};
use crate::models::decoder::{Activation, RopeStyle};
use crate::models::BatchToken;
use crate::formats::quant::QType;

/// One weight matrix (rows = output features) on the MLX side.
pub enum MlxMatrix {
    Quantized(QuantizedWeight),
    /// Float16, stored transposed-ready as `rows x cols`.
    Dense(Array),
}

fn mlx_error(e: MlxError) -> EngineError {
    EngineError::Internal(format!("mlx backend: {e}"))
}

impl From<MlxError> for EngineError {
    fn from(e: MlxError) -> EngineError {
        mlx_error(e)
    }
}

impl MlxMatrix {
    pub fn from_qmatrix(w: &QMatrix) -> Result<MlxMatrix, EngineError> {
        if matches!(w.qtype, QType::Q4_0 | QType::Q4_1 | QType::Q8_0 | QType::A8) {
            let (mut words, mut scales, mut biases) = (Vec::new(), Vec::new(), Vec::new());
            let mut bits = 0;
            for r in 0..w.rows {
                let (b, wr, s, m) = blocks_to_affine(w.qtype, &w.row(r), w.cols).map_err(EngineError::Internal)?;
                bits = b as usize;
                words.extend_from_slice(&wr);
                // Kept in float32, the activations' type: MLX would otherwise
                // convert them on every matmul (5% of a decode step, perf).
                scales.extend(s);
                biases.extend(m);
            }
            let group_size = widest_groups(&scales, &biases, w.cols);
            let step = group_size / 32;
            let scales: Vec<f32> = scales.into_iter().step_by(step).collect();
            let biases: Vec<f32> = biases.into_iter().step_by(step).collect();
            let groups = w.cols / group_size;
            let q = QuantizedWeight {
                w: Array::from_bytes(&words, Dtype::U32, &[w.rows, w.cols * bits / 32])?,
                scales: Array::from_slice(&scales, &[w.rows, groups])?,
                biases: Array::from_slice(&biases, &[w.rows, groups])?,
                group_size,
                bits,
            };
            return Ok(MlxMatrix::Quantized(q));
        }
        let mut row = vec![0f32; w.cols];
        let mut dense = Vec::with_capacity(w.rows * w.cols);
        for r in 0..w.rows {
            w.dequantize_row_into(r, &mut row);
            dense.extend(row.iter().map(|&v| f16::from_f32(v)));
        }
        Ok(MlxMatrix::Dense(Array::from_slice(&dense, &[w.rows, w.cols])?))
    }

    /// `x @ W^T` for activations `x` of shape `(tokens, cols)`.
    pub fn matmul(&self, x: &Array) -> Result<Array, EngineError> {
        Ok(match self {
            MlxMatrix::Quantized(q) => q.matmul(x)?,
            MlxMatrix::Dense(w) => x.matmul(&w.transpose(&[1, 0])?)?,
        })
    }
}

/// The widest group size MLX takes (128, 64, else 32) at which each run of
/// groups of 32 shares one scale and one bias in every row. An MLX folder
/// quantized in groups of 64 reaches the kernels as pairs of equal Q4_1 / A8
/// blocks, so this gives its own groups back, exactly: half the scales to
/// read, and the grouping mlx-lm computes with. `scales` and `biases` hold
/// `cols / 32` entries per row.
fn widest_groups(scales: &[f32], biases: &[f32], cols: usize) -> usize {
    let per_row = cols / 32;
    for size in [128, 64] {
        let n = size / 32;
        if cols % size != 0 {
            continue;
        }
        // Rows hold a whole number of runs, so runs never straddle rows.
        let same = |v: &[f32]| v.chunks_exact(n).all(|run| run.iter().all(|x| x.to_bits() == run[0].to_bits()));
        if per_row % n == 0 && same(scales) && same(biases) {
            return size;
        }
    }
    32
}

// Arrays are reference counted atomically, but MLX does not promise that
// two threads may build and run graphs at once. Every pass holds `LOCK`
// while it touches any array, which is what makes the weights `Sync`.
static LOCK: Mutex<()> = Mutex::new(());
unsafe impl Sync for MlxMatrix {}

/// A norm weight or bias.
pub struct MlxVector {
    a: Array,
    len: usize,
}
unsafe impl Sync for MlxVector {}

/// The paged KV cache of one model (see the module docs).
pub struct MlxKv {
    /// Per layer: keys and values, `(rows, kv_dim)` float16.
    layers: Vec<Option<(Array, Array)>>,
    kv_dim: usize,
    /// Rows held (the same for every layer), and the most there can be.
    rows: usize,
    max_rows: usize,
}

impl MlxKv {
    /// The layer's cache with room for `need` rows.
    fn layer(&mut self, layer: usize, need: usize) -> Result<&mut (Array, Array), EngineError> {
        if need > self.max_rows {
            return Err(EngineError::Internal(format!("kv row {need} is past the pool's {}", self.max_rows)));
        }
        let d = self.kv_dim;
        // Grown to the next power of two, so growth (a copy) happens only
        // a few times while the pool fills.
        let want = need.max(self.rows).max(1).next_power_of_two().min(self.max_rows);
        let slot = &mut self.layers[layer];
        match slot.take() {
            None => *slot = Some((zeros(want, d)?, zeros(want, d)?)),
            Some((k, v)) if k.shape()[0] < need => {
                let more = zeros(want - k.shape()[0], d)?;
                *slot = Some((mlx_serving_mlx::concatenate(&[&k, &more], 0)?, mlx_serving_mlx::concatenate(&[&v, &more], 0)?));
            }
            kept => *slot = kept,
        }
        let kv = slot.as_mut().expect("set above");
        self.rows = self.rows.max(kv.0.shape()[0]);
        Ok(kv)
    }
}

// Touched only by passes, which hold `LOCK`.
unsafe impl Sync for MlxKv {}

fn zeros(rows: usize, d: usize) -> Result<Array, EngineError> {
    Ok(Array::zeros(&[rows, d], Dtype::F16)?)
}

fn get(t: &Option<Array>) -> Result<&Array, EngineError> {
    t.as_ref().ok_or_else(|| EngineError::Internal("mlx backend: tensor used before it was computed".into()))
}

fn i32s(v: impl IntoIterator<Item = usize>) -> Result<Array, EngineError> {
    let v: Vec<i32> = v.into_iter().map(|x| x as i32).collect();
    let n = v.len();
    Ok(Array::from_slice(&v, &[n])?)
}

/// The backend. `Mlx::new` fails when libmlx cannot be loaded here.
pub struct Mlx;

impl Mlx {
    pub fn new() -> Result<Mlx, EngineError> {
        match mlx_serving_mlx::unavailable_reason() {
            None => Ok(Mlx),
            // Say how to get it: an npm-installed package has no shim of its own.
            Some(why) => Err(EngineError::InvalidParams(format!(
                "backend 'mlx' is unavailable here: {why}. It needs libmlx and the shim built against it: \
                 in a checkout, `bash scripts/setup.sh` builds both (MLX_WHEEL picks the wheel); an npm-installed \
                 package runs the cpu backend only, unless MLX_SHIM names a shim built from a checkout"
            ))),
        }
    }
}

/// A run of one sequence's tokens at consecutive positions: attended as
/// one block of queries against the sequence's first `n_pos` positions.
struct Run {
    seq: usize,
    t0: usize,
    len: usize,
    n_pos: usize,
    /// Cache rows of positions `0..n_pos` (set at the first layer).
    rows: Option<Array>,
}

pub struct MlxPass {
    tokens: Array,
    style: RopeStyle,
    head_dim: usize,
    /// Each token's position, and each rope's period (1 / frequency) per rotary pair.
    positions: Array,
    periods: Vec<Array>,
    runs: Vec<Run>,
    /// Cache row each token's keys and values go to (set at the first layer).
    write_rows: Option<(Array, usize)>,
    /// Additive masks by (run, window, repeats).
    masks: HashMap<(usize, Option<usize>, usize), Array>,
    /// Last, so it is released after every array above is dropped.
    _lock: MutexGuard<'static, ()>,
}

impl MlxPass {
    /// Cache rows for the batch's writes and its runs' reads, once per pass
    /// (the runs cover the batch's tokens in order).
    fn rows(&mut self, row_of: impl Fn(usize, usize) -> usize) -> Result<(), EngineError> {
        if self.write_rows.is_none() {
            let rows: Vec<usize> = self.runs.iter().flat_map(|r| (r.n_pos - r.len..r.n_pos).map(|pos| row_of(r.seq, pos))).collect();
            let max = rows.iter().copied().max().unwrap_or(0);
            self.write_rows = Some((i32s(rows)?, max + 1));
            for r in &mut self.runs {
                r.rows = Some(i32s((0..r.n_pos).map(|p| row_of(r.seq, p)))?);
            }
        }
        Ok(())
    }

    /// `(queries * repeats) x n_pos` additive mask of run `i`: each query
    /// sees its own position and those before it, within `window`.
    fn mask(&mut self, i: usize, window: Option<usize>, repeats: usize) -> Result<&Array, EngineError> {
        let r = &self.runs[i];
        let (len, n_pos) = (r.len, r.n_pos);
        if let Entry::Vacant(slot) = self.masks.entry((i, window, repeats)) {
            let mut m = Vec::with_capacity(repeats * len * n_pos);
            for _ in 0..repeats {
                for qi in 0..len {
                    let pos = n_pos - len + qi;
                    m.extend((0..n_pos).map(|j| if j <= pos && window.is_none_or(|w| j + w > pos) { 0.0f32 } else { f32::NEG_INFINITY }));
                }
            }
            slot.insert(Array::from_slice(&m, &[repeats * len, n_pos])?);
        }
        Ok(&self.masks[&(i, window, repeats)])
    }
}

impl Backend for Mlx {
    type Matrix = MlxMatrix;
    type Vector = MlxVector;
    type Tensor = Option<Array>;
    type Pass = MlxPass;

    fn matrix(&self, m: QMatrix) -> Result<MlxMatrix, EngineError> {
        MlxMatrix::from_qmatrix(&m)
    }

    fn vector(&self, v: Vec<f32>) -> Result<MlxVector, EngineError> {
        Ok(MlxVector { len: v.len(), a: Array::from_slice(&v, &[v.len()])? })
    }

    fn matrix_bytes(m: &MlxMatrix) -> usize {
        let bytes = |a: &Array| a.len() * a.dtype().map_or(0, Dtype::size);
        match m {
            MlxMatrix::Quantized(q) => bytes(&q.w) + bytes(&q.scales) + bytes(&q.biases),
            MlxMatrix::Dense(a) => bytes(a),
        }
    }

    fn new_kv_store(&self, n_layers: usize, kv_dim: usize, block_size: usize, n_blocks: usize) -> KvStore {
        let store = MlxKv { layers: (0..n_layers).map(|_| None).collect(), kv_dim, rows: 0, max_rows: n_blocks * block_size };
        KvStore::on_device(n_layers, kv_dim, block_size, n_blocks, Box::new(store))
    }

    fn begin(&self, batch: &[BatchToken], ropes: &[Rope]) -> Result<MlxPass, EngineError> {
        let rope = ropes.first().ok_or_else(|| EngineError::Internal("a forward pass needs a rope".into()))?;
        let lock = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let periods = ropes
            .iter()
            .map(|r| {
                let p: Vec<f32> = r.inv_freq.iter().map(|f| 1.0 / f).collect();
                Array::from_slice(&p, &[p.len()])
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut runs: Vec<Run> = Vec::new();
        for (t, bt) in batch.iter().enumerate() {
            match runs.last_mut() {
                Some(r) if r.seq == bt.seq && r.n_pos == bt.pos => {
                    r.len += 1;
                    r.n_pos += 1;
                }
                _ => runs.push(Run { seq: bt.seq, t0: t, len: 1, n_pos: bt.pos + 1, rows: None }),
            }
        }
        Ok(MlxPass {
            _lock: lock,
            tokens: i32s(batch.iter().map(|bt| bt.token as usize))?,
            style: rope.style,
            head_dim: rope.head_dim,
            positions: i32s(batch.iter().map(|bt| bt.pos))?,
            periods,
            runs,
            write_rows: None,
            masks: HashMap::new(),
        })
    }

    fn embed(&self, p: &mut MlxPass, table: &MlxMatrix, scale: Option<f32>, out: &mut Option<Array>) -> R {
        let rows = match table {
            MlxMatrix::Quantized(q) => q.dequantize(Some(&p.tokens)),
            MlxMatrix::Dense(w) => w.take(&p.tokens, 0),
        };
        let mut x = rows?.astype(Dtype::F32)?;
        if let Some(s) = scale {
            x = x.multiply(&Array::scalar(s)?)?;
        }
        *out = Some(x);
        Ok(())
    }

    fn rms_norm(&self, _: &mut MlxPass, x: &Option<Array>, w: &MlxVector, eps: f32, out: &mut Option<Array>) -> R {
        *out = Some(norm_runs(get(x)?, w, eps)?);
        Ok(())
    }

    fn rms_norm_in_place(&self, _: &mut MlxPass, x: &mut Option<Array>, w: &MlxVector, eps: f32) -> R {
        *x = Some(norm_runs(get(x)?, w, eps)?);
        Ok(())
    }

    fn linear(&self, _: &mut MlxPass, w: &MlxMatrix, x: &Option<Array>, out: &mut Option<Array>) -> R {
        *out = Some(w.matmul(get(x)?)?);
        Ok(())
    }

    fn add_bias(&self, _: &mut MlxPass, x: &mut Option<Array>, b: &MlxVector) -> R {
        *x = Some(get(x)?.add(&b.a)?);
        Ok(())
    }

    fn rope(&self, p: &mut MlxPass, x: &mut Option<Array>, n_heads: usize, which: usize) -> R {
        let a = get(x)?;
        let (n, hd) = (a.shape()[0], p.head_dim);
        let turned = mlx_serving_mlx::rope_at(&a.reshape(&[n, n_heads, 1, hd])?, p.style == RopeStyle::Adjacent, &p.positions, &p.periods[which])?;
        *x = Some(turned.reshape(&[n, n_heads * hd])?);
        Ok(())
    }

    fn attention(&self, p: &mut MlxPass, a: &AttnParams, q: &Option<Array>, k: &Option<Array>, v: &Option<Array>, kv: &mut KvStore, tables: &[&[BlockId]], out: &mut Option<Array>) -> R {
        let (hd, nh, nkv) = (a.head_dim, a.n_heads, a.n_kv_heads);
        let bs = kv.block_size();
        p.rows(|seq, pos| tables[seq][pos / bs] as usize * bs + pos % bs)?;
        let (write_rows, need) = p.write_rows.as_ref().expect("set by rows()");
        let store = kv.device_mut::<MlxKv>().ok_or_else(|| EngineError::Internal("mlx backend: the KV store is not MLX's".into()))?;
        let (kc, vc) = store.layer(a.layer, *need)?;
        *kc = kc.scatter_rows(write_rows, get(k)?)?;
        *vc = vc.scatter_rows(write_rows, get(v)?)?;
        let (kc, vc) = (&*kc, &*vc);
        let q = get(q)?;
        let mut outs = Vec::with_capacity(p.runs.len());
        for i in 0..p.runs.len() {
            let (t0, len, n_pos) = (p.runs[i].t0, p.runs[i].len, p.runs[i].n_pos);
            let rows = p.runs[i].rows.as_ref().expect("set by rows()");
            let heads = |c: &Array| -> Result<Array, EngineError> { Ok(c.take(rows, 0)?.reshape(&[1, n_pos, nkv, hd])?.transpose(&[0, 2, 1, 3])?.astype(Dtype::F32)?) };
            let (keys, values) = (heads(kc)?, heads(vc)?);
            let qr = q.slice(&[t0, 0], &[t0 + len, nh * hd])?.reshape(&[1, len, nh, hd])?.transpose(&[0, 2, 1, 3])?;
            let hidden = a.window.is_some_and(|w| w < n_pos);
            let o = if let Some(c) = a.softcap {
                // Capped scores: by hand, each KV head's query heads stacked as one block of rows.
                let group = nh / nkv;
                let qg = qr.reshape(&[1, nkv, group * len, hd])?;
                let s = qg.matmul(&keys.transpose(&[0, 1, 3, 2])?)?.multiply(&Array::scalar(a.scale / c)?)?;
                let s = s.tanh()?.multiply(&Array::scalar(c)?)?;
                let s = s.add(p.mask(i, a.window, group)?)?.softmax()?;
                s.matmul(&values)?.reshape(&[1, nh, len, hd])?
            } else if hidden {
                mlx_serving_mlx::scaled_dot_product_attention_masked(&qr, &keys, &values, a.scale, p.mask(i, a.window, 1)?)?
            } else {
                mlx_serving_mlx::scaled_dot_product_attention(&qr, &keys, &values, a.scale, len > 1)?
            };
            outs.push(o.transpose(&[0, 2, 1, 3])?.reshape(&[len, nh * hd])?);
        }
        *out = Some(match outs.len() {
            1 => outs.pop().expect("one"),
            _ => mlx_serving_mlx::concatenate(&outs.iter().collect::<Vec<_>>(), 0)?,
        });
        Ok(())
    }

    fn activate(&self, _: &mut MlxPass, act: Activation, gate: &mut Option<Array>, up: &Option<Array>) -> R {
        let g = get(gate)?;
        let act = match act {
            Activation::Silu => g.silu(),
            Activation::GeluTanh => g.gelu_tanh(),
        };
        *gate = Some(act?.multiply(get(up)?)?);
        Ok(())
    }

    fn add(&self, _: &mut MlxPass, x: &mut Option<Array>, y: &Option<Array>) -> R {
        *x = Some(get(x)?.add(get(y)?)?);
        Ok(())
    }

    fn soft_cap(&self, _: &mut MlxPass, x: &mut Option<Array>, cap: f32) -> R {
        *x = Some(get(x)?.multiply(&Array::scalar(1.0 / cap)?)?.tanh()?.multiply(&Array::scalar(cap)?)?);
        Ok(())
    }

    fn zeros(&self, _: &mut MlxPass, rows: usize, width: usize, out: &mut Option<Array>) -> R {
        *out = Some(Array::zeros(&[rows, width], Dtype::F32)?);
        Ok(())
    }

    fn select_rows(&self, _: &mut MlxPass, x: &Option<Array>, rows: &[usize], _: usize, out: &mut Option<Array>) -> R {
        *out = Some(get(x)?.take(&i32s(rows.iter().copied())?, 0)?);
        Ok(())
    }

    fn add_rows_weighted(&self, _: &mut MlxPass, out: &mut Option<Array>, y: &Option<Array>, rows: &[usize], weights: &[f32], _: usize) -> R {
        // A (rows of out) x (rows of y) matrix of the weights: one matmul
        // adds every weighted row where it belongs.
        let o = get(out)?;
        let n = o.shape()[0];
        let mut s = vec![0f32; n * rows.len()];
        for (i, (&r, &w)) in rows.iter().zip(weights).enumerate() {
            s[r * rows.len() + i] = w;
        }
        let s = Array::from_slice(&s, &[n, rows.len()])?;
        *out = Some(o.add(&s.matmul(get(y)?)?)?);
        Ok(())
    }

    fn layer_done(&self, _: &mut MlxPass, x: &Option<Array>) -> R {
        // MLX computes the layers described so far while the next ones are
        // built (on a GPU: the device works while the host encodes).
        Ok(mlx_serving_mlx::async_eval(&[get(x)?])?)
    }

    fn to_host(&self, _: &mut MlxPass, x: Option<Array>) -> Result<Vec<f32>, EngineError> {
        Ok(get(&x)?.to_vec_f32()?)
    }

    fn finish(&self, p: MlxPass, kv: &mut KvStore, logits: Option<Option<Array>>) -> Result<Vec<f32>, EngineError> {
        // Arrays built on one thread cannot be evaluated on another (MLX's
        // streams are per thread), and the engine's passes may move between
        // pool threads: so the cache leaves every pass computed.
        let mut outs: Vec<&Array> = Vec::new();
        if let Some(store) = kv.device_mut::<MlxKv>() {
            outs.extend(store.layers.iter().flatten().flat_map(|(k, v)| [k, v]));
        }
        let logits = logits.map(|l| l.ok_or_else(|| EngineError::Internal("mlx backend: no logits".into()))).transpose()?;
        outs.extend(logits.as_ref());
        mlx_serving_mlx::eval(&outs)?;
        let out = logits.map_or(Ok(Vec::new()), |l| l.to_vec_f32());
        drop(p);
        Ok(out?)
    }
}

/// RMSNorm of every run of `w.len` values of `x` (rows, or heads in a row).
fn norm_runs(x: &Array, w: &MlxVector, eps: f32) -> Result<Array, EngineError> {
    let shape = x.shape();
    let width = shape.last().copied().unwrap_or(0);
    if width == w.len {
        return Ok(mlx_serving_mlx::rms_norm(x, Some(&w.a), eps)?);
    }
    let runs = x.len() / w.len;
    Ok(mlx_serving_mlx::rms_norm(&x.reshape(&[runs, w.len])?, Some(&w.a), eps)?.reshape(&shape)?)
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::kernels::Bytes;
    use crate::formats::quant::quantize_row;
    use crate::formats::quant::tests::{rand_vec, random_k_row};

    /// Whether libmlx loaded; a test run that requires it fails without it.
    fn mlx_here() -> bool {
        let here = mlx_serving_mlx::available();
        assert!(here || std::env::var_os("MLX_REQUIRED").is_none(), "MLX_REQUIRED: {:?}", mlx_serving_mlx::unavailable_reason());
        here
    }

    /// MLX on the mapped weights computes what the dequantized weights
    /// compute in plain f64 (float activations on both sides, so the only
    /// difference is float16 activations inside MLX's kernels).
    #[test]
    fn every_format_maps_to_mlx_weights_with_the_same_values() {
        if !mlx_here() {
            return;
        }
        let (rows, cols, n) = (24, 256, 3);
        let x = rand_vec(n * cols, 5);
        for qtype in [QType::Q4_0, QType::Q4_1, QType::Q8_0, QType::A8, QType::F16, QType::Q4_K, QType::Q6_K] {
            let row_of = |r: usize| match qtype {
                QType::Q4_K | QType::Q6_K => random_k_row(qtype, cols / qtype.block_size(), r as u64 + 11),
                _ => quantize_row(qtype, &rand_vec(cols, r as u64 + 11)),
            };
            let data: Vec<u8> = (0..rows).flat_map(row_of).collect();
            let w = QMatrix { layout: crate::backend::cpu::kernels::Layout::Rows, qtype, rows, cols, data: Bytes::Owned(data) };
            let m = MlxMatrix::from_qmatrix(&w).unwrap();
            let exact = !matches!(qtype, QType::Q4_K | QType::Q6_K);
            assert_eq!(matches!(m, MlxMatrix::Quantized(_)), matches!(qtype, QType::Q4_0 | QType::Q4_1 | QType::Q8_0 | QType::A8));
            let got = m.matmul(&Array::from_slice(&x, &[n, cols]).unwrap()).unwrap().to_vec_f32().unwrap();
            let mut row = vec![0f32; cols];
            for r in 0..rows {
                w.dequantize_row_into(r, &mut row);
                for t in 0..n {
                    let terms = row.iter().zip(&x[t * cols..]).map(|(&a, &b)| a as f64 * b as f64);
                    let (want, magnitude) = terms.fold((0.0, 0.0), |(s, m), v| (s + v, m + v.abs()));
                    let g = got[t * rows + r] as f64;
                    // Exact formats: only summation order differs. Widened ones also
                    // round each weight to float16 (relative 2^-11).
                    let tol = if exact { 2e-3 * (1.0 + want.abs()) } else { magnitude / 2048.0 + 1e-3 };
                    assert!((g - want).abs() <= tol, "{qtype:?} row {r} token {t}: {g} vs {want}");
                }
            }
        }
    }

    /// MLX folders in groups of 64 or 128 reach the backend as runs of equal
    /// blocks of 32; the backend gives MLX the folder's own groups back and
    /// computes exactly what MLX computes on the folder's arrays.
    #[test]
    fn mlx_groups_wider_than_blocks_come_back_whole() {
        if !mlx_here() {
            return;
        }
        let (rows, cols, n) = (8, 256, 2);
        let x = Array::from_slice(&rand_vec(n * cols, 3), &[n, cols]).unwrap();
        // Float16 weights, so MLX's scales and biases are float16 values too.
        let w = Array::from_slice(&rand_vec(rows * cols, 9), &[rows, cols]).unwrap().astype(Dtype::F16).unwrap();
        for (group, bits) in [(32, 4), (64, 4), (128, 4), (64, 8), (128, 8)] {
            let q = QuantizedWeight::quantize(&w, group, bits).unwrap();
            let q = QuantizedWeight {
                w: q.w,
                scales: q.scales.astype(Dtype::F32).unwrap(),
                biases: q.biases.astype(Dtype::F32).unwrap(),
                group_size: group,
                bits,
            };
            let (words, scales, biases) = (q.w.to_vec::<u32>().unwrap(), q.scales.to_vec_f32().unwrap(), q.biases.to_vec_f32().unwrap());
            let (per_words, per_groups) = (cols * bits / 32, cols / group);
            let mut blocks = Vec::new();
            for r in 0..rows {
                let bytes: Vec<u8> = words[r * per_words..(r + 1) * per_words].iter().flat_map(|w| w.to_le_bytes()).collect();
                let g = r * per_groups..(r + 1) * per_groups;
                let (qtype, b) = crate::formats::affine::affine_to_blocks(bits as u32, group, &bytes, &scales[g.clone()], &biases[g], cols).unwrap();
                assert_eq!(qtype, if bits == 4 { QType::Q4_1 } else { QType::A8 });
                blocks.extend(b);
            }
            let qtype = if bits == 4 { QType::Q4_1 } else { QType::A8 };
            let mut m = QMatrix { layout: crate::backend::cpu::kernels::Layout::Rows, qtype, rows, cols, data: Bytes::Owned(blocks) };
            let MlxMatrix::Quantized(got) = MlxMatrix::from_qmatrix(&m).unwrap() else { panic!("{bits}-bit stays quantized") };
            assert_eq!(got.group_size, group, "{bits}-bit groups of {group}");
            let want = q.matmul(&x).unwrap().to_vec_f32().unwrap();
            assert_eq!(MlxMatrix::Quantized(got).matmul(&x).unwrap().to_vec_f32().unwrap(), want, "{bits}-bit groups of {group}");
            // One block's bias off in the last row: that row's run is no longer
            // one group, so no row may take the wide groups.
            if group > 32 {
                let Bytes::Owned(data) = &mut m.data else { unreachable!() };
                let at = data.len() - qtype.block_bytes() + 2;
                data[at] ^= 1;
                let MlxMatrix::Quantized(got) = MlxMatrix::from_qmatrix(&m).unwrap() else { unreachable!() };
                assert_eq!(got.group_size, 32, "{bits}-bit groups of {group}, one block changed");
            }
        }
    }
}
