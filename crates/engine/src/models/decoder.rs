//! The pre-norm decoder every supported architecture is an instance of:
//! token embedding, then per layer attention (rotary positions, grouped-query
//! heads over the paged KV cache) and a feed-forward block (SwiGLU/GeGLU, or
//! routed experts), each with a residual, then a final norm and the output
//! head. Architecture files (`llama.rs`, `gemma2.rs`, ...) load their weights
//! into these parts and switch on what differs; the compute lives here once.

use super::weights::{global, layer, permute_rows, Format, Name, WeightSource};
use super::{BatchToken, Model, ModelConfig};
use crate::backend::{AttnParams, Backend, Cpu, Rope};
use crate::backend::cpu::kernels::QMatrix;
use crate::error::EngineError;
use crate::engine::kv::{BlockId, KvStore};

/// Largest head size and query heads per KV head that the attention
/// kernel's stack buffer holds.
pub const MAX_HEAD_DIM: usize = 256;
pub const MAX_GROUP: usize = 16;

/// Which elements of a head rotate together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i+1)`: llama.cpp's layout for llama GGUF files, whose Q
    /// and K rows the converter permuted.
    Adjacent,
    /// Pairs `(i, i + d/2)`: the Hugging Face / MLX layout ("neox").
    Half,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU, tanh approximation (Gemma).
    GeluTanh,
}

/// Weights are loaded as `Cpu`'s (the file's bytes) and moved to another
/// backend with `Decoder::into_backend`.
pub struct Attention<B: Backend = Cpu> {
    pub wq: B::Matrix,
    pub wk: B::Matrix,
    pub wv: B::Matrix,
    pub wo: B::Matrix,
    pub bias: Option<[B::Vector; 3]>,
    /// Per-head RMSNorm of queries and keys before rotation (Qwen3).
    pub qk_norm: Option<[B::Vector; 2]>,
    /// Sliding window: a token sees only the last `window` positions.
    pub window: Option<usize>,
    /// Which of the decoder's ropes rotates its queries and keys (0: the
    /// model's own; 1: `Options::local_rope_theta`'s).
    pub rope: usize,
}

pub struct Mlp<B: Backend = Cpu> {
    pub gate: B::Matrix,
    pub up: B::Matrix,
    pub down: B::Matrix,
}

/// Routed experts: each token runs its `top_k` best-scoring experts and sums
/// their outputs weighted by the router's softmax.
pub struct Moe<B: Backend = Cpu> {
    pub router: B::Matrix,
    pub experts: Vec<Mlp<B>>,
    pub top_k: usize,
    /// Renormalise the chosen experts' weights to sum to one.
    pub norm_topk: bool,
}

pub enum Ffn<B: Backend = Cpu> {
    Dense(Mlp<B>),
    Moe(Moe<B>),
}

pub struct Layer<B: Backend = Cpu> {
    pub attn_norm: B::Vector,
    pub attn: Attention<B>,
    /// Norm of the attention output before the residual add (Gemma 2).
    pub post_attn_norm: Option<B::Vector>,
    pub ffn_norm: B::Vector,
    pub ffn: Ffn<B>,
    pub post_ffn_norm: Option<B::Vector>,
}

/// What differs between architectures beyond their weights.
#[derive(Debug, Clone)]
pub struct Options {
    pub rope_style: RopeStyle,
    pub activation: Activation,
    /// Multiplies the embeddings (Gemma: sqrt of the width).
    pub embed_scale: Option<f32>,
    /// Scale of the attention scores (default `1/sqrt(head_dim)`).
    pub attn_scale: f32,
    /// `cap * tanh(x / cap)` of attention scores and of the output logits.
    pub attn_softcap: Option<f32>,
    pub final_softcap: Option<f32>,
    /// Added to every norm weight at load: Gemma's checkpoints store `w` for
    /// a norm that multiplies by `1 + w` (its GGUF files store `1 + w`).
    pub norm_offset: f32,
    /// The base of a second, unscaled rope that layers with `rope: 1` use
    /// (Gemma 3's sliding-window layers).
    pub local_rope_theta: Option<f32>,
}

