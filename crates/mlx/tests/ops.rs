//! Every operation against a plain Rust reference on random data, the MLX
//! affine weight format unpacked by hand, and errors as values. Without MLX
//! in the build the tests check that calls fail as unavailable (and fail
//! themselves when MLX_REQUIRED is set, as CI sets it).

use mlx_serving_mlx::*;

fn have_mlx() -> bool {
    if available() {
        return true;
    }
    assert!(std::env::var_os("MLX_REQUIRED").is_none(), "MLX_REQUIRED is set but MLX is unavailable: {:?}", unavailable_reason());
    assert!(matches!(Array::from_slice(&[1f32], &[1]), Err(MlxError::Unavailable(_))));
    false
}

fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "element {i}: got {g}, want {w}");
    }
}

/// a (m x k) times b^T (n x k).
fn matmul_t(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|t| a[i * k + t] * b[j * k + t]).sum();
        }
    }
    out
}

#[test]
fn arrays_round_trip_and_report_shape_and_type() {
    if !have_mlx() {
        return;
    }
    assert!(version().unwrap().starts_with("0."));
    let a = Array::from_slice(&[1f32, 2., 3., 4., 5., 6.], &[2, 3]).unwrap();
    assert_eq!(a.shape(), [2, 3]);
    assert_eq!(a.dtype(), Some(Dtype::F32));
    let t = a.transpose(&[1, 0]).unwrap();
    assert_eq!(t.to_vec_f32().unwrap(), [1., 4., 2., 5., 3., 6.]);
    let h = Array::from_slice(&[half::f16::from_f32(1.5), half::f16::from_f32(-2.0)], &[2]).unwrap();
    assert_eq!(h.to_vec_f32().unwrap(), [1.5, -2.0]);
    let s = a.slice(&[0, 1], &[2, 3]).unwrap();
    assert_eq!(s.to_vec_f32().unwrap(), [2., 3., 5., 6.]);
    let c = concatenate(&[&a, &a], 0).unwrap();
    assert_eq!(c.shape(), [4, 3]);
    let rows = a.take(&Array::from_slice(&[1u32, 1, 0], &[3]).unwrap(), 0).unwrap();
    assert_eq!(rows.to_vec_f32().unwrap(), [4., 5., 6., 4., 5., 6., 1., 2., 3.]);
    let x = Array::from_slice(&[-1f32, 0., 2.], &[3]).unwrap();
    let want: Vec<f32> = [-1f32, 0., 2.].iter().map(|v| v / (1.0 + (-v).exp())).collect();
    assert_close(&x.silu().unwrap().to_vec_f32().unwrap(), &want, 1e-6);
    assert_eq!(x.add(&x).unwrap().multiply(&x).unwrap().to_vec_f32().unwrap(), [2., 0., 8.]);
}

#[test]
fn errors_are_values_and_the_process_carries_on() {
    if !have_mlx() {
        return;
    }
    let a = Array::from_slice(&rand(4, 1), &[2, 2]).unwrap();
    let b = Array::from_slice(&rand(9, 2), &[3, 3]).unwrap();
    let MlxError::Mlx(msg) = a.matmul(&b).unwrap_err() else { panic!("expected an MLX error") };
    assert!(msg.contains("matmul"), "{msg}");
    assert!(matches!(Array::from_slice(&[1f32, 2.], &[3]), Err(MlxError::Invalid(_))));
    assert!(a.reshape(&[5]).is_err());
    assert!(QuantizedWeight::quantize(&a, 32, 3).is_err() || QuantizedWeight::quantize(&a, 32, 4).is_err());
    // Still working afterwards.
    assert_eq!(a.matmul(&a).unwrap().shape(), [2, 2]);
}

#[test]
fn matmul_matches_the_reference() {
    if !have_mlx() {
        return;
    }
    let (m, k, n) = (5, 33, 7);
    let (a, b) = (rand(m * k, 3), rand(n * k, 4));
    let got = Array::from_slice(&a, &[m, k]).unwrap().matmul(&Array::from_slice(&b, &[n, k]).unwrap().transpose(&[1, 0]).unwrap()).unwrap();
    assert_close(&got.to_vec_f32().unwrap(), &matmul_t(&a, &b, m, k, n), 1e-4);
}

