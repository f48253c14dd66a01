//! mlx-serving engine: GGUF loading, CPU kernels, model code, tokenizer,
//! sampler and the per-model engine thread. No napi here: the Node binding
//! is a thin crate on top, and everything below is tested with `cargo test`.

pub mod backend;
pub mod control;
pub mod engine;
pub mod error;
pub mod formats;
pub mod models;
pub mod request;
pub mod sampler;
pub mod text;

#[cfg(test)]
mod leakcheck;

pub use error::{EngineError, Result};
pub use engine::{Engine, Event, GenerateRequest, Input, ModelInfo, RequestHandle, Stats};