pub struct Decoder<B: Backend = Cpu> {
    backend: B,
    cfg: ModelConfig,
    dim: usize,
    n_heads: usize,
    eps: f32,
    /// The model's rope, then `Options::local_rope_theta`'s if set.
    ropes: Vec<Rope>,
    opts: Options,
    embed: B::Matrix,
    layers: Vec<Layer<B>>,
    out_norm: B::Vector,
    /// `None`: tied to the token embedding.
    output: Option<B::Matrix>,
}

/// Default options. `adjacent_in_gguf` architectures (llama, mistral) rotate
/// adjacent pairs, as their GGUF files are laid out; their MLX folders get
/// the same layout at load (`attention`), so both formats compute alike, to
/// the bit.
pub fn default_options(src: &dyn WeightSource, adjacent_in_gguf: bool) -> Options {
    let hp = src.hparams();
    Options {
        rope_style: if adjacent_in_gguf { RopeStyle::Adjacent } else { RopeStyle::Half },
        activation: Activation::Silu,
        embed_scale: None,
        attn_scale: 1.0 / (hp.head_dim as f32).sqrt(),
        attn_softcap: None,
        final_softcap: None,
        norm_offset: 0.0,
        local_rope_theta: None,
    }
}

/// Row order between the two rotary layouts of `rows` rows in heads of
/// `hd`: with `to_adjacent`, entry `r` is the Hugging Face row that becomes
/// row `r` of llama.cpp's layout (pairs `(i, i + hd/2)` become `(2i, 2i+1)`);
/// otherwise the inverse.
pub fn rope_row_order(rows: usize, hd: usize, to_adjacent: bool) -> Vec<usize> {
    let half = hd / 2;
    (0..rows)
        .map(|r| {
            let (h, k) = (r / hd, r % hd);
            if to_adjacent {
                h * hd + (k % 2) * half + k / 2
            } else {
                h * hd + 2 * (k % half) + k / half
            }
        })
        .collect()
}

/// A norm weight of `len` with the architecture's offset applied.
pub fn norm(
    src: &dyn WeightSource,
    name: &Name,
    len: usize,
    opts: &Options,
) -> Result<Vec<f32>, EngineError> {
    let mut w = src.vector(name, "weight", len)?;
    w.iter_mut().for_each(|v| *v += opts.norm_offset);
    Ok(w)
}

/// The attention weights of layer `i` under their usual names.
/// Biases of the projections are read when the source has them.
pub fn attention(
    src: &dyn WeightSource,
    i: usize,
    qk_norm: bool,
    opts: &Options,
) -> Result<Attention, EngineError> {
    let hp = src.hparams();
    let (q_dim, kv_dim) = (hp.n_heads * hp.head_dim, hp.n_kv_heads * hp.head_dim);
    let (q, k, v) = (
        layer(i, "attn_q", "self_attn.q_proj"),
        layer(i, "attn_k", "self_attn.k_proj"),
        layer(i, "attn_v", "self_attn.v_proj"),
    );
    let (mut wq, mut wk) = (src.matrix(&q, q_dim, hp.dim)?, src.matrix(&k, kv_dim, hp.dim)?);
    let mut bias = match src.has(&q, "bias") {
        true => Some([src.vector(&q, "bias", q_dim)?, src.vector(&k, "bias", kv_dim)?, src.vector(&v, "bias", kv_dim)?]),
        false => None,
    };
    if opts.rope_style == RopeStyle::Adjacent && src.format() == Format::Mlx {
        let (oq, ok) = (rope_row_order(q_dim, hp.head_dim, true), rope_row_order(kv_dim, hp.head_dim, true));
        wq = permute_rows(&wq, &oq);
        wk = permute_rows(&wk, &ok);
        if let Some([bq, bk, _]) = &mut bias {
            *bq = oq.iter().map(|&r| bq[r]).collect();
            *bk = ok.iter().map(|&r| bk[r]).collect();
        }
    }
    Ok(Attention {
        wq,
        wk,
        wv: src.matrix(&v, kv_dim, hp.dim)?,
        wo: src.matrix(&layer(i, "attn_output", "self_attn.o_proj"), hp.dim, q_dim)?,
        bias,
        qk_norm: match qk_norm {
            true => Some([
                norm(
                    src,
                    &layer(i, "attn_q_norm", "self_attn.q_norm"),
                    hp.head_dim,
                    opts,
                )?,
                norm(
                    src,
                    &layer(i, "attn_k_norm", "self_attn.k_norm"),
                    hp.head_dim,
                    opts,
                )?,
            ]),
            false => None,
        },
        window: None,
        rope: 0,
    })
}

