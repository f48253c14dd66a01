//! Model shapes from a file, to a loaded model: the llama fixture with its
//! hyperparameters (GGUF metadata) or its `config.json` (MLX folder) set
//! from the input. Loading must end in a model or an error, never a panic,
//! and never an allocation sized by an unchecked number (run under
//! `-malloc_limit_mb`, which reports one as a crash).
#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use mlx_serving_engine::formats::filebuf::FileBuf;
use mlx_serving_engine::formats::gguf::writer::{write, TensorSpec};
use mlx_serving_engine::formats::gguf::{GgufFile, MetaValue};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../crates/engine/tests/fixtures/llama");

/// The integer keys a llama GGUF's shape comes from.
const KEYS: &[&str] = &[
    "llama.block_count",
    "llama.embedding_length",
    "llama.feed_forward_length",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.attention.key_length",
    "llama.context_length",
    "llama.attention.sliding_window",
    "llama.expert_count",
    "llama.expert_used_count",
    "llama.rope.dimension_count",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
];

fn fixture() -> &'static (Vec<(String, MetaValue)>, Vec<TensorSpec>) {
    static F: OnceLock<(Vec<(String, MetaValue)>, Vec<TensorSpec>)> = OnceLock::new();
    F.get_or_init(|| {
        let g = GgufFile::open(format!("{FIXTURE}/model.gguf")).unwrap();
        let md = g.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let tensors = g.tensors.iter().map(|t| TensorSpec { name: t.name.clone(), dims: t.dims.clone(), qtype: t.qtype, data: g.tensor_bytes(t).to_vec() }).collect();
        (md, tensors)
    })
}

/// A copy of the fixture's MLX folder whose config.json each input replaces.
fn folder() -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mlx-serving-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(format!("{FIXTURE}/mlx")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode % 2 == 0 {
        // GGUF: (key, value) pairs of 9 bytes each override the fixture's.
        let (md, tensors) = fixture();
        let mut md = md.clone();
        for pair in rest.chunks_exact(9) {
            let key = KEYS[pair[0] as usize % KEYS.len()];
            let v = u64::from_le_bytes(pair[1..].try_into().unwrap());
            md.retain(|(k, _)| k != key);
            md.push((key.to_string(), MetaValue::U64(v)));
        }
        let refs: Vec<(&str, MetaValue)> = md.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let bytes = write(&refs, tensors);
        if let Ok(g) = GgufFile::from_buffer("fuzz.gguf".into(), Arc::new(FileBuf::from_bytes(&bytes))) {
            let _ = mlx_serving_engine::models::load_gguf(&g);
            let _ = mlx_serving_engine::text::tokenizer::Tokenizer::from_gguf(&g);
        }
    } else {
        // MLX: the input is config.json.
        let dir = folder();
        std::fs::write(dir.join("config.json"), rest).unwrap();
        let _ = mlx_serving_engine::models::open(dir);
    }
});
