//! OpenAI-compatible HTTP server over the engine: `/v1/chat/completions`
//! and `/v1/completions` (SSE streaming and not), `/v1/models`, `/health`,
//! `/metrics` (Prometheus), and a live dashboard at `/`.
//!
//! Admission: at most `max_concurrent` generations run; past that a request
//! gets `429` with `Retry-After` at once instead of queueing without bound.
//! A client that disconnects drops its response stream, which cancels the
//! generation in the engine.

mod metrics;
pub mod openai;
mod run;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use mlx_serving_engine::engine::GenerateRequest;
use mlx_serving_engine::{Engine, EngineError};
use serde_json::{json, Value};
use tokio::sync::{oneshot, Semaphore};

/// How long a request waits for a generation slot before a 429.
const SLOT_GRACE: std::time::Duration = std::time::Duration::from_millis(250);

pub use metrics::{Metrics, Snapshot};
use openai::{BadRequest, Parsed};

#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub host: String,
    pub port: u16,
    /// Bearer token required on `/v1/*` when set.
    pub api_key: Option<String>,
    /// Generations running at once; more get 429 (the engine's
    /// `streaming.maxConcurrentStreams` refuses past its own limit too).
    pub max_concurrent: usize,
    pub body_limit_bytes: usize,
    /// Origins whose browser pages may call the API (CORS); `*` for any.
    /// Empty (the default): no CORS headers, so browsers keep other sites'
    /// pages from driving a local server.
    pub cors_origins: Vec<String>,
    /// This replica's name in the `x-mlx-serving-replica` header and the
    /// metrics' `replica` label; `None`: the host name and the bound port.
    pub replica_id: Option<String>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions { host: "127.0.0.1".into(), port: 8080, api_key: None, max_concurrent: 64, body_limit_bytes: 4 << 20, cors_origins: Vec::new(), replica_id: None }
    }
}

/// Longest replica id: it travels in a header and a metric label.
const MAX_REPLICA_ID: usize = 128;

/// The machine's host name (`HOSTNAME`, else the kernel's), for the default replica id.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Server settings as a frontend received them (numbers as JavaScript or a
/// command line gave them); `resolve` checks each of them, once.
#[derive(Debug, Clone, Default)]
pub struct ServerSpec {
    pub host: Option<String>,
    pub port: Option<f64>,
    pub api_key: Option<String>,
    pub max_concurrent: Option<f64>,
    pub body_limit_bytes: Option<f64>,
    pub cors_origins: Option<Vec<String>>,
    pub replica_id: Option<String>,
}

/// `v` as a whole number in `[min, max]`: napi and `Number()` would let
/// through what a u16 or u32 field would wrap (-1) or truncate (1.5).
fn whole(name: &str, v: Option<f64>, min: u32, max: u32) -> Result<Option<u32>, String> {
    match v {
        None => Ok(None),
        Some(x) if x.fract() == 0.0 && x >= min as f64 && x <= max as f64 => Ok(Some(x as u32)),
        Some(x) => Err(format!("{name} must be an integer from {min} to {max}, got {x}")),
    }
}

impl ServerSpec {
    /// The options, with `max_concurrent` defaulting to the engine's own
    /// `streaming.maxConcurrentStreams`.
    pub fn resolve(self, default_max_concurrent: usize) -> Result<ServerOptions, String> {
        let d = ServerOptions::default();
        let cors_origins = self.cors_origins.unwrap_or_default();
        if cors_origins.iter().any(String::is_empty) {
            return Err("corsOrigins must be an array of origins (or \"*\")".into());
        }
        // An unset `$API_KEY` expanded into `--api-key ''` must not start a
        // server without authentication: leaving the key out does that.
        if self.api_key.as_ref().is_some_and(|k| k.trim().is_empty()) {
            return Err("apiKey must not be empty (leave it out to serve without authentication)".into());
        }
        if let Some(id) = &self.replica_id {
            if id.is_empty() || id.len() > MAX_REPLICA_ID || !id.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\') {
                return Err(format!("replicaId must be 1 to {MAX_REPLICA_ID} visible ASCII characters other than quotes and backslashes, got {id:?}"));
            }
        }
        Ok(ServerOptions {
            host: self.host.unwrap_or(d.host),
            port: whole("port", self.port, 0, u16::MAX as u32)?.map_or(d.port, |p| p as u16),
            api_key: self.api_key,
            max_concurrent: whole("maxConcurrent", self.max_concurrent, 1, u32::MAX)?.map_or(default_max_concurrent, |m| m as usize),
            body_limit_bytes: whole("bodyLimitBytes", self.body_limit_bytes, 1, u32::MAX)?.map_or(d.body_limit_bytes, |b| b as usize),
            cors_origins,
            replica_id: self.replica_id,
        })
    }
}

