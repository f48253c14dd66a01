//! `convert`: writes an MLX model folder from a GGUF file, so the same
//! weights run from either format (and in mlx-lm itself).
//!
//! Q4_0, Q4_1 and Q8_0 blocks map exactly onto MLX affine groups of 32
//! (`w = scale * q + bias`): Q4_1 is already scale and bias, Q4_0 is
//! `d * (q - 8)` (bias `-8d`), Q8_0 is `d * q` on signed bytes (stored as
//! `q + 128` with bias `-128d`). Mixed files (a Q8_0 embedding in a Q4_1
//! model) get per-layer entries in `quantization`, as mlx-lm reads them.
//! Other formats (K-quants) are written dequantized as float16.

use std::collections::BTreeMap;
use std::path::Path;

use half::f16;
use serde_json::{json, Map, Value};

use crate::error::EngineError;
use crate::formats::gguf::{GgufFile, TensorInfo};
use crate::models::decoder::rope_row_order;
use crate::models::weights::GgufSource;
use crate::models::weights::WeightSource;
use crate::formats::affine::blocks_to_affine;
use crate::formats::quant::{dequantize_row, QType};
use crate::formats::safetensors::{self, Dtype};
use crate::text::tokenizer::Tokenizer;

/// Architectures whose tensors map one to one onto the Hugging Face names.
const CONVERTIBLE: &[&str] = &["llama", "mistral", "qwen2", "qwen3"];

/// What `convert` wrote.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    pub tensors: usize,
    /// Tensors written as MLX affine groups of 32 (bit-exact).
    pub quantized: usize,
    /// Tensors written dequantized (formats with no exact MLX equivalent).
    pub dequantized: usize,
    pub bytes: u64,
}