/// The gated MLP of layer `i` under its usual names.
pub fn mlp(src: &dyn WeightSource, i: usize) -> Result<Mlp, EngineError> {
    let hp = src.hparams();
    Ok(Mlp {
        gate: src.matrix(&layer(i, "ffn_gate", "mlp.gate_proj"), hp.ffn_dim, hp.dim)?,
        up: src.matrix(&layer(i, "ffn_up", "mlp.up_proj"), hp.ffn_dim, hp.dim)?,
        down: src.matrix(&layer(i, "ffn_down", "mlp.down_proj"), hp.dim, hp.ffn_dim)?,
    })
}

/// Layer `i` of the llama family: attention and a gated MLP, each after
/// an RMSNorm, under the usual names.
pub fn standard_layer(src: &dyn WeightSource, i: usize, qk_norm: bool, opts: &Options) -> Result<Layer, EngineError> {
    pre_norm_layer(src, i, attention(src, i, qk_norm, opts)?, Ffn::Dense(mlp(src, i)?), opts)
}

/// Layer `i` of the llama family around the given attention and
/// feed-forward parts: their two RMSNorms under the usual names.
pub fn pre_norm_layer(src: &dyn WeightSource, i: usize, attn: Attention, ffn: Ffn, opts: &Options) -> Result<Layer, EngineError> {
    let dim = src.hparams().dim;
    Ok(Layer {
        attn_norm: norm(src, &layer(i, "attn_norm", "input_layernorm"), dim, opts)?,
        attn,
        post_attn_norm: None,
        ffn_norm: norm(src, &layer(i, "ffn_norm", "post_attention_layernorm"), dim, opts)?,
        ffn,
        post_ffn_norm: None,
    })
}

/// Layer `i` of the Gemma family around the given attention: norms before
/// and after both attention and the gated MLP, under Gemma's names.
pub fn sandwich_layer(src: &dyn WeightSource, i: usize, attn: Attention, opts: &Options) -> Result<Layer, EngineError> {
    let n = |gguf: &str, hf: &str| norm(src, &layer(i, gguf, hf), src.hparams().dim, opts);
    Ok(Layer {
        attn_norm: n("attn_norm", "input_layernorm")?,
        attn,
        post_attn_norm: Some(n("post_attention_norm", "post_attention_layernorm")?),
        ffn_norm: n("ffn_norm", "pre_feedforward_layernorm")?,
        ffn: Ffn::Dense(mlp(src, i)?),
        post_ffn_norm: Some(n("post_ffw_norm", "post_feedforward_layernorm")?),
    })
}

impl Decoder<Cpu> {
    /// Builds the model from its layers; embedding, final norm and output
    /// head are read under their usual names.
    pub fn new(
        src: &dyn WeightSource,
        mut opts: Options,
        layers: Vec<Layer>,
    ) -> Result<Decoder, EngineError> {
        let hp = src.hparams();
        // Queries and keys both scaled by `m` (the whole head rotates)
        // scale their dot products by m^2.
        if let Some(m) = hp.rope_mscale {
            opts.attn_scale *= m * m;
        }
        let embed_name = global("token_embd", "model.embed_tokens");
        let vocab_size = src.rows(&embed_name)?;
        let embed = src.matrix(&embed_name, vocab_size, hp.dim)?;
        let output_name = global("output", "lm_head");
        let output = if src.has(&output_name, "weight") {
            Some(src.matrix(&output_name, vocab_size, hp.dim)?)
        } else {
            None
        };
        let out_norm = norm(src, &global("output_norm", "model.norm"), hp.dim, &opts)?;
        let freqs = |theta: f32| -> Vec<f32> { (0..hp.head_dim / 2).map(|i| theta.powf(-2.0 * i as f32 / hp.head_dim as f32)).collect() };
        let mut inv_freq = freqs(hp.rope_theta);
        if let Some(f) = &hp.rope_factors {
            inv_freq.iter_mut().zip(f).for_each(|(v, d)| *v /= d);
        }
        let mut ropes = vec![Rope { inv_freq, style: opts.rope_style, head_dim: hp.head_dim }];
        if let Some(theta) = opts.local_rope_theta {
            ropes.push(Rope { inv_freq: freqs(theta), style: opts.rope_style, head_dim: hp.head_dim });
        }
        if let Some(l) = layers.iter().position(|l| l.attn.rope >= ropes.len()) {
            return Err(EngineError::Internal(format!("layer {l} names rope {} of {}", layers[l].attn.rope, ropes.len())));
        }
        Ok(Decoder {
            backend: Cpu,
            ropes,
            cfg: ModelConfig {
                architecture: hp.model_type.clone(),
                n_layers: layers.len(),
                n_kv_heads: hp.n_kv_heads,
                head_dim: hp.head_dim,
                vocab_size,
                context_length: hp.context_length,
            },
            dim: hp.dim,
            n_heads: hp.n_heads,
            eps: hp.eps,
            opts,
            embed,
            layers,
            out_norm,
            output,
        })
    }

