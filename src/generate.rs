//! Generation: the params as JavaScript sends them, and the stream of
//! events a request yields.

use mlx_serving_engine::text::chat::ChatMessage;
use mlx_serving_engine::engine::{Canceller, Event, RequestHandle, Stats};
use mlx_serving_engine::request::{Field, InvalidParam, Number, PromptSpec, RequestDefaults, RequestSpec};
use napi::tokio;
use napi_derive::napi;

use crate::engine::NativeEngine;
use crate::models::NativeMessage;
use crate::{blocking, js_error, Coded};

/// Generation parameters as JavaScript sends them. Every number stays an
/// f64 so that the engine's checks (`RequestSpec::resolve`) see what was
/// sent, not what napi would wrap or truncate it to (-1 as 4294967295).
#[napi(object)]
pub struct NativeGenerateParams {
    pub model: String,
    pub prompt: Option<String>,
    pub prompt_tokens: Option<Vec<f64>>,
    pub messages: Option<Vec<NativeMessage>>,
    pub max_tokens: Option<f64>,
    pub min_tokens: Option<f64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<f64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub seed: Option<f64>,
    pub stop_sequences: Option<Vec<String>>,
    pub stop_token_ids: Option<Vec<f64>>,
    pub ignore_eos: Option<bool>,
    pub timeout_ms: Option<f64>,
    /// `urgent`, `default` or `background`.
    pub priority: Option<String>,
    pub cache_salt: Option<String>,
    /// Feature-flag decisions hash it (sticky per id).
    pub request_id: Option<String>,
    /// Keep the prompt's KV blocks cached while the model is loaded.
    pub pin_prefix: Option<bool>,
    /// `{type: 'json_object'}` or `{type: 'json_schema', schema, strict?}`.
    pub response_format: Option<serde_json::Value>,
    pub regex: Option<String>,
    /// A Lark grammar.
    pub grammar: Option<String>,
    /// OpenAI-shaped function tools.
    pub tools: Option<serde_json::Value>,
    /// `auto`, `none`, `required` or `{type: 'function', function: {name}}`.
    pub tool_choice: Option<serde_json::Value>,
    pub parallel_tool_calls: Option<bool>,
    /// Token id to a bias in [-100, 100].
    pub logit_bias: Option<std::collections::HashMap<String, f64>>,
    /// `auto`, `parsed` or `inline`: whether `<think>` blocks are split out.
    pub reasoning_format: Option<String>,
}


impl TryFrom<NativeGenerateParams> for RequestSpec {
    type Error = InvalidParam;
    fn try_from(p: NativeGenerateParams) -> std::result::Result<Self, InvalidParam> {
        let numbers = |v: Vec<f64>| v.into_iter().map(Number::from).collect();
        let prompt = match (p.prompt, p.prompt_tokens) {
            (Some(text), _) => Some(PromptSpec::Text(text)),
            (None, Some(ids)) => Some(PromptSpec::Tokens { tokens: numbers(ids) }),
            (None, None) => None,
        };
        Ok(RequestSpec {
            model: Some(p.model),
            prompt,
            messages: p.messages.map(|m| m.into_iter().map(ChatMessage::from).collect()),
            max_tokens: p.max_tokens.map(Number::from),
            min_tokens: p.min_tokens.map(Number::from),
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: p.top_k.map(Number::from),
            min_p: p.min_p,
            repetition_penalty: p.repetition_penalty,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            seed: p.seed.map(Number::from),
            stop_sequences: p.stop_sequences,
            stop_token_ids: p.stop_token_ids.map(numbers),
            ignore_eos: p.ignore_eos,
            top_logprobs: None,
            timeout_ms: p.timeout_ms,
            priority: p.priority,
            cache_salt: p.cache_salt,
            request_id: p.request_id,
            pin_prefix: p.pin_prefix,
            response_format: p.response_format.map(|v| Field::ResponseFormat.parse(v)).transpose()?,
            regex: p.regex,
            grammar: p.grammar,
            tools: p.tools.map(|v| Field::Tools.parse(v)).transpose()?,
            tool_choice: p.tool_choice,
            parallel_tool_calls: p.parallel_tool_calls,
            logit_bias: p.logit_bias.map(|m| m.into_iter().collect()),
            reasoning_format: p.reasoning_format,
        })
    }
}

#[napi(object)]
pub struct NativeStats {
    pub prompt_tokens: u32,
    pub tokens_generated: u32,
    pub time_to_first_token: f64,
    pub total_time: f64,
    pub tokens_per_second: f64,
    pub finish_reason: String,
    /// Gated Phase 5 features that were on for the request.
    pub features: Vec<String>,
}

