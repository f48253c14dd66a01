use super::*;
use crate::formats::quant::quantize_row;
use crate::formats::quant::tests::rand_vec;

/// Random weights: quantized rows, or random K-quant and Q5 blocks (those are
/// read from files, never written).
fn matrix(qtype: QType, rows: usize, cols: usize, seed: u64) -> QMatrix {
    use crate::formats::quant::tests::random_k_row;
    let data = match qtype {
        QType::Q4_K | QType::Q5_K | QType::Q6_K | QType::Q5_0 | QType::Q5_1 => (0..rows).flat_map(|r| random_k_row(qtype, cols / qtype.block_size(), seed + r as u64)).collect(),
        _ => rand_vec(rows * cols, seed).chunks(cols).flat_map(|r| quantize_row(qtype, r)).collect(),
    };
    QMatrix::new(qtype, rows, cols, Bytes::Owned(data))
}

/// `w` times `n` random tokens on every path this CPU has gives the scalar
/// reference's bits: every kernel keeps `dot_scalar`'s order of operations.
fn assert_paths_agree(w: &QMatrix, n: usize) {
    let x = rand_vec(n * w.cols, 99);
    let mut xq = QuantizedActs::default();
    let mut want = vec![0.0; n * w.rows];
    matmul_with(Isa::Scalar, w, &x, &mut xq, &mut want);
    for isa in Isa::available() {
        let mut got = vec![0.0; n * w.rows];
        matmul_with(isa, w, &x, &mut xq, &mut got);
        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
            assert!(g.to_bits() == e.to_bits(), "{isa:?} {:?} {:?} {}x{} x {n}, output {i}: {g} vs {e}", w.qtype, w.layout, w.rows, w.cols);
        }
    }
}

#[test]
fn every_simd_path_matches_the_scalar_reference() {
    for qtype in [QType::Q4_0, QType::Q4_1, QType::Q8_0, QType::A8] {
        // Odd sizes: a single block, a non-power-of-two block count, and
        // an output count that does not split evenly across workers.
        // Every tile width (1-8 tokens in one pass) and tiles of 4 beyond
        // that; from 4 tokens on, groups of 8 rows plus the rows left over.
        // From 32 tokens (the 8-bit formats, `amx::min_tokens`): AMX tiles
        // where granted for each full group of 16, the rest on vectors.
        for (rows, cols, n) in [(1, 32, 1), (37, 96, 3), (130, 576, 1), (65, 1536, 5), (33, 64, 6), (33, 64, 7), (33, 64, 8), (19, 64, 11), (24, 96, 4), (130, 576, 8), (48, 96, 16), (37, 64, 37)] {
            // In every layout (the kernels' own, or rows gathered for the one-row tile).
            for layout in Layout::ALL {
                assert_paths_agree(&matrix(qtype, rows, cols, rows as u64 * 7 + cols as u64).into_layout(layout), n);
            }
        }
    }
}

/// The engine promises a request the same output alone and batched:
/// each token's products must be bit-identical whatever else is in the
/// batch, on every path.
#[test]
fn a_tokens_result_does_not_depend_on_its_batch() {
    for qtype in [QType::Q4_0, QType::Q4_1, QType::Q5_0, QType::Q5_1, QType::Q8_0, QType::A8, QType::Q4_K, QType::Q5_K, QType::Q6_K] {
        // 70 tokens: four groups of 16 on AMX tiles where granted (every
        // tile format's `amx::min_tokens`), 6 on vectors.
        let (rows, cols, n) = (70, 256, 70);
        let x = rand_vec(n * cols, 5);
        let mut xq = QuantizedActs::default();
        for (isa, w) in Isa::available().into_iter().flat_map(|isa| Layout::ALL.map(|l| (isa, matrix(qtype, rows, cols, 3).into_layout(l)))) {
            let mut batch = vec![0.0; n * rows];
            matmul_with(isa, &w, &x, &mut xq, &mut batch);
            for t in 0..n {
                let mut alone = vec![0.0; rows];
                matmul_with(isa, &w, &x[t * cols..(t + 1) * cols], &mut xq, &mut alone);
                assert_eq!(alone, batch[t * rows..(t + 1) * rows], "{isa:?} {qtype:?} token {t}");
            }
        }
    }
}

/// Panels are the rows rearranged in place, in owned and in file
/// bytes alike, and every row reads back as it was.
#[test]
fn panels_keep_every_row() {
    for (qtype, rows) in [(QType::Q4_0, 21), (QType::Q4_1, 16), (QType::Q4_1, 5), (QType::Q8_0, 37)] {
        let cols = 96;
        let plain = matrix(qtype, rows, cols, 11);
        let bytes = plain.data.as_slice().to_vec();
        let file = Arc::new(FileBuf::from_bytes(&[&[7u8; 64][..], &bytes, &[9u8; 64]].concat()));
        let in_file = QMatrix::new(qtype, rows, cols, Bytes::File { file: file.clone(), offset: 64, len: bytes.len() });
        for m in [QMatrix::new(qtype, rows, cols, Bytes::Owned(bytes.clone())).into_panels(), in_file.into_panels()] {
            let want = Layout::for_kernels(Isa::detect(), qtype);
            assert_eq!(m.layout, if rows >= want.group() { want } else { Layout::Rows }, "{qtype:?} {rows}");
            for r in 0..rows {
                assert_eq!(m.row(r), plain.row(r), "{qtype:?} row {r} of {rows}");
            }
            let mut got = vec![0.0; cols];
            let mut want = vec![0.0; cols];
            m.dequantize_row_into(rows - 1, &mut got);
            plain.dequantize_row_into(rows - 1, &mut want);
            assert_eq!(got, want);
        }
        // The bytes around the tensor are untouched.
        assert!(file[..64].iter().all(|&b| b == 7) && file[64 + bytes.len()..].iter().all(|&b| b == 9));
    }
}

