//! Qwen3 (dense): the llama layout with a per-head RMSNorm of queries and
//! keys before rotation, and an explicit head size.
//!
//! Reference: mlx-lm's `models/qwen3.py`.

use super::decoder::{default_options, standard_layer, Decoder};
use super::weights::WeightSource;
use crate::error::EngineError;

pub fn load(src: &dyn WeightSource) -> Result<Decoder, EngineError> {
    let hp = src.hparams();
    let opts = default_options(src, false);
    let layers = (0..hp.n_layers)
        .map(|i| standard_layer(src, i, true, &opts))
        .collect::<Result<_, _>>()?;
    Decoder::new(src, opts, layers)
}