/// Dequantizes MLX affine weights by hand: row-major u32 words holding
/// `bits`-bit values from the lowest bits up; value = scale * q + bias per group.
fn dequantize(q: &QuantizedWeight, rows: usize, cols: usize) -> Vec<f32> {
    let words: Vec<u32> = q.w.to_vec().unwrap();
    let scales = q.scales.to_vec_f32().unwrap();
    let biases = q.biases.to_vec_f32().unwrap();
    let per_word = 32 / q.bits;
    let mask = (1u32 << q.bits) - 1;
    (0..rows * cols)
        .map(|i| {
            let v = (words[i / per_word] >> ((i % per_word) * q.bits)) & mask;
            let g = i / q.group_size;
            scales[g] * v as f32 + biases[g]
        })
        .collect()
}

#[test]
fn quantized_matmul_matches_the_weights_unpacked_by_hand() {
    if !have_mlx() {
        return;
    }
    let (m, k, n) = (3, 128, 48);
    let x = rand(m * k, 5);
    let w = rand(n * k, 6);
    for (group, bits) in [(32, 4), (64, 4), (128, 4), (64, 8), (32, 8)] {
        let q = QuantizedWeight::quantize(&Array::from_slice(&w, &[n, k]).unwrap(), group, bits).unwrap();
        assert_eq!(q.w.shape(), [n, k * bits / 32]);
        assert_eq!(q.scales.shape(), [n, k / group]);
        let deq = dequantize(&q, n, k);
        // Quantization error stays within half a step of each group.
        let step = 2.0 / ((1 << bits) - 1) as f32;
        assert_close(&deq, &w, step);
        let got = q.matmul(&Array::from_slice(&x, &[m, k]).unwrap()).unwrap();
        assert_close(&got.to_vec_f32().unwrap(), &matmul_t(&x, &deq, m, k, n), 1e-3);
    }
}

#[test]
fn rms_norm_matches_the_reference() {
    if !have_mlx() {
        return;
    }
    let (rows, d) = (3, 40);
    let (x, w) = (rand(rows * d, 7), rand(d, 8));
    let got = rms_norm(&Array::from_slice(&x, &[rows, d]).unwrap(), Some(&Array::from_slice(&w, &[d]).unwrap()), 1e-5).unwrap();
    let want: Vec<f32> = x
        .chunks(d)
        .flat_map(|r| {
            let inv = 1.0 / (r.iter().map(|v| v * v).sum::<f32>() / d as f32 + 1e-5).sqrt();
            r.iter().zip(&w).map(move |(v, g)| v * inv * g)
        })
        .collect();
    assert_close(&got.to_vec_f32().unwrap(), &want, 1e-5);
}

#[test]
fn rope_matches_the_reference_in_both_layouts() {
    if !have_mlx() {
        return;
    }
    let (heads, seq, d, base, offset) = (2, 5, 16, 10000f32, 3);
    let x = rand(heads * seq * d, 9);
    for traditional in [true, false] {
        let got = rope(&Array::from_slice(&x, &[1, heads, seq, d]).unwrap(), d, traditional, base, 1.0, offset).unwrap();
        let mut want = x.clone();
        for h in 0..heads {
            for p in 0..seq {
                let row = &mut want[(h * seq + p) * d..][..d];
                for i in 0..d / 2 {
                    let theta = (offset + p) as f32 * base.powf(-2.0 * i as f32 / d as f32);
                    let (a, b) = if traditional { (2 * i, 2 * i + 1) } else { (i, i + d / 2) };
                    let (xa, xb) = (row[a], row[b]);
                    row[a] = xa * theta.cos() - xb * theta.sin();
                    row[b] = xa * theta.sin() + xb * theta.cos();
                }
            }
        }
        assert_close(&got.to_vec_f32().unwrap(), &want, 1e-4);
        // Per-token positions (tokens of several sequences in one batch),
        // with frequencies given as periods.
        let positions = [7i32, 0, 3, 12, 5];
        let inv: Vec<f32> = (0..d / 2).map(|i| base.powf(-2.0 * i as f32 / d as f32) * if i % 3 == 0 { 0.5 } else { 1.0 }).collect();
        let periods: Vec<f32> = inv.iter().map(|f| 1.0 / f).collect();
        let xt = Array::from_slice(&x[..seq * heads * d], &[seq, heads, 1, d]).unwrap();
        let got = rope_at(&xt, traditional, &Array::from_slice(&positions, &[seq]).unwrap(), &Array::from_slice(&periods, &[d / 2]).unwrap()).unwrap();
        let mut want = x[..seq * heads * d].to_vec();
        for (t, &p) in positions.iter().enumerate() {
            for h in 0..heads {
                let row = &mut want[(t * heads + h) * d..][..d];
                for (i, f) in inv.iter().enumerate() {
                    let theta = p as f32 * f;
                    let (a, b) = if traditional { (2 * i, 2 * i + 1) } else { (i, i + d / 2) };
                    let (xa, xb) = (row[a], row[b]);
                    row[a] = xa * theta.cos() - xb * theta.sin();
                    row[b] = xa * theta.sin() + xb * theta.cos();
                }
            }
        }
        assert_close(&got.to_vec_f32().unwrap(), &want, 1e-4);
    }
}

