//! The same logits on every kernel path this CPU has (`scalar`, `avx2`,
//! `avx512-vnni`, `amx`): a user's greedy output must not depend on the
//! host's instruction set. The path is chosen once per process
//! (`MLX_SERVING_ISA`), so the test runs itself once per path in a child
//! process that writes its logits, and compares them here.
//!
//! What is compared: a forward pass over a prompt (the prompt's last
//! logits), then decode steps token by token, on the default model and,
//! where present, the synthetic files of real sizes that use other block
//! formats.

use std::path::{Path, PathBuf};
use std::process::Command;

use mlx_serving_engine::backend::cpu::kernels::Isa;
use mlx_serving_engine::backend::BackendKind;
use mlx_serving_engine::models::{open_on, BatchToken};

const CHILD: &str = "KERNEL_PATHS_OUT";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The models compared: the default model (Q4_1, a Q8_0 output layer), the
/// synthetic files of real shapes where `scripts/make_synthetic.py` wrote
/// them (Q4_0, Q4_K, Q6_K), and any named in `KERNEL_PATHS_MODELS`
/// (separated by `:`; e.g. Gemma 3 270M from `npx mlx-serving pull
/// gemma3-270m`, with Q5_0 and a head size of 256).
fn models() -> Vec<PathBuf> {
    let mut m = vec![root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf")];
    m.extend(["llama-1b-q4_0.gguf", "llama-1b-q4_k_m.gguf"].iter().map(|f| root().join("models/synthetic").join(f)).filter(|p| p.exists()));
    m.extend(std::env::var("KERNEL_PATHS_MODELS").unwrap_or_default().split(':').filter(|p| !p.is_empty()).map(PathBuf::from));
    m
}

/// Last-position logits of a 70-token prompt (64 tokens on AMX tiles where
/// granted, for every format they take), then of 4 decode steps.
fn logits(path: &Path) -> Vec<f32> {
    let m = open_on(path, BackendKind::Cpu).expect("model loads").model;
    let vocab = m.config().vocab_size as u32;
    let prompt: Vec<u32> = (0..70u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let mut kv = m.new_kv_store(16, 5);
    let table = [0u32, 1, 2, 3, 4];
    let batch: Vec<_> = prompt.iter().enumerate().map(|(pos, &token)| BatchToken { token, pos, seq: 0, logits: pos + 1 == prompt.len() }).collect();
    let mut out = m.forward(&batch, &mut kv, &[&table]).unwrap();
    for i in 0..4 {
        let bt = BatchToken { token: (i * 31 + 5) % vocab, pos: prompt.len() + i as usize, seq: 0, logits: true };
        out.extend(m.forward(&[bt], &mut kv, &[&table]).unwrap());
    }
    out
}

#[test]
fn every_kernel_path_gives_the_same_logits() {
    if let Ok(out) = std::env::var(CHILD) {
        let all: Vec<f32> = models().iter().flat_map(|m| logits(m)).collect();
        std::fs::write(out, all.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run = |isa: Isa| -> Vec<f32> {
        let out = dir.path().join(isa.name());
        let status = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "every_kernel_path_gives_the_same_logits", "--test-threads=1"])
            .env(CHILD, &out)
            .env("MLX_SERVING_ISA", isa.name())
            .status()
            .unwrap();
        assert!(status.success(), "{} child failed", isa.name());
        std::fs::read(&out).unwrap().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    };
    let paths = Isa::available();
    let want = run(Isa::Scalar);
    eprintln!("paths compared with scalar: {:?}", paths.iter().map(|i| i.name()).collect::<Vec<_>>());
    for &isa in &paths[1..] {
        let got = run(isa);
        assert_eq!(got.len(), want.len());
        let differ = got.iter().zip(&want).filter(|(g, w)| g.to_bits() != w.to_bits()).count();
        let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
        assert!(differ == 0, "{}: {differ} of {} logits differ from the scalar path's, by up to {worst}", isa.name(), want.len());
    }
}
