//! Any bytes as a safetensors file: the header check must accept or refuse
//! it without panicking, and every accepted entry must lie inside the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mlx_serving_engine::formats::safetensors::parse_header;

fuzz_target!(|data: &[u8]| {
    if let Ok((tensors, _)) = parse_header(data) {
        for t in tensors.values() {
            assert!(t.offset + t.len <= data.len());
            std::hint::black_box(&data[t.offset..t.offset + t.len]);
        }
    }
});