#[test]
fn k_quant_paths_match_the_scalar_reference() {
    use crate::formats::quant::tests::random_k_row;
    for qtype in [QType::Q4_K, QType::Q5_K, QType::Q6_K, QType::Q5_0, QType::Q5_1] {
        for (rows, cols, n) in [(1, 256, 1), (37, 512, 3), (20, 768, 9), (9, 256, 7), (33, 512, 21), (16, 768, 48), (16, 768, 70)] {
            let data: Vec<u8> = (0..rows).flat_map(|r| random_k_row(qtype, cols / qtype.block_size(), r as u64 + 1)).collect();
            for layout in Layout::ALL {
                assert_paths_agree(&QMatrix::new(qtype, rows, cols, Bytes::Owned(data.clone())).into_layout(layout), n);
            }
        }
    }
}

/// The override takes the documented names (and the older spelling) and
/// refuses the rest. Only values that leave `detect` at the best path
/// are set, since tests share the process.
#[test]
fn the_isa_override_refuses_unknown_names() {
    let best = Isa::best();
    for (value, ok) in [(best.name().to_owned(), true), (best.name().replace('-', ""), true), ("avx512vnnii".into(), false), ("".into(), false)] {
        match Isa::parse(&value) {
            Ok(isa) => assert!(ok && isa == best, "{value:?} gave {isa:?}"),
            Err(e) => assert!(!ok && e.to_string().contains("known: scalar, avx2, avx512-vnni, amx"), "{value:?}: {e}"),
        }
    }
    // AMX: taken where granted, refused with the reason elsewhere.
    match Isa::parse("amx") {
        Ok(isa) => assert!(isa == Isa::Amx && Isa::available().contains(&Isa::Amx)),
        Err(e) => assert!(!Isa::available().contains(&Isa::Amx) && e.to_string().contains("amx"), "{e}"),
    }
}

#[test]
fn f16_widening_matches_scalar() {
    for n in [1, 7, 8, 64, 70] {
        let src: Vec<f16> = rand_vec(n, 2).iter().map(|&v| f16::from_f32(v)).collect();
        let mut dst = vec![0.0; n];
        f16_to_f32(&src, &mut dst);
        assert!(src.iter().zip(&dst).all(|(a, b)| a.to_f32() == *b));
    }
}

#[test]
fn float_matrices_use_an_exact_path() {
    for qtype in [QType::F32, QType::F16, QType::BF16] {
        let w = matrix(qtype, 9, 64, 5);
        let x = rand_vec(2 * 64, 6);
        let mut out = vec![0.0; 18];
        matmul(&w, &x, &mut QuantizedActs::default(), &mut out);
        let mut row = vec![0.0; 64];
        for r in 0..9 {
            w.dequantize_row_into(r, &mut row);
            for t in 0..2 {
                let e: f32 = row.iter().zip(&x[t * 64..]).map(|(a, b)| a * b).sum();
                assert!((out[t * 9 + r] - e).abs() < 1e-4);
            }
        }
    }
}


/// Matrices that share an input (q, k and v) run as one: each output has
/// the bits of its `matmul` alone, on every path, whether their formats
/// quantize the input alike (Q4_K and Q6_K), differently (Q4_0 and Q6_K)
/// or not at all (f16), and with AMX tiles for some tokens (70).
#[test]
fn matrices_sharing_an_input_match_each_alone() {
    let cols = 512;
    for qtypes in [[QType::Q4_K, QType::Q6_K, QType::Q6_K], [QType::Q4_0, QType::Q6_K, QType::Q8_0], [QType::Q4_1, QType::F16, QType::Q4_1]] {
        for n in [1, 5, 37, 70] {
            let x = rand_vec(n * cols, 17);
            let mut xq = QuantizedActs::default();
            for isa in Isa::available() {
                let ws: Vec<QMatrix> = qtypes.iter().zip([64, 35, 16]).map(|(&q, rows)| matrix(q, rows, cols, rows as u64).into_layout(Layout::for_kernels(isa, q))).collect();
                let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![0.0; n * w.rows]).collect();
                let mut slices: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
                matmul_many_with(isa, &ws.iter().collect::<Vec<_>>(), &x, &mut xq, &mut slices);
                for (w, got) in ws.iter().zip(&outs) {
                    let mut alone = vec![0.0; n * w.rows];
                    matmul_with(isa, w, &x, &mut xq, &mut alone);
                    assert!(alone.iter().zip(got).all(|(a, b)| a.to_bits() == b.to_bits()), "{isa:?} {:?} in {qtypes:?} x {n}", w.qtype);
                }
            }
        }
    }
}
