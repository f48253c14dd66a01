//! What an architecture file loads a model through: its hyperparameters and
//! its named tensors, from a GGUF file or an MLX model folder alike.
//!
//! Tensors are asked for by both of their names (llama.cpp's GGUF name and
//! the Hugging Face / MLX name), so an architecture file states each weight
//! once and the source picks the convention it stores.

use std::path::Path;

use crate::backend::cpu::kernels::{Bytes, QMatrix};
use crate::error::EngineError;
use crate::formats::gguf::GgufFile;
use crate::formats::quant::dequantize_row;

use super::rope_scaling;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Gguf,
    Mlx,
}

/// The hyperparameters every architecture reads; the optional ones are only
/// set by the architectures that have them.
#[derive(Debug, Clone, Default)]
pub struct Hparams {
    /// mlx-lm's `model_type` (`llama`, `qwen3_moe`, ...).
    pub model_type: String,
    pub n_layers: usize,
    pub dim: usize,
    pub ffn_dim: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    pub eps: f32,
    pub context_length: usize,
    pub sliding_window: Option<usize>,
    /// Which layers use the sliding window, where the source says (an MLX
    /// folder's `layer_types` or `sliding_window_pattern`); the
    /// architecture's rule otherwise.
    pub sliding_layers: Option<Vec<bool>>,
    /// The rope base of sliding-window layers where it differs (Gemma 3's
    /// `rope_local_base_freq`).
    pub rope_local_theta: Option<f32>,
    pub attn_softcap: Option<f32>,
    pub final_softcap: Option<f32>,
    pub query_pre_attn_scalar: Option<f32>,
    pub n_experts: usize,
    pub n_experts_used: usize,
    pub moe_ffn_dim: usize,
    pub norm_topk_prob: bool,
    /// Divisors of the rotary frequencies, one per rotated pair (the
    /// long-context scalings of `rope_scaling.rs`): llama.cpp's `rope_freqs`.
    pub rope_factors: Option<Vec<f32>>,
    /// Multiplier of the rotated queries and keys (YaRN, LongRoPE); 1 if none.
    pub rope_mscale: Option<f32>,
}

/// The largest value each shape hyperparameter may take. Real models stay
/// far below (Llama 3.1 405B: 126 layers, hidden 16384, ffn 53248, 128
/// heads; 10M-token contexts), and a file may not ask for more: the loader
/// and the KV cache size buffers by these numbers.
pub const MAX_LAYERS: usize = 1 << 12;
pub const MAX_DIM: usize = 1 << 17;
pub const MAX_HEADS: usize = 1 << 12;
pub const MAX_CONTEXT: usize = 1 << 24;
pub const MAX_EXPERTS: usize = 1 << 12;

impl Hparams {
    /// Checks every number the model code relies on against the bounds
    /// above and against each other. The sources call it as soon as the
    /// numbers are read, before anything is sized by them (a GGUF claiming
    /// a hidden size of 2^40 once aborted the process on its first
    /// allocation), and again once the rope scaling is known.
    pub fn check(&self) -> Result<(), String> {
        let range = |field: &str, v: usize, lo: usize, hi: usize| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(format!("{field}: {v} is out of range ({lo} to {hi})"))
            }
        };
        range("layers", self.n_layers, 1, MAX_LAYERS)?;
        range("hidden size", self.dim, 1, MAX_DIM)?;
        range("feed-forward size", self.ffn_dim, 0, 8 * MAX_DIM)?;
        range("attention heads", self.n_heads, 1, MAX_HEADS)?;
        range("head size", self.head_dim, 1, MAX_DIM)?;
        range("context length", self.context_length, 1, MAX_CONTEXT)?;
        range("sliding window", self.sliding_window.unwrap_or(1), 1, MAX_CONTEXT)?;
        range("experts", self.n_experts, 0, MAX_EXPERTS)?;
        range("expert feed-forward size", self.moe_ffn_dim, 0, 8 * MAX_DIM)?;
        if self.n_kv_heads == 0 || self.n_heads % self.n_kv_heads != 0 {
            return Err(format!("key/value heads: {} does not divide {} attention heads", self.n_kv_heads, self.n_heads));
        }
        if self.n_heads / self.n_kv_heads > super::decoder::MAX_GROUP
            || self.head_dim > super::decoder::MAX_HEAD_DIM
            || self.head_dim % 2 != 0
        {
            return Err(format!("head size: {} (group {}) is not supported", self.head_dim, self.n_heads / self.n_kv_heads));
        }
        if !(self.eps > 0.0 && self.eps < 1.0) || !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return Err(format!("norm epsilon / rope theta: {} / {} out of range", self.eps, self.rope_theta));
        }
        let positive = |x: &f32| *x > 0.0 && x.is_finite();
        if !self.rope_factors.iter().flatten().chain(&self.rope_mscale).all(positive) {
            return Err("rope scaling: factors must be positive numbers".into());
        }
        if self.n_experts > 0 && (self.n_experts_used == 0 || self.n_experts_used > self.n_experts || self.moe_ffn_dim == 0) {
            return Err(format!("experts: {} used of {} with width {}", self.n_experts_used, self.n_experts, self.moe_ffn_dim));
        }
        Ok(())
    }
}

