//! Qwen3 MoE: Qwen3's attention (per-head query/key norms) with a sparse
//! feed-forward block: a router picks the top-k of the experts per token.
//! Layers without a router (`mlp_only_layers`) keep a dense MLP.
//!
//! Reference: mlx-lm's `models/qwen3_moe.py` (experts stacked as
//! `switch_mlp`), llama.cpp's `ffn_*_exps` tensors.

use super::decoder::{attention, default_options, mlp, pre_norm_layer, Decoder, Ffn, Mlp, Moe};
use super::weights::{layer, WeightSource};
use crate::error::EngineError;

pub fn load(src: &dyn WeightSource) -> Result<Decoder, EngineError> {
    let hp = src.hparams();
    if hp.n_experts == 0 {
        return Err(src.err("qwen3_moe needs num_experts / expert_count".into()));
    }
    let opts = default_options(src, false);
    let layers = (0..hp.n_layers)
        .map(|i| {
            let router = layer(i, "ffn_gate_inp", "mlp.gate");
            let ffn = if src.has(&router, "weight") {
                let (n, ff) = (hp.n_experts, hp.moe_ffn_dim);
                let exps = |gguf: &str, hf: &str, rows, cols| {
                    src.stacked(
                        &layer(i, gguf, &format!("mlp.switch_mlp.{hf}")),
                        n,
                        rows,
                        cols,
                    )
                };
                let gate = exps("ffn_gate_exps", "gate_proj", ff, hp.dim)?;
                let up = exps("ffn_up_exps", "up_proj", ff, hp.dim)?;
                let down = exps("ffn_down_exps", "down_proj", hp.dim, ff)?;
                let experts = gate
                    .into_iter()
                    .zip(up)
                    .zip(down)
                    .map(|((gate, up), down)| Mlp { gate, up, down })
                    .collect();
                Ffn::Moe(Moe {
                    router: src.matrix(&router, n, hp.dim)?,
                    experts,
                    top_k: hp.n_experts_used,
                    norm_topk: hp.norm_topk_prob,
                })
            } else {
                Ffn::Dense(mlp(src, i)?)
            };
            pre_norm_layer(src, i, attention(src, i, true, &opts)?, ffn, &opts)
        })
        .collect::<Result<_, EngineError>>()?;
    Decoder::new(src, opts, layers)
}
