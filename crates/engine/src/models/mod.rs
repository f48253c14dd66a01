//! Model architectures, one file each, behind the `Model` trait; and the
//! pieces every architecture shares (KV cache, batch description, small ops).

pub mod decoder;
pub mod gemma2;
pub mod gemma3;
pub mod llama;
pub mod mlx_folder;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;
pub mod qwen3_moe;
pub mod rope_scaling;
pub mod weights;

use crate::backend::{BackendKind, Cpu, Mlx};
use crate::error::EngineError;
use std::path::Path;

use crate::formats::gguf::GgufFile;
use crate::text::tokenizer::Tokenizer;
use crate::engine::kv::{BlockId, KvStore};
use weights::{GgufSource, WeightSource};

/// Shape facts the engine needs about a loaded model.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: String,
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub context_length: usize,
}

/// One token of a forward batch. Tokens of several sequences, and several
/// tokens of one sequence (prefill), may share a batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchToken {
    pub token: u32,
    /// Position in its sequence; the sequence's cache must already hold
    /// positions `0..pos` (or receive them earlier in this batch).
    pub pos: usize,
    /// Index into the `caches` slice passed to `forward`.
    pub seq: usize,
    /// Whether to compute logits for this token.
    pub logits: bool,
}

pub trait Model: Send + Sync {
    fn config(&self) -> &ModelConfig;
    /// Bytes of weights this model holds.
    fn weight_bytes(&self) -> usize;
    /// Bytes of weights one decode step reads (every matrix once, one
    /// embedding row; of a mixture, the experts one token uses).
    fn decode_weight_bytes(&self) -> usize;
    /// Runs the batch, writing every token's keys and values into its
    /// sequence's blocks (`tables[bt.seq]` must cover `bt.pos`); returns
    /// `vocab_size` logits per token that asked.
    fn forward(
        &self,
        batch: &[BatchToken],
        kv: &mut KvStore,
        tables: &[&[BlockId]],
    ) -> Result<Vec<f32>, EngineError>;
    /// Bytes of keys and values one position takes in the cache.
    fn kv_bytes_per_position(&self) -> usize {
        let c = self.config();
        c.n_layers * 2 * c.n_kv_heads * c.head_dim * 2
    }
    fn new_kv_store(&self, block_size: usize, n_blocks: usize) -> KvStore {
        let c = self.config();
        KvStore::new(c.n_layers, c.n_kv_heads * c.head_dim, block_size, n_blocks)
    }
}

/// Rejects a batch that names a missing block table, a position its table
/// does not cover, or a token outside the vocabulary.
pub(crate) fn check_batch(
    cfg: &ModelConfig,
    batch: &[BatchToken],
    kv: &KvStore,
    tables: &[&[BlockId]],
) -> Result<(), EngineError> {
    for bt in batch {
        let table = tables
            .get(bt.seq)
            .ok_or_else(|| EngineError::Internal("batch names a missing block table".into()))?;
        let covered = table.len() * kv.block_size();
        if bt.pos >= covered
            || bt.token as usize >= cfg.vocab_size
            || table.iter().any(|&b| b as usize >= kv.n_blocks())
        {
            return Err(EngineError::Internal(format!(
                "bad batch token {bt:?} (its blocks cover {covered} positions)"
            )));
        }
    }
    Ok(())
}

/// The architectures this engine runs, by mlx-lm `model_type`.
pub const SUPPORTED: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "phi3",
];

/// Loads a model by its `model_type`, from either kind of source, onto
/// `backend`.
pub fn load(src: &dyn WeightSource, backend: BackendKind) -> Result<Box<dyn Model>, EngineError> {
    let decoder = match src.hparams().model_type.as_str() {
        "llama" | "mistral" => llama::load(src)?,
        "qwen2" => qwen2::load(src)?,
        "qwen3" => qwen3::load(src)?,
        "qwen3_moe" => qwen3_moe::load(src)?,
        "gemma2" => gemma2::load(src)?,
        "gemma3" | "gemma3_text" => gemma3::load(src)?,
        "phi3" => phi3::load(src)?,
        other => {
            return Err(src.err(format!(
                "unsupported architecture '{other}' (supported: {})",
                SUPPORTED.join(", ")
            )));
        }
    };
    Ok(match backend {
        BackendKind::Cpu => Box::new(decoder.into_backend(Cpu)?),
        BackendKind::Mlx => Box::new(decoder.into_backend(Mlx::new()?)?),
    })
}