/// Attention by hand over (heads, positions, d) arrays: query `i` of `l`
/// sees key `j` of `s` when `sees(i, j)`.
#[allow(clippy::too_many_arguments)]
fn attention_reference(q: &[f32], k: &[f32], v: &[f32], hq: usize, hkv: usize, l: usize, s: usize, d: usize, scale: f32, sees: impl Fn(usize, usize) -> bool) -> Vec<f32> {
    let mut want = vec![0f32; hq * l * d];
    for h in 0..hq {
        let g = h / (hq / hkv);
        for i in 0..l {
            let qi = &q[(h * l + i) * d..][..d];
            let scores: Vec<f32> = (0..s).map(|j| if sees(i, j) { qi.iter().zip(&k[(g * s + j) * d..][..d]).map(|(a, b)| a * b).sum::<f32>() * scale } else { f32::NEG_INFINITY }).collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = scores.iter().map(|x| (x - max).exp()).collect();
            let z: f32 = e.iter().sum();
            for (j, w) in e.iter().enumerate() {
                for t in 0..d {
                    want[(h * l + i) * d + t] += w / z * v[(g * s + j) * d + t];
                }
            }
        }
    }
    want
}

#[test]
fn attention_matches_the_reference_with_grouped_heads_and_a_causal_mask() {
    if !have_mlx() {
        return;
    }
    let (hq, hkv, d) = (4, 2, 8);
    let scale = 1.0 / (d as f32).sqrt();
    let arr = |data: &[f32], h: usize, n: usize| Array::from_slice(data, &[1, h, n, d]).unwrap();
    // Queries for the last `l` of `s` positions (a chunk after cached keys).
    for (l, s, causal) in [(5, 5, true), (2, 6, true), (1, 6, false)] {
        let (q, k, v) = (rand(hq * l * d, 10), rand(hkv * s * d, 11), rand(hkv * s * d, 12));
        let got = scaled_dot_product_attention(&arr(&q, hq, l), &arr(&k, hkv, s), &arr(&v, hkv, s), scale, causal).unwrap();
        let want = attention_reference(&q, &k, &v, hq, hkv, l, s, d, scale, |i, j| !causal || j <= s - l + i);
        assert_close(&got.to_vec_f32().unwrap(), &want, 1e-4);
    }
    // An additive mask: a sliding window of 3 over a causal chunk.
    let (l, s) = (3, 7);
    let (q, k, v) = (rand(hq * l * d, 13), rand(hkv * s * d, 14), rand(hkv * s * d, 15));
    let sees = |i: usize, j: usize| j <= s - l + i && j + 3 > s - l + i;
    let mask: Vec<f32> = (0..l * s).map(|x| if sees(x / s, x % s) { 0.0 } else { f32::NEG_INFINITY }).collect();
    let got = scaled_dot_product_attention_masked(&arr(&q, hq, l), &arr(&k, hkv, s), &arr(&v, hkv, s), scale, &Array::from_slice(&mask, &[l, s]).unwrap()).unwrap();
    assert_close(&got.to_vec_f32().unwrap(), &attention_reference(&q, &k, &v, hq, hkv, l, s, d, scale, sees), 1e-4);
}