struct AppState {
    engine: Arc<Engine>,
    opts: ServerOptions,
    permits: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    draining: Arc<AtomicBool>,
    next_id: AtomicU64,
    id_prefix: String,
    /// `created` of /v1/models entries (stable, unlike the time of the call).
    started_unix: u64,
    /// `x-mlx-serving-replica` on every response (checked as a header value
    /// and a label when the options were resolved).
    replica: HeaderValue,
}

/// Turns a running server to draining (`RunningServer::drain_switch`).
#[derive(Clone)]
pub struct DrainSwitch(Arc<AtomicBool>);

impl DrainSwitch {
    pub fn drain(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A server running on the current tokio runtime.
pub struct RunningServer {
    pub addr: SocketAddr,
    state: Arc<AppState>,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningServer {
    pub fn metrics_snapshot(&self) -> Snapshot {
        let stats = self.state.engine.stats();
        self.state.metrics.snapshot(&stats, stats.n_running)
    }

    /// Drains, then stops: `/health` turns 503 `draining` and new
    /// generations get 503 at once, while the listener stays open (load
    /// balancers see the change instead of refused connections) until the
    /// generations in flight end or `grace` passes; then the listener
    /// closes and streams still running are cut.
    pub async fn stop(mut self, grace: Duration) {
        let until = tokio::time::Instant::now() + grace;
        self.state.draining.store(true, Ordering::Relaxed);
        let all = self.state.opts.max_concurrent.max(1);
        while self.state.permits.available_permits() < all && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if tokio::time::timeout_at(until.max(tokio::time::Instant::now() + Duration::from_millis(100)), &mut self.task).await.is_err() {
            self.task.abort();
        }
    }

    /// What turns this server to draining (as `stop` does first) without
    /// waiting: a caller on another thread flips it before it awaits `stop`,
    /// so that a request sent right after sees the drain.
    pub fn drain_switch(&self) -> DrainSwitch {
        DrainSwitch(self.state.draining.clone())
    }

    /// This replica's id (`x-mlx-serving-replica`).
    pub fn replica_id(&self) -> String {
        self.state.replica.to_str().unwrap_or_default().to_owned()
    }
}

pub async fn start(engine: Arc<Engine>, opts: ServerOptions) -> std::io::Result<RunningServer> {
    let listener = tokio::net::TcpListener::bind((opts.host.as_str(), opts.port)).await?;
    let addr = listener.local_addr()?;
    let replica = opts.replica_id.clone().unwrap_or_else(|| format!("{}:{}", host_name(), addr.port()));
    let replica = HeaderValue::from_str(&replica).map_err(|_| std::io::Error::other(format!("replica id {replica:?} is not a header value")))?;
    let state = Arc::new(AppState {
        replica,
        permits: Arc::new(Semaphore::new(opts.max_concurrent.max(1))),
        engine,
        metrics: Arc::new(Metrics::default()),
        draining: Arc::new(AtomicBool::new(false)),
        next_id: AtomicU64::new(1),
        started_unix: unix_now(),
        // Distinct per server start, so ids do not repeat across restarts.
        id_prefix: format!("{:x}-", SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0) ^ u64::from(std::process::id()) << 32),
        opts,
    });
    let v1 = Router::new()
        .route("/chat/completions", post(chat_completions))
        .route("/completions", post(completions))
        .route("/models", get(list_models))
        .route("/models/{id}", get(get_model))
        .layer(middleware::from_fn_with_state(state.clone(), require_api_key));
    let app = Router::new()
        .nest("/v1", v1)
        .route("/health", get(health))
        .route("/live", get(live))
        .route("/metrics", get(prometheus))
        .route("/dashboard/data", get(dashboard_data))
        .route("/", get(|| async { Html(include_str!("dashboard.html")) }))
        .fallback(|| async { error_response(StatusCode::NOT_FOUND, "NotFound", "no such endpoint".into()) })
        .method_not_allowed_fallback(|| async { error_response(StatusCode::METHOD_NOT_ALLOWED, "InvalidParams", "this endpoint does not take that method".into()) })
        .layer(middleware::from_fn_with_state(state.clone(), read_body))
        .layer(DefaultBodyLimit::max(state.opts.body_limit_bytes))
        // Outermost, so a preflight is answered before the API key check.
        .layer(middleware::from_fn_with_state(state.clone(), cors))
        .layer(middleware::from_fn_with_state(state.clone(), request_id))
        .with_state(state.clone());

    // Sample the engine's counters once a second for rolling rates.
    let sampler = {
        let state = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                state.metrics.sample(&state.engine.stats());
            }
        })
    };
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        serve(listener, app, rx).await;
        sampler.abort();
    });
    Ok(RunningServer { addr, state, shutdown: Some(tx), task })
}

