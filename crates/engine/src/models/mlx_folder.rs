//! An MLX model folder (what mlx-lm writes and mlx-community publishes) as a
//! weight source: `config.json`, one or several `*.safetensors` shards
//! (`model.safetensors.index.json` maps tensors to shards), weights dense
//! (f32/f16/bf16) or MLX-quantized.
//!
//! MLX's affine quantization stores a `rows x cols` weight as `uint32`
//! words packing `bits`-bit values, plus a scale and a bias per group of
//! `group_size` columns (`w = scale * q + bias`). At load each row is
//! repacked into the CPU kernels' blocks of 32 (4-bit: exactly Q4_1; 8-bit:
//! the affine 8-bit block), so the folder's bytes are not kept twice.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::rope_scaling;
use super::weights::{Format, Hparams, Name, WeightSource};
use crate::backend::cpu::kernels::{Bytes, QMatrix};
use crate::error::EngineError;
use crate::formats::affine::affine_to_blocks;
use crate::formats::filebuf::{read_text, MAX_MODEL_TEXT};
use crate::formats::quant::QType;
use crate::formats::safetensors::{Dtype, SafeTensors};

/// Bits and group size of one quantized weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Quant {
    bits: u32,
    group_size: usize,
}

pub struct MlxFolder {
    dir: PathBuf,
    config: Value,
    hp: Hparams,
    shards: Vec<SafeTensors>,
    /// Tensor name to the shard holding it.
    index: HashMap<String, usize>,
    /// The folder's default quantization (`None`: dense).
    quant: Option<Quant>,
}

fn load_err(path: &Path, reason: String) -> EngineError {
    EngineError::ModelLoad { path: path.display().to_string(), reason }
}

/// Whether `dir` looks like an MLX model folder.
pub fn is_mlx_folder(dir: &Path) -> bool {
    dir.is_dir() && dir.join("config.json").is_file()
}

fn parse_quant(v: &Value, field: &str, cfg_path: &Path) -> Result<Quant, EngineError> {
    let get = |k: &str| v[k].as_u64().ok_or_else(|| load_err(cfg_path, format!("{field}.{k} is missing or not a number")));
    if let Some(mode) = v.get("mode").filter(|m| *m != "affine") {
        return Err(load_err(cfg_path, format!("{field}.mode = {mode} is not supported (affine is)")));
    }
    let q = Quant { bits: get("bits")? as u32, group_size: get("group_size")? as usize };
    if ![4, 8].contains(&q.bits) {
        return Err(load_err(cfg_path, format!("{field}.bits = {} is not supported (4 and 8 are)", q.bits)));
    }
    if ![32, 64, 128].contains(&q.group_size) {
        return Err(load_err(cfg_path, format!("{field}.group_size = {} is not supported (32, 64 and 128 are)", q.group_size)));
    }
    Ok(q)
}

