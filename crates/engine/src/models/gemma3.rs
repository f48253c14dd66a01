//! Gemma 3 (text): Gemma 2's layer (norms before and after attention and
//! the MLP, GeGLU, embeddings scaled by sqrt(width)) with a per-head RMSNorm
//! of queries and keys, no soft-capping, and sliding-window attention on
//! five layers of every six: local layers rotate with their own base
//! (10,000) and a window of `sliding_window` positions, every sixth layer
//! attends globally with the model's rope base and scaling.
//!
//! Reference: mlx-lm's `models/gemma3_text.py` and llama.cpp's gemma3 graph.

use super::decoder::{attention, default_options, sandwich_layer, Activation, Decoder};
use super::weights::{Format, WeightSource};
use crate::error::EngineError;

/// Every sixth layer is global, the rest slide (the released models; GGUF
/// files do not carry the pattern).
const PATTERN: usize = 6;
/// The rope base of local layers when the source does not give one.
const LOCAL_ROPE_THETA: f32 = 10_000.0;
/// The model with 62 layers (27B) scales scores by width / heads.
const LAYERS_27B: usize = 62;

pub fn load(src: &dyn WeightSource) -> Result<Decoder, EngineError> {
    let hp = src.hparams();
    let mut opts = default_options(src, false);
    opts.activation = Activation::GeluTanh;
    opts.embed_scale = Some((hp.dim as f32).sqrt());
    let pre_attn = match hp.query_pre_attn_scalar {
        Some(s) => s,
        None if hp.n_layers == LAYERS_27B => (hp.dim / hp.n_heads) as f32,
        None => hp.head_dim as f32,
    };
    opts.attn_scale = 1.0 / pre_attn.sqrt();
    // Checkpoints store w for a norm by (1 + w); llama.cpp's converter adds the 1.
    opts.norm_offset = if src.format() == Format::Mlx { 1.0 } else { 0.0 };
    opts.local_rope_theta = Some(hp.rope_local_theta.unwrap_or(LOCAL_ROPE_THETA));
    let slides = |i: usize| match &hp.sliding_layers {
        Some(s) => s[i],
        None => (i + 1) % PATTERN != 0,
    };
    let layers = (0..hp.n_layers)
        .map(|i| {
            let mut attn = attention(src, i, true, &opts)?;
            if slides(i) {
                attn.window = hp.sliding_window;
                attn.rope = 1;
            }
            sandwich_layer(src, i, attn, &opts)
        })
        .collect::<Result<_, EngineError>>()?;
    Decoder::new(src, opts, layers)
}
