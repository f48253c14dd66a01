//! mlx-serving engine: GGUF loading, CPU kernels, model code, tokenizer,
//! sampler and the per-model engine thread. No napi here: the Node binding
//! is a thin crate on top, and everything below is tested with `cargo test`.

pub mod affine;
pub mod backend;
pub mod breaker;
pub mod canary;
pub mod chat;
pub mod config;
pub mod convert;
pub mod cpu;
pub mod engine;
pub mod error;
pub mod filebuf;
pub mod flags;
pub mod gguf;
pub mod kv;
pub mod metrics;
pub mod models;
pub mod qos;
pub mod safetensors;
pub mod quant;
pub mod request;
pub mod sampler;
pub mod speculative;
mod stop;
pub mod tokenizer;

#[cfg(test)]
mod leakcheck;

pub use error::{EngineError, Result};
pub use engine::{Engine, Event, GenerateRequest, Input, ModelInfo, RequestHandle, Stats};