/// A model ready to serve: its weights and its tokenizer.
pub struct Opened {
    pub model: Box<dyn Model>,
    pub tokenizer: Tokenizer,
    /// How the weights are stored (`Q4_1`, `MLX 4-bit/64`, `BF16`, ...).
    pub weight_format: String,
}

/// Opens a GGUF file or an MLX model folder on the `cpu` backend.
pub fn open(path: &Path) -> Result<Opened, EngineError> {
    open_on(path, BackendKind::Cpu)
}

/// Opens a GGUF file or an MLX model folder on `backend`.
pub fn open_on(path: &Path, backend: BackendKind) -> Result<Opened, EngineError> {
    let tok_err = |e: EngineError| EngineError::ModelLoad { path: path.display().to_string(), reason: e.to_string() };
    crate::backend::cpu::kernels::Isa::check_env()?;
    if mlx_folder::is_mlx_folder(path) {
        let folder = mlx_folder::MlxFolder::open(path)?;
        let model = load(&folder, backend)?;
        let tokenizer = Tokenizer::from_hf_dir(path).map_err(tok_err)?;
        return Ok(Opened { model, tokenizer, weight_format: folder.weight_format() });
    }
    if path.is_dir() {
        return Err(EngineError::ModelLoad {
            path: path.display().to_string(),
            reason: "is a directory without config.json: neither a GGUF file nor an MLX model folder".into(),
        });
    }
    let g = GgufFile::open(path)?;
    let model = load(&GgufSource::new(&g)?, backend)?;
    let tokenizer = Tokenizer::from_gguf(&g).map_err(tok_err)?;
    let weight_format = g.tensor("blk.0.attn_q.weight").or_else(|| g.tensor("blk.0.attn_qkv.weight")).map_or("?", |t| t.qtype.name()).to_owned();
    Ok(Opened { model, tokenizer, weight_format })
}

/// Loads a GGUF model by its `general.architecture` (on `cpu`).
pub fn load_gguf(g: &GgufFile) -> Result<Box<dyn Model>, EngineError> {
    load(&GgufSource::new(g)?, BackendKind::Cpu)
}

pub(crate) mod ops {
    /// `out = x / rms(x) * w` per row of `w.len()` elements.
    pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let d = w.len();
        for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let inv = 1.0 / (ss + eps).sqrt();
            for ((o, &xv), &wv) in or.iter_mut().zip(xr).zip(w) {
                *o = xv * inv * wv;
            }
        }
    }

    /// `rms_norm` of each `w.len()` run of `x`, in place.
    pub fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
        let d = w.len();
        for r in x.chunks_exact_mut(d) {
            let ss: f32 = r.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let inv = 1.0 / (ss + eps).sqrt();
            r.iter_mut().zip(w).for_each(|(v, &wv)| *v *= inv * wv);
        }
    }

    /// `gate = gelu_tanh(gate) * up`, in place.
    pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
        const SQRT_2_OVER_PI: f32 = 0.797_884_6;
        for (g, &u) in gate.iter_mut().zip(up) {
            let x = *g;
            *g = 0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh()) * u;
        }
    }

    /// `gate = silu(gate) * up`, in place.
    pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
        for (g, &u) in gate.iter_mut().zip(up) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
    }

    /// In-place softmax.
    pub fn softmax(x: &mut [f32]) {
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for v in x.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let inv = 1.0 / sum;
        x.iter_mut().for_each(|v| *v *= inv);
    }

    pub fn add_in_place(x: &mut [f32], y: &[f32]) {
        x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
    }
}
