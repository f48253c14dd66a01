//! Llama (Llama 2/3, SmolLM2): pre-norm decoder with RMSNorm, rotary
//! position embeddings, grouped-query attention and a SwiGLU MLP.
//!
//! Reference: llama.cpp's `llm_build_llama` and mlx-lm's `models/llama.py`.
//! GGUF files store Q and K rows permuted for rotation of adjacent pairs
//! (llama.cpp's "normal" rope), which is what this file applies.

use rayon::prelude::*;

use super::{ops, BatchToken, Model, ModelConfig};
use crate::kv::{BlockId, KvStore};
use half::f16;

use crate::cpu::{dot_f32, f16_to_f32, matmul, Bytes, QMatrix};
use crate::error::EngineError;
use crate::gguf::GgufFile;
use crate::quant::{dequantize_row, QuantizedActs};

/// Largest head size and query heads per KV head that the attention
/// kernel's stack buffer holds.
const MAX_HEAD_DIM: usize = 256;
const MAX_GROUP: usize = 16;

struct Layer {
    attn_norm: Vec<f32>,
    wq: QMatrix,
    wk: QMatrix,
    wv: QMatrix,
    wo: QMatrix,
    ffn_norm: Vec<f32>,
    w_gate: QMatrix,
    w_up: QMatrix,
    w_down: QMatrix,
}

pub struct Llama {
    cfg: ModelConfig,
    dim: usize,
    n_heads: usize,
    ffn_dim: usize,
    eps: f32,
    /// Inverse frequencies of the rotated pairs.
    inv_freq: Vec<f32>,
    embed: QMatrix,
    layers: Vec<Layer>,
    out_norm: Vec<f32>,
    /// `None`: tied to the token embedding.
    output: Option<QMatrix>,
}

fn load_err(g: &GgufFile, reason: String) -> EngineError {
    EngineError::ModelLoad { path: g.path.display().to_string(), reason }
}

fn matrix(g: &GgufFile, name: &str, cols: usize, rows: usize) -> Result<QMatrix, EngineError> {
    let t = g.tensor(name).ok_or_else(|| load_err(g, format!("missing tensor '{name}'")))?;
    if t.dims != [cols as u64, rows as u64] {
        return Err(load_err(g, format!("tensor '{name}' has shape {:?}, expected [{cols}, {rows}]", t.dims)));
    }
    Ok(QMatrix {
        qtype: t.qtype,
        rows,
        cols,
        data: Bytes::File { file: g.bytes().clone(), offset: t.offset, len: t.n_bytes },
    })
}