    /// The same model on backend `b`: every weight handed over, one at a
    /// time, so the file's copy of each can go as its replacement arrives.
    pub fn into_backend<B: Backend>(self, b: B) -> Result<Decoder<B>, EngineError> {
        let m = |w: QMatrix| b.matrix(w);
        let v = |w: Vec<f32>| b.vector(w);
        let opt = |w: Option<Vec<f32>>| w.map(&v).transpose();
        let mlp = |x: Mlp| -> Result<Mlp<B>, EngineError> { Ok(Mlp { gate: m(x.gate)?, up: m(x.up)?, down: m(x.down)? }) };
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in self.layers {
            let a = l.attn;
            let attn = Attention {
                wq: m(a.wq)?,
                wk: m(a.wk)?,
                wv: m(a.wv)?,
                wo: m(a.wo)?,
                bias: match a.bias {
                    Some([x, y, z]) => Some([v(x)?, v(y)?, v(z)?]),
                    None => None,
                },
                qk_norm: match a.qk_norm {
                    Some([x, y]) => Some([v(x)?, v(y)?]),
                    None => None,
                },
                window: a.window,
                rope: a.rope,
            };
            let ffn = match l.ffn {
                Ffn::Dense(x) => Ffn::Dense(mlp(x)?),
                Ffn::Moe(x) => Ffn::Moe(Moe {
                    router: m(x.router)?,
                    experts: x.experts.into_iter().map(mlp).collect::<Result<_, _>>()?,
                    top_k: x.top_k,
                    norm_topk: x.norm_topk,
                }),
            };
            layers.push(Layer {
                attn_norm: v(l.attn_norm)?,
                attn,
                post_attn_norm: opt(l.post_attn_norm)?,
                ffn_norm: v(l.ffn_norm)?,
                ffn,
                post_ffn_norm: opt(l.post_ffn_norm)?,
            });
        }
        Ok(Decoder {
            cfg: self.cfg,
            dim: self.dim,
            n_heads: self.n_heads,
            eps: self.eps,
            ropes: self.ropes,
            opts: self.opts,
            embed: m(self.embed)?,
            layers,
            out_norm: v(self.out_norm)?,
            output: self.output.map(m).transpose()?,
            backend: b,
        })
    }
}

impl<B: Backend> Decoder<B> {
    /// `out = mlp(h)`; `scratch` holds the gate and up activations
    /// (allocated once per forward pass, not per layer).
    fn run_mlp(&self, p: &mut B::Pass, m: &Mlp<B>, h: &B::Tensor, scratch: &mut [B::Tensor; 2], out: &mut B::Tensor) -> Result<(), EngineError> {
        let b = &self.backend;
        let [gate, up] = scratch;
        b.linear_many(p, [&m.gate, &m.up], h, [gate, up])?;
        b.activate(p, self.opts.activation, gate, up)?;
        b.linear(p, &m.down, gate, out)
    }