/// The Hugging Face name of a GGUF tensor (without `.weight`/`.bias`).
fn hf_name(gguf: &str) -> Option<String> {
    let global = match gguf {
        "token_embd" => Some("model.embed_tokens"),
        "output_norm" => Some("model.norm"),
        "output" => Some("lm_head"),
        _ => None,
    };
    if let Some(g) = global {
        return Some(g.to_owned());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (i, part) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{i}.{hf}"))
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect()
}

/// Writes `out_dir` (created; must not hold a model already) from `gguf`.
pub fn gguf_to_mlx(gguf: &Path, out_dir: &Path) -> Result<ConvertReport, EngineError> {
    let out_err = |reason: String| EngineError::ModelLoad { path: out_dir.display().to_string(), reason };
    let g = GgufFile::open(gguf)?;
    let src = GgufSource::new(&g)?;
    let hp = src.hparams().clone();
    if !CONVERTIBLE.contains(&hp.model_type.as_str()) {
        return Err(src.err(format!("convert supports {} (this file is '{}')", CONVERTIBLE.join(", "), hp.model_type)));
    }
    // A GGUF keeps a scaling's outcome (per-pair factors), not the
    // rope_scaling settings a config would need to say the same.
    if hp.rope_factors.is_some() || hp.rope_mscale.is_some() {
        return Err(src.err("convert does not carry rope scaling (rope_freqs, yarn, longrope) into a config yet".into()));
    }
    let tokenizer = Tokenizer::from_gguf(&g).map_err(|e| src.err(e.to_string()))?;
    if out_dir.join("config.json").exists() {
        return Err(out_err("already holds a model (config.json); choose an empty folder".into()));
    }
    std::fs::create_dir_all(out_dir).map_err(|e| out_err(format!("cannot create: {e}")))?;

    let adjacent = matches!(hp.model_type.as_str(), "llama" | "mistral");
    let mut report = ConvertReport { tensors: 0, quantized: 0, dequantized: 0, bytes: 0 };
    let mut out: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut per_layer = Map::new();
    let mut main_bits: Option<u32> = None;
    let mut tensors: Vec<&TensorInfo> = g.tensors.iter().collect();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    for t in tensors {
        let (base, suffix) = t.name.rsplit_once('.').ok_or_else(|| src.err(format!("tensor '{}' has no suffix", t.name)))?;
        let hf = hf_name(base).ok_or_else(|| src.err(format!("tensor '{}' has no MLX counterpart", t.name)))?;
        // A float vector is handled as rows of one element, so a llama Q/K
        // bias is reordered like its weight's rows.
        let (rows, cols) = match t.dims[..] {
            [n] if !t.qtype.is_quantized() => (n as usize, 1),
            _ => ((t.n_elements() / t.dims[0].max(1)) as usize, t.dims[0] as usize),
        };
        let bytes = g.tensor_bytes(t);
        let rb = t.qtype.row_bytes(cols);
        // Row order: llama Q and K back to Hugging Face's layout.
        let order: Vec<usize> = match base.rsplit('.').next() {
            Some("attn_q" | "attn_k") if adjacent => rope_row_order(rows, hp.head_dim, false),
            _ => (0..rows).collect(),
        };
        let shape = if t.dims.len() == 1 { vec![rows * cols] } else { vec![rows, cols] };
        report.tensors += 1;
        #[allow(unreachable_patterns)] // while every other format is a float
        match t.qtype {
            QType::Q4_0 | QType::Q4_1 | QType::Q8_0 | QType::A8 => {
                let (mut words, mut scales, mut biases, mut bits) = (Vec::new(), Vec::new(), Vec::new(), 0);
                for &r in &order {
                    let (b, w, s, bi) = blocks_to_affine(t.qtype, &bytes[r * rb..(r + 1) * rb], cols).map_err(|e| src.err(format!("tensor '{}': {e}", t.name)))?;
                    bits = b;
                    words.extend_from_slice(&w);
                    scales.extend(s);
                    biases.extend(bi);
                }
                match main_bits {
                    None => main_bits = Some(bits),
                    Some(m) if m != bits => {
                        per_layer.insert(hf.clone(), json!({"group_size": 32, "bits": bits}));
                    }
                    _ => {}
                }
                let groups = cols / 32;
                out.push((format!("{hf}.weight"), Dtype::U32, vec![rows, cols * bits as usize / 32], words));
                out.push((format!("{hf}.scales"), Dtype::F16, vec![rows, groups], f16_bytes(&scales)));
                out.push((format!("{hf}.biases"), Dtype::F16, vec![rows, groups], f16_bytes(&biases)));
                report.quantized += 1;
            }
            QType::F32 | QType::F16 | QType::BF16 => {
                let dtype = match t.qtype {
                    QType::F32 => Dtype::F32,
                    QType::F16 => Dtype::F16,
                    _ => Dtype::BF16,
                };
                let data: Vec<u8> = order.iter().flat_map(|&r| bytes[r * rb..(r + 1) * rb].iter().copied()).collect();
                out.push((format!("{hf}.{suffix}"), dtype, shape, data));
            }
            _ => {
                let mut row = vec![0.0f32; cols];
                let mut data = Vec::with_capacity(rows * cols * 2);
                for &r in &order {
                    dequantize_row(t.qtype, &bytes[r * rb..(r + 1) * rb], &mut row);
                    data.extend(f16_bytes(&row));
                }
                out.push((format!("{hf}.{suffix}"), Dtype::F16, shape, data));
                report.dequantized += 1;
            }
        }
    }
    // A layer whose bits differ from the first quantized tensor's is listed;
    // the rest follow the folder-wide setting.
    let main_bits = main_bits.unwrap_or(4);
    per_layer.retain(|_, v| v["bits"] != main_bits);
    // mlx-lm reads a layer quantized only if config.json or its scales say
    // so; dense layers in a quantized folder are left out of the config.
    let mut quantization = Map::new();
    quantization.insert("group_size".into(), json!(32));
    quantization.insert("bits".into(), json!(main_bits));
    quantization.extend(per_layer);

    let refs: Vec<(&str, Dtype, &[usize], &[u8])> = out.iter().map(|(n, d, s, b)| (n.as_str(), *d, s.as_slice(), b.as_slice())).collect();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_owned(), "mlx".to_owned());
    let weights_path = out_dir.join("model.safetensors");
    safetensors::write(&weights_path, &refs, &meta).map_err(|e| out_err(format!("cannot write model.safetensors: {e}")))?;
    report.bytes = std::fs::metadata(&weights_path).map(|m| m.len()).unwrap_or(0);

    let vocab_size = src.rows(&crate::models::weights::global("token_embd", "model.embed_tokens"))?;
    let tied = g.tensor("output.weight").is_none();
    let mut config = json!({
        "model_type": hp.model_type,
        "hidden_size": hp.dim,
        "num_hidden_layers": hp.n_layers,
        "intermediate_size": hp.ffn_dim,
        "num_attention_heads": hp.n_heads,
        "num_key_value_heads": hp.n_kv_heads,
        "head_dim": hp.head_dim,
        "rms_norm_eps": hp.eps,
        "rope_theta": hp.rope_theta,
        "max_position_embeddings": hp.context_length,
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "attention_bias": g.tensor("blk.0.attn_q.bias").is_some(),
    });
    if report.quantized > 0 {
        config["quantization"] = Value::Object(quantization.clone());
        config["quantization_config"] = Value::Object(quantization);
    }
    if let Some(b) = tokenizer.bos_id {
        config["bos_token_id"] = json!(b);
    }
    config["eos_token_id"] = json!(tokenizer.eog_ids.clone());

    let text = |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).map(str::to_owned);
    let mut tok_cfg = json!({
        "add_bos_token": tokenizer.add_bos,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": false,
    });
    if let Some(t) = text(tokenizer.bos_id) {
        tok_cfg["bos_token"] = json!(t);
    }
    if let Some(t) = text(tokenizer.eos_id) {
        tok_cfg["eos_token"] = json!(t);
    }
    if let Some(t) = &tokenizer.chat_template {
        tok_cfg["chat_template"] = json!(t);
    }
    let generation = json!({ "eos_token_id": tokenizer.eog_ids.clone(), "bos_token_id": tokenizer.bos_id });
    let write_json = |name: &str, v: &Value| {
        std::fs::write(out_dir.join(name), serde_json::to_string_pretty(v).unwrap() + "\n").map_err(|e| out_err(format!("cannot write {name}: {e}")))
    };
    write_json("config.json", &config)?;
    write_json("tokenizer_config.json", &tok_cfg)?;
    write_json("generation_config.json", &generation)?;
    let tok_json = tokenizer.to_hf_json().map_err(|e| out_err(format!("cannot write tokenizer.json: {e}")))?;
    std::fs::write(out_dir.join("tokenizer.json"), tok_json).map_err(|e| out_err(format!("cannot write tokenizer.json: {e}")))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rope_scaled_file_is_refused_before_anything_is_written() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let out = tempfile::tempdir().unwrap();
        for name in ["llama3_scaled", "qwen2_yarn"] {
            let dir = out.path().join(name);
            let err = gguf_to_mlx(&fixtures.join(name).join("model.gguf"), &dir).unwrap_err().to_string();
            assert!(err.contains("does not carry rope scaling"), "{err}");
            assert!(!dir.exists());
        }
    }

    #[test]
    fn rope_row_orders_are_inverse_permutations() {
        // GGUF row of (head h, half j, index i) is h*hd + 2i + j.
        let hd = 8;
        let to_hf = rope_row_order(2 * hd, hd, false);
        assert_eq!(&to_hf[..hd], &[0, 2, 4, 6, 1, 3, 5, 7]);
        let to_adj = rope_row_order(2 * hd, hd, true);
        assert_eq!(&to_adj[..hd], &[0, 4, 1, 5, 2, 6, 3, 7]);
        for r in 0..2 * hd {
            assert_eq!(to_adj[to_hf[r]], r);
        }
    }

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(hf_name("blk.3.attn_q").as_deref(), Some("model.layers.3.self_attn.q_proj"));
        assert_eq!(hf_name("output").as_deref(), Some("lm_head"));
        assert_eq!(hf_name("blk.x.attn_q"), None);
        assert_eq!(hf_name("rope_freqs"), None);
    }
}