/// A tensor's two names, without the `.weight` / `.bias` suffix.
#[derive(Debug, Clone)]
pub struct Name {
    pub gguf: String,
    pub hf: String,
}

/// A tensor outside the layers (`token_embd` / `model.embed_tokens`).
pub fn global(gguf: &str, hf: &str) -> Name {
    Name {
        gguf: gguf.to_owned(),
        hf: hf.to_owned(),
    }
}

/// A tensor of layer `i` (`blk.{i}.attn_q` / `model.layers.{i}.self_attn.q_proj`).
pub fn layer(i: usize, gguf: &str, hf: &str) -> Name {
    Name {
        gguf: format!("blk.{i}.{gguf}"),
        hf: format!("model.layers.{i}.{hf}"),
    }
}

pub trait WeightSource {
    fn path(&self) -> &Path;
    fn format(&self) -> Format;
    fn hparams(&self) -> &Hparams;
    /// Whether the source holds `name.{suffix}` (`weight` or `bias`).
    fn has(&self, name: &Name, suffix: &str) -> bool;
    /// Rows of the matrix `name.weight` (the vocabulary, for embeddings).
    fn rows(&self, name: &Name) -> Result<usize, EngineError>;
    /// The `rows x cols` weight `name.weight`, in its stored format.
    fn matrix(&self, name: &Name, rows: usize, cols: usize) -> Result<QMatrix, EngineError>;
    /// `n` matrices of `rows x cols` stacked in one tensor (experts).
    fn stacked(
        &self,
        name: &Name,
        n: usize,
        rows: usize,
        cols: usize,
    ) -> Result<Vec<QMatrix>, EngineError> {
        let all = self.matrix(name, n * rows, cols)?;
        Ok((0..n).map(|e| slice_rows(&all, e * rows, rows)).collect())
    }
    /// The vector `name.{suffix}` (`weight` or `bias`) as f32.
    fn vector(&self, name: &Name, suffix: &str, len: usize) -> Result<Vec<f32>, EngineError>;
    fn err(&self, reason: String) -> EngineError {
        EngineError::ModelLoad {
            path: self.path().display().to_string(),
            reason,
        }
    }
}

/// Rows `start..start + n` of a matrix: shared file bytes, or a copy.
pub fn slice_rows(m: &QMatrix, start: usize, n: usize) -> QMatrix {
    assert!(m.layout == crate::backend::cpu::kernels::Layout::Rows, "rows are sliced at load, before the kernels' layout");
    let rb = m.row_bytes();
    let data = match &m.data {
        Bytes::File { file, offset, .. } => Bytes::File {
            file: file.clone(),
            offset: offset + start * rb,
            len: n * rb,
        },
        Bytes::Owned(v) => Bytes::Owned(v[start * rb..(start + n) * rb].to_vec()),
    };
    QMatrix::new(m.qtype, n, m.cols, data)
}

/// The matrix whose row `r` is row `order[r]` of `m` (a copy).
pub fn permute_rows(m: &QMatrix, order: &[usize]) -> QMatrix {
    let data: Vec<u8> = order.iter().flat_map(|&r| m.row(r).into_owned()).collect();
    QMatrix { layout: crate::backend::cpu::kernels::Layout::Rows, qtype: m.qtype, rows: order.len(), cols: m.cols, data: Bytes::Owned(data) }
}

/// A GGUF file as a weight source; `general.architecture` and the
/// `{arch}.*` keys give the hyperparameters.
pub struct GgufSource<'a> {
    pub g: &'a GgufFile,
    hp: Hparams,
}

