//! Compute backends under the one model code (`models/decoder.rs`): `cpu`
//! (our own kernels on host memory) and `mlx` (libmlx through
//! `crates/mlx`). The decoder is written once against `Backend`'s fused
//! operations; a backend chooses how weights, activations and the KV cache
//! are held. See docs/mlx-backend.md.

pub mod cpu;
pub mod mlx;

use crate::backend::cpu::kernels::QMatrix;
use crate::error::EngineError;
use crate::engine::kv::{BlockId, KvStore};
use crate::models::decoder::{Activation, RopeStyle};
use crate::models::BatchToken;

pub use cpu::Cpu;
pub use mlx::Mlx;

pub type R = Result<(), EngineError>;

/// Which backend a model runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    #[default]
    Cpu,
    Mlx,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Mlx => "mlx",
        }
    }

    /// `cpu`, `mlx`, or `auto` (MLX where it runs on a GPU, else our kernels,
    /// which are faster than MLX's on a CPU).
    pub fn parse(s: &str) -> Result<BackendKind, EngineError> {
        match s {
            "cpu" => Ok(BackendKind::Cpu),
            "mlx" => Ok(BackendKind::Mlx),
            "auto" => Ok(if mlx_serving_mlx::has_gpu() { BackendKind::Mlx } else { BackendKind::Cpu }),
            other => Err(EngineError::InvalidParams(format!("backend must be 'cpu', 'mlx' or 'auto', got '{other}'"))),
        }
    }
}

/// Rotary embedding of a model: per-pair inverse frequencies and layout.
#[derive(Debug, Clone)]
pub struct Rope {
    pub inv_freq: Vec<f32>,
    pub style: RopeStyle,
    pub head_dim: usize,
}

impl Rope {
    /// `(cos, sin)` of every token's angle per pair: `n x head_dim/2` each.
    pub fn tables(&self, batch: &[BatchToken]) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let (mut cos, mut sin) = (Vec::with_capacity(batch.len() * half), Vec::with_capacity(batch.len() * half));
        for bt in batch {
            for &f in &self.inv_freq {
                let (s, c) = (bt.pos as f32 * f).sin_cos();
                cos.push(c);
                sin.push(s);
            }
        }
        (cos, sin)
    }
}

/// What one layer's attention needs beyond its tensors.
#[derive(Debug, Clone, Copy)]
pub struct AttnParams {
    pub layer: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// `cap * tanh(score / cap)` before the softmax (Gemma 2).
    pub softcap: Option<f32>,
    /// A token sees only the last `window` positions.
    pub window: Option<usize>,
}

/// The operations of a forward pass. Tensors are `tokens x width` row
/// blocks; outputs are written through `&mut` so the CPU backend reuses
/// its buffers across layers while MLX simply rebinds a lazy array.
pub trait Backend: Send + Sync + Sized + 'static {
    type Matrix: Send + Sync;
    type Vector: Send + Sync;
    type Tensor: Default;
    /// State of one forward pass: scratch, per-batch tables, locks.
    type Pass;

    fn matrix(&self, m: QMatrix) -> Result<Self::Matrix, EngineError>;
    fn vector(&self, v: Vec<f32>) -> Result<Self::Vector, EngineError>;
    fn matrix_bytes(m: &Self::Matrix) -> usize;
    fn new_kv_store(&self, n_layers: usize, kv_dim: usize, block_size: usize, n_blocks: usize) -> KvStore;

    /// Starts a forward pass; `ropes` are the rotary embeddings its layers
    /// use (Gemma 3's local and global layers differ), all of one style and size.
    fn begin(&self, batch: &[BatchToken], ropes: &[Rope]) -> Result<Self::Pass, EngineError>;
    /// Rows of `table` for the batch's tokens, times `scale`.
    fn embed(&self, p: &mut Self::Pass, table: &Self::Matrix, scale: Option<f32>, out: &mut Self::Tensor) -> R;
    /// RMSNorm of every run of `w`'s length.
    fn rms_norm(&self, p: &mut Self::Pass, x: &Self::Tensor, w: &Self::Vector, eps: f32, out: &mut Self::Tensor) -> R;
    fn rms_norm_in_place(&self, p: &mut Self::Pass, x: &mut Self::Tensor, w: &Self::Vector, eps: f32) -> R;
    /// `out = x W^T`.
    fn linear(&self, p: &mut Self::Pass, w: &Self::Matrix, x: &Self::Tensor, out: &mut Self::Tensor) -> R;
    /// `outs[i] = x W_i^T` for matrices that read the same input (q, k and
    /// v; gate and up), which a backend may run as one operation.
    fn linear_many<const N: usize>(&self, p: &mut Self::Pass, ws: [&Self::Matrix; N], x: &Self::Tensor, outs: [&mut Self::Tensor; N]) -> R {
        ws.into_iter().zip(outs).try_for_each(|(w, out)| self.linear(p, w, x, out))
    }
    /// Adds `b` to every row.
    fn add_bias(&self, p: &mut Self::Pass, x: &mut Self::Tensor, b: &Self::Vector) -> R;
    /// Rotates `n_heads` heads per token by the token's position, with
    /// rope `which` of those `begin` was given.
    fn rope(&self, p: &mut Self::Pass, x: &mut Self::Tensor, n_heads: usize, which: usize) -> R;
    /// Writes the batch's keys and values into its sequences' blocks, then
    /// attends every query over its sequence (causally).
    #[allow(clippy::too_many_arguments)]
    fn attention(&self, p: &mut Self::Pass, a: &AttnParams, q: &Self::Tensor, k: &Self::Tensor, v: &Self::Tensor, kv: &mut KvStore, tables: &[&[BlockId]], out: &mut Self::Tensor) -> R;
    /// `gate = act(gate) * up`.
    fn activate(&self, p: &mut Self::Pass, act: Activation, gate: &mut Self::Tensor, up: &Self::Tensor) -> R;
    fn add(&self, p: &mut Self::Pass, x: &mut Self::Tensor, y: &Self::Tensor) -> R;
    /// `cap * tanh(x / cap)`.
    fn soft_cap(&self, p: &mut Self::Pass, x: &mut Self::Tensor, cap: f32) -> R;
    fn zeros(&self, p: &mut Self::Pass, rows: usize, width: usize, out: &mut Self::Tensor) -> R;
    /// `out` = rows `rows` of `x`.
    fn select_rows(&self, p: &mut Self::Pass, x: &Self::Tensor, rows: &[usize], width: usize, out: &mut Self::Tensor) -> R;
    /// `out[rows[i]] += weights[i] * y[i]`.
    fn add_rows_weighted(&self, p: &mut Self::Pass, out: &mut Self::Tensor, y: &Self::Tensor, rows: &[usize], weights: &[f32], width: usize) -> R;
    /// Layer done: its output `x` may start computing while later layers
    /// are still being described (a no-op where operations run at once).
    fn layer_done(&self, _p: &mut Self::Pass, _x: &Self::Tensor) -> R {
        Ok(())
    }
    /// The values on the host (router scores inside a pass).
    fn to_host(&self, p: &mut Self::Pass, x: Self::Tensor) -> Result<Vec<f32>, EngineError>;
    /// Ends the pass: everything it wrote to `kv` is computed (the next
    /// pass may run on another thread) and the logits, if any, are read.
    fn finish(&self, p: Self::Pass, kv: &mut KvStore, logits: Option<Self::Tensor>) -> Result<Vec<f32>, EngineError>;
}
