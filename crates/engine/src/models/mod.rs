//! Model architectures, one file each, behind the `Model` trait; and the
//! pieces every architecture shares (KV cache, batch description, small ops).

pub mod llama;

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::error::EngineError;
use crate::gguf::GgufFile;

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
    /// Runs the batch, appending every token's keys and values to its
    /// sequence's cache; returns `vocab_size` logits per token that asked.
    fn forward(&self, batch: &[BatchToken], caches: &mut [&mut KvCache]) -> Result<Vec<f32>, EngineError>;
    fn new_cache(&self) -> KvCache {
        let c = self.config();
        KvCache::new(c.n_layers, c.n_kv_heads * c.head_dim)
    }
}

/// Keys and values of one sequence, `[layer][pos][kv_dim]`, grown as the
/// sequence grows. Stored as f16 like llama.cpp's default cache: half the
/// memory of f32, and the same rounding as the peer we compare against.
#[derive(Debug, Default)]
pub struct KvCache {
    kv_dim: usize,
    k: Vec<Vec<f16>>,
    v: Vec<Vec<f16>>,
    len: usize,
}

impl KvCache {
    pub fn new(n_layers: usize, kv_dim: usize) -> Self {
        KvCache { kv_dim, k: vec![Vec::new(); n_layers], v: vec![Vec::new(); n_layers], len: 0 }
    }
    /// Positions filled.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|l| l.capacity() * 2).sum()
    }
    /// Forgets positions from `len` on (a re-used prefix keeps its values).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        for l in self.k.iter_mut().chain(self.v.iter_mut()) {
            l.truncate(self.len * self.kv_dim);
        }
    }
    pub(crate) fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let d = self.kv_dim;
        for (buf, src) in [(&mut self.k[layer], k), (&mut self.v[layer], v)] {
            if buf.len() < (pos + 1) * d {
                buf.resize((pos + 1) * d, f16::ZERO);
            }
            buf[pos * d..(pos + 1) * d].convert_from_f32_slice(src);
        }
        if layer == 0 {
            self.len = self.len.max(pos + 1);
        }
    }
    pub(crate) fn keys(&self, layer: usize) -> &[f16] {
        &self.k[layer]
    }
    pub(crate) fn values(&self, layer: usize) -> &[f16] {
        &self.v[layer]
    }
}

/// Loads a GGUF model by its `general.architecture`.
pub fn load_gguf(g: &GgufFile) -> Result<Box<dyn Model>, EngineError> {
    let arch = g.get_str("general.architecture").unwrap_or("");
    match arch {
        "llama" => Ok(Box::new(llama::Llama::from_gguf(g)?)),
        other => Err(EngineError::ModelLoad {
            path: g.path.display().to_string(),
            reason: format!("unsupported architecture '{other}' (supported: llama)"),
        }),
    }
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
