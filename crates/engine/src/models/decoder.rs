//! The pre-norm decoder every supported architecture is an instance of:
//! token embedding, then per layer attention (rotary positions, grouped-query
//! heads over the paged KV cache) and a feed-forward block (SwiGLU/GeGLU, or
//! routed experts), each with a residual, then a final norm and the output
//! head. Architecture files (`llama.rs`, `gemma2.rs`, ...) load their weights
//! into these parts and switch on what differs; the compute lives here once.

use rayon::prelude::*;

use half::f16;

use super::weights::{global, layer, permute_rows, Format, Name, WeightSource};
use super::{ops, BatchToken, Model, ModelConfig};
use crate::cpu::{dot_f32, f16_to_f32, matmul, QMatrix};
use crate::error::EngineError;
use crate::kv::{BlockId, KvStore};
use crate::quant::QuantizedActs;

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

pub struct Attention {
    pub wq: QMatrix,
    pub wk: QMatrix,
    pub wv: QMatrix,
    pub wo: QMatrix,
    pub bias: Option<[Vec<f32>; 3]>,
    /// Per-head RMSNorm of queries and keys before rotation (Qwen3).
    pub qk_norm: Option<[Vec<f32>; 2]>,
    /// Sliding window: a token sees only the last `window` positions.
    pub window: Option<usize>,
}

pub struct Mlp {
    pub gate: QMatrix,
    pub up: QMatrix,
    pub down: QMatrix,
}

/// Routed experts: each token runs its `top_k` best-scoring experts and sums
/// their outputs weighted by the router's softmax.
pub struct Moe {
    pub router: QMatrix,
    pub experts: Vec<Mlp>,
    pub top_k: usize,
    /// Renormalise the chosen experts' weights to sum to one.
    pub norm_topk: bool,
}

pub enum Ffn {
    Dense(Mlp),
    Moe(Moe),
}

pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub attn: Attention,
    /// Norm of the attention output before the residual add (Gemma 2).
    pub post_attn_norm: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    pub ffn: Ffn,
    pub post_ffn_norm: Option<Vec<f32>>,
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
}

pub struct Decoder {
    cfg: ModelConfig,
    dim: usize,
    n_heads: usize,
    eps: f32,
    inv_freq: Vec<f32>,
    opts: Options,
    embed: QMatrix,
    layers: Vec<Layer>,
    out_norm: Vec<f32>,
    /// `None`: tied to the token embedding.
    output: Option<QMatrix>,
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

impl Decoder {
    /// Builds the model from its layers; embedding, final norm and output
    /// head are read under their usual names.
    pub fn new(
        src: &dyn WeightSource,
        opts: Options,
        layers: Vec<Layer>,
    ) -> Result<Decoder, EngineError> {
        let hp = src.hparams();
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
        let mut inv_freq: Vec<f32> = (0..hp.head_dim / 2).map(|i| hp.rope_theta.powf(-2.0 * i as f32 / hp.head_dim as f32)).collect();
        if let Some(f) = &hp.rope_factors {
            inv_freq.iter_mut().zip(f).for_each(|(v, d)| *v /= d);
        }
        Ok(Decoder {
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
            inv_freq,
            opts,
            embed,
            layers,
            out_norm,
            output,
        })
    }

    /// Rotates every head of every token in `x` (`n_heads_x` heads per
    /// token) by its position.
    fn rope(&self, x: &mut [f32], n_heads_x: usize, batch: &[BatchToken]) {
        let hd = self.cfg.head_dim;
        let (stride, pair) = match self.opts.rope_style {
            RopeStyle::Adjacent => (2, 1),
            RopeStyle::Half => (1, hd / 2),
        };
        for (t, bt) in batch.iter().enumerate() {
            let row = &mut x[t * n_heads_x * hd..(t + 1) * n_heads_x * hd];
            for (i, &f) in self.inv_freq.iter().enumerate() {
                let (sin, cos) = (bt.pos as f32 * f).sin_cos();
                for h in 0..n_heads_x {
                    let j = h * hd + stride * i;
                    let (a, b) = (row[j], row[j + pair]);
                    row[j] = a * cos - b * sin;
                    row[j + pair] = a * sin + b * cos;
                }
            }
        }
    }

