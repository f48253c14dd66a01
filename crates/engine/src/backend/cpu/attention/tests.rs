use super::*;
use crate::formats::quant::tests::rand_vec;

fn paths() -> Vec<Path> {
    Isa::available().into_iter().map(|i| Path::for_isa(i, 64)).collect()
}

/// The same bits: every path keeps the scalar code's order of operations.
fn same(a: &[f32], b: &[f32]) {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(x.to_bits() == y.to_bits(), "element {i}: {x} vs {y}");
    }
}

fn close(a: &[f32], b: &[f32], tol: f32) {
    let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * scale, "element {i}: {x} vs {y}");
    }
}

#[test]
fn every_kernel_path_matches_the_plain_code() {
    for hd in [16, 64, 128] {
        for rows in [1, 2, 5, 6, 7, 13] {
            let n_keys: usize = 37;
            let stride = n_keys.next_multiple_of(KEYS);
            // Rows see 25.. keys, one more each, like a tile's tokens.
            let ends: Vec<usize> = (0..rows).map(|r| (25 + r).min(n_keys)).collect();
            let q = rand_vec(rows * hd, 1);
            let keys = rand_vec(stride * hd, 2);
            let v = rand_vec(stride * hd, 3);
            let mut w = rand_vec(rows * stride, 4);
            for (r, &e) in ends.iter().enumerate() {
                w[r * stride + e..(r + 1) * stride].fill(0.0);
            }
            let (mut s0, mut o0) = (vec![0.0; rows * stride], vec![0.0; rows * hd]);
            Path::Scalar.scores(&q, hd, &keys, &mut s0, stride, &ends);
            Path::Scalar.weighted_values(&w, stride, &ends, &v, hd, &mut o0);
            for path in paths() {
                let (mut s, mut o) = (vec![0.0; rows * stride], vec![0.0; rows * hd]);
                path.scores(&q, hd, &keys, &mut s, stride, &ends);
                path.weighted_values(&w, stride, &ends, &v, hd, &mut o);
                for (r, &e) in ends.iter().enumerate() {
                    same(&s[r * stride..r * stride + e], &s0[r * stride..r * stride + e]);
                }
                same(&o, &o0);
            }
        }
    }
}