/// How long a connection may take to send a request's headers: without a
/// limit, connections that never finish a request hold their sockets for
/// ever, and enough of them starve the server of file descriptors.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// CORS for the configured origins: preflights get 204 with what may be
/// sent, other responses name the origin they may be read by.
async fn cors(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let origins = &state.opts.cors_origins;
    if origins.is_empty() {
        return next.run(req).await;
    }
    let origin = req.headers().get(header::ORIGIN).cloned();
    let allowed = origin.as_ref().filter(|o| origins.iter().any(|a| a == "*" || a.as_bytes() == o.as_bytes()));
    let preflight = req.method() == axum::http::Method::OPTIONS && req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut resp = match allowed {
        Some(_) if preflight => {
            let mut r = StatusCode::NO_CONTENT.into_response();
            let h = r.headers_mut();
            h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, OPTIONS"));
            // Whatever the page's client sends (the OpenAI SDK adds its own
            // x-stainless-* headers); the API key still decides access.
            let asked = req.headers().get(header::ACCESS_CONTROL_REQUEST_HEADERS).cloned();
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.unwrap_or(HeaderValue::from_static("authorization, content-type")));
            h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
            r
        }
        _ => next.run(req).await,
    };
    let h = resp.headers_mut();
    if let Some(o) = allowed {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o.clone());
        // Pages may read these beside the few headers CORS always lets through.
        h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static("x-request-id, retry-after"));
    }
    // Caches must not hand one origin's answer to another.
    h.append(header::VARY, HeaderValue::from_static("origin"));
    resp
}

/// Longest client `x-request-id` echoed back; a longer one gets one of ours.
const MAX_REQUEST_ID_BYTES: usize = 200;

/// `x-request-id` on every response: the client's own, so its logs and
/// ours meet, or one of ours.
/// Sets the flags when dropped: the client left while its requests were
/// being submitted.
struct CancelOnDrop(Vec<Arc<AtomicBool>>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        for f in &self.0 {
            f.store(true, Ordering::Relaxed);
        }
    }
}

async fn request_id(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let given = req.headers().get("x-request-id").filter(|v| !v.is_empty() && v.len() <= MAX_REQUEST_ID_BYTES).cloned();
    let mut resp = next.run(req).await;
    let id = given.unwrap_or_else(|| {
        let n = state.next_id.fetch_add(1, Ordering::Relaxed);
        HeaderValue::from_str(&format!("req-{}{n:x}", state.id_prefix)).expect("hex digits and dashes")
    });
    resp.headers_mut().insert("x-request-id", id);
    resp.headers_mut().insert("x-mlx-serving-replica", state.replica.clone());
    resp
}