    /// Causal attention of every token over its sequence's cache. Work is
    /// split by (token, KV head) so each cached key and value is converted
    /// from f16 once for all the query heads that share it.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: usize,
        window: Option<usize>,
        q: &[f32],
        batch: &[BatchToken],
        kv: &KvStore,
        tables: &[&[BlockId]],
        out: &mut [f32],
    ) {
        let hd = self.cfg.head_dim;
        let n_kv = self.cfg.n_kv_heads;
        let group = self.n_heads / n_kv;
        let scale = self.opts.attn_scale;
        let softcap = self.opts.attn_softcap;
        let bs = kv.block_size();
        // Few tasks (decode of one or two sequences): split each KV head's
        // query heads apart too, so every core gets work; the shared key and
        // value rows are then widened once per query head instead of once.
        let split = if batch.len() * n_kv < 4 * crate::cpu::n_threads() {
            group
        } else {
            1
        };
        let gs = group / split;
        out.par_chunks_mut(gs * hd).enumerate().for_each_init(
            || (Vec::new(), vec![0.0f32; hd]),
            |(scores, row): &mut (Vec<f32>, Vec<f32>), (j, o)| {
                let (t, rem) = (j / (n_kv * split), j % (n_kv * split));
                let (kvh, sub) = (rem / split, rem % split);
                let bt = batch[t];
                let n_pos = bt.pos + 1;
                // Positions before `first` are outside the sliding window.
                let first = window.map_or(0, |w| n_pos.saturating_sub(w));
                let blocks = &tables[bt.seq][..n_pos.div_ceil(bs)];
                // Queries rounded to f16 like the f16 cache, as llama.cpp does.
                let mut qg = [0.0f32; MAX_HEAD_DIM * MAX_GROUP];
                let qg = &mut qg[..gs * hd];
                let q0 = (t * self.n_heads + kvh * group + sub * gs) * hd;
                for (d, &v) in qg.iter_mut().zip(&q[q0..q0 + gs * hd]) {
                    *d = f16::from_f32(v).to_f32();
                }
                let off = kvh * hd;
                scores.clear();
                scores.resize(gs * n_pos, f32::NEG_INFINITY);
                for_each_position(kv, layer, blocks, first, n_pos, false, off, hd, |p, key| {
                    f16_to_f32(key, row);
                    for g in 0..gs {
                        let s = dot_f32(&qg[g * hd..(g + 1) * hd], row) * scale;
                        scores[g * n_pos + p] = match softcap {
                            Some(c) => c * (s / c).tanh(),
                            None => s,
                        };
                    }
                });
                for g in 0..gs {
                    let sg = &mut scores[g * n_pos + first..(g + 1) * n_pos];
                    ops::softmax(sg);
                    // Weights rounded to f16 too (llama.cpp multiplies them with f16 values).
                    sg.iter_mut().for_each(|w| *w = f16::from_f32(*w).to_f32());
                }
                o.fill(0.0);
                for_each_position(
                    kv,
                    layer,
                    blocks,
                    first,
                    n_pos,
                    true,
                    off,
                    hd,
                    |p, value| {
                        f16_to_f32(value, row);
                        for g in 0..gs {
                            let w = scores[g * n_pos + p];
                            o[g * hd..(g + 1) * hd]
                                .iter_mut()
                                .zip(row.iter())
                                .for_each(|(a, &v)| *a += w * v);
                        }
                    },
                );
            },
        );
    }

    fn activate(&self, gate: &mut [f32], up: &[f32]) {
        match self.opts.activation {
            Activation::Silu => ops::silu_mul(gate, up),
            Activation::GeluTanh => ops::gelu_tanh_mul(gate, up),
        }
    }

