//! Llama (Llama 2/3, SmolLM2) and Mistral: pre-norm decoder with RMSNorm,
//! rotary positions, grouped-query attention and a SwiGLU MLP.
//!
//! Reference: mlx-lm's `models/llama.py` and llama.cpp's llama graph. GGUF
//! files store Q and K rows permuted for rotation of adjacent pairs, so
//! those rotate adjacent pairs; MLX folders keep Hugging Face's halves.

use super::decoder::{default_options, standard_layer, Decoder};
use super::weights::WeightSource;
use crate::error::EngineError;

pub fn load(src: &dyn WeightSource) -> Result<Decoder, EngineError> {
    let hp = src.hparams();
    let opts = default_options(src, true);
    let layers = (0..hp.n_layers)
        .map(|i| standard_layer(src, i, false, &opts))
        .collect::<Result<_, _>>()?;
    Decoder::new(src, opts, layers)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::formats::gguf::writer::{write, TensorSpec};
    use crate::formats::gguf::GgufFile;
    use crate::formats::gguf::MetaValue;
    use crate::engine::kv::{BlockId, KvStore};
    use crate::models::weights::GgufSource;
    use crate::models::{BatchToken, Model};
    use crate::formats::quant::{quantize_row, QType};

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
    pub fn tiny_llama_gguf(
        spec: &TinyLlama,
        extra_metadata: Vec<(&'static str, MetaValue)>,
    ) -> Vec<u8> {
        let TinyLlama {
            vocab,
            dim,
            n_layers,
        } = *spec;
        let (n_heads, n_kv, ffn) = (4usize, 2usize, dim * 2);
        let kv_dim = dim / n_heads * n_kv;
        let mut seed = 1u64;
        let mut tensors = Vec::new();
        let mut mat = |name: String, cols: usize, rows: usize, qtype: QType| {
            seed += 1;
            let w = rand_vec(rows * cols, seed, 0.5 / (cols as f32).sqrt() * 3.0);
            let data = w
                .chunks(cols)
                .flat_map(|r| quantize_row(qtype, r))
                .collect();
            tensors.push(TensorSpec {
                name,
                dims: vec![cols as u64, rows as u64],
                qtype,
                data,
            });
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
            TensorSpec {
                name,
                dims: vec![dim as u64],
                qtype: QType::F32,
                data: quantize_row(QType::F32, &w),
            }
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
            (
                "llama.attention.layer_norm_rms_epsilon",
                MetaValue::F32(1e-5),
            ),
        ];
        md.extend(extra_metadata);
        write(&md, &tensors)
    }

    fn load_bytes(bytes: &[u8]) -> (Decoder, tempfile::NamedTempFile) {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), bytes).unwrap();
        let g = GgufFile::open(f.path()).unwrap();
        (load(&GgufSource::new(&g).unwrap()).unwrap(), f)
    }

    /// A store of `n_seqs` sequences of up to 32 positions, blocks of 4
    /// handed out in a scattered order so tables are not contiguous.
    fn store_for(m: &Decoder, n_seqs: usize) -> (KvStore, Vec<Vec<BlockId>>) {
        let per = 8;
        let kv = m.new_kv_store(4, n_seqs * per);
        let tables = (0..n_seqs)
            .map(|s| {
                (0..per)
                    .map(|i| ((i * n_seqs + s) as BlockId * 5) % (n_seqs * per) as BlockId)
                    .collect()
            })
            .collect();
        (kv, tables)
    }

    fn refs(t: &[Vec<BlockId>]) -> Vec<&[BlockId]> {
        t.iter().map(Vec::as_slice).collect()
    }

    #[test]
    fn whole_prompt_logits_equal_incremental_decoding() {
        let spec = TinyLlama {
            vocab: 96,
            dim: 64,
            n_layers: 4,
        };
        let (m, _f) = load_bytes(&tiny_llama_gguf(&spec, vec![]));
        let prompt: Vec<u32> = vec![5, 17, 3, 88, 42, 42, 7, 60, 1, 33];

        // One forward over the whole prompt, logits for every position.
        let (mut kv, t) = store_for(&m, 1);
        let batch: Vec<BatchToken> = prompt
            .iter()
            .enumerate()
            .map(|(pos, &token)| BatchToken {
                token,
                pos,
                seq: 0,
                logits: true,
            })
            .collect();
        let all = m.forward(&batch, &mut kv, &refs(&t)).unwrap();

        // Then token by token with the KV cache.
        let (mut kv2, t2) = store_for(&m, 1);
        for (pos, &token) in prompt.iter().enumerate() {
            let one = m
                .forward(
                    &[BatchToken {
                        token,
                        pos,
                        seq: 0,
                        logits: true,
                    }],
                    &mut kv2,
                    &refs(&t2),
                )
                .unwrap();
            let want = &all[pos * spec.vocab..(pos + 1) * spec.vocab];
            let max_diff = one
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(
                max_diff < 1e-4,
                "position {pos}: logits differ by {max_diff}"
            );
        }
        // Sanity: the model is not degenerate (logits vary across the vocab).
        let spread = all[..spec.vocab]
            .iter()
            .fold(f32::NEG_INFINITY, |a, &b| a.max(b))
            - all[..spec.vocab]
                .iter()
                .fold(f32::INFINITY, |a, &b| a.min(b));
        assert!(spread > 0.1, "{spread}");
    }

    #[test]
    fn sequences_in_one_batch_do_not_see_each_other() {
        let spec = TinyLlama {
            vocab: 96,
            dim: 64,
            n_layers: 2,
        };
        let (m, _f) = load_bytes(&tiny_llama_gguf(&spec, vec![]));
        let (a, b) = ([1u32, 2, 3, 4, 5, 6], [9u32, 8]);
        let solo = |toks: &[u32]| {
            let (mut kv, t) = store_for(&m, 1);
            let batch: Vec<_> = toks
                .iter()
                .enumerate()
                .map(|(pos, &token)| BatchToken {
                    token,
                    pos,
                    seq: 0,
                    logits: pos + 1 == toks.len(),
                })
                .collect();
            m.forward(&batch, &mut kv, &refs(&t)).unwrap()
        };
        let (mut kv, t) = store_for(&m, 2);
        let mut batch: Vec<_> = a
            .iter()
            .enumerate()
            .map(|(pos, &token)| BatchToken {
                token,
                pos,
                seq: 0,
                logits: pos == 5,
            })
            .collect();
        batch.extend(b.iter().enumerate().map(|(pos, &token)| BatchToken {
            token,
            pos,
            seq: 1,
            logits: pos == 1,
        }));
        let both = m.forward(&batch, &mut kv, &refs(&t)).unwrap();
        for (got, want) in both.chunks(spec.vocab).zip([solo(&a), solo(&b)]) {
            let d = got
                .iter()
                .zip(&want)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            assert!(d < 1e-4, "{d}");
        }
        // A position outside the table is refused, not written out of bounds.
        let far = [BatchToken {
            token: 1,
            pos: 32,
            seq: 0,
            logits: true,
        }];
        assert!(m.forward(&far, &mut kv, &refs(&t)).is_err());
    }

    #[test]
    fn rejects_wrong_shapes_and_missing_tensors() {
        let spec = TinyLlama {
            vocab: 96,
            dim: 64,
            n_layers: 2,
        };
        let bytes = tiny_llama_gguf(&spec, vec![("llama.block_count", MetaValue::U32(3))]);
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), bytes).unwrap();
        let g = GgufFile::open(f.path()).unwrap();
        let err = load(&GgufSource::new(&g).unwrap()).err().unwrap();
        assert!(
            err.to_string()
                .contains("missing tensor 'blk.2.attn_norm.weight'")
                || err.to_string().contains("blk.2"),
            "{err}"
        );
    }

    #[test]
    fn rope_metadata_it_cannot_honour_is_refused() {
        let spec = TinyLlama { vocab: 96, dim: 64, n_layers: 1 };
        let cases: Vec<(Vec<(&'static str, MetaValue)>, &str)> = vec![
            (vec![("llama.rope.scaling.type", MetaValue::Str("ntk".into()))], "rope scaling 'ntk' is not supported"),
            (vec![("llama.rope.scaling.type", MetaValue::Str("yarn".into())), ("llama.rope.scaling.factor", MetaValue::F32(4.0))], "original_context_length"),
            (vec![("llama.rope.scaling.type", MetaValue::Str("linear".into()))], "rope.scaling.factor"),
            (vec![("llama.rope.dimension_count", MetaValue::U32(8))], "partial rotary embeddings (8 of 16 dimensions)"),
            (vec![("llama.rope.scaling.type", MetaValue::Str("longrope".into()))], "needs the rope_factors_long"),
        ];
        for (md, want) in cases {
            let f = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(f.path(), tiny_llama_gguf(&spec, md)).unwrap();
            let g = GgufFile::open(f.path()).unwrap();
            let err = GgufSource::new(&g).err().expect(want).to_string();
            assert!(err.contains(want), "{err} lacks {want}");
        }
        // A linear stretch is honoured: every frequency divided by the factor.
        let f = tempfile::NamedTempFile::new().unwrap();
        let md = vec![("llama.rope.scaling.type", MetaValue::Str("linear".into())), ("llama.rope.scaling.factor", MetaValue::F32(2.0))];
        std::fs::write(f.path(), tiny_llama_gguf(&spec, md)).unwrap();
        let g = GgufFile::open(f.path()).unwrap();
        assert_eq!(GgufSource::new(&g).unwrap().hparams().rope_factors, Some(vec![2.0; 8]));
    }
}
