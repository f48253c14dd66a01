/// The vector quantizer gives the scalar one's bits, ties and zeros too,
/// with scales per 32 and per 256.
#[test]
fn activation_quantizers_agree() {
    let mut x = rand_vec(256 * 3, 3);
    x[..32].fill(0.0);
    // Exact halves after scaling by 127 / 127.
    x[32..64].iter_mut().enumerate().for_each(|(i, v)| *v = if i == 0 { 127.0 } else { i as f32 - 15.5 });
    x[512..768].fill(0.0);
    let n = x.len() / QK;
    for group in [QK, QK_K] {
        let run = |f: fn(ActRowMut, usize)| {
            let (mut qs, mut d, mut s, mut sum16, mut bsum) = (vec![0i8; x.len()], vec![0.0; n], vec![0.0; n], vec![0; 2 * n], vec![0.0; n]);
            f(ActRowMut { x: &x, qs: &mut qs, d: &mut d, s: &mut s, sum16: &mut sum16, bsum: &mut bsum }, group);
            (qs, d, s, sum16, bsum)
        };
        assert_eq!(run(quantize_row_q8), run(quantize_row_q8_scalar), "groups of {group}");
    }
}

use super::*;

/// Deterministic values in [-1, 1) for kernel tests.
pub(crate) fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[test]
fn quantize_dequantize_round_trip_is_close() {
    let x = rand_vec(256, 1);
    for (qt, tol) in [(QType::Q4_0, 0.15), (QType::Q4_1, 0.08), (QType::Q8_0, 0.01), (QType::A8, 0.01), (QType::F16, 1e-3), (QType::BF16, 1e-2)] {
        let q = quantize_row(qt, &x);
        assert_eq!(q.len(), qt.row_bytes(x.len()));
        let mut y = vec![0.0; x.len()];
        dequantize_row(qt, &q, &mut y);
        let err = x.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(err < tol, "{qt:?} max error {err}");
    }
}

/// Random K-quant super-blocks with finite, small f16 scales.
pub(crate) fn random_k_row(qtype: QType, n_blocks: usize, seed: u64) -> Vec<u8> {
    let noise = rand_vec(n_blocks * qtype.block_bytes(), seed);
    let mut b: Vec<u8> = noise.iter().map(|v| ((v + 1.0) * 127.9) as u8).collect();
    for (i, blk) in b.chunks_exact_mut(qtype.block_bytes()).enumerate() {
        let d = f16::from_f32(0.01 * (1.0 + i as f32 * 0.1)).to_le_bytes();
        let at = if qtype == QType::Q6_K { 208 } else { 0 };
        blk[at..at + 2].copy_from_slice(&d);
        if matches!(qtype, QType::Q4_K | QType::Q5_K | QType::Q5_1) {
            blk[2..4].copy_from_slice(&f16::from_f32(0.003).to_le_bytes());
        }
    }
    b
}

#[test]
fn k_quants_dequantize_as_llama_cpp_does() {
    // Vectors from llama.cpp's Python package (scripts/kquant_vectors.py).
    let v: serde_json::Value = serde_json::from_str(include_str!("../../testdata/kquants.json")).unwrap();
    for qt in [QType::Q4_K, QType::Q5_K, QType::Q6_K, QType::Q5_0, QType::Q5_1] {
        let case = &v[qt.name()];
        let bytes: Vec<u8> = case["bytes"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u8).collect();
        let want: Vec<f32> = case["values"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        let mut got = vec![0.0; want.len()];
        dequantize_row(qt, &bytes, &mut got);
        assert_eq!(got, want, "{qt:?}");
    }
}

#[test]
fn k_quant_dot_matches_float_dot_of_dequantized_values() {
    let cols = 512;
    let x = rand_vec(cols, 5);
    for qt in [QType::Q4_K, QType::Q5_K, QType::Q6_K, QType::Q5_0, QType::Q5_1] {
        let mut acts = QuantizedActs::default();
        acts.quantize(&x, cols, qt.act_group());
        let xd: Vec<f32> = acts.qs.iter().enumerate().map(|(i, &q)| q as f32 * acts.d[i / QK]).collect();
        let w = random_k_row(qt, cols / qt.block_size(), 11);
        let mut wd = vec![0.0; cols];
        dequantize_row(qt, &w, &mut wd);
        // Against the dequantized weights times the (quantized) activations.
        let want: f32 = wd.iter().zip(&xd).map(|(a, b)| a * b).sum();
        let got = dot_scalar(qt, &w, acts.row(0));
        assert!((got - want).abs() <= 1e-3 * (1.0 + want.abs()), "{qt:?}: {got} vs {want}");
    }
}

#[test]
fn activation_rounding_is_half_to_even() {
    let mut acts = QuantizedActs::default();
    let mut x = vec![0.0f32; 32];
    x[0] = 127.0; // d = 1
    x[1] = 2.5;
    x[2] = -3.5;
    x[3] = 0.49999997;
    x[4] = -1.5;
    acts.quantize(&x, 32, QK);
    assert_eq!(&acts.qs[..5], &[127, 2, -4, 0, -2]);
}

#[test]
fn scalar_dot_matches_float_dot_of_dequantized_values() {
    let w = rand_vec(128, 2);
    let x = rand_vec(128, 3);
    let mut acts = QuantizedActs::default();
    acts.quantize(&x, 128, QK);
    for qt in [QType::Q4_0, QType::Q4_1, QType::Q8_0, QType::A8] {
        let q = quantize_row(qt, &w);
        let mut wd = vec![0.0; 128];
        dequantize_row(qt, &q, &mut wd);
        let reference: f32 = wd.iter().zip(&x).map(|(a, b)| a * b).sum();
        let got = dot_scalar(qt, &q, acts.row(0));
        assert!((got - reference).abs() < 0.05, "{qt:?}: {got} vs {reference}");
    }
}