#[test]
fn elementwise_ops_match_the_reference() {
    if !have_mlx() {
        return;
    }
    let (a, b) = (rand(24, 16), rand(24, 17));
    let (x, y) = (Array::from_slice(&a, &[4, 6]).unwrap(), Array::from_slice(&b, &[4, 6]).unwrap());
    let each = |f: fn(f32, f32) -> f32| -> Vec<f32> { a.iter().zip(&b).map(|(&p, &q)| f(p, q)).collect() };
    assert_close(&x.subtract(&y).unwrap().to_vec_f32().unwrap(), &each(|p, q| p - q), 1e-6);
    assert_close(&x.tanh().unwrap().to_vec_f32().unwrap(), &each(|p, _| p.tanh()), 1e-5);
    let gelu = |p: f32, _| 0.5 * p * (1.0 + (0.797_884_6 * (p + 0.044715 * p * p * p)).tanh());
    assert_close(&x.gelu_tanh().unwrap().to_vec_f32().unwrap(), &each(gelu), 1e-5);
    assert_close(&x.multiply(&Array::scalar(3.0).unwrap()).unwrap().to_vec_f32().unwrap(), &each(|p, _| 3.0 * p), 1e-6);
    let soft: Vec<f32> = a
        .chunks(6)
        .flat_map(|r| {
            let z: f32 = r.iter().map(|v| v.exp()).sum();
            r.iter().map(move |v| v.exp() / z)
        })
        .collect();
    assert_close(&x.softmax().unwrap().to_vec_f32().unwrap(), &soft, 1e-5);
    assert_eq!(Array::zeros(&[2, 3], Dtype::F16).unwrap().to_vec_f32().unwrap(), [0.0; 6]);
}

#[test]
fn scatter_rows_replaces_the_named_rows_and_dequantize_inverts_quantize() {
    if !have_mlx() {
        return;
    }
    let cache = Array::zeros(&[5, 2], Dtype::F16).unwrap();
    let rows = Array::from_slice(&[1f32, 2., 3., 4.], &[2, 2]).unwrap();
    let at = Array::from_slice(&[3i32, 0], &[2]).unwrap();
    let cache = cache.scatter_rows(&at, &rows).unwrap();
    assert_eq!(cache.dtype(), Some(Dtype::F16));
    assert_eq!(cache.to_vec_f32().unwrap(), [3., 4., 0., 0., 0., 0., 1., 2., 0., 0.]);
    assert!(cache.scatter_rows(&at, &Array::from_slice(&[1f32; 6], &[2, 3]).unwrap()).is_err());
    let (n, k) = (6, 64);
    let q = QuantizedWeight::quantize(&Array::from_slice(&rand(n * k, 18), &[n, k]).unwrap(), 32, 4).unwrap();
    let by_hand = dequantize(&q, n, k);
    assert_close(&q.dequantize(None).unwrap().to_vec_f32().unwrap(), &by_hand, 1e-3);
    let picked = q.dequantize(Some(&Array::from_slice(&[4i32, 1], &[2]).unwrap())).unwrap();
    let want: Vec<f32> = [4, 1].iter().flat_map(|&r| by_hand[r * k..(r + 1) * k].to_vec()).collect();
    assert_close(&picked.to_vec_f32().unwrap(), &want, 1e-3);
}

#[test]
fn slice_update_writes_rows_in_place_of_others() {
    if !have_mlx() {
        return;
    }
    let cache = Array::from_slice(&[0f32; 12], &[4, 3]).unwrap();
    let rows = Array::from_slice(&[1f32, 2., 3., 4., 5., 6.], &[2, 3]).unwrap();
    let cache = cache.slice_update(&rows, &[1, 0], &[3, 3]).unwrap();
    assert_eq!(cache.to_vec_f32().unwrap(), [0., 0., 0., 1., 2., 3., 4., 5., 6., 0., 0., 0.]);
    assert!(cache.slice_update(&rows, &[3, 0], &[5, 3]).and_then(|a| a.to_vec_f32()).is_err());
}