impl<'a> GgufSource<'a> {
    pub fn new(g: &'a GgufFile) -> Result<Self, EngineError> {
        let arch = g.get_str("general.architecture").unwrap_or("").to_owned();
        let err = |reason: String| EngineError::ModelLoad {
            path: g.path.display().to_string(),
            reason,
        };
        let model_type = if arch == "qwen3moe" { "qwen3_moe".to_owned() } else { arch.clone() };
        if !super::SUPPORTED.contains(&model_type.as_str()) {
            return Err(err(format!("unsupported architecture '{arch}' (supported: {})", super::SUPPORTED.join(", "))));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let get = |k: &str| {
            g.get_u64(&key(k))
                .map(|v| v.min(usize::MAX as u64 >> 1) as usize)
        };
        let req = |k: &str| {
            get(k).ok_or_else(|| err(format!("missing or invalid metadata '{}'", key(k))))
        };
        let n_heads = req("attention.head_count")?;
        let dim = req("embedding_length")?;
        let f = |k: &str| g.get_f64(&key(k)).map(|v| v as f32);
        let hp = Hparams {
            model_type,
            n_layers: req("block_count")?,
            dim,
            ffn_dim: get("feed_forward_length").unwrap_or(0),
            n_heads,
            n_kv_heads: get("attention.head_count_kv").unwrap_or(n_heads),
            head_dim: get("attention.key_length").unwrap_or(if n_heads > 0 {
                dim / n_heads
            } else {
                0
            }),
            rope_theta: f("rope.freq_base").unwrap_or(10000.0),
            eps: f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            context_length: get("context_length").unwrap_or(4096),
            sliding_window: get("attention.sliding_window").filter(|&w| w > 0),
            // GGUF files carry neither: the architecture's rule applies.
            sliding_layers: None,
            rope_local_theta: None,
            attn_softcap: f("attn_logit_softcapping").filter(|&c| c > 0.0),
            final_softcap: f("final_logit_softcapping").filter(|&c| c > 0.0),
            query_pre_attn_scalar: None,
            n_experts: get("expert_count").unwrap_or(0),
            n_experts_used: get("expert_used_count").unwrap_or(0),
            moe_ffn_dim: get("expert_feed_forward_length").unwrap_or(0),
            // llama.cpp's qwen3moe always renormalises the chosen experts' weights.
            norm_topk_prob: true,
            rope_factors: None,
            rope_mscale: None,
        };
        let mut hp = hp;
        hp.check().map_err(&err)?;
        if get("rope.dimension_count").is_some_and(|d| d != hp.head_dim) {
            return Err(err(format!("partial rotary embeddings ({} of {} dimensions) are not supported", req("rope.dimension_count")?, hp.head_dim)));
        }
        let pairs = |name: &str| -> Result<Option<Vec<f32>>, EngineError> {
            let Some(t) = g.tensor(name) else { return Ok(None) };
            if t.dims.len() != 1 || t.qtype.is_quantized() || t.dims[0] as usize * 2 != hp.head_dim {
                return Err(err(format!("{name} has shape {:?}, expected [{}] floats", t.dims, hp.head_dim / 2)));
            }
            let mut v = vec![0.0; hp.head_dim / 2];
            dequantize_row(t.qtype, g.tensor_bytes(t), &mut v);
            Ok(Some(v))
        };
        // Scalings compose as products of divisors, as llama.cpp applies them.
        let mut factors = vec![1.0f32; hp.head_dim / 2];
        let mut scaled = false;
        let mut apply = |by: &[f32]| {
            factors.iter_mut().zip(by).for_each(|(a, b)| *a *= b);
            scaled = true;
        };
        // Llama 3's long context, as the converter writes it.
        if let Some(f) = pairs("rope_freqs.weight")? {
            apply(&f);
        }
        let original = || req("rope.scaling.original_context_length").map(|n| n as f32);
        let attn_factor = f("rope.scaling.attn_factor");
        // Phi-3's LongRoPE: the long factors when the context exceeds the
        // trained one (llama.cpp's rule; it is static, so the cache stays valid).
        let longrope = (pairs("rope_factors_long.weight")?, pairs("rope_factors_short.weight")?);
        let has_longrope = matches!(longrope, (Some(_), Some(_)));
        if let (Some(long), Some(short)) = longrope {
            let original = original()?;
            let ctx = hp.context_length as f32;
            apply(if ctx > original { &long } else { &short });
            hp.rope_mscale = Some(attn_factor.unwrap_or_else(|| rope_scaling::longrope_mscale(ctx, original)));
        }
        let factor = || f("rope.scaling.factor").or_else(|| f("rope.scale_linear")).filter(|x| *x > 0.0 && x.is_finite()).ok_or_else(|| err(format!("missing or invalid metadata '{}'", key("rope.scaling.factor"))));
        match g.get_str(&key("rope.scaling.type")) {
            None | Some("none") if f("rope.scale_linear").is_none_or(|x| x == 1.0) => {}
            None | Some("none") | Some("linear") => apply(&vec![factor()?; hp.head_dim / 2]),
            Some("yarn") => {
                let mut y = rope_scaling::Yarn::new(factor()?, original()?);
                y.beta_fast = f("rope.scaling.yarn_beta_fast").unwrap_or(y.beta_fast);
                y.beta_slow = f("rope.scaling.yarn_beta_slow").unwrap_or(y.beta_slow);
                let (by, mscale) = y.scale(hp.rope_theta, hp.head_dim);
                apply(&by);
                hp.rope_mscale = Some(mscale * attn_factor.unwrap_or(1.0));
            }
            Some("longrope") if has_longrope => {} // the tensors above
            Some("longrope") => return Err(err("rope scaling 'longrope' needs the rope_factors_long and rope_factors_short tensors".into())),
            Some(other) => return Err(err(format!("rope scaling '{other}' is not supported (linear, yarn, longrope and Llama 3's rope_freqs are)"))),
        }
        if scaled {
            hp.rope_factors = Some(factors);
        }
        hp.check().map_err(err)?;
        Ok(GgufSource { g, hp })
    }
}

impl WeightSource for GgufSource<'_> {
    fn path(&self) -> &Path {
        &self.g.path
    }
    fn format(&self) -> Format {
        Format::Gguf
    }
    fn hparams(&self) -> &Hparams {
        &self.hp
    }
    fn has(&self, name: &Name, suffix: &str) -> bool {
        self.g.tensor(&format!("{}.{suffix}", name.gguf)).is_some()
    }
    fn rows(&self, name: &Name) -> Result<usize, EngineError> {
        let full = format!("{}.weight", name.gguf);
        let t = self
            .g
            .tensor(&full)
            .ok_or_else(|| self.err(format!("missing tensor '{full}'")))?;
        match t.dims[..] {
            [_, rows] if rows > 0 => Ok(rows as usize),
            _ => Err(self.err(format!(
                "tensor '{full}' has shape {:?}, expected a matrix",
                t.dims
            ))),
        }
    }
    fn matrix(&self, name: &Name, rows: usize, cols: usize) -> Result<QMatrix, EngineError> {
        let full = format!("{}.weight", name.gguf);
        let t = self
            .g
            .tensor(&full)
            .ok_or_else(|| self.err(format!("missing tensor '{full}'")))?;
        // ggml lists the contiguous dimension first; stacked experts add a third.
        let n: u64 = t.dims.iter().skip(1).product();
        if t.dims.first() != Some(&(cols as u64)) || n != rows as u64 {
            return Err(self.err(format!(
                "tensor '{full}' has shape {:?}, expected {cols} x {rows}",
                t.dims
            )));
        }
        if cols % t.qtype.block_size() != 0 {
            return Err(self.err(format!(
                "tensor '{full}': {cols} columns do not fill {} blocks",
                t.qtype.name()
            )));
        }
        Ok(QMatrix::new(
            t.qtype,
            rows,
            cols,
            Bytes::File {
                file: self.g.bytes().clone(),
                offset: t.offset,
                len: t.n_bytes,
            },
        ))
    }
    fn vector(&self, name: &Name, suffix: &str, len: usize) -> Result<Vec<f32>, EngineError> {
        let full = format!("{}.{suffix}", name.gguf);
        let t = self
            .g
            .tensor(&full)
            .ok_or_else(|| self.err(format!("missing tensor '{full}'")))?;
        if t.dims != [len as u64] || t.qtype.is_quantized() {
            return Err(self.err(format!(
                "tensor '{full}' has shape {:?} ({}), expected [{len}] floats",
                t.dims,
                t.qtype.name()
            )));
        }
        let mut out = vec![0.0; len];
        dequantize_row(t.qtype, self.g.tensor_bytes(t), &mut out);
        Ok(out)
    }
}
