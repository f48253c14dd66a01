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

/// What every fallible binding call throws or rejects with: a JS `Error`
/// whose `code` property is the engine's stable code (`InvalidParams`,
/// `ModelNotLoaded`, ...) and whose message is the engine's.
pub(crate) type Result<T> = std::result::Result<T, napi::Error<Code>>;

/// An engine error code as napi sets it on the JS error.
#[derive(Debug)]
pub struct Code(&'static str);

impl AsRef<str> for Code {
    fn as_ref(&self) -> &str {
        self.0
    }
}

/// The one mapping from engine errors to JS errors.
pub(crate) fn js_error(e: EngineError) -> napi::Error<Code> {
    napi::Error::new(Code(e.code()), e.to_string())
}

pub(crate) fn invalid(msg: String) -> napi::Error<Code> {
    js_error(EngineError::InvalidParams(msg))
}

/// The outcome of an `async` binding call. napi rejects a promise only
/// with its own `Status` codes, so an error travels to the JavaScript
/// thread as this value and becomes the rejection there: the `Error`
/// object with our `code` is made on that thread and handed to napi by
/// reference, which rejects with that very object. (`index.d.ts` declares
/// `type Coded<T> = T`: package.json's `napi.dtsHeader`.)
pub struct Coded<T>(Result<T>);

impl<T> Coded<T> {
    /// Awaits a call's work: `Coded::of(async { ...? ... }).await`.
    pub(crate) async fn of(work: impl std::future::Future<Output = Result<T>>) -> Coded<T> {
        Coded(work.await)
    }
}

impl<T: ToNapiValue> ToNapiValue for Coded<T> {
    unsafe fn to_napi_value(env: napi::sys::napi_env, value: Self) -> napi::Result<napi::sys::napi_value> {
        match value.0 {
            Ok(v) => T::to_napi_value(env, v),
            Err(e) => {
                let error = napi::JsError::from(e).into_value(env);
                Err(napi::Error::from(Unknown::from_raw_unchecked(env, error)))
            }
        }
    }
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
pub async fn read_bandwidth(mib: f64) -> Coded<f64> {
    Coded::of(async move {
        // A float, checked here: napi would wrap -1 and truncate 1.5.
        if !(1.0..=16384.0).contains(&mib) || mib.fract() != 0.0 {
            return Err(invalid(format!("mib must be a whole number from 1 to 16384, got {mib}")));
        }
        blocking(move || Ok(mlx_serving_engine::backend::cpu::kernels::read_bandwidth(mib as usize))).await
    })
    .await
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
pub async fn convert_gguf_to_mlx(gguf: String, out_dir: String) -> Coded<NativeConvertReport> {
    Coded::of(async move {
        let r = blocking(move || mlx_serving_engine::formats::convert::gguf_to_mlx(gguf.as_ref(), out_dir.as_ref())).await?;
        Ok(NativeConvertReport { tensors: r.tensors as u32, quantized: r.quantized as u32, dequantized: r.dequantized as u32, bytes: r.bytes as f64 })
    })
    .await
}
