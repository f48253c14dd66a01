//! Model files made to hurt: numbers that would size allocations, counts
//! just under the file's size, huge arrays, files that are not models.
//!
//! Its own test binary, for its allocator: any single allocation over
//! `CAP` fails, so a loader that sizes a buffer by an unchecked number
//! aborts this binary (as it would abort a server on a smaller machine)
//! instead of passing on a host with memory to spare. The fixtures are a
//! few hundred KB, so nothing honest comes near the cap.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use mlx_serving_engine::formats::gguf::writer::{write, TensorSpec};
use mlx_serving_engine::formats::gguf::{GgufFile, MetaValue};
use mlx_serving_engine::EngineError;

const CAP: usize = 64 << 20;

struct Capped;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; refusing is allowed (null).
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        if layout.size() > CAP {
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        if new_size > CAP {
            return std::ptr::null_mut();
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: Capped = Capped;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// The llama fixture's metadata and tensors, for rewriting.
fn llama_parts() -> (Vec<(String, MetaValue)>, Vec<TensorSpec>) {
    let g = GgufFile::open(fixture("llama/model.gguf")).unwrap();
    let mut md: Vec<(String, MetaValue)> = g.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    md.sort_by(|a, b| a.0.cmp(&b.0));
    let tensors = g
        .tensors
        .iter()
        .map(|t| TensorSpec { name: t.name.clone(), dims: t.dims.clone(), qtype: t.qtype, data: g.tensor_bytes(t).to_vec() })
        .collect();
    (md, tensors)
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn load_reason(path: &Path) -> String {
    match mlx_serving_engine::models::open(path) {
        Err(EngineError::ModelLoad { reason, .. }) => reason,
        Err(other) => panic!("{}: expected ModelLoadError, got {other}", path.display()),
        Ok(_) => panic!("{}: loaded", path.display()),
    }
}

#[test]
fn hyperparameters_past_any_real_model_are_refused_before_they_size_anything() {
    let dir = tempfile::tempdir().unwrap();
    let (md, tensors) = llama_parts();
    let huge = 1u64 << 40;
    for (key, want) in [
        ("llama.embedding_length", "hidden size: 1099511627776 is out of range"),
        ("llama.attention.key_length", "head size: 1099511627776 is out of range"),
        ("llama.context_length", "context length: 1099511627776 is out of range"),
        ("llama.attention.head_count", "attention heads: 1099511627776 is out of range"),
        ("llama.block_count", "layers: 1099511627776 is out of range"),
        ("llama.feed_forward_length", "feed-forward size: 1099511627776 is out of range"),
        ("llama.attention.sliding_window", "sliding window: 1099511627776 is out of range"),
        ("llama.expert_count", "experts: 1099511627776 is out of range"),
    ] {
        let mut md = md.clone();
        md.retain(|(k, _)| k != key);
        md.push((key.to_string(), MetaValue::U64(huge)));
        let refs: Vec<(&str, MetaValue)> = md.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let p = write_file(dir.path(), "m.gguf", &write(&refs, &tensors));
        let reason = load_reason(&p);
        assert!(reason.contains(want), "{key}: {reason}");
    }
    // A context of 0 is no model either.
    let mut md0 = md.clone();
    md0.retain(|(k, _)| k != "llama.context_length");
    md0.push(("llama.context_length".into(), MetaValue::U32(0)));
    let refs: Vec<(&str, MetaValue)> = md0.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    assert!(load_reason(&write_file(dir.path(), "m.gguf", &write(&refs, &tensors))).contains("context length: 0 is out of range"));
    // `convert` reads the same numbers through the same check.
    let out = dir.path().join("converted");
    let mut md = md.clone();
    md.retain(|(k, _)| k != "llama.embedding_length");
    md.push(("llama.embedding_length".into(), MetaValue::U64(huge)));
    let refs: Vec<(&str, MetaValue)> = md.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let p = write_file(dir.path(), "c.gguf", &write(&refs, &tensors));
    let err = mlx_serving_engine::formats::convert::gguf_to_mlx(&p, &out).err().unwrap().to_string();
    assert!(err.contains("hidden size"), "{err}");
}

#[test]
fn an_mlx_config_past_any_real_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("llama/mlx");
    for entry in std::fs::read_dir(&src).unwrap() {
        let e = entry.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let huge = 4_000_000_000u64;
    for (key, want) in [
        ("hidden_size", "hidden size"),
        ("head_dim", "head size"),
        ("max_position_embeddings", "context length"),
        ("num_hidden_layers", "layers"),
        ("intermediate_size", "feed-forward size"),
    ] {
        let mut c = config.clone();
        c[key] = huge.into();
        // A linear rope scaling would size its factors by the head size.
        c["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": 2.0});
        std::fs::write(dir.path().join("config.json"), c.to_string()).unwrap();
        let reason = load_reason(dir.path());
        assert!(reason.contains(want) && reason.contains("out of range"), "{key}: {reason}");
    }
}

/// Patches the little-endian u64 at `at`.
fn patch_u64(bytes: &mut [u8], at: usize, v: u64) {
    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn counts_just_under_the_file_size_reserve_nothing_for_them() {
    let dir = tempfile::tempdir().unwrap();
    let (md, tensors) = llama_parts();
    let refs: Vec<(&str, MetaValue)> = md.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let good = write(&refs, &tensors);
    // Tensor count at 8..16, metadata count at 16..24: each just under the
    // bytes left, as a bit flip in a large file makes them.
    for at in [8, 16] {
        let mut bad = good.clone();
        patch_u64(&mut bad, at, (good.len() - 25) as u64);
        let p = write_file(dir.path(), "m.gguf", &bad);
        let reason = match GgufFile::open(&p) {
            Err(EngineError::ModelLoad { reason, .. }) => reason,
            other => panic!("{other:?}"),
        };
        assert!(!reason.is_empty());
    }
}

#[test]
fn a_huge_number_array_costs_its_bytes_not_thirty_times_them() {
    let dir = tempfile::tempdir().unwrap();
    let n = 16 << 20;
    let bytes = write(&[("general.architecture", MetaValue::Str("llama".into())), ("junk", MetaValue::Packed(0, vec![7u8; n]))], &[]);
    let p = write_file(dir.path(), "m.gguf", &bytes);
    let g = GgufFile::open(&p).unwrap();
    match g.get("junk") {
        Some(MetaValue::Packed(0, b)) => assert_eq!(b.len(), n),
        other => panic!("{:?}", other.map(|_| ())),
    }
    // An array of scores reads back as numbers.
    let scores = write(&[("s", MetaValue::Packed(6, [1.5f32, -2.0].iter().flat_map(|x| x.to_le_bytes()).collect()))], &[]);
    let g = GgufFile::open(write_file(dir.path(), "s.gguf", &scores)).unwrap();
    assert_eq!(g.get("s").unwrap().numbers(), Some(vec![1.5, -2.0]));
}

#[test]
fn a_large_file_that_is_not_a_model_is_refused_before_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    // Sparse: 64 GiB that take no disk; reading it whole would need them in memory.
    let p = dir.path().join("big.gguf");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(64 << 30).unwrap();
    let t = Instant::now();
    assert_eq!(load_reason(&p), "not a GGUF file (bad magic)");
    assert!(t.elapsed().as_secs() < 5);
    let st = dir.path().join("model.safetensors");
    std::fs::File::create(&st).unwrap().set_len(64 << 30).unwrap();
    let err = mlx_serving_engine::formats::safetensors::SafeTensors::open(&st).err().unwrap().to_string();
    assert!(err.contains("not a safetensors file"), "{err}");
    assert!(LARGEST.load(Ordering::Relaxed) <= CAP);
}

#[test]
fn a_fifo_as_the_model_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("model.gguf");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string naming a path in a fresh directory.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    assert_eq!(load_reason(&fifo), "cannot open: not a regular file");
}