    /// Routes each token to its best experts; each expert runs once on all
    /// the tokens routed to it.
    fn run_moe(&self, p: &mut B::Pass, m: &Moe<B>, h: &B::Tensor, n: usize, scratch: &mut [B::Tensor; 2], out: &mut B::Tensor) -> Result<(), EngineError> {
        let (b, dim, ne) = (&self.backend, self.dim, m.experts.len());
        let mut logits = B::Tensor::default();
        b.linear(p, &m.router, h, &mut logits)?;
        let mut probs = b.to_host(p, logits)?;
        let mut routed: Vec<(Vec<usize>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); ne];
        for (t, pr) in probs.chunks_exact_mut(ne).enumerate() {
            super::ops::softmax(pr);
            let mut order: Vec<usize> = (0..ne).collect();
            order.sort_by(|&a, &b| pr[b].total_cmp(&pr[a]).then(a.cmp(&b)));
            let chosen = &order[..m.top_k];
            let total: f32 = if m.norm_topk { chosen.iter().map(|&e| pr[e]).sum() } else { 1.0 };
            for &e in chosen {
                routed[e].0.push(t);
                routed[e].1.push(pr[e] / total);
            }
        }
        b.zeros(p, n, dim, out)?;
        let (mut x, mut y) = (B::Tensor::default(), B::Tensor::default());
        for (e, (tokens, weights)) in routed.iter().enumerate().filter(|(_, r)| !r.0.is_empty()) {
            b.select_rows(p, h, tokens, dim, &mut x)?;
            self.run_mlp(p, &m.experts[e], &x, scratch, &mut y)?;
            b.add_rows_weighted(p, out, &y, tokens, weights, dim)?;
        }
        Ok(())
    }
}

impl<B: Backend> Decoder<B> {
    /// Bytes of every layer's matrices; with `active`, of those one token
    /// reads (a mixture's router and `top_k` of its experts).
    fn layer_bytes(&self, active: bool) -> usize {
        self.layers
            .iter()
            .map(|l| {
                let a = &l.attn;
                let ffn = match &l.ffn {
                    Ffn::Dense(m) => mlp_bytes(m),
                    Ffn::Moe(m) => {
                        let experts = m.experts.iter().map(mlp_bytes).sum::<usize>();
                        B::matrix_bytes(&m.router) + if active { experts / m.experts.len().max(1) * m.top_k } else { experts }
                    }
                };
                [&a.wq, &a.wk, &a.wv, &a.wo].into_iter().map(B::matrix_bytes).sum::<usize>() + ffn
            })
            .sum()
    }
}

fn mlp_bytes<B: Backend>(m: &Mlp<B>) -> usize {
    B::matrix_bytes(&m.gate) + B::matrix_bytes(&m.up) + B::matrix_bytes(&m.down)
}

impl<B: Backend> Model for Decoder<B> {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn weight_bytes(&self) -> usize {
        self.layer_bytes(false) + B::matrix_bytes(&self.embed) + self.output.as_ref().map_or(0, B::matrix_bytes)
    }

    fn decode_weight_bytes(&self) -> usize {
        // The output matrix (the embedding when tied) and one embedding row.
        let output = B::matrix_bytes(self.output.as_ref().unwrap_or(&self.embed));
        self.layer_bytes(true) + output + B::matrix_bytes(&self.embed) / self.cfg.vocab_size.max(1)
    }

    fn new_kv_store(&self, block_size: usize, n_blocks: usize) -> KvStore {
        let c = &self.cfg;
        self.backend.new_kv_store(c.n_layers, c.n_kv_heads * c.head_dim, block_size, n_blocks)
    }

