//! Gemma 2: norms after attention and after the MLP as well as before,
//! GeGLU (tanh GELU), embeddings scaled by sqrt(width), soft-capped
//! attention scores and logits, and a sliding window on every other layer
//! (even layers, as Hugging Face and llama.cpp apply it).
//!
//! Reference: mlx-lm's `models/gemma2.py` (which attends over the whole
//! context on every layer; the two agree while a sequence is shorter than
//! the window, 4096 in the released models).

use super::decoder::{attention, default_options, sandwich_layer, Activation, Decoder};
use super::weights::{Format, WeightSource};
use crate::error::EngineError;

pub fn load(src: &dyn WeightSource) -> Result<Decoder, EngineError> {
    let hp = src.hparams();
    let mut opts = default_options(src, false);
    opts.activation = Activation::GeluTanh;
    opts.embed_scale = Some((hp.dim as f32).sqrt());
    // Scores scale by query_pre_attn_scalar^-1/2; GGUF files do not carry it,
    // and llama.cpp derives it as the released models set it: the head size,
    // but width / heads for the 46-layer (27B) model.
    let pre_attn = match (hp.query_pre_attn_scalar, src.format()) {
        (Some(s), _) => s,
        (None, Format::Gguf) if hp.n_layers == 46 => (hp.dim / hp.n_heads) as f32,
        (None, _) => hp.head_dim as f32,
    };
    opts.attn_scale = 1.0 / pre_attn.sqrt();
    opts.attn_softcap = hp.attn_softcap;
    opts.final_softcap = hp.final_softcap;
    // Checkpoints store w for a norm by (1 + w); llama.cpp's converter adds the 1.
    opts.norm_offset = if src.format() == Format::Mlx {
        1.0
    } else {
        0.0
    };
    let layers = (0..hp.n_layers)
        .map(|i| {
            let mut attn = attention(src, i, false, &opts)?;
            attn.window = hp.sliding_window.filter(|_| i % 2 == 0);
            sandwich_layer(src, i, attn, &opts)
        })
        .collect::<Result<_, EngineError>>()?;
    Decoder::new(src, opts, layers)
}