#[test]
fn softmax_paths_agree() {
    for n in [1, 7, 8, 9, 37, 300] {
        let x: Vec<f32> = rand_vec(n, n as u64).iter().map(|v| v * 40.0).collect();
        let mut want = x.clone();
        Path::Scalar.softmax_to_f16(&mut want, 0.7);
        assert!((want.iter().sum::<f32>() - 1.0).abs() < 1e-2);
        for path in paths() {
            let mut got = x.clone();
            path.softmax_to_f16(&mut got, 0.7);
            same(&got, &want);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn the_exp_is_within_two_ulp_and_alike_on_both_paths() {
    use std::arch::x86_64::*;
    if !Isa::available().contains(&Isa::Avx2) {
        return;
    }
    for i in 0..20_000 {
        let x = -95.0 + i as f32 * 0.0052;
        // SAFETY: the CPU has AVX2 and FMA.
        let got = unsafe {
            let mut out = [0.0f32; 8];
            _mm256_storeu_ps(out.as_mut_ptr(), x86::exp8(_mm256_set1_ps(x)));
            out[0]
        };
        assert_eq!(got.to_bits(), exp(x).to_bits(), "e^{x}: the vector and scalar paths");
        let want = x.exp();
        if x < -87.0 {
            assert_eq!(got, 0.0, "e^{x}");
        } else {
            assert!((got - want).abs() <= 2.5e-7 * want, "e^{x}: {got} vs {want}");
        }
    }
}

/// Attention written the obvious way, one query head at a time.
fn reference(a: &AttnParams, q: &[f32], batch: &[BatchToken], kv: &KvStore, tables: &[&[BlockId]]) -> Vec<f32> {
    let (hd, bs) = (a.head_dim, kv.block_size());
    let group = a.n_heads / a.n_kv_heads;
    let read = |seq: usize, pos: usize, kvh: usize, values: bool| -> Vec<f32> {
        let (k, v) = kv.block(a.layer, tables[seq][pos / bs]);
        let kv_dim = k.len() / bs;
        (kvh * hd..(kvh + 1) * hd)
            .map(|i| if values { v[(pos % bs) * kv_dim + i] } else { k[i * bs + pos % bs] }.to_f32())
            .collect()
    };
    let round = |x: f32| f16::from_f32(x).to_f32();
    let mut out = vec![0.0; q.len()];
    for (t, bt) in batch.iter().enumerate() {
        let first = a.window.map_or(0, |w| (bt.pos + 1).saturating_sub(w));
        for h in 0..a.n_heads {
            let qh: Vec<f32> = q[(t * a.n_heads + h) * hd..][..hd].iter().map(|&x| round(x)).collect();
            let mut w: Vec<f32> = (first..=bt.pos)
                .map(|p| {
                    let s = read(bt.seq, p, h / group, false).iter().zip(&qh).map(|(k, q)| k * q).sum::<f32>() * a.scale;
                    a.softcap.map_or(s, |c| c * (s / c).tanh())
                })
                .collect();
            crate::models::ops::softmax(&mut w);
            let o = &mut out[(t * a.n_heads + h) * hd..][..hd];
            for (p, wp) in (first..=bt.pos).zip(&w) {
                o.iter_mut().zip(read(bt.seq, p, h / group, true)).for_each(|(o, v)| *o += round(*wp) * v);
            }
        }
    }
    out
}

/// Three sequences: a 40-token prefill chunk starting at 5 (tiles of 16,
/// 16 and 8), one decode token, and a 3-token chunk; blocks of 4 (less
/// than a panel) and of 16 (one panel per block).
#[test]
fn tiled_attention_matches_the_reference() {
    for bs in [4, 16] {
        tiled_attention_matches_the_reference_with_blocks_of(bs);
    }
}

fn tiled_attention_matches_the_reference_with_blocks_of(bs: usize) {
    let (n_heads, n_kv, hd) = (6, 2, 64);
    let kv_dim = n_kv * hd;
    let lens = [45usize, 20, 12];
    let mut kv = KvStore::new(1, kv_dim, bs, 64);
    let mut next = 0u32;
    let tables: Vec<Vec<BlockId>> = lens
        .iter()
        .map(|&n| (0..n.div_ceil(bs)).map(|_| {
            next += 1;
            next - 1
        }).collect())
        .collect();
    for (seq, &n) in lens.iter().enumerate() {
        for pos in 0..n {
            let k = rand_vec(kv_dim, (seq * 1000 + pos) as u64 * 2);
            let v = rand_vec(kv_dim, (seq * 1000 + pos) as u64 * 2 + 1);
            kv.write(0, &tables[seq], pos, &k, &v);
        }
    }
    let mut batch = Vec::new();
    let mut push = |seq, range: std::ops::Range<usize>| {
        batch.extend(range.map(|pos| BatchToken { token: 0, pos, seq, logits: false }));
    };
    push(0, 5..45);
    push(1, 19..20);
    push(2, 9..12);
    let tables: Vec<&[BlockId]> = tables.iter().map(|t| t.as_slice()).collect();
    let q = rand_vec(batch.len() * n_heads * hd, 99);
    for (window, softcap) in [(None, None), (Some(7), None), (None, Some(3.0))] {
        let a = AttnParams { layer: 0, n_heads, n_kv_heads: n_kv, head_dim: hd, scale: 0.3, softcap, window };
        let want = reference(&a, &q, &batch, &kv, &tables);
        let mut scalar = vec![f32::NAN; q.len()];
        attend_with(Isa::Scalar, &a, &q, &batch, &kv, &tables, &mut scalar);
        close(&scalar, &want, 2e-3);
        for isa in Isa::available() {
            let mut out = vec![f32::NAN; q.len()];
            attend_with(isa, &a, &q, &batch, &kv, &tables, &mut out);
            same(&out, &scalar);
        }
    }
}