impl MlxFolder {
    pub fn open(dir: &Path) -> Result<MlxFolder, EngineError> {
        let cfg_path = dir.join("config.json");
        let text = read_text(&cfg_path, MAX_MODEL_TEXT).map_err(|e| load_err(&cfg_path, format!("cannot read: {e}")))?;
        let config: Value = serde_json::from_str(&text).map_err(|e| load_err(&cfg_path, format!("not valid JSON: {e}")))?;
        if !config.is_object() {
            return Err(load_err(&cfg_path, "is not a JSON object".into()));
        }
        let hp = hparams(&config, &cfg_path)?;
        let quant = match config.get("quantization").or_else(|| config.get("quantization_config")) {
            Some(q) if !q.is_null() => Some(parse_quant(q, "quantization", &cfg_path)?),
            _ => None,
        };

        // Shards: those the index names, or every *.safetensors file.
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.is_file() {
            let text = read_text(&index_path, MAX_MODEL_TEXT).map_err(|e| load_err(&index_path, format!("cannot read: {e}")))?;
            let idx: Value = serde_json::from_str(&text).map_err(|e| load_err(&index_path, format!("not valid JSON: {e}")))?;
            let map = idx["weight_map"].as_object().ok_or_else(|| load_err(&index_path, "weight_map is missing".into()))?;
            let mut names: Vec<&str> = map.values().filter_map(Value::as_str).collect();
            names.sort_unstable();
            names.dedup();
            for n in &names {
                if n.contains('/') || n.contains("..") || !dir.join(n).is_file() {
                    return Err(load_err(&index_path, format!("weight_map names shard '{n}', which the folder does not have")));
                }
            }
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| load_err(dir, format!("cannot list: {e}")))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            v.sort();
            v
        };
        if files.is_empty() {
            return Err(load_err(dir, "the folder has no *.safetensors weights".into()));
        }
        let shards = files.iter().map(|f| SafeTensors::open(f)).collect::<Result<Vec<_>, _>>()?;
        let mut index = HashMap::new();
        for (i, s) in shards.iter().enumerate() {
            for name in s.names() {
                if let Some(j) = index.insert(name.to_owned(), i) {
                    return Err(load_err(s.path(), format!("tensor '{name}' is also in {}", shards[j].path().display())));
                }
            }
        }
        Ok(MlxFolder { dir: dir.to_owned(), config, hp, shards, index, quant })
    }

    /// How the weights are stored, for model info.
    pub fn weight_format(&self) -> String {
        match self.quant {
            Some(q) => format!("MLX {}-bit/{}", q.bits, q.group_size),
            None => self.find("model.embed_tokens.weight").map_or("?".into(), |(_, t)| format!("{:?}", t.dtype)),
        }
    }

    /// The `config.json` this folder was opened with.
    pub fn config(&self) -> &Value {
        &self.config
    }

    fn find(&self, name: &str) -> Option<(&SafeTensors, &crate::formats::safetensors::TensorEntry)> {
        let s = &self.shards[*self.index.get(name)?];
        Some((s, s.get(name)?))
    }

    /// The quantization of weight `base` (per-layer overrides first).
    fn quant_of(&self, base: &str) -> Result<Option<Quant>, EngineError> {
        let q = self.config.get("quantization").or_else(|| self.config.get("quantization_config"));
        match q.and_then(|q| q.get(base)) {
            Some(Value::Bool(false)) => Ok(None),
            Some(v) if v.is_object() => parse_quant(v, &format!("quantization.{base}"), &self.dir.join("config.json")).map(Some),
            _ => Ok(self.quant),
        }
    }

    fn f32_row_data(&self, name: &str, what: &str) -> Result<(Vec<f32>, Vec<usize>), EngineError> {
        let (s, t) = self.find(name).ok_or_else(|| self.err(format!("quantized weight has no '{name}' ({what})")))?;
        let v = s.to_f32(t)?;
        Ok((v, t.shape.clone()))
    }
}

