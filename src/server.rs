//! The OpenAI-compatible HTTP server, started from JavaScript.

use mlx_serving_engine::EngineError;
use napi::tokio;
use napi_derive::napi;

use crate::engine::NativeEngine;
use crate::{invalid, js_error, Coded, Result};

#[napi]
impl NativeEngine {
    #[napi]
    pub async fn start_server(&self, opts: NativeServerOptions) -> Coded<NativeServer> {
        Coded::of(self.start(opts)).await
    }
}

impl NativeEngine {
    async fn start(&self, opts: NativeServerOptions) -> Result<NativeServer> {
        let spec = mlx_serving_server::ServerSpec {
            host: opts.host,
            port: opts.port,
            api_key: opts.api_key,
            max_concurrent: opts.max_concurrent,
            body_limit_bytes: opts.body_limit_bytes,
            cors_origins: opts.cors_origins,
            replica_id: opts.replica_id,
        };
        let o = spec.resolve(self.inner.config().streaming.max_concurrent_streams).map_err(invalid)?;
        let at = format!("{}:{}", o.host, o.port);
        let s = mlx_serving_server::start(self.inner.clone(), o)
            .await
            .map_err(|e| {
                let why = if e.kind() == std::io::ErrorKind::AddrInUse { "the port is already in use".to_string() } else { e.to_string() };
                js_error(EngineError::InvalidParams(format!("cannot listen on {at}: {why}")))
            })?;
        Ok(NativeServer { host: s.addr.ip().to_string(), port: s.addr.port() as u32, replica_id: s.replica_id(), drain: s.drain_switch(), inner: tokio::sync::Mutex::new(Some(s)) })
    }
}

#[napi(object)]
pub struct NativeServerOptions {
    pub host: Option<String>,
    /// Numbers as sent: `ServerSpec::resolve` checks them.
    pub port: Option<f64>,
    pub api_key: Option<String>,
    pub max_concurrent: Option<f64>,
    pub body_limit_bytes: Option<f64>,
    pub cors_origins: Option<Vec<String>>,
    /// `x-mlx-serving-replica` and the metrics' `replica` label (default: host name and port).
    pub replica_id: Option<String>,
}

/// The OpenAI-compatible HTTP server, running on the addon's tokio runtime.
#[napi]
pub struct NativeServer {
    inner: tokio::sync::Mutex<Option<mlx_serving_server::RunningServer>>,
    drain: mlx_serving_server::DrainSwitch,
    host: String,
    port: u32,
    replica_id: String,
}

#[napi]
impl NativeServer {
    #[napi(getter)]
    pub fn host(&self) -> String {
        self.host.clone()
    }
    #[napi(getter)]
    pub fn port(&self) -> u32 {
        self.port
    }
    #[napi(getter)]
    pub fn replica_id(&self) -> String {
        self.replica_id.clone()
    }
    /// Turns `/health` to 503 `draining` and refuses new generations, at
    /// once (on the JavaScript thread: `close`'s own work starts on another
    /// thread, after a request sent right after it may have been taken).
    #[napi]
    pub fn begin_drain(&self) {
        self.drain.drain();
    }
    /// Drains, then stops: `/health` turns 503 `draining` and new generations
    /// get 503 while the listener stays open; in-flight requests get
    /// `grace_ms` to finish, then the listener closes.
    #[napi]
    pub async fn close(&self, grace_ms: Option<u32>) {
        if let Some(s) = self.inner.lock().await.take() {
            s.stop(std::time::Duration::from_millis(grace_ms.unwrap_or(5000) as u64)).await;
        }
    }
}
