//! Phi-3: the llama layout with the query, key and value projections fused
//! into one matrix and the MLP's gate and up projections fused into another
//! (`[gate; up]`). The fused rows are split at load (no copy for GGUF).
//!
//! Reference: mlx-lm's `models/phi3.py`, llama.cpp's `attn_qkv` / `ffn_up`.

use super::decoder::{default_options, pre_norm_layer, Attention, Decoder, Ffn, Mlp};
use super::weights::{layer, slice_rows, WeightSource};
use crate::error::EngineError;

pub fn load(src: &dyn WeightSource) -> Result<Decoder, EngineError> {
    let hp = src.hparams();
    let opts = default_options(src, false);
    let (q_dim, kv_dim, ff) = (
        hp.n_heads * hp.head_dim,
        hp.n_kv_heads * hp.head_dim,
        hp.ffn_dim,
    );
    let layers = (0..hp.n_layers)
        .map(|i| {
            let qkv = src.matrix(
                &layer(i, "attn_qkv", "self_attn.qkv_proj"),
                q_dim + 2 * kv_dim,
                hp.dim,
            )?;
            let gate_up = src.matrix(&layer(i, "ffn_up", "mlp.gate_up_proj"), 2 * ff, hp.dim)?;
            let attn = Attention {
                wq: slice_rows(&qkv, 0, q_dim),
                wk: slice_rows(&qkv, q_dim, kv_dim),
                wv: slice_rows(&qkv, q_dim + kv_dim, kv_dim),
                wo: src.matrix(&layer(i, "attn_output", "self_attn.o_proj"), hp.dim, q_dim)?,
                bias: None,
                qk_norm: None,
                window: None,
                rope: 0,
            };
            let ffn = Ffn::Dense(Mlp {
                gate: slice_rows(&gate_up, 0, ff),
                up: slice_rows(&gate_up, ff, ff),
                down: src.matrix(&layer(i, "ffn_down", "mlp.down_proj"), hp.dim, ff)?,
            });
            pre_norm_layer(src, i, attn, ffn, &opts)
        })
        .collect::<Result<_, EngineError>>()?;
    Decoder::new(src, opts, layers)
}
