//! Loading and unloading models, draft models, and the tokenizer calls.

use mlx_serving_engine::backend::BackendKind;
use mlx_serving_engine::text::chat::ChatMessage;
use mlx_serving_engine::engine::{ModelInfo, ModelOptions};
use napi_derive::napi;

use crate::engine::NativeEngine;
use crate::{blocking, js_error, ms_option, Coded, Result};

#[napi(object)]
pub struct NativeModelInfo {
    pub id: String,
    pub path: String,
    pub architecture: String,
    pub context_length: u32,
    pub vocab_size: u32,
    pub weight_bytes: f64,
    /// Weight bytes one decode step reads.
    pub decode_weight_bytes: f64,
    /// Bytes of keys and values one cached position takes.
    pub kv_bytes_per_position: f64,
    pub file_type: String,
    pub warmup_ms: f64,
    pub request_timeout_ms: Option<f64>,
    /// Unix epoch milliseconds of the last request (or the load).
    pub last_access_ms: f64,
    /// The id of the attached draft model.
    pub draft_model: Option<String>,
    /// `cpu` or `mlx`.
    pub backend: String,
    /// `hermes` or `mistral`.
    pub tool_call_format: String,
}

impl From<ModelInfo> for NativeModelInfo {
    fn from(m: ModelInfo) -> Self {
        NativeModelInfo {
            id: m.id,
            path: m.path.display().to_string(),
            architecture: m.architecture,
            context_length: m.context_length as u32,
            vocab_size: m.vocab_size as u32,
            weight_bytes: m.weight_bytes as f64,
            decode_weight_bytes: m.decode_weight_bytes as f64,
            kv_bytes_per_position: m.kv_bytes_per_position as f64,
            file_type: m.file_type,
            warmup_ms: m.warmup_ms,
            request_timeout_ms: m.request_timeout_ms.map(|t| t as f64),
            last_access_ms: m.last_access_ms as f64,
            draft_model: m.draft_model,
            backend: m.backend.name().to_owned(),
            tool_call_format: m.tool_call_format.name().to_owned(),
        }
    }
}

#[napi(object)]
pub struct NativeLoaded {
    pub model: NativeModelInfo,
    /// Models unloaded to make room for it (`model_cache.maxModels`).
    pub evicted: Vec<String>,
}

#[napi(object)]
pub struct NativeDraftCompatibility {
    pub compatible: bool,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    pub primary: NativeModelInfo,
    pub draft: NativeModelInfo,
}

#[napi(object)]
pub struct NativeMessage {
    pub role: String,
    pub content: String,
    /// An assistant turn's calls, OpenAI's shape.
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A `tool` turn: the call it answers.
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
}

impl From<NativeMessage> for ChatMessage {
    fn from(m: NativeMessage) -> Self {
        ChatMessage { tool_calls: m.tool_calls.unwrap_or_default(), tool_call_id: m.tool_call_id, name: m.name, ..ChatMessage::new(m.role, m.content) }
    }
}

#[napi]
impl NativeEngine {
    /// Loads a GGUF file or MLX folder (off the JS thread) on `backend`
    /// (`cpu`, `mlx` or `auto`; `cpu` when absent); `tool_call_format`
    /// (`hermes`, `mistral`) overrides the one its template implies.
    #[napi]
    pub async fn load_model(&self, path: String, id: Option<String>, request_timeout_ms: Option<f64>, backend: Option<String>, tool_call_format: Option<String>) -> Coded<NativeLoaded> {
        Coded::of(async {
            let backend = backend.as_deref().map(BackendKind::parse).transpose().map_err(js_error)?.unwrap_or_default();
            let options = ModelOptions { request_timeout_ms: ms_option("requestTimeoutMs", request_timeout_ms)?, backend, tool_call_format };
            let e = self.inner.clone();
            let loaded = blocking(move || e.load(&path, id, options)).await?;
            Ok(NativeLoaded { model: loaded.info.into(), evicted: loaded.evicted })
        })
        .await
    }

    /// Loads a draft model for speculative decoding of `primary`'s requests.
    #[napi]
    pub async fn load_draft_model(&self, primary: String, path: String, id: Option<String>) -> Coded<NativeModelInfo> {
        let e = self.inner.clone();
        Coded::of(async { blocking(move || e.load_draft_model(&primary, &path, id)).await.map(Into::into) }).await
    }

    /// Detaches the draft of `model` (a primary or draft id), or every draft.
    #[napi]
    pub async fn unload_draft_model(&self, model: Option<String>) -> Coded<Vec<String>> {
        let e = self.inner.clone();
        Coded::of(blocking(move || e.unload_draft_model(model.as_deref()))).await
    }

    #[napi]
    pub fn is_draft_model_compatible(&self, primary: String, draft: String) -> Result<NativeDraftCompatibility> {
        let r = self.inner.draft_compatibility(&primary, &draft).map_err(js_error)?;
        Ok(NativeDraftCompatibility {
            compatible: r.compatible,
            errors: r.errors,
            warnings: r.warnings,
            primary: r.primary.into(),
            draft: r.draft.into(),
        })
    }

    #[napi]
    pub async fn unload_model(&self, id: String) -> Coded<()> {
        let e = self.inner.clone();
        Coded::of(blocking(move || e.unload_model(&id))).await
    }

    #[napi]
    pub fn list_models(&self) -> Vec<NativeModelInfo> {
        self.inner.list_models().into_iter().map(Into::into).collect()
    }

    #[napi]
    pub fn get_model_info(&self, id: String) -> Option<NativeModelInfo> {
        self.inner.model_info(&id).map(Into::into)
    }

    #[napi]
    pub async fn tokenize(&self, model: String, text: String, add_bos: Option<bool>) -> Coded<Vec<u32>> {
        let e = self.inner.clone();
        Coded::of(blocking(move || e.tokenize(&model, &text, add_bos))).await
    }

    #[napi]
    pub fn detokenize(&self, model: String, tokens: Vec<u32>) -> Result<String> {
        self.inner.detokenize(&model, &tokens).map_err(js_error)
    }

    /// Off the JavaScript thread: a model's template may take up to its
    /// render bounds (`docs/reliability.md`).
    #[napi]
    pub async fn apply_chat_template(&self, model: String, messages: Vec<NativeMessage>) -> Coded<String> {
        let msgs: Vec<ChatMessage> = messages.into_iter().map(ChatMessage::from).collect();
        let e = self.inner.clone();
        Coded::of(blocking(move || e.apply_chat_template(&model, &msgs))).await
    }
}