/// How long a request body may take to arrive after its headers.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads the whole body first, within `BODY_READ_TIMEOUT` and the size
/// limit, so a client that stops sending mid-body cannot hold a request
/// open, and a body over the limit gets a JSON 413 like every other error.
async fn read_body(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let limit = state.opts.body_limit_bytes;
    let too_large = || error_response(StatusCode::PAYLOAD_TOO_LARGE, "InvalidParams", format!("the request body is over {limit} bytes"));
    // A stated length over the limit is refused before any of it is read.
    let stated = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if stated.is_some_and(|n| n > limit as u64) {
        return too_large();
    }
    match tokio::time::timeout(BODY_READ_TIMEOUT, axum::body::to_bytes(body, limit)).await {
        Err(_) => error_response(StatusCode::REQUEST_TIMEOUT, "Timeout", format!("the request body did not arrive within {} s", BODY_READ_TIMEOUT.as_secs())),
        Ok(Err(e)) if is_length_limit(&e) => too_large(),
        // A malformed chunked body, or the connection broke (then no one
        // reads this).
        Ok(Err(e)) => error_response(StatusCode::BAD_REQUEST, "InvalidParams", format!("the request body could not be read: {e}")),
        Ok(Ok(bytes)) => next.run(Request::from_parts(parts, axum::body::Body::from(bytes))).await,
    }
}

/// Whether reading a body failed on the size limit (not on its framing).
fn is_length_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Accepts connections until `shutdown`, then lets each finish its current
/// request. Our own loop rather than `axum::serve`, which has no header
/// timeout.
async fn serve(listener: tokio::net::TcpListener, app: Router, shutdown: oneshot::Receiver<()>) {
    let (closing_tx, closing_rx) = tokio::sync::watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of file descriptors (or a reset before accept):
                // back off instead of spinning.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // Token events are small writes: send each at once.
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut closing = closing_rx.clone();
        conns.spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = closing.changed() => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
        while conns.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = closing_tx.send(());
    while conns.join_next().await.is_some() {}
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// An OpenAI-style error body.
fn error_response(status: StatusCode, code: &str, message: String) -> Response {
    error_with_param(status, code, message, None)
}

/// OpenAI's error `type` for a status (its SDKs pick the exception class by
/// status; the type is what logs and dashboards group by). `code` stays ours.
fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        s if s < 500 => "invalid_request_error",
        _ => "server_error",
    }
}

fn error_with_param(status: StatusCode, code: &str, message: String, param: Option<&str>) -> Response {
    let body = json!({ "error": { "message": message, "type": error_type(status), "param": param, "code": code } });
    (status, Json(body)).into_response()
}

/// Longest wait a 429 suggests: the SDKs give up on longer ones.
const MAX_RETRY_AFTER_S: f64 = 60.0;

/// 429 with `Retry-After`: about when `slots` generations will have ended,
/// from the mean request duration so far and how many run at once (1 s
/// before any request has finished).
fn overloaded(state: &AppState, slots: usize, message: String) -> Response {
    let e2e = state.engine.latency_histograms().e2e;
    let mean_s = if e2e.count == 0 { 1.0 } else { e2e.sum / e2e.count as f64 };
    let wait = (mean_s * slots as f64 / state.opts.max_concurrent.max(1) as f64).clamp(1.0, MAX_RETRY_AFTER_S).ceil();
    let mut r = error_response(StatusCode::TOO_MANY_REQUESTS, "Overloaded", message);
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(wait as u64));
    r
}

fn engine_error_response(state: &AppState, e: &EngineError) -> Response {
    if let EngineError::Overloaded(_) = e {
        return overloaded(state, 1, e.to_string());
    }
    if let EngineError::InvalidParam(p) = e {
        let bad = BadRequest::from(p.clone());
        return error_with_param(StatusCode::BAD_REQUEST, e.code(), bad.message, bad.param.as_deref());
    }
    let status = match e {
        EngineError::InvalidParams(_) | EngineError::InvalidParam(_) | EngineError::Tokenizer(_) => StatusCode::BAD_REQUEST,
        EngineError::ModelNotLoaded(_) => StatusCode::NOT_FOUND,
        EngineError::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
        EngineError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
        EngineError::Cancelled => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error_response(status, e.code(), e.to_string())
}

async fn require_api_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.opts.api_key {
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            // The scheme is case-insensitive (RFC 7235).
            .and_then(|v| v.split_once(' ').filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer")).map(|(_, token)| token.trim()))
            .is_some_and(|given| constant_time_eq(given.as_bytes(), key.as_bytes()));
        if !ok {
            return error_response(StatusCode::UNAUTHORIZED, "Unauthorized", "missing or invalid API key".into());
        }
    }
    next.run(req).await
}

/// Compares without an early exit, so response time does not leak the key.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Liveness: the process answers, draining or not (readiness is `/health`).
async fn live(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({ "status": "alive", "draining": state.draining.load(Ordering::Relaxed) }))
}