fn hparams(c: &Value, cfg_path: &Path) -> Result<Hparams, EngineError> {
    let err = |reason: String| load_err(cfg_path, reason);
    let uint = |k: &str| -> Result<Option<usize>, EngineError> {
        match &c[k] {
            Value::Null => Ok(None),
            v => v.as_u64().filter(|&x| x < 1 << 32).map(|x| Some(x as usize)).ok_or_else(|| err(format!("{k} must be a non-negative integer, got {v}"))),
        }
    };
    let float = |k: &str| -> Result<Option<f32>, EngineError> {
        match &c[k] {
            Value::Null => Ok(None),
            v => v.as_f64().map(|x| Some(x as f32)).ok_or_else(|| err(format!("{k} must be a number, got {v}"))),
        }
    };
    let req = |k: &str| uint(k)?.ok_or_else(|| err(format!("{k} is missing")));
    let model_type = c["model_type"].as_str().ok_or_else(|| err("model_type is missing".into()))?.to_owned();
    if !super::SUPPORTED.contains(&model_type.as_str()) {
        return Err(err(format!("model_type '{model_type}' is not supported (supported: {})", super::SUPPORTED.join(", "))));
    }
    if c["text_config"].is_object() {
        return Err(err(format!("a '{model_type}' folder with a text_config is a vision-language checkpoint: convert its text model (mlx-lm's gemma3_text) to serve it")));
    }
    // transformers 5 nests the rope settings under rope_parameters.
    let rope = &c["rope_parameters"];
    let scaling = if c["rope_scaling"].is_object() { &c["rope_scaling"] } else { rope };
    let scaling_kind = scaling["rope_type"].as_str().or_else(|| scaling["type"].as_str()).unwrap_or("default");
    // mlx-lm's per-architecture default when the config leaves it out.
    let default_theta = if matches!(model_type.as_str(), "qwen2" | "gemma3_text") { 1_000_000.0 } else { 10_000.0 };
    let rope_theta = match rope["rope_theta"].as_f64() {
        Some(t) => t as f32,
        None => float("rope_theta")?.unwrap_or(default_theta),
    };
    let n_heads = req("num_attention_heads")?;
    let dim = req("hidden_size")?;
    let n_layers = req("num_hidden_layers")?;
    let head_dim = uint("head_dim")?.unwrap_or(if n_heads > 0 { dim / n_heads } else { 0 });
    if float("partial_rotary_factor")?.is_some_and(|p| p != 1.0) {
        return Err(err("partial rotary embeddings (partial_rotary_factor below 1) are not supported".into()));
    }
    let context_length = uint("max_position_embeddings")?.unwrap_or(4096);
    // The trained context that a scaling stretches: in the scaling's own
    // settings or, as Phi-3 keeps it, beside them.
    let original = |default: Option<f64>| match (&scaling["original_max_position_embeddings"], &c["original_max_position_embeddings"]) {
        (Value::Null, Value::Null) => scaling_number(scaling, "original_max_position_embeddings", default),
        (Value::Null, _) => scaling_number(c, "original_max_position_embeddings", None),
        _ => scaling_number(scaling, "original_max_position_embeddings", None),
    };
    let mut hp = Hparams {
        rope_factors: None,
        rope_mscale: None,
        n_layers,
        dim,
        ffn_dim: uint("intermediate_size")?.unwrap_or(0),
        n_heads,
        n_kv_heads: uint("num_key_value_heads")?.unwrap_or(n_heads),
        head_dim,
        rope_theta,
        eps: float("rms_norm_eps")?.ok_or_else(|| err("rms_norm_eps is missing".into()))?,
        context_length,
        sliding_window: uint("sliding_window")?.filter(|&w| w > 0),
        // Sized by the layer count: read once that is checked.
        sliding_layers: None,
        rope_local_theta: float("rope_local_base_freq")?,
        attn_softcap: float("attn_logit_softcapping")?.filter(|&v| v > 0.0),
        final_softcap: float("final_logit_softcapping")?.filter(|&v| v > 0.0),
        query_pre_attn_scalar: float("query_pre_attn_scalar")?,
        n_experts: uint("num_experts")?.unwrap_or(0),
        n_experts_used: uint("num_experts_per_tok")?.unwrap_or(0),
        moe_ffn_dim: uint("moe_intermediate_size")?.unwrap_or(0),
        norm_topk_prob: c["norm_topk_prob"].as_bool().unwrap_or(false),
        model_type,
    };
    // Bounded before the rope scaling sizes anything by them.
    hp.check().map_err(err)?;
    hp.sliding_layers = sliding_layers(c, hp.n_layers).map_err(err)?;
    (hp.rope_factors, hp.rope_mscale) = match scaling_kind {
        // Dynamic NTK changes only past max_position_embeddings, our limit.
        "default" | "dynamic" => (None, None),
        "linear" => (Some(vec![scaling_number(scaling, "factor", None).map_err(err)?; head_dim / 2]), None),
        "llama3" => {
            let n = |k, d| scaling_number(scaling, k, d).map_err(err);
            let f = rope_scaling::llama3(n("factor", None)?, n("low_freq_factor", Some(1.0))?, n("high_freq_factor", Some(4.0))?, n("original_max_position_embeddings", Some(8192.0))?, rope_theta, head_dim);
            (Some(f.map_err(err)?), None)
        }
        "yarn" => {
            let mut y = rope_scaling::Yarn::new(scaling_number(scaling, "factor", None).map_err(err)?, original(Some(4096.0)).map_err(err)?);
            for (key, v) in [("beta_fast", &mut y.beta_fast), ("beta_slow", &mut y.beta_slow), ("mscale", &mut y.mscale), ("mscale_all_dim", &mut y.mscale_all_dim)] {
                if !scaling[key].is_null() {
                    *v = scaling[key].as_f64().filter(|x| *x >= 0.0 && x.is_finite()).ok_or_else(|| err(format!("rope scaling {key} must be a non-negative number, got {}", scaling[key])))? as f32;
                }
            }
            let (f, m) = y.scale(rope_theta, head_dim);
            (Some(f), Some(m))
        }
        // Phi-3's LongRoPE: the long factors when the context exceeds the
        // trained one (always, in real configs; llama.cpp's rule).
        "longrope" | "su" => {
            let original = original(Some(4096.0)).map_err(err)?;
            let which = if context_length as f32 > original { "long_factor" } else { "short_factor" };
            let f: Option<Vec<f32>> = scaling[which].as_array().and_then(|a| a.iter().map(|x| x.as_f64().map(|x| x as f32)).collect());
            let f = f.filter(|f| f.len() == head_dim / 2).ok_or_else(|| err(format!("rope scaling {which} must be {} numbers", head_dim / 2)))?;
            (Some(f), Some(rope_scaling::longrope_mscale(context_length as f32, original)))
        }
        other => return Err(err(format!("rope scaling '{other}' is not supported (linear, dynamic, llama3, yarn and longrope are)"))),
    };
    hp.check().map_err(err)?;
    Ok(hp)
}

