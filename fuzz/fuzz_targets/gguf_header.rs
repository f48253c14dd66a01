//! Any bytes as a GGUF file: parsing must return a model index or an
//! error, never panic, overflow or read out of bounds; a parsed index must
//! hand out every tensor's bytes and metadata safely.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use mlx_serving_engine::formats::filebuf::FileBuf;
use mlx_serving_engine::formats::gguf::GgufFile;

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = GgufFile::from_buffer("fuzz.gguf".into(), Arc::new(FileBuf::from_bytes(data))) {
        for t in &g.tensors {
            let b = g.tensor_bytes(t);
            std::hint::black_box(b.first());
        }
        for k in g.metadata.keys() {
            std::hint::black_box((g.get_u64(k), g.get_f64(k), g.get_str(k)));
        }
        // The model loaders read shapes and names from here too.
        let _ = mlx_serving_engine::models::load_gguf(&g);
    }
});