/// Readiness: 200 while a model is loaded and the server takes work.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    let stats = state.engine.stats();
    if state.draining.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "draining" }))).into_response();
    }
    if stats.n_models == 0 {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "loading" }))).into_response();
    }
    Json(json!({ "status": "ok", "models": stats.n_models, "running": stats.n_running })).into_response()
}

fn model_object(state: &AppState, m: &mlx_serving_engine::engine::ModelInfo) -> Value {
    json!({ "id": m.id, "object": "model", "created": state.started_unix, "owned_by": "mlx-serving", "max_model_len": m.context_length })
}

async fn list_models(State(state): State<Arc<AppState>>) -> Json<Value> {
    let data: Vec<Value> = state.engine.list_models().iter().map(|m| model_object(&state, m)).collect();
    Json(json!({ "object": "list", "data": data }))
}

async fn get_model(State(state): State<Arc<AppState>>, axum::extract::Path(id): axum::extract::Path<String>) -> Response {
    match state.engine.model_info(&id) {
        Some(m) => Json(model_object(&state, &m)).into_response(),
        None => engine_error_response(&state, &EngineError::ModelNotLoaded(id)),
    }
}

async fn prometheus(State(state): State<Arc<AppState>>) -> Response {
    let stats = state.engine.stats();
    let model = state.engine.list_models().first().map(|m| m.id.clone()).unwrap_or_default();
    let e = &state.engine;
    let body = state.metrics.render(
        state.replica.to_str().unwrap_or_default(),
        &stats,
        &e.latency_histograms(),
        &e.feature_flag_counts(),
        &e.qos_status(),
        e.canary_status().as_ref(),
        &model,
        stats.n_running,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

async fn dashboard_data(State(state): State<Arc<AppState>>) -> Json<Snapshot> {
    let stats = state.engine.stats();
    Json(state.metrics.snapshot(&stats, stats.n_running))
}

#[derive(Clone, Copy, PartialEq)]
enum Api {
    Chat,
    Completion,
}

async fn chat_completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    generate(state, openai::parse_chat(&body), Api::Chat).await
}

async fn completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    generate(state, openai::parse_completion(&body), Api::Completion).await
}