impl From<Stats> for NativeStats {
    fn from(s: Stats) -> Self {
        NativeStats {
            prompt_tokens: s.n_prompt_tokens as u32,
            tokens_generated: s.n_generated_tokens as u32,
            time_to_first_token: s.t_first_token_ms,
            total_time: s.t_total_ms,
            tokens_per_second: s.decode_tokens_per_s,
            finish_reason: s.finish_reason.as_str().to_owned(),
            features: s.features,
        }
    }
}

/// A piece of a tool call: a call's first piece names it, the rest carry
/// its arguments' JSON text in order.
#[napi(object)]
pub struct NativeToolCall {
    pub index: u32,
    pub id: String,
    pub name: String,
    /// This piece of the arguments' JSON text.
    pub arguments: String,
}

/// One stream event: `kind` is `token`, `toolCall`, `done` or `error`.
#[napi(object)]
pub struct NativeChunk {
    pub kind: String,
    pub tool_call: Option<NativeToolCall>,
    /// Text of the model's reasoning this token released (`<think>` blocks).
    pub reasoning: Option<String>,
    pub text: Option<String>,
    pub token_id: Option<u32>,
    pub logprob: Option<f64>,
    pub stats: Option<NativeStats>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
}

impl From<Event> for NativeChunk {
    fn from(e: Event) -> Self {
        let mut c = NativeChunk {
            kind: String::new(),
            tool_call: None,
            reasoning: None,
            text: None,
            token_id: None,
            logprob: None,
            stats: None,
            error_code: None,
            error_message: None,
        };
        match e {
            Event::Token { text, reasoning, token_id, logprob, .. } => {
                c.kind = "token".into();
                c.text = Some(text);
                c.reasoning = (!reasoning.is_empty()).then_some(reasoning);
                c.token_id = Some(token_id);
                c.logprob = logprob.map(f64::from);
            }
            Event::ToolCall(t) => {
                c.kind = "toolCall".into();
                c.tool_call = Some(NativeToolCall { index: t.index as u32, id: t.id, name: t.name, arguments: t.arguments });
            }
            Event::Done(s) => {
                c.kind = "done".into();
                c.stats = Some(s.into());
            }
            Event::Error(e) => {
                c.kind = "error".into();
                c.error_code = Some(e.code().into());
                c.error_message = Some(e.to_string());
            }
        }
        c
    }
}

/// The events of one generation request.
#[napi]
pub struct NativeStream {
    handle: tokio::sync::Mutex<RequestHandle>,
    canceller: Canceller,
    request_id: f64,
    /// Most events per `next()` (`streaming.batchSize`).
    batch_size: usize,
}

#[napi]
impl NativeStream {
    #[napi(getter)]
    pub fn request_id(&self) -> f64 {
        self.request_id
    }

    /// Waits for at least one event and returns every event ready by then;
    /// an empty array means the stream has ended.
    #[napi]
    pub async fn next(&self) -> Vec<NativeChunk> {
        let mut h = self.handle.lock().await;
        let mut out = Vec::new();
        if let Some(first) = h.recv().await {
            out.push(first.into());
            while out.len() < self.batch_size {
                let Some(ev) = h.try_recv() else { break };
                out.push(ev.into());
            }
        }
        out
    }

    /// Stops the request at the next step; the stream then ends.
    #[napi]
    pub fn cancel(&self) {
        self.canceller.cancel();
    }
}

#[napi]
impl NativeEngine {
    /// Validates, templates and tokenizes (off the JS thread), then queues
    /// the request.
    #[napi]
    pub async fn generate(&self, params: NativeGenerateParams) -> Coded<NativeStream> {
        Coded::of(async {
            let req = RequestSpec::try_from(params).and_then(|s| s.resolve(&RequestDefaults::default())).map_err(|e| js_error(e.into()))?;
            let e = self.inner.clone();
            let handle = blocking(move || e.submit(req)).await?;
            Ok(NativeStream {
                canceller: handle.canceller(),
                request_id: handle.id as f64,
                handle: tokio::sync::Mutex::new(handle),
                batch_size: self.inner.config().streaming.batch_size,
            })
        })
        .await
    }

    /// Cancels the requests with this id still being templated or
    /// tokenized (their `generate` rejects with `Cancelled`): an abort
    /// before `generate` has returned a stream to cancel.
    #[napi]
    pub fn cancel_pending(&self, request_id: String) {
        self.inner.cancel_pending(&request_id);
    }
}