fn vector(g: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>, EngineError> {
    let t = g.tensor(name).ok_or_else(|| load_err(g, format!("missing tensor '{name}'")))?;
    if t.dims != [len as u64] {
        return Err(load_err(g, format!("tensor '{name}' has shape {:?}, expected [{len}]", t.dims)));
    }
    let mut out = vec![0.0; len];
    dequantize_row(t.qtype, g.tensor_bytes(t), &mut out);
    Ok(out)
}

impl Llama {
    pub fn from_gguf(g: &GgufFile) -> Result<Self, EngineError> {
        let arch = g.get_str("general.architecture").unwrap_or("llama").to_owned();
        let req = |key: &str| -> Result<usize, EngineError> {
            g.get_u64(&format!("{arch}.{key}"))
                .filter(|&v| v > 0 && v < (1 << 24))
                .map(|v| v as usize)
                .ok_or_else(|| load_err(g, format!("missing or invalid metadata '{arch}.{key}'")))
        };
        let n_layers = req("block_count")?;
        let dim = req("embedding_length")?;
        let ffn_dim = req("feed_forward_length")?;
        let n_heads = req("attention.head_count")?;
        let n_kv_heads = req("attention.head_count_kv").unwrap_or(n_heads);
        if dim % n_heads != 0 || n_heads % n_kv_heads != 0 {
            return Err(load_err(g, format!("{n_heads} heads / {n_kv_heads} kv heads do not divide width {dim}")));
        }
        let head_dim = dim / n_heads;
        if head_dim > MAX_HEAD_DIM || n_heads / n_kv_heads > MAX_GROUP {
            return Err(load_err(g, format!("head size {head_dim} or group {} too large", n_heads / n_kv_heads)));
        }
        let rope_dim = req("rope.dimension_count").unwrap_or(head_dim);
        if rope_dim > head_dim || rope_dim % 2 != 0 {
            return Err(load_err(g, format!("rope dimension {rope_dim} does not fit head size {head_dim}")));
        }
        let theta = g.get_f64(&format!("{arch}.rope.freq_base")).unwrap_or(10000.0) as f32;
        let eps = g.get_f64(&format!("{arch}.attention.layer_norm_rms_epsilon")).unwrap_or(1e-5) as f32;
        let context_length = req("context_length").unwrap_or(4096);
        let embed_t = g.tensor("token_embd.weight").ok_or_else(|| load_err(g, "missing tensor 'token_embd.weight'".into()))?;
        let vocab_size = *embed_t.dims.get(1).ok_or_else(|| load_err(g, "token_embd.weight is not a matrix".into()))? as usize;
        let kv_dim = n_kv_heads * head_dim;

        let embed = matrix(g, "token_embd.weight", dim, vocab_size)?;
        let output = match g.tensor("output.weight") {
            Some(_) => Some(matrix(g, "output.weight", dim, vocab_size)?),
            None => None,
        };
        for m in std::iter::once(&embed).chain(output.as_ref()) {
            if m.qtype.is_quantized() && dim % 32 != 0 {
                return Err(load_err(g, format!("width {dim} is not a multiple of 32")));
            }
        }
        let layers = (0..n_layers)
            .map(|i| {
                let n = |s: &str| format!("blk.{i}.{s}.weight");
                Ok(Layer {
                    attn_norm: vector(g, &n("attn_norm"), dim)?,
                    wq: matrix(g, &n("attn_q"), dim, dim)?,
                    wk: matrix(g, &n("attn_k"), dim, kv_dim)?,
                    wv: matrix(g, &n("attn_v"), dim, kv_dim)?,
                    wo: matrix(g, &n("attn_output"), dim, dim)?,
                    ffn_norm: vector(g, &n("ffn_norm"), dim)?,
                    w_gate: matrix(g, &n("ffn_gate"), dim, ffn_dim)?,
                    w_up: matrix(g, &n("ffn_up"), dim, ffn_dim)?,
                    w_down: matrix(g, &n("ffn_down"), ffn_dim, dim)?,
                })
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        let out_norm = vector(g, "output_norm.weight", dim)?;
        let inv_freq = (0..rope_dim / 2).map(|i| theta.powf(-2.0 * i as f32 / rope_dim as f32)).collect();
        Ok(Llama {
            cfg: ModelConfig { architecture: arch, n_layers, n_kv_heads, head_dim, vocab_size, context_length },
            dim,
            n_heads,
            ffn_dim,
            eps,
            inv_freq,
            embed,
            layers,
            out_norm,
            output,
        })
    }

    /// Rotates adjacent pairs of every head of every token in `x`
    /// (`n_heads_x` heads per token) by its position.
    fn rope(&self, x: &mut [f32], n_heads_x: usize, batch: &[BatchToken]) {
        let hd = self.cfg.head_dim;
        for (t, bt) in batch.iter().enumerate() {
            let row = &mut x[t * n_heads_x * hd..(t + 1) * n_heads_x * hd];
            for (i, &f) in self.inv_freq.iter().enumerate() {
                let (sin, cos) = (bt.pos as f32 * f).sin_cos();
                for h in 0..n_heads_x {
                    let j = h * hd + 2 * i;
                    let (a, b) = (row[j], row[j + 1]);
                    row[j] = a * cos - b * sin;
                    row[j + 1] = a * sin + b * cos;
                }
            }
        }
    }

    /// Causal attention of every token over its sequence's cache. Work is
    /// split by (token, KV head) so each cached key and value is converted
    /// from f16 once for all the query heads that share it.
    fn attention(&self, layer: usize, q: &[f32], batch: &[BatchToken], kv: &KvStore, tables: &[&[BlockId]], out: &mut [f32]) {
        let hd = self.cfg.head_dim;
        let n_kv = self.cfg.n_kv_heads;
        let group = self.n_heads / n_kv;
        let scale = 1.0 / (hd as f32).sqrt();
        let bs = kv.block_size();
        // Few tasks (decode of one or two sequences): split each KV head's
        // query heads apart too, so every core gets work; the shared key and
        // value rows are then widened once per query head instead of once.
        let split = if batch.len() * n_kv < 4 * crate::cpu::n_threads() { group } else { 1 };
        let gs = group / split;
        out.par_chunks_mut(gs * hd).enumerate().for_each_init(
            || (Vec::new(), vec![0.0f32; hd]),
            |(scores, row): &mut (Vec<f32>, Vec<f32>), (j, o)| {
                let (t, rem) = (j / (n_kv * split), j % (n_kv * split));
                let (kvh, sub) = (rem / split, rem % split);
                let bt = batch[t];
                let n_pos = bt.pos + 1;
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
                scores.resize(gs * n_pos, 0.0);
                for_each_position(kv, layer, blocks, n_pos, false, off, hd, |p, key| {
                    f16_to_f32(key, row);
                    for g in 0..gs {
                        scores[g * n_pos + p] = dot_f32(&qg[g * hd..(g + 1) * hd], row) * scale;
                    }
                });
                for g in 0..gs {
                    let sg = &mut scores[g * n_pos..(g + 1) * n_pos];
                    ops::softmax(sg);
                    // Weights rounded to f16 too (llama.cpp multiplies them with f16 values).
                    sg.iter_mut().for_each(|w| *w = f16::from_f32(*w).to_f32());
                }
                o.fill(0.0);
                for_each_position(kv, layer, blocks, n_pos, true, off, hd, |p, value| {
                    f16_to_f32(value, row);
                    for g in 0..gs {
                        let w = scores[g * n_pos + p];
                        o[g * hd..(g + 1) * hd].iter_mut().zip(row.iter()).for_each(|(a, &v)| *a += w * v);
                    }
                });
            },
        );
    }
}

/// Calls `f(position, row)` for positions `0..n_pos` of a sequence, with the
/// `hd` elements at `off` of each position's key (or value) row of `layer`.
#[allow(clippy::too_many_arguments)]
#[inline]
fn for_each_position(
    kv: &KvStore,
    layer: usize,
    blocks: &[BlockId],
    n_pos: usize,
    values: bool,
    off: usize,
    hd: usize,
    mut f: impl FnMut(usize, &[f16]),
) {
    let bs = kv.block_size();
    for (bi, &b) in blocks.iter().enumerate() {
        let (k, v) = kv.block(layer, b);
        let rows = if values { v } else { k };
        let stride = rows.len() / bs;
        for slot in 0..bs.min(n_pos - bi * bs) {
            f(bi * bs + slot, &rows[slot * stride + off..slot * stride + off + hd]);
        }
    }
}

impl Model for Llama {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn weight_bytes(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down].iter().map(|m| m.n_bytes()).sum::<usize>())
            .sum();
        l + self.embed.n_bytes() + self.output.as_ref().map_or(0, QMatrix::n_bytes)
    }

    fn forward(&self, batch: &[BatchToken], kv: &mut KvStore, tables: &[&[BlockId]]) -> Result<Vec<f32>, EngineError> {
        let n = batch.len();
        let (dim, hd) = (self.dim, self.cfg.head_dim);
        let kv_dim = self.cfg.n_kv_heads * hd;
        super::check_batch(&self.cfg, batch, kv, tables)?;
        let mut x = vec![0.0f32; n * dim];
        for (t, bt) in batch.iter().enumerate() {
            self.embed.dequantize_row_into(bt.token as usize, &mut x[t * dim..(t + 1) * dim]);
        }
        let mut xq = QuantizedActs::default();
        let mut h = vec![0.0f32; n * dim];
        let mut q = vec![0.0f32; n * dim];
        let mut k = vec![0.0f32; n * kv_dim];
        let mut v = vec![0.0f32; n * kv_dim];
        let mut att = vec![0.0f32; n * dim];
        let mut proj = vec![0.0f32; n * dim];
        let mut gate = vec![0.0f32; n * self.ffn_dim];
        let mut up = vec![0.0f32; n * self.ffn_dim];

        for (li, l) in self.layers.iter().enumerate() {
            ops::rms_norm(&x, &l.attn_norm, self.eps, &mut h);
            matmul(&l.wq, &h, &mut xq, &mut q);
            matmul(&l.wk, &h, &mut xq, &mut k);
            matmul(&l.wv, &h, &mut xq, &mut v);
            self.rope(&mut q, self.n_heads, batch);
            self.rope(&mut k, self.cfg.n_kv_heads, batch);
            for (t, bt) in batch.iter().enumerate() {
                kv.write(li, tables[bt.seq], bt.pos, &k[t * kv_dim..(t + 1) * kv_dim], &v[t * kv_dim..(t + 1) * kv_dim]);
            }
            self.attention(li, &q, batch, kv, tables, &mut att);
            matmul(&l.wo, &att, &mut xq, &mut proj);
            ops::add_in_place(&mut x, &proj);

            ops::rms_norm(&x, &l.ffn_norm, self.eps, &mut h);
            matmul(&l.w_gate, &h, &mut xq, &mut gate);
            matmul(&l.w_up, &h, &mut xq, &mut up);
            ops::silu_mul(&mut gate, &up);
            matmul(&l.w_down, &gate, &mut xq, &mut proj);
            ops::add_in_place(&mut x, &proj);
        }

        // Only the tokens that asked for logits go through the (large) output layer.
        let picked: Vec<usize> = (0..n).filter(|&t| batch[t].logits).collect();
        let mut last = vec![0.0f32; picked.len() * dim];
        for (i, &t) in picked.iter().enumerate() {
            ops::rms_norm(&x[t * dim..(t + 1) * dim], &self.out_norm, self.eps, &mut last[i * dim..(i + 1) * dim]);
        }
        let mut logits = vec![0.0f32; picked.len() * self.cfg.vocab_size];
        if !picked.is_empty() {
            matmul(self.output.as_ref().unwrap_or(&self.embed), &last, &mut xq, &mut logits);
        }
        Ok(logits)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::gguf::writer::{write, TensorSpec};
    use crate::gguf::MetaValue;
    use crate::quant::{quantize_row, QType};

    pub struct TinyLlama {
        pub vocab: usize,
        pub dim: usize,
        pub n_layers: usize,
    }

    fn rand_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// Writes a random llama GGUF: 4 heads, 2 KV heads, mixed weight formats
    /// (Q8_0 embeddings, Q4_1/Q4_0/Q8_0/F16 layers) like real quantized files.
    pub fn tiny_llama_gguf(spec: &TinyLlama, extra_metadata: Vec<(&'static str, MetaValue)>) -> Vec<u8> {
        let TinyLlama { vocab, dim, n_layers } = *spec;
        let (n_heads, n_kv, ffn) = (4usize, 2usize, dim * 2);
        let kv_dim = dim / n_heads * n_kv;
        let mut seed = 1u64;
        let mut tensors = Vec::new();
        let mut mat = |name: String, cols: usize, rows: usize, qtype: QType| {
            seed += 1;
            let w = rand_vec(rows * cols, seed, 0.5 / (cols as f32).sqrt() * 3.0);
            let data = w.chunks(cols).flat_map(|r| quantize_row(qtype, r)).collect();
            tensors.push(TensorSpec { name, dims: vec![cols as u64, rows as u64], qtype, data });
        };
        mat("token_embd.weight".into(), dim, vocab, QType::Q8_0);
        let kinds = [QType::Q4_1, QType::Q4_0, QType::Q8_0, QType::F16];
        for i in 0..n_layers {
            let qt = kinds[i % kinds.len()];
            mat(format!("blk.{i}.attn_q.weight"), dim, dim, qt);
            mat(format!("blk.{i}.attn_k.weight"), dim, kv_dim, qt);
            mat(format!("blk.{i}.attn_v.weight"), dim, kv_dim, qt);
            mat(format!("blk.{i}.attn_output.weight"), dim, dim, qt);
            mat(format!("blk.{i}.ffn_gate.weight"), dim, ffn, qt);
            mat(format!("blk.{i}.ffn_up.weight"), dim, ffn, qt);
            mat(format!("blk.{i}.ffn_down.weight"), ffn, dim, qt);
        }
        let norm = |name: String, seed: u64| {
            let w: Vec<f32> = rand_vec(dim, seed, 0.2).iter().map(|v| 1.0 + v).collect();
            TensorSpec { name, dims: vec![dim as u64], qtype: QType::F32, data: quantize_row(QType::F32, &w) }
        };
        for i in 0..n_layers {
            tensors.push(norm(format!("blk.{i}.attn_norm.weight"), 100 + i as u64));
            tensors.push(norm(format!("blk.{i}.ffn_norm.weight"), 200 + i as u64));
        }
        tensors.push(norm("output_norm.weight".into(), 300));
        let mut md = vec![
            ("general.architecture", MetaValue::Str("llama".into())),
            ("llama.block_count", MetaValue::U32(n_layers as u32)),
            ("llama.embedding_length", MetaValue::U32(dim as u32)),
            ("llama.feed_forward_length", MetaValue::U32(ffn as u32)),
            ("llama.attention.head_count", MetaValue::U32(n_heads as u32)),
            ("llama.attention.head_count_kv", MetaValue::U32(n_kv as u32)),
            ("llama.context_length", MetaValue::U32(256)),
            ("llama.rope.freq_base", MetaValue::F32(10000.0)),
            ("llama.attention.layer_norm_rms_epsilon", MetaValue::F32(1e-5)),
        ];
        md.extend(extra_metadata);
        write(&md, &tensors)
    }

    fn load(bytes: &[u8]) -> (Llama, tempfile::NamedTempFile) {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), bytes).unwrap();
        let g = GgufFile::open(f.path()).unwrap();
        (Llama::from_gguf(&g).unwrap(), f)
    }

    /// A store of `n_seqs` sequences of up to 32 positions, blocks of 4
    /// handed out in a scattered order so tables are not contiguous.
    fn store_for(m: &Llama, n_seqs: usize) -> (KvStore, Vec<Vec<BlockId>>) {
        let per = 8;
        let kv = m.new_kv_store(4, n_seqs * per);
        let tables = (0..n_seqs).map(|s| (0..per).map(|i| ((i * n_seqs + s) as BlockId * 5) % (n_seqs * per) as BlockId).collect()).collect();
        (kv, tables)
    }

    fn refs(t: &[Vec<BlockId>]) -> Vec<&[BlockId]> {
        t.iter().map(Vec::as_slice).collect()
    }

    #[test]
    fn whole_prompt_logits_equal_incremental_decoding() {
        let spec = TinyLlama { vocab: 96, dim: 64, n_layers: 4 };
        let (m, _f) = load(&tiny_llama_gguf(&spec, vec![]));
        let prompt: Vec<u32> = vec![5, 17, 3, 88, 42, 42, 7, 60, 1, 33];

        // One forward over the whole prompt, logits for every position.
        let (mut kv, t) = store_for(&m, 1);
        let batch: Vec<BatchToken> =
            prompt.iter().enumerate().map(|(pos, &token)| BatchToken { token, pos, seq: 0, logits: true }).collect();
        let all = m.forward(&batch, &mut kv, &refs(&t)).unwrap();

        // Then token by token with the KV cache.
        let (mut kv2, t2) = store_for(&m, 1);
        for (pos, &token) in prompt.iter().enumerate() {
            let one = m.forward(&[BatchToken { token, pos, seq: 0, logits: true }], &mut kv2, &refs(&t2)).unwrap();
            let want = &all[pos * spec.vocab..(pos + 1) * spec.vocab];
            let max_diff = one.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(max_diff < 1e-4, "position {pos}: logits differ by {max_diff}");
        }
        // Sanity: the model is not degenerate (logits vary across the vocab).
        let spread = all[..spec.vocab].iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
            - all[..spec.vocab].iter().fold(f32::INFINITY, |a, &b| a.min(b));
        assert!(spread > 0.1, "{spread}");
    }

    #[test]
    fn sequences_in_one_batch_do_not_see_each_other() {
        let spec = TinyLlama { vocab: 96, dim: 64, n_layers: 2 };
        let (m, _f) = load(&tiny_llama_gguf(&spec, vec![]));
        let (a, b) = ([1u32, 2, 3, 4, 5, 6], [9u32, 8]);
        let solo = |toks: &[u32]| {
            let (mut kv, t) = store_for(&m, 1);
            let batch: Vec<_> = toks.iter().enumerate().map(|(pos, &token)| BatchToken { token, pos, seq: 0, logits: pos + 1 == toks.len() }).collect();
            m.forward(&batch, &mut kv, &refs(&t)).unwrap()
        };
        let (mut kv, t) = store_for(&m, 2);
        let mut batch: Vec<_> = a.iter().enumerate().map(|(pos, &token)| BatchToken { token, pos, seq: 0, logits: pos == 5 }).collect();
        batch.extend(b.iter().enumerate().map(|(pos, &token)| BatchToken { token, pos, seq: 1, logits: pos == 1 }));
        let both = m.forward(&batch, &mut kv, &refs(&t)).unwrap();
        for (got, want) in both.chunks(spec.vocab).zip([solo(&a), solo(&b)]) {
            let d = got.iter().zip(&want).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
            assert!(d < 1e-4, "{d}");
        }
        // A position outside the table is refused, not written out of bounds.
        let far = [BatchToken { token: 1, pos: 32, seq: 0, logits: true }];
        assert!(m.forward(&far, &mut kv, &refs(&t)).is_err());
    }

    #[test]
    fn rejects_wrong_shapes_and_missing_tensors() {
        let spec = TinyLlama { vocab: 96, dim: 64, n_layers: 2 };
        let bytes = tiny_llama_gguf(&spec, vec![("llama.block_count", MetaValue::U32(3))]);
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), bytes).unwrap();
        let g = GgufFile::open(f.path()).unwrap();
        let err = Llama::from_gguf(&g).err().unwrap();
        assert!(err.to_string().contains("missing tensor 'blk.2.attn_norm.weight'") || err.to_string().contains("blk.2"), "{err}");
    }
}