async fn generate(state: Arc<AppState>, parsed: Result<Parsed, BadRequest>, api: Api) -> Response {
    let parsed = match parsed {
        Ok(p) => p,
        Err(bad) => {
            state.metrics.bad_request();
            return error_with_param(StatusCode::BAD_REQUEST, "InvalidParams", bad.message, bad.param.as_deref());
        }
    };
    if state.draining.load(Ordering::Relaxed) {
        let mut r = error_response(StatusCode::SERVICE_UNAVAILABLE, "Draining", "this replica is draining; send the request to another".into());
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    }
    let model = parsed.reqs[0].model.clone();
    // A canary's name is not a model id: the engine routes it.
    if !state.engine.serves(&model) {
        state.metrics.bad_request();
        let known: Vec<String> = state.engine.list_models().into_iter().map(|m| m.id).collect();
        let msg = format!("model '{model}' is not loaded (available: {})", known.join(", "));
        return error_response(StatusCode::NOT_FOUND, "ModelNotLoaded", msg);
    }
    let (n, prompts) = (parsed.n, parsed.reqs.len());
    let slots = n * prompts;
    if slots > state.opts.max_concurrent {
        state.metrics.bad_request();
        let (msg, param) = if prompts > 1 {
            (format!("{prompts} prompts x n = {n} is {slots} generations, more than the {} this server runs at once", state.opts.max_concurrent), "prompt")
        } else {
            (format!("n = {n} is more than the {} generations this server runs at once", state.opts.max_concurrent), "n")
        };
        return error_with_param(StatusCode::BAD_REQUEST, "InvalidParams", msg, Some(param));
    }
    // A short grace: a client that aborts a request and sends the next one
    // at once is faster than the server noticing the first connection
    // closed, and would otherwise see a 429 for a slot it no longer uses.
    let acquire = state.permits.clone().acquire_many_owned(slots as u32);
    let Ok(Ok(permit)) = tokio::time::timeout(SLOT_GRACE, acquire).await else {
        state.metrics.rejected();
        let free = state.permits.available_permits();
        let why = format!("this request needs {slots} of the {} generation slots and {free} are free; retry shortly", state.opts.max_concurrent);
        return overloaded(&state, slots, why);
    };
    let engine = state.engine.clone();
    // Each prompt's choices past the first differ only in their seed (choice
    // i samples with seed + i); the run submits them once the first one's
    // prompt is cached.
    let groups: Vec<(GenerateRequest, Vec<GenerateRequest>)> = parsed
        .reqs
        .into_iter()
        .map(|req| {
            let rest = (1..n)
                .map(|i| {
                    let mut r = req.clone();
                    r.sampling.seed = r.sampling.seed.map(|s| s.wrapping_add(i as u64));
                    r
                })
                .collect();
            (req, rest)
        })
        .collect();
    // Templating and tokenization can take a moment on long prompts. The
    // slots go with the work: a client that leaves meanwhile does not free
    // them for others while its prompt is still being tokenized. Leaving
    // drops this handler, whose guard cancels that work, so the slots come
    // back at the template's next write or the tokenizer's next turn.
    let flags: Vec<Arc<AtomicBool>> = groups.iter().map(|_| Arc::new(AtomicBool::new(false))).collect();
    let mut gone = CancelOnDrop(flags.clone());
    let submitted = tokio::task::spawn_blocking(move || {
        let mut started = Vec::with_capacity(groups.len());
        for ((first, rest), cancel) in groups.into_iter().zip(flags) {
            // A prompt refused ends the request; those started are dropped, which cancels them.
            started.push((engine.submit_with_cancel(first, cancel)?, rest));
        }
        Ok::<_, EngineError>((started, permit))
    })
    .await;
    // Submitted (or refused): from here the run's handles cancel.
    gone.0.clear();
    let (started, permit) = match submitted {
        Ok(Ok(ok)) => ok,
        Ok(Err(e)) => {
            match e {
                EngineError::InvalidParams(_) | EngineError::InvalidParam(_) | EngineError::Tokenizer(_) => state.metrics.bad_request(),
                // The engine's own limit (a cancelled sequence not yet
                // released, streaming.maxConcurrentStreams).
                EngineError::Overloaded(_) => state.metrics.rejected(),
                _ => {}
            }
            return engine_error_response(&state, &e);
        }
        Err(e) => return error_response(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", e.to_string()),
    };
    let id = format!("{}-{}{:x}", if api == Api::Chat { "chatcmpl" } else { "cmpl" }, state.id_prefix, state.next_id.fetch_add(1, Ordering::Relaxed));
    let fingerprint = fingerprint(&state.engine, &model);
    let shape = run::Shape { id, model, api, created: unix_now(), fingerprint, n, wire: parsed.shape };
    let stream = parsed.shape.stream;
    let run = run::Run::new(state.clone(), started, permit, shape);
    if stream {
        Sse::new(run.into_sse()).keep_alive(KeepAlive::default()).into_response()
    } else {
        run.collect().await
    }
}

/// OpenAI's `system_fingerprint`: what, beside the request, decides the
/// output (this build, the model file, the backend), so a client can tell
/// when the same request may start giving other answers.
fn fingerprint(engine: &Engine, model: &str) -> String {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same inputs give the same value in every run of this build.
    let mut h = std::hash::DefaultHasher::new();
    env!("CARGO_PKG_VERSION").hash(&mut h);
    model.hash(&mut h);
    if let Some(m) = engine.model_info(model) {
        (m.path, m.file_type, m.backend.name(), m.weight_bytes).hash(&mut h);
    }
    format!("fp_{:012x}", h.finish() & 0xffff_ffff_ffff)
}