/// Which layers slide, as the config says: `layer_types` (one
/// `sliding_attention` / `full_attention` per layer) or a
/// `sliding_window_pattern` (every `p`-th layer is full); `None` when it
/// says neither.
fn sliding_layers(c: &Value, n_layers: usize) -> Result<Option<Vec<bool>>, String> {
    if let Some(types) = c["layer_types"].as_array() {
        if types.len() != n_layers {
            return Err(format!("layer_types has {} entries for {n_layers} layers", types.len()));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(format!("layer_types entries must be sliding_attention or full_attention, got {t}")),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some);
    }
    match &c["sliding_window_pattern"] {
        Value::Null => Ok(None),
        v => match v.as_u64().filter(|&p| p >= 1 && p <= n_layers.max(1) as u64) {
            Some(p) => Ok(Some((0..n_layers).map(|i| (i + 1) % p as usize != 0).collect())),
            None => Err(format!("sliding_window_pattern must be an integer from 1 to the layer count, got {v}")),
        },
    }
}

/// The quantization a packed weight of `cols` columns really has: the
/// configured one when its `words` per row and `groups` of scales fit it,
/// else the one they spell out (mlx-lm does the same for mixed-precision
/// folders whose config names no per-layer entry, such as 8-bit
/// embeddings beside 4-bit layers); `None` when no supported width fits.
fn packed_quant(configured: Quant, cols: usize, words: usize, groups: usize) -> Option<Quant> {
    let fits = |q: &Quant| cols % q.group_size == 0 && groups == cols / q.group_size && words * 32 == cols * q.bits as usize;
    if fits(&configured) {
        return Some(configured);
    }
    if groups == 0 || cols % groups != 0 || (words * 32) % cols != 0 {
        return None;
    }
    let q = Quant { bits: (words * 32 / cols) as u32, group_size: cols / groups };
    ([4, 8].contains(&q.bits) && [32, 64, 128].contains(&q.group_size) && fits(&q)).then_some(q)
}

fn scaling_number(scaling: &Value, key: &str, default: Option<f64>) -> Result<f32, String> {
    match (&scaling[key], default) {
        (Value::Null, Some(d)) => Ok(d as f32),
        (v, _) => v.as_f64().filter(|x| *x > 0.0 && x.is_finite()).map(|x| x as f32).ok_or_else(|| format!("rope scaling {key} must be a positive number, got {v}")),
    }
}

impl WeightSource for MlxFolder {
    fn path(&self) -> &Path {
        &self.dir
    }
    fn format(&self) -> Format {
        Format::Mlx
    }
    fn hparams(&self) -> &Hparams {
        &self.hp
    }
    fn has(&self, name: &Name, suffix: &str) -> bool {
        self.index.contains_key(&format!("{}.{suffix}", name.hf))
    }
    fn rows(&self, name: &Name) -> Result<usize, EngineError> {
        let full = format!("{}.weight", name.hf);
        let (s, t) = self.find(&full).ok_or_else(|| self.err(format!("missing tensor '{full}'")))?;
        match t.shape[..] {
            [rows, _] if rows > 0 => Ok(rows),
            _ => Err(load_err(s.path(), format!("tensor '{full}' has shape {:?}, expected a matrix", t.shape))),
        }
    }