    /// `out = mlp(h)` for `n` tokens; `scratch` holds the gate and up
    /// activations (allocated once per forward pass, not per layer).
    fn run_mlp(&self, m: &Mlp, h: &[f32], n: usize, xq: &mut QuantizedActs, scratch: &mut [Vec<f32>; 2], out: &mut [f32]) {
        let [gate, up] = scratch;
        gate.resize(n * m.gate.rows, 0.0);
        up.resize(n * m.up.rows, 0.0);
        matmul(&m.gate, h, xq, gate);
        matmul(&m.up, h, xq, up);
        self.activate(gate, up);
        matmul(&m.down, gate, xq, out);
    }

    /// Routes each token to its best experts; each expert runs once on all
    /// the tokens routed to it.
    fn run_moe(&self, m: &Moe, h: &[f32], n: usize, xq: &mut QuantizedActs, scratch: &mut [Vec<f32>; 2], out: &mut [f32]) {
        let (dim, ne) = (self.dim, m.experts.len());
        let mut probs = vec![0.0f32; n * ne];
        matmul(&m.router, h, xq, &mut probs);
        let mut routed: Vec<Vec<(usize, f32)>> = vec![Vec::new(); ne];
        for (t, p) in probs.chunks_exact_mut(ne).enumerate() {
            ops::softmax(p);
            let mut order: Vec<usize> = (0..ne).collect();
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            let chosen = &order[..m.top_k];
            let total: f32 = if m.norm_topk {
                chosen.iter().map(|&e| p[e]).sum()
            } else {
                1.0
            };
            for &e in chosen {
                routed[e].push((t, p[e] / total));
            }
        }
        out.fill(0.0);
        for (e, tokens) in routed.iter().enumerate().filter(|(_, t)| !t.is_empty()) {
            let x: Vec<f32> = tokens
                .iter()
                .flat_map(|&(t, _)| h[t * dim..(t + 1) * dim].iter().copied())
                .collect();
            let mut y = vec![0.0f32; tokens.len() * dim];
            self.run_mlp(&m.experts[e], &x, tokens.len(), xq, scratch, &mut y);
            for (&(t, w), yr) in tokens.iter().zip(y.chunks_exact(dim)) {
                out[t * dim..(t + 1) * dim]
                    .iter_mut()
                    .zip(yr)
                    .for_each(|(o, &v)| *o += w * v);
            }
        }
    }
}

/// Calls `f(position, row)` for positions `first..n_pos` of a sequence, with
/// the `hd` elements at `off` of each position's key (or value) row of `layer`.
#[allow(clippy::too_many_arguments)]
#[inline]
fn for_each_position(
    kv: &KvStore,
    layer: usize,
    blocks: &[BlockId],
    first: usize,
    n_pos: usize,
    values: bool,
    off: usize,
    hd: usize,
    mut f: impl FnMut(usize, &[f16]),
) {
    let bs = kv.block_size();
    for (bi, &b) in blocks.iter().enumerate().skip(first / bs) {
        let (k, v) = kv.block(layer, b);
        let rows = if values { v } else { k };
        let stride = rows.len() / bs;
        for slot in first.saturating_sub(bi * bs)..bs.min(n_pos - bi * bs) {
            f(
                bi * bs + slot,
                &rows[slot * stride + off..slot * stride + off + hd],
            );
        }
    }
}

fn mlp_bytes(m: &Mlp) -> usize {
    m.gate.n_bytes() + m.up.n_bytes() + m.down.n_bytes()
}

