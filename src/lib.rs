//! Node binding for the mlx-serving engine. Thin by design: it converts
//! arguments, turns engine events into JS objects behind awaitable streams,
//! and maps `EngineError` to stable codes. The TypeScript layer (`lib/`)
//! builds the public API on top.

mod control;
mod engine;
mod generate;
mod models;
mod server;

use mlx_serving_engine::backend::BackendKind;
use mlx_serving_engine::backend::cpu::kernels::Isa;
use mlx_serving_engine::EngineError;
use napi::bindgen_prelude::*;
use napi::tokio;
use napi_derive::napi;

/// The one mapping from engine errors to JS errors: the message starts with
/// the stable code, which the TypeScript layer lifts into `error.code`.
pub(crate) fn js_error(e: EngineError) -> Error {
    Error::new(Status::GenericFailure, format!("{}: {e}", e.code()))
}

pub(crate) fn invalid(msg: String) -> Error {
    js_error(EngineError::InvalidParams(msg))
}

/// A millisecond count from JS: finite and non-negative.
pub(crate) fn ms_option(name: &str, v: Option<f64>) -> Result<Option<u64>> {
    match v {
        None => Ok(None),
        // Up, so a fraction of a millisecond is not 0 (no limit, or refused).
        Some(x) if x.is_finite() && x >= 0.0 => Ok(Some(x.ceil() as u64)),
        Some(x) => Err(invalid(format!("{name} must be a non-negative number of milliseconds, got {x}"))),
    }
}

pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> std::result::Result<T, EngineError> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| js_error(EngineError::Internal(format!("worker task failed: {e}"))))?
        .map_err(js_error)
}

#[napi(object)]
pub struct NativeRuntimeInfo {
    pub version: String,
    pub backend: String,
    pub isa: String,
    /// Why prompts do not run on AMX tiles (absent where they do).
    pub amx: Option<String>,
    pub threads: u32,
    pub mlx: NativeMlxInfo,
}

/// Whether MLX (libmlx through our shim) loads in this process.
#[napi(object)]
pub struct NativeMlxInfo {
    pub available: bool,
    pub version: Option<String>,
    pub gpu: bool,
    /// Why it is not available.
    pub reason: Option<String>,
}

#[napi]
pub fn runtime_info() -> NativeRuntimeInfo {
    NativeRuntimeInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        // What a load without `backend` runs on.
        backend: BackendKind::default().name().into(),
        isa: Isa::detect().name().into(),
        amx: Isa::amx_note(),
        threads: mlx_serving_engine::backend::cpu::kernels::n_threads() as u32,
        mlx: NativeMlxInfo {
            available: mlx_serving_mlx::available(),
            version: mlx_serving_mlx::version(),
            gpu: mlx_serving_mlx::has_gpu(),
            reason: mlx_serving_mlx::unavailable_reason().map(str::to_owned),
        },
    }
}

/// GB/s of reading `mib` MiB with the kernels' worker threads (best of
/// five), the ceiling for decode: benchmarks report the fraction reached.
#[napi]
pub async fn read_bandwidth(mib: f64) -> Result<f64> {
    // A float, checked here: napi would wrap -1 and truncate 1.5.
    if !(1.0..=16384.0).contains(&mib) || mib.fract() != 0.0 {
        return Err(invalid(format!("mib must be a whole number from 1 to 16384, got {mib}")));
    }
    blocking(move || Ok(mlx_serving_engine::backend::cpu::kernels::read_bandwidth(mib as usize))).await
}

#[napi(object)]
pub struct NativeConvertReport {
    pub tensors: u32,
    pub quantized: u32,
    pub dequantized: u32,
    pub bytes: f64,
}

/// Writes an MLX model folder from a GGUF file (off the JS thread).
#[napi]
pub async fn convert_gguf_to_mlx(gguf: String, out_dir: String) -> Result<NativeConvertReport> {
    let r = blocking(move || mlx_serving_engine::formats::convert::gguf_to_mlx(gguf.as_ref(), out_dir.as_ref())).await?;
    Ok(NativeConvertReport { tensors: r.tensors as u32, quantized: r.quantized as u32, dequantized: r.dequantized as u32, bytes: r.bytes as f64 })
}