    fn matrix(&self, name: &Name, rows: usize, cols: usize) -> Result<QMatrix, EngineError> {
        let full = format!("{}.weight", name.hf);
        let (s, t) = self.find(&full).ok_or_else(|| self.err(format!("missing tensor '{full}'")))?;
        let shape_err = |want: String| load_err(s.path(), format!("tensor '{full}' has shape {:?} ({:?}), expected {want}", t.shape, t.dtype));
        let (last, lead) = match t.shape.split_last() {
            Some((&last, lead)) if !lead.is_empty() => (last, lead.iter().product::<usize>()),
            _ => return Err(shape_err(format!("{rows} x {cols}"))),
        };
        if lead != rows {
            return Err(shape_err(format!("{rows} rows")));
        }
        let qtype = match t.dtype {
            Dtype::F32 => QType::F32,
            Dtype::F16 => QType::F16,
            Dtype::BF16 => QType::BF16,
            Dtype::U32 => {
                let configured = self.quant_of(&name.hf)?.ok_or_else(|| {
                    load_err(s.path(), format!("tensor '{full}' is packed uint32 but config.json has no quantization for it"))
                })?;
                let (scales, s_shape) = self.f32_row_data(&format!("{}.scales", name.hf), "scales")?;
                let (biases, b_shape) = self.f32_row_data(&format!("{}.biases", name.hf), "biases")?;
                let q = packed_quant(configured, cols, last, s_shape.last().copied().unwrap_or(0))
                    .ok_or_else(|| shape_err(format!("{rows} x {} packed words ({cols} columns of {} bits), or another supported width", cols * configured.bits as usize / 32, configured.bits)))?;
                let groups = cols / q.group_size;
                for (what, shape) in [("scales", &s_shape), ("biases", &b_shape)] {
                    if shape.iter().product::<usize>() != rows * groups || shape.last() != Some(&groups) {
                        return Err(load_err(s.path(), format!("'{}.{what}' has shape {shape:?}, expected {rows} x {groups}", name.hf)));
                    }
                }
                let words = s.bytes(t);
                let row_in = last * 4;
                let mut data = Vec::new();
                let mut qtype = QType::Q4_1;
                for r in 0..rows {
                    let g = r * groups..(r + 1) * groups;
                    let (qt, bytes) = affine_to_blocks(q.bits, q.group_size, &words[r * row_in..(r + 1) * row_in], &scales[g.clone()], &biases[g], cols)
                        .map_err(|e| load_err(s.path(), format!("tensor '{full}' row {r}: {e}")))?;
                    qtype = qt;
                    data.extend_from_slice(&bytes);
                }
                return Ok(QMatrix { layout: crate::backend::cpu::kernels::Layout::Rows, qtype, rows, cols, data: Bytes::Owned(data) });
            }
            other => return Err(load_err(s.path(), format!("tensor '{full}' has dtype {other:?}, expected f32, f16, bf16 or MLX-quantized uint32"))),
        };
        if last != cols {
            return Err(shape_err(format!("{rows} x {cols}")));
        }
        Ok(QMatrix { layout: crate::backend::cpu::kernels::Layout::Rows, qtype, rows, cols, data: Bytes::File { file: s.buffer().clone(), offset: t.offset, len: t.len } })
    }

    fn vector(&self, name: &Name, suffix: &str, len: usize) -> Result<Vec<f32>, EngineError> {
        let full = format!("{}.{suffix}", name.hf);
        let (s, t) = self.find(&full).ok_or_else(|| self.err(format!("missing tensor '{full}'")))?;
        if t.shape != [len] {
            return Err(load_err(s.path(), format!("tensor '{full}' has shape {:?}, expected [{len}]", t.shape)));
        }
        s.to_f32(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::open;
    use std::path::Path;

    /// A writable copy of a committed fixture folder.
    fn copy_fixture(name: &str) -> tempfile::TempDir {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name).join("mlx");
        let dir = tempfile::tempdir().unwrap();
        for e in std::fs::read_dir(&src).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
        }
        dir
    }

