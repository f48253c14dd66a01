//! Qwen2 (Qwen2, Qwen2.5): the llama layout with biases on the query, key
//! and value projections, rotating halves in both formats.
//!
//! Reference: mlx-lm's `models/qwen2.py`.

use super::decoder::{default_options, standard_layer, Decoder};
use super::weights::WeightSource;
use crate::error::EngineError;

pub fn load(src: &dyn WeightSource) -> Result<Decoder, EngineError> {
    let hp = src.hparams();
    let opts = default_options(src, false);
    let layers = (0..hp.n_layers)
        .map(|i| standard_layer(src, i, false, &opts))
        .collect::<Result<_, _>>()?;
    Decoder::new(src, opts, layers)
}