    fn forward(
        &self,
        batch: &[BatchToken],
        kv: &mut KvStore,
        tables: &[&[BlockId]],
    ) -> Result<Vec<f32>, EngineError> {
        let n = batch.len();
        super::check_batch(&self.cfg, batch, kv, tables)?;
        let (b, eps) = (&self.backend, self.eps);
        let mut pass = b.begin(batch, &self.ropes)?;
        let p = &mut pass;
        let mut x = B::Tensor::default();
        b.embed(p, &self.embed, self.opts.embed_scale, &mut x)?;
        let [mut h, mut q, mut k, mut v, mut att, mut proj] = std::array::from_fn(|_| B::Tensor::default());
        let mut ffn_scratch = [B::Tensor::default(), B::Tensor::default()];

        for (li, l) in self.layers.iter().enumerate() {
            let a = &l.attn;
            b.rms_norm(p, &x, &l.attn_norm, eps, &mut h)?;
            b.linear_many(p, [&a.wq, &a.wk, &a.wv], &h, [&mut q, &mut k, &mut v])?;
            if let Some([bq, bk, bv]) = &a.bias {
                b.add_bias(p, &mut q, bq)?;
                b.add_bias(p, &mut k, bk)?;
                b.add_bias(p, &mut v, bv)?;
            }
            if let Some([qn, kn]) = &a.qk_norm {
                b.rms_norm_in_place(p, &mut q, qn, eps)?;
                b.rms_norm_in_place(p, &mut k, kn, eps)?;
            }
            b.rope(p, &mut q, self.n_heads, a.rope)?;
            b.rope(p, &mut k, self.cfg.n_kv_heads, a.rope)?;
            let params = AttnParams {
                layer: li,
                n_heads: self.n_heads,
                n_kv_heads: self.cfg.n_kv_heads,
                head_dim: self.cfg.head_dim,
                scale: self.opts.attn_scale,
                softcap: self.opts.attn_softcap,
                window: a.window,
            };
            b.attention(p, &params, &q, &k, &v, kv, tables, &mut att)?;
            b.linear(p, &a.wo, &att, &mut proj)?;
            if let Some(w) = &l.post_attn_norm {
                b.rms_norm_in_place(p, &mut proj, w, eps)?;
            }
            b.add(p, &mut x, &proj)?;

            b.rms_norm(p, &x, &l.ffn_norm, eps, &mut h)?;
            match &l.ffn {
                Ffn::Dense(m) => self.run_mlp(p, m, &h, &mut ffn_scratch, &mut proj)?,
                Ffn::Moe(m) => self.run_moe(p, m, &h, n, &mut ffn_scratch, &mut proj)?,
            }
            if let Some(w) = &l.post_ffn_norm {
                b.rms_norm_in_place(p, &mut proj, w, eps)?;
            }
            b.add(p, &mut x, &proj)?;
            b.layer_done(p, &x)?;
        }

        // Only the tokens that asked for logits go through the (large) output layer.
        let picked: Vec<usize> = (0..n).filter(|&t| batch[t].logits).collect();
        if picked.is_empty() {
            return b.finish(pass, kv, None);
        }
        let p = &mut pass;
        b.select_rows(p, &x, &picked, self.dim, &mut h)?;
        b.rms_norm(p, &h, &self.out_norm, eps, &mut x)?;
        let mut logits = B::Tensor::default();
        b.linear(p, self.output.as_ref().unwrap_or(&self.embed), &x, &mut logits)?;
        if let Some(c) = self.opts.final_softcap {
            b.soft_cap(p, &mut logits, c)?;
        }
        b.finish(pass, kv, Some(logits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::gguf::GgufFile;
    use crate::models::weights::GgufSource;

    /// Logits at the last position of `tokens`, every layer windowed to `window`.
    fn last_logits(m: &mut Decoder, window: Option<usize>, tokens: &[u32]) -> Vec<f32> {
        m.layers.iter_mut().for_each(|l| l.attn.window = window);
        let mut kv = m.new_kv_store(4, 8);
        let table: Vec<BlockId> = (0..8).collect();
        let batch: Vec<BatchToken> = tokens.iter().enumerate().map(|(pos, &token)| BatchToken { token, pos, seq: 0, logits: pos + 1 == tokens.len() }).collect();
        m.forward(&batch, &mut kv, &[&table]).unwrap()
    }

    #[test]
    fn a_sliding_window_hides_tokens_outside_it_and_a_wide_one_changes_nothing() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/model.gguf");
        let g = GgufFile::open(&path).unwrap();
        let mut m = crate::models::llama::load(&GgufSource::new(&g).unwrap()).unwrap();
        let a: Vec<u32> = (0..12).map(|i| 10 + i * 7).collect();
        let mut b = a.clone();
        b[0] = 200;
        // Two layers with a window of 2: the last position's receptive field
        // is its last 3 tokens, so the first token cannot matter...
        assert_eq!(last_logits(&mut m, Some(2), &a), last_logits(&mut m, Some(2), &b));
        // ...while it does without a window, and a window wider than the
        // sequence is no window at all.
        let full = last_logits(&mut m, None, &a);
        assert_ne!(full, last_logits(&mut m, None, &b));
        assert_eq!(full, last_logits(&mut m, Some(64), &a));
        // The window really narrows attention (not just the first token).
        assert_ne!(full, last_logits(&mut m, Some(2), &a));
    }
}