    fn edit_config(dir: &Path, f: impl FnOnce(&mut Value)) {
        let p = dir.join("config.json");
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, v.to_string()).unwrap();
    }

    fn load_error(dir: &Path) -> String {
        match open(dir) {
            Ok(_) => panic!("{} loaded", dir.display()),
            Err(e) => {
                assert_eq!(e.code(), "ModelLoadError", "{e}");
                e.to_string()
            }
        }
    }

    #[test]
    fn a_fixture_folder_loads_and_reports_its_format() {
        let dir = copy_fixture("llama_q8");
        let folder = MlxFolder::open(dir.path()).unwrap();
        assert_eq!(folder.weight_format(), "MLX 8-bit/64");
        let opened = open(dir.path()).unwrap();
        assert_eq!(opened.model.config().architecture, "llama");
        // generation_config.json's two EOS ids both end generation.
        assert_eq!(opened.tokenizer.eog_ids.len(), 2);
    }

    #[test]
    fn malformed_folders_are_load_errors_naming_file_and_field() {
        let cases: Vec<(&str, Box<dyn Fn(&Path)>, &str)> = vec![
            ("config.json not JSON", Box::new(|d| std::fs::write(d.join("config.json"), "{oops").unwrap()), "config.json: not valid JSON"),
            ("unknown model_type", Box::new(|d| edit_config(d, |c| c["model_type"] = "gpt_bigcode".into())), "model_type 'gpt_bigcode' is not supported (supported: llama, mistral"),
            ("missing field", Box::new(|d| edit_config(d, |c| drop(c.as_object_mut().unwrap().remove("num_hidden_layers")))), "num_hidden_layers is missing"),
            ("negative field", Box::new(|d| edit_config(d, |c| c["hidden_size"] = (-64).into())), "hidden_size must be a non-negative integer"),
            ("3-bit", Box::new(|d| edit_config(d, |c| c["quantization"]["bits"] = 3.into())), "quantization.bits = 3 is not supported"),
            ("group 16", Box::new(|d| edit_config(d, |c| c["quantization"]["group_size"] = 16.into())), "quantization.group_size = 16 is not supported"),
            ("mxfp4", Box::new(|d| edit_config(d, |c| c["quantization"]["mode"] = "mxfp4".into())), "mode = \"mxfp4\" is not supported"),
            ("wrong width", Box::new(|d| edit_config(d, |c| c["intermediate_size"] = 96.into())), "mlp.gate_proj.weight' has shape"),
            ("rope scaling", Box::new(|d| edit_config(d, |c| c["rope_scaling"] = serde_json::json!({"rope_type": "mrope", "factor": 4.0}))), "rope scaling 'mrope' is not supported"),
            ("yarn factor", Box::new(|d| edit_config(d, |c| c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": -4.0}))), "rope scaling factor must be a positive number"),
            ("yarn beta", Box::new(|d| edit_config(d, |c| c["rope_scaling"] = serde_json::json!({"type": "yarn", "factor": 4.0, "beta_fast": "x"}))), "rope scaling beta_fast must be a non-negative number"),
            ("longrope factors", Box::new(|d| edit_config(d, |c| c["rope_scaling"] = serde_json::json!({"type": "longrope", "long_factor": [1.0], "short_factor": [1.0], "original_max_position_embeddings": 64}))), "rope scaling long_factor must be 8 numbers"),
            ("partial rotary", Box::new(|d| edit_config(d, |c| c["partial_rotary_factor"] = 0.75.into())), "partial rotary embeddings"),
            (
                "missing shard",
                Box::new(|d| {
                    let p = d.join("model.safetensors.index.json");
                    let text = std::fs::read_to_string(&p).unwrap().replace("model.safetensors", "model-00002-of-00002.safetensors");
                    std::fs::write(p, text).unwrap();
                }),
                "names shard 'model-00002-of-00002.safetensors', which the folder does not have",
            ),
            (
                "truncated weights",
                Box::new(|d| {
                    let p = d.join("model.safetensors");
                    let b = std::fs::read(&p).unwrap();
                    std::fs::write(p, &b[..b.len() / 2]).unwrap();
                }),
                "fall outside",
            ),
            (
                "header longer than the file",
                Box::new(|d| {
                    let p = d.join("model.safetensors");
                    let mut b = std::fs::read(&p).unwrap();
                    b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
                    std::fs::write(p, b).unwrap();
                }),
                "exceeds the file",
            ),
            ("no tokenizer", Box::new(|d| std::fs::remove_file(d.join("tokenizer.json")).unwrap()), "no tokenizer.json"),
        ];
        for (what, break_it, want) in cases {
            let dir = copy_fixture("llama");
            break_it(dir.path());
            let err = load_error(dir.path());
            assert!(err.contains(want), "{what}: {err}");
        }
    }

    #[test]
    fn a_tensor_of_the_wrong_dtype_or_shape_is_named() {
        // Rewrite the weights with one tensor changed.
        for (what, want) in [("dtype", "has dtype I32"), ("shape", "expected 64 rows")] {
            let dir = copy_fixture("llama_f16");
            let p = dir.path().join("model.safetensors");
            let st = SafeTensors::open(&p).unwrap();
            let mut out: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
            for name in st.names() {
                let t = st.get(name).unwrap();
                let mut e = (name.to_owned(), t.dtype, t.shape.clone(), st.bytes(t).to_vec());
                if name == "model.layers.1.self_attn.o_proj.weight" {
                    match what {
                        "dtype" => e.1 = Dtype::I32,
                        _ => e.2 = vec![t.shape[0] * 2, t.shape[1] / 2],
                    }
                    if what == "dtype" {
                        e.2 = vec![t.shape[0], t.shape[1] / 2];
                    }
                }
                out.push(e);
            }
            drop(st);
            let refs: Vec<crate::formats::safetensors::TensorOut> = out.iter().map(|(n, d, s, b)| (n.as_str(), *d, s.as_slice(), b.as_slice())).collect();
            crate::formats::safetensors::write(&p, &refs, &Default::default()).unwrap();
            let err = load_error(dir.path());
            assert!(err.contains("o_proj.weight") && err.contains(want), "{what}: {err}");
        }
    }

    #[test]
    fn packed_shapes_override_a_config_that_does_not_fit_them() {
        let q = |bits, group_size| Quant { bits, group_size };
        // 256 columns at 4 bits are 32 words per row; at 8 bits, 64.
        assert_eq!(packed_quant(q(4, 64), 256, 32, 4), Some(q(4, 64)));
        assert_eq!(packed_quant(q(4, 64), 256, 64, 4), Some(q(8, 64)), "8-bit embeddings beside 4-bit layers");
        assert_eq!(packed_quant(q(8, 64), 256, 32, 8), Some(q(4, 32)));
        for (words, groups) in [(24, 4), (32, 16), (32, 0), (48, 2)] {
            assert_eq!(packed_quant(q(4, 64), 256, words, groups), None, "{words} words, {groups} groups: 3-bit, groups of 16, none, 6-bit/128");
        }
        // A whole folder whose config names another width loads as its shapes say.
        let dir = copy_fixture("llama_q8");
        let want = open(dir.path()).unwrap().model.weight_bytes();
        edit_config(dir.path(), |c| c["quantization"] = serde_json::json!({"bits": 4, "group_size": 32}));
        assert_eq!(open(dir.path()).unwrap().model.weight_bytes(), want);
    }

    #[test]
    fn which_layers_slide_follows_layer_types_or_the_pattern() {
        let cfg = |v: serde_json::Value| sliding_layers(&v, 6);
        assert_eq!(cfg(serde_json::json!({})), Ok(None));
        assert_eq!(cfg(serde_json::json!({"sliding_window_pattern": 3})), Ok(Some(vec![true, true, false, true, true, false])));
        let types = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "sliding_attention", "full_attention"];
        assert_eq!(cfg(serde_json::json!({"layer_types": types, "sliding_window_pattern": 2})), Ok(Some(vec![true, false, true, true, true, false])));
        assert!(cfg(serde_json::json!({"layer_types": ["full_attention"]})).unwrap_err().contains("1 entries for 6 layers"));
        assert!(cfg(serde_json::json!({"layer_types": [1, 2, 3, 4, 5, 6]})).unwrap_err().contains("sliding_attention or full_attention"));
        assert!(cfg(serde_json::json!({"sliding_window_pattern": 0})).unwrap_err().contains("sliding_window_pattern"));
    }
}