impl Model for Decoder {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn weight_bytes(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|l| {
                let a = &l.attn;
                let ffn = match &l.ffn {
                    Ffn::Dense(m) => mlp_bytes(m),
                    Ffn::Moe(m) => {
                        m.router.n_bytes() + m.experts.iter().map(mlp_bytes).sum::<usize>()
                    }
                };
                a.wq.n_bytes() + a.wk.n_bytes() + a.wv.n_bytes() + a.wo.n_bytes() + ffn
            })
            .sum();
        l + self.embed.n_bytes() + self.output.as_ref().map_or(0, QMatrix::n_bytes)
    }

    fn forward(
        &self,
        batch: &[BatchToken],
        kv: &mut KvStore,
        tables: &[&[BlockId]],
    ) -> Result<Vec<f32>, EngineError> {
        let n = batch.len();
        let (dim, hd) = (self.dim, self.cfg.head_dim);
        let (q_dim, kv_dim) = (self.n_heads * hd, self.cfg.n_kv_heads * hd);
        super::check_batch(&self.cfg, batch, kv, tables)?;
        let mut x = vec![0.0f32; n * dim];
        for (t, bt) in batch.iter().enumerate() {
            let row = &mut x[t * dim..(t + 1) * dim];
            self.embed.dequantize_row_into(bt.token as usize, row);
            if let Some(s) = self.opts.embed_scale {
                row.iter_mut().for_each(|v| *v *= s);
            }
        }
        let mut xq = QuantizedActs::default();
        let mut h = vec![0.0f32; n * dim];
        let mut q = vec![0.0f32; n * q_dim];
        let mut k = vec![0.0f32; n * kv_dim];
        let mut v = vec![0.0f32; n * kv_dim];
        let mut att = vec![0.0f32; n * q_dim];
        let mut proj = vec![0.0f32; n * dim];
        let mut ffn_scratch = [Vec::new(), Vec::new()];

        for (li, l) in self.layers.iter().enumerate() {
            let a = &l.attn;
            ops::rms_norm(&x, &l.attn_norm, self.eps, &mut h);
            matmul(&a.wq, &h, &mut xq, &mut q);
            matmul(&a.wk, &h, &mut xq, &mut k);
            matmul(&a.wv, &h, &mut xq, &mut v);
            if let Some([bq, bk, bv]) = &a.bias {
                for (m, b) in [(&mut q, bq), (&mut k, bk), (&mut v, bv)] {
                    m.chunks_exact_mut(b.len())
                        .for_each(|r| ops::add_in_place(r, b));
                }
            }
            if let Some([qn, kn]) = &a.qk_norm {
                ops::rms_norm_in_place(&mut q, qn, self.eps);
                ops::rms_norm_in_place(&mut k, kn, self.eps);
            }
            self.rope(&mut q, self.n_heads, batch);
            self.rope(&mut k, self.cfg.n_kv_heads, batch);
            for (t, bt) in batch.iter().enumerate() {
                kv.write(
                    li,
                    tables[bt.seq],
                    bt.pos,
                    &k[t * kv_dim..(t + 1) * kv_dim],
                    &v[t * kv_dim..(t + 1) * kv_dim],
                );
            }
            self.attention(li, a.window, &q, batch, kv, tables, &mut att);
            matmul(&a.wo, &att, &mut xq, &mut proj);
            if let Some(w) = &l.post_attn_norm {
                ops::rms_norm_in_place(&mut proj, w, self.eps);
            }
            ops::add_in_place(&mut x, &proj);

            ops::rms_norm(&x, &l.ffn_norm, self.eps, &mut h);
            match &l.ffn {
                Ffn::Dense(m) => self.run_mlp(m, &h, n, &mut xq, &mut ffn_scratch, &mut proj),
                Ffn::Moe(m) => self.run_moe(m, &h, n, &mut xq, &mut ffn_scratch, &mut proj),
            }
            if let Some(w) = &l.post_ffn_norm {
                ops::rms_norm_in_place(&mut proj, w, self.eps);
            }
            ops::add_in_place(&mut x, &proj);
        }

        // Only the tokens that asked for logits go through the (large) output layer.
        let picked: Vec<usize> = (0..n).filter(|&t| batch[t].logits).collect();
        let mut last = vec![0.0f32; picked.len() * dim];
        for (i, &t) in picked.iter().enumerate() {
            ops::rms_norm(
                &x[t * dim..(t + 1) * dim],
                &self.out_norm,
                self.eps,
                &mut last[i * dim..(i + 1) * dim],
            );
        }
        let mut logits = vec![0.0f32; picked.len() * self.cfg.vocab_size];
        if !picked.is_empty() {
            matmul(
                self.output.as_ref().unwrap_or(&self.embed),
                &last,
                &mut xq,
                &mut logits,
            );
        }
        if let Some(c) = self.opts.final_softcap {
            logits.iter_mut().for_each(|v| *v = c * (*v / c).tanh());
        }
        Ok(logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufFile;
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
