//! OpenAI request bodies and their translation to the engine's request spec,
//! which checks the fields. What is left here is the wire format's own:
//! `n`, lists of prompts, streaming, the logprobs shapes, OpenAI's
//! conventions (`top_k: -1`, negative seeds, at most 4 stops, temperature
//! 0-2, the `developer` role).
//!
//! Unknown fields (the policy, also in docs/http.md): a field that would
//! change the output and that we cannot honour is refused with a 400 naming
//! it, never silently dropped. Fields that only carry metadata (`user`,
//! `metadata`, `store`, `service_tier`, `prompt_cache_key`,
//! `safety_identifier`) are accepted, and so are the peers' cheap
//! extensions, implemented: vLLM's `min_tokens`, `return_token_ids`,
//! `stream_options.continuous_usage_stats`; llama.cpp's `cache_prompt`.

use mlx_serving_engine::text::chat::ChatMessage;
use mlx_serving_engine::engine::GenerateRequest;
use mlx_serving_engine::request::{InvalidParam, Number, PromptSpec, RequestDefaults, RequestSpec, ResponseFormat};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

/// OpenAI's default temperature (the engine's own is 0, greedy).
const OPENAI_DEFAULT_TEMPERATURE: f32 = 1.0;
/// OpenAI's default `max_tokens` for legacy completions.
const COMPLETIONS_DEFAULT_MAX_TOKENS: i64 = 16;
/// Most stop sequences a request may carry (OpenAI's limit).
const MAX_STOP_SEQUENCES: usize = 4;
/// Most choices (`n`) per request; each is a sequence of its own.
pub const MAX_CHOICES: i64 = 16;
/// OpenAI's temperature range is 0 to 2.
const MAX_TEMPERATURE: f64 = 2.0;
/// Fields that only carry metadata for the caller's own bookkeeping.
const METADATA_FIELDS: &[&str] = &["metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"];

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// `null` as the field's default, as OpenAI reads it (some clients send
/// every field, unset ones as null).
fn nullable<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Refuses fields outside our request types unless they change nothing:
/// null, an empty `functions` or `tools` (completions), a `text` response
/// format, or bookkeeping (`metadata`, `store`, ...).
/// A field silently dropped would hand a client output it did not ask for.
fn refuse_unsupported(fields: &Map<String, Value>) -> Result<(), BadRequest> {
    for (k, v) in fields {
        let empty = v.as_array().is_some_and(|a| a.is_empty()) || v.as_object().is_some_and(|o| o.is_empty());
        let harmless = v.is_null()
            || METADATA_FIELDS.contains(&k.as_str())
            || (k == "modalities" && v.as_array().is_some_and(|m| m.iter().all(|x| x == "text")))
            || (matches!(k.as_str(), "functions" | "tools") && empty)
            || (matches!(k.as_str(), "function_call" | "tool_choice") && v == "none")
            || (k == "response_format" && v.get("type").and_then(Value::as_str) == Some("text"))
            || (k == "best_of" && v == 1);
        if !harmless {
            return bad(k, format!("{k} is not supported"));
        }
    }
    Ok(())
}

/// A message's fields beyond role and content: a name, an assistant's
/// `tool_calls`, a tool result's `tool_call_id`.
fn message_from(m: ChatMessageIn) -> Result<ChatMessage, BadRequest> {
    // OpenAI's `developer` role is the system role for models that predate it.
    let role = if m.role == "developer" { "system".to_owned() } else { m.role.clone() };
    let mut msg = ChatMessage::new(role, content_text(&m.role, m.content)?);
    for (k, v) in m.other {
        match (k.as_str(), v) {
            (_, Value::Null) => {}
            ("name", Value::String(n)) => msg.name = Some(n),
            ("tool_call_id", Value::String(id)) if m.role == "tool" => msg.tool_call_id = Some(id),
            ("tool_calls", Value::Array(calls)) if m.role == "assistant" || calls.is_empty() => {
                for (i, c) in calls.iter().enumerate() {
                    let name = c.pointer("/function/name").and_then(Value::as_str);
                    let args = c.pointer("/function/arguments");
                    if name.is_none() || !args.is_none_or(|a| a.is_string() || a.is_object()) {
                        return bad("messages", format!("assistant message: tool_calls[{i}] needs function.name and function.arguments (a JSON string)"));
                    }
                }
                msg.tool_calls = calls;
            }
            (k, _) => return bad("messages", format!("{} message: {k} is not supported", m.role)),
        }
    }
    Ok(msg)
}
/// A request refused, with OpenAI's `param` when one field is at fault.
#[derive(Debug, PartialEq)]
pub struct BadRequest {
    pub message: String,
    pub param: Option<String>,
}

fn bad<T>(param: &str, message: impl Into<String>) -> Result<T, BadRequest> {
    Err(BadRequest { message: message.into(), param: Some(param.to_owned()) })
}

impl From<InvalidParam> for BadRequest {
    fn from(e: InvalidParam) -> Self {
        let name = e.field.openai_name();
        BadRequest { message: e.message(name), param: Some(name.to_owned()) }
    }
}

fn unreadable(e: serde_json::Error) -> BadRequest {
    BadRequest { message: format!("invalid request body: {e}"), param: None }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default, deserialize_with = "nullable")]
    pub include_usage: bool,
    /// vLLM: every chunk carries the usage so far.
    #[serde(default, deserialize_with = "nullable")]
    pub continuous_usage_stats: bool,
    /// OpenAI pads chunks against length side channels on its own network;
    /// nothing to pad here, so either value gives the same output.
    #[serde(default, deserialize_with = "nullable")]
    pub include_obfuscation: bool,
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Deserialize, Default)]
pub struct Common {
    pub model: String,
    pub max_tokens: Option<Number>,
    pub max_completion_tokens: Option<Number>,
    /// vLLM: no end before this many tokens.
    pub min_tokens: Option<Number>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// -1 (vLLM) or 0: off.
    pub top_k: Option<Number>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    /// Negative seeds are valid for OpenAI clients: they count modulo 2^64.
    pub seed: Option<Number>,
    pub stop: Option<OneOrMany>,
    #[serde(default, deserialize_with = "nullable")]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<i64>,
    #[serde(default, deserialize_with = "nullable")]
    pub ignore_eos: bool,
    /// `urgent`, `default` or `background` (scheduling class).
    pub priority: Option<String>,
    /// Requests with different salts never share prefix-cache blocks.
    pub cache_salt: Option<String>,
    /// OpenAI's end-user id: feature-flag rollouts hash it, so a user sees
    /// the same variant on every request.
    pub user: Option<String>,
    /// Token id (a string) to a bias in [-100, 100].
    pub logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    /// vLLM: the prompt's and each choice's token ids in the response.
    #[serde(default, deserialize_with = "nullable")]
    pub return_token_ids: bool,
    /// llama.cpp: `false` keeps the request out of the prefix cache.
    pub cache_prompt: Option<bool>,
    /// vLLM's constraints: `{json | regex | grammar | choice}`.
    pub structured_outputs: Option<StructuredOutputs>,
    /// `auto`, `parsed` or `inline`: where `<think>` blocks go (chat:
    /// `reasoning_content`, or inline in the content).
    pub reasoning_format: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StructuredOutputs {
    pub json: Option<Value>,
    pub regex: Option<String>,
    pub grammar: Option<String>,
    /// The output is one of these strings.
    pub choice: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(flatten)]
    pub common: Common,
    pub messages: Vec<ChatMessageIn>,
    #[serde(default, deserialize_with = "nullable")]
    pub logprobs: bool,
    pub top_logprobs: Option<Number>,
    pub response_format: Option<Value>,
    pub tools: Option<Vec<mlx_serving_engine::text::tools::Tool>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    /// Every other field (checked by `refuse_unsupported`).
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: Option<Value>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    #[serde(flatten)]
    pub common: Common,
    pub prompt: Value,
    /// Legacy API: number of alternatives per token (0 to 5).
    pub logprobs: Option<i64>,
    #[serde(default, deserialize_with = "nullable")]
    pub echo: bool,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// What a parsed request asks of the engine and of the response shape.
pub struct Parsed {
    /// One request per prompt (chat: one).
    pub reqs: Vec<GenerateRequest>,
    /// Choices to generate per prompt (`n`), each its own sequence.
    pub n: usize,
    pub shape: Shape,
}

/// What the response carries beside the text.
#[derive(Debug, Clone, Copy, Default)]
pub struct Shape {
    pub stream: bool,
    pub include_usage: bool,
    /// Usage on every chunk (vLLM's `continuous_usage_stats`).
    pub continuous_usage: bool,
    pub logprobs: bool,
    pub return_token_ids: bool,
}

/// The spec of what the endpoints share, `n`, and the response's shape.
fn common_to_spec(c: Common) -> Result<(RequestSpec, usize, Shape), BadRequest> {
    let n = c.n.unwrap_or(1);
    if !(1..=MAX_CHOICES).contains(&n) {
        return bad("n", format!("n must be from 1 to {MAX_CHOICES}, got {n}"));
    }
    if let Some(t) = c.temperature.filter(|t| *t > MAX_TEMPERATURE) {
        return bad("temperature", format!("temperature must be from 0 to {MAX_TEMPERATURE}, got {t}"));
    }
    let stop = match c.stop {
        None => vec![],
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    };
    if stop.len() > MAX_STOP_SEQUENCES {
        return bad("stop", format!("stop takes at most {MAX_STOP_SEQUENCES} sequences, got {}", stop.len()));
    }
    let opts = c.stream_options.as_ref();
    if opts.is_some() && !c.stream {
        return bad("stream_options", "stream_options is only allowed when stream is true");
    }
    let shape = Shape {
        stream: c.stream,
        include_usage: opts.is_some_and(|o| o.include_usage),
        continuous_usage: opts.is_some_and(|o| o.continuous_usage_stats),
        logprobs: false,
        return_token_ids: c.return_token_ids,
    };
    // A salt this server gives no other request: its blocks are shared with no one.
    let cache_salt = match c.cache_prompt {
        Some(false) => Some(format!("{}\0uncached-{}", c.cache_salt.unwrap_or_default(), uncached_count())),
        _ => c.cache_salt,
    };
    let spec = RequestSpec {
        model: Some(c.model),
        max_tokens: c.max_completion_tokens.or(c.max_tokens),
        min_tokens: c.min_tokens,
        temperature: c.temperature,
        top_p: c.top_p,
        top_k: c.top_k.filter(|&k| k != Number::Int(-1)),
        min_p: c.min_p,
        repetition_penalty: c.repetition_penalty,
        presence_penalty: c.presence_penalty,
        frequency_penalty: c.frequency_penalty,
        seed: c.seed.map(|s| match s {
            Number::Int(s) if s < 0 => Number::UInt(s as u64),
            s => s,
        }),
        stop_sequences: Some(stop),
        ignore_eos: Some(c.ignore_eos),
        priority: c.priority,
        cache_salt,
        request_id: c.user,
        logit_bias: c.logit_bias,
        reasoning_format: c.reasoning_format,
        ..RequestSpec::default()
    };
    let spec = match c.structured_outputs {
        None => spec,
        Some(so) => structured_outputs(spec, so)?,
    };
    Ok((spec, n as usize, shape))
}

/// Requests sent with `cache_prompt: false` so far.
fn uncached_count() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// vLLM's `structured_outputs` as the engine's constraint fields.
fn structured_outputs(mut spec: RequestSpec, so: StructuredOutputs) -> Result<RequestSpec, BadRequest> {
    let given = [so.json.is_some(), so.regex.is_some(), so.grammar.is_some(), so.choice.is_some()].iter().filter(|&&g| g).count();
    if given != 1 {
        return bad("structured_outputs", "structured_outputs takes exactly one of json, regex, grammar and choice");
    }
    spec.response_format = so.json.map(|schema| ResponseFormat::JsonSchema { schema, strict: None });
    spec.grammar = so.grammar;
    spec.regex = match so.choice {
        Some(c) if c.is_empty() => return bad("structured_outputs", "structured_outputs.choice must not be empty"),
        Some(c) => Some(c.iter().map(|s| regex_escape(s)).collect::<Vec<_>>().join("|")),
        None => so.regex,
    };
    Ok(spec)
}

/// `s` as a regex matching exactly it.
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('(');
    for ch in s.chars() {
        if "\\.+*?()|[]{}^$#&-~/\"".contains(ch) {
            out.push('\\');
        }
        out.push(ch);
    }
    out.push(')');
    out
}

/// OpenAI's `response_format`: `text`, `json_object`, or `json_schema`
/// with `{name, schema, strict, description}`.
fn response_format(v: Value) -> Result<Option<ResponseFormat>, BadRequest> {
    let kind = v.get("type").and_then(Value::as_str);
    match kind {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(ResponseFormat::JsonObject)),
        Some("json_schema") => match v.pointer("/json_schema/schema") {
            Some(schema) => Ok(Some(ResponseFormat::JsonSchema { schema: schema.clone(), strict: v.pointer("/json_schema/strict").and_then(Value::as_bool) })),
            None => bad("response_format", "response_format json_schema needs json_schema.schema"),
        },
        _ => bad("response_format", format!("response_format.type must be text, json_object or json_schema, got {}", v.get("type").unwrap_or(&Value::Null))),
    }
}

/// Message content as a string: plain text, or the text parts of an array.
fn content_text(role: &str, v: Option<Value>) -> Result<String, BadRequest> {
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    (Some("text"), None) => return bad("messages", format!("{role} message: a text part needs a string \"text\"")),
                    (Some(ty), _) => return bad("messages", format!("{role} message: content part type '{ty}' is not supported (text only)")),
                    (None, _) => return bad("messages", format!("{role} message: a content part needs a \"type\"")),
                }
            }
            Ok(out)
        }
        Some(other) => bad("messages", format!("{role} message: content must be a string or an array of text parts, got {other}")),
    }
}

pub fn parse_chat(body: &[u8]) -> Result<Parsed, BadRequest> {
    let r: ChatRequest = serde_json::from_slice(body).map_err(unreadable)?;
    refuse_unsupported(&r.other)?;
    let messages = r.messages.into_iter().map(message_from).collect::<Result<Vec<_>, BadRequest>>()?;
    let (mut spec, n, mut shape) = common_to_spec(r.common)?;
    spec.messages = Some(messages);
    if let Some(f) = r.response_format.filter(|v| !v.is_null()) {
        if spec.response_format.is_some() || spec.regex.is_some() || spec.grammar.is_some() {
            return bad("response_format", "give either response_format or structured_outputs, not both");
        }
        spec.response_format = response_format(f)?;
    }
    spec.tools = r.tools;
    spec.tool_choice = r.tool_choice.filter(|v| !v.is_null());
    spec.parallel_tool_calls = r.parallel_tool_calls;
    spec.top_logprobs = r.top_logprobs;
    let req = spec.resolve(&RequestDefaults { temperature: OPENAI_DEFAULT_TEMPERATURE, max_tokens: None })?;
    if !r.logprobs && req.top_logprobs > 0 {
        return bad("top_logprobs", "top_logprobs requires logprobs: true");
    }
    shape.logprobs = r.logprobs;
    Ok(Parsed { reqs: vec![req], n, shape })
}

/// Legacy `prompt`: a string, token ids, or a list of either (one choice
/// per prompt, times `n`).
fn prompts(v: Value) -> Result<Vec<PromptSpec>, BadRequest> {
    let one = |v: Value| match v {
        Value::String(s) => Ok(PromptSpec::Text(s)),
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_number) => {
            Ok(PromptSpec::Tokens { tokens: items.into_iter().map(serde_json::from_value).collect::<Result<_, _>>().map_err(unreadable)? })
        }
        other => bad("prompt", format!("each prompt must be a string or a non-empty array of token ids, got {other}")),
    };
    match v {
        Value::String(_) => Ok(vec![one(v)?]),
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_number) => Ok(vec![one(Value::Array(items))?]),
        Value::Array(items) if items.is_empty() => bad("prompt", "prompt must not be an empty list"),
        Value::Array(items) => items.into_iter().map(one).collect(),
        other => bad("prompt", format!("prompt must be a string, token ids, or a list of either, got {other}")),
    }
}

pub fn parse_completion(body: &[u8]) -> Result<Parsed, BadRequest> {
    let r: CompletionRequest = serde_json::from_slice(body).map_err(unreadable)?;
    refuse_unsupported(&r.other)?;
    if r.echo {
        return bad("echo", "echo is not supported");
    }
    let prompts = prompts(r.prompt)?;
    // The legacy API's alternatives per token: 0 to 5.
    let top = match r.logprobs {
        None => None,
        Some(n) if (0..=5).contains(&n) => Some(n as u64),
        Some(n) => return bad("logprobs", format!("logprobs must be in [0, 5], got {n}")),
    };
    let (mut spec, n, mut shape) = common_to_spec(r.common)?;
    spec.top_logprobs = top.map(Number::from);
    // Legacy completions have no reasoning field: the text is whole.
    if spec.reasoning_format.as_deref().is_some_and(|f| f != "inline") {
        return bad("reasoning_format", "completions keep reasoning inline: reasoning_format must be inline here");
    }
    spec.reasoning_format = Some("inline".into());
    shape.logprobs = top.is_some();
    let defaults = RequestDefaults { temperature: OPENAI_DEFAULT_TEMPERATURE, max_tokens: Some(COMPLETIONS_DEFAULT_MAX_TOKENS) };
    let reqs = prompts
        .into_iter()
        .map(|p| RequestSpec { prompt: Some(p), ..spec.clone() }.resolve(&defaults))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Parsed { reqs, n, shape })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx_serving_engine::engine::Input;

    #[test]
    fn chat_request_maps_to_engine_request() {
        let p = parse_chat(
            br#"{"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"hi"}]}],
                "max_tokens":5,"temperature":0,"stop":"x","stream":true,"stream_options":{"include_usage":true},
                "logprobs":true,"top_logprobs":3,"user":"ignored"}"#,
        )
        .unwrap();
        assert!(p.shape.stream && p.shape.include_usage && p.shape.logprobs);
        let req = &p.reqs[0];
        assert_eq!(req.max_tokens, Some(5));
        assert_eq!(req.top_logprobs, 3);
        assert_eq!(req.stop_sequences, vec!["x"]);
        match &req.input {
            Input::Messages(m) => assert_eq!(m[1].content, "hi"),
            _ => panic!(),
        }
    }

    #[test]
    fn completion_prompt_forms() {
        let inputs = |body: &[u8]| parse_completion(body).unwrap().reqs.into_iter().map(|r| r.input).collect::<Vec<_>>();
        assert!(matches!(&inputs(br#"{"model":"m","prompt":"a"}"#)[..], [Input::Prompt(_)]));
        assert!(matches!(&inputs(br#"{"model":"m","prompt":[1,2]}"#)[..], [Input::Tokens(_)]));
        assert!(matches!(&inputs(br#"{"model":"m","prompt":["a"]}"#)[..], [Input::Prompt(_)]));
        assert!(matches!(&inputs(br#"{"model":"m","prompt":["a","b",[3,4]]}"#)[..], [Input::Prompt(_), Input::Prompt(_), Input::Tokens(_)]));
        assert!(matches!(&inputs(br#"{"model":"m","prompt":[[1],[2,3]]}"#)[..], [Input::Tokens(_), Input::Tokens(_)]));
        assert_eq!(parse_completion(br#"{"model":"m","prompt":"a"}"#).unwrap().reqs[0].max_tokens, Some(16));
        for body in [&br#"{"model":"m","prompt":[]}"#[..], br#"{"model":"m","prompt":[[]]}"#, br#"{"model":"m","prompt":["a",{"x":1}]}"#, br#"{"model":"m","prompt":[["a"]]}"#] {
            assert_eq!(parse_completion(body).map(|_| ()).unwrap_err().param.as_deref(), Some("prompt"), "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn developer_is_system_and_peer_extensions_parse() {
        let p = parse_chat(br#"{"model":"m","messages":[{"role":"developer","content":"d"},{"role":"user","content":"u"}],"min_tokens":3,"return_token_ids":true,"cache_prompt":false,"stream":true,"stream_options":{"include_usage":true,"continuous_usage_stats":true},"prompt_cache_key":"k","safety_identifier":"s","modalities":["text"]}"#).unwrap();
        match &p.reqs[0].input {
            Input::Messages(m) => assert_eq!(m[0].role, "system"),
            _ => panic!(),
        }
        assert_eq!(p.reqs[0].min_tokens, 3);
        assert!(p.shape.return_token_ids && p.shape.continuous_usage && p.shape.include_usage);
        let salt = p.reqs[0].cache_salt.clone().unwrap();
        let again = parse_chat(br#"{"model":"m","messages":[{"role":"user","content":"u"}],"cache_prompt":false}"#).unwrap();
        assert_ne!(again.reqs[0].cache_salt.as_deref(), Some(salt.as_str()), "each uncached request has a salt of its own");
        assert_eq!(parse_chat(br#"{"model":"m","messages":[{"role":"user","content":"u"}],"cache_prompt":true}"#).unwrap().reqs[0].cache_salt, None);
        let refused = |extra: &str| parse_chat(format!(r#"{{"model":"m","messages":[{{"role":"user","content":"u"}}]{extra}}}"#).as_bytes()).map(|_| ()).unwrap_err();
        let e = refused(r#","stream":true,"stream_options":{"include_usage":true,"sometimes":1}"#);
        assert!(e.message.contains("unknown field `sometimes`"), "{}", e.message);
        let e = refused(r#","temperature":2.5"#);
        assert_eq!((e.message.as_str(), e.param.as_deref()), ("temperature must be from 0 to 2, got 2.5", Some("temperature")));
        assert_eq!(refused(r#","min_tokens":9,"max_tokens":4"#).param.as_deref(), Some("min_tokens"));
        assert_eq!(refused(r#","modalities":["text","audio"]"#).param.as_deref(), Some("modalities"));
    }

    #[test]
    fn rejects_what_cannot_be_honoured() {
        for body in [
            &br#"{"model":"m","messages":[],"n":17}"#[..],
            br#"{"model":"m","messages":[],"n":0}"#,
            br#"{"model":"m","messages":[],"top_logprobs":3}"#,
            br#"{"model":"m","messages":[],"stop":["a","b","c","d","e"]}"#,
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
            br#"{"model":"m","messages":[],"stream_options":{"include_usage":true}}"#,
            br#"{"model":"m","messages":"hi"}"#,
            br#"{"messages":[]}"#,
            br#"not json"#,
        ] {
            assert!(parse_chat(body).is_err(), "{}", String::from_utf8_lossy(body));
        }
        assert!(parse_completion(br#"{"model":"m","prompt":{"x":1}}"#).is_err());
        assert!(parse_completion(br#"{"model":"m","prompt":"a","echo":true}"#).is_err());
        assert!(parse_completion(br#"{"model":"m","prompt":"a","logprobs":9}"#).is_err());
        // Token ids the engine refuses are named by OpenAI's field, with the index.
        for body in [&br#"{"model":"m","prompt":[1,-1]}"#[..], br#"{"model":"m","prompt":[1,2.5]}"#, br#"{"model":"m","prompt":[1,4294967296]}"#] {
            let e = parse_completion(body).map(|_| ()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("prompt"), "{}", e.message);
            assert!(e.message.starts_with("prompt[1] must be a token id"), "{}", e.message);
        }
    }

    #[test]
    fn fields_we_cannot_honour_are_named_and_harmless_ones_pass() {
        let chat = |extra: &str| parse_chat(format!(r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}]{extra}}}"#).as_bytes()).map(|_| ());
        let param = |body: &[u8]| parse_chat(body).map(|_| ()).unwrap_err().param;
        for (extra, named) in [
            (r#","tools":[{"type":"function","function":{"name":"bad name"}}]"#, "tools[0].function.name must be 1 to 64 letters, digits, '_' or '-', got \"bad name\""),
            (r#","response_format":{"type":"yaml"}"#, "response_format.type must be text, json_object or json_schema, got \"yaml\""),
            (r#","response_format":{"type":"json_schema","json_schema":{"name":"x"}}"#, "response_format json_schema needs json_schema.schema"),
            (r#","logit_bias":{"x":1}"#, "logit_bias keys must be token ids, got 'x'"),
            (r#","logit_bias":{"5":101}"#, "logit_bias values must be in [-100, 100], got 101 for token 5"),
            (r#","foo_bar":1"#, "foo_bar is not supported"),
            (r#","tool_choice":"sometimes""#, "tool_choice must be auto, none, required or a named function, got 'sometimes'"),
            (r#","tool_choice":"required""#, "tool_choice requires tools"),
            (r#","tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":{"type":"function","function":{"name":"g"}}"#, "tool_choice names 'g', which is not among the tools"),
            (r#","name":"x""#, "name is not supported"),
            (r#","regex":"a""#, "regex is not supported"),
            (r#","structured_outputs":{"regex":"a","grammar":"start: \"a\""}"#, "structured_outputs takes exactly one of json, regex, grammar and choice"),
            (r#","structured_outputs":{"regex":"a"},"response_format":{"type":"json_object"}"#, "give either response_format or structured_outputs, not both"),
        ] {
            assert_eq!(chat(extra).unwrap_err().message, named, "{extra}");
        }
        for extra in [
            r#","tools":[],"logit_bias":{},"tool_choice":"none","response_format":{"type":"text"}"#,
            r#","metadata":{"a":"b"},"store":false,"parallel_tool_calls":true,"suffix":null"#,
            r#","stream":null,"logprobs":null,"ignore_eos":null"#,
            r#","response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"object"},"strict":true}}"#,
            r#","structured_outputs":{"choice":["a.b","c|d"]},"logit_bias":{"5":-100}"#,
        ] {
            assert_eq!(chat(extra), Ok(()), "{extra}");
        }
        let tool_call = br#"{"model":"m","messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"1"}]}]}"#;
        assert_eq!(parse_chat(tool_call).map(|_| ()).unwrap_err().message, "assistant message: tool_calls[0] needs function.name and function.arguments (a JSON string)");
        let history = br#"{"model":"m","messages":[{"role":"user","content":"hi"},{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"x\":1}"}}]},{"role":"tool","tool_call_id":"c1","content":"42"}]}"#;
        match parse_chat(history).unwrap().reqs.remove(0).input {
            Input::Messages(m) => assert_eq!((m[1].tool_calls.len(), m[2].tool_call_id.as_deref()), (1, Some("c1"))),
            _ => panic!(),
        }
        assert!(parse_completion(br#"{"model":"m","prompt":"a","suffix":"z"}"#).map(|_| ()).unwrap_err().message.contains("suffix"));
        assert!(parse_completion(br#"{"model":"m","prompt":"a","echo":null,"stream":null,"best_of":1}"#).is_ok());
        // Completions take no tools or JSON formats, but their empty forms change nothing.
        assert!(parse_completion(br#"{"model":"m","prompt":"a","tools":[],"tool_choice":"none","response_format":{"type":"text"}}"#).is_ok());
        assert!(parse_completion(br#"{"model":"m","prompt":"a","response_format":{"type":"json_object"}}"#).is_err());
        let named = br#"{"model":"m","messages":[{"role":"user","content":"hi","name":"ann","tool_calls":[]}]}"#;
        assert!(parse_chat(named).is_ok());
        for (body, want) in [
            (&br#"{"model":"m","messages":[],"foo":1}"#[..], Some("foo")),
            (tool_call, Some("messages")),
            (br#"{"model":"m","messages":[],"top_k":-5}"#, Some("top_k")),
            (br#"{"model":"m","messages":[],"n":17}"#, Some("n")),
            (br#"{"model":"m","messages":[{"role":"user","content":"x"}],"tool_choice":"required"}"#, Some("tool_choice")),
            (br#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f","parameters":[]}}]}"#, Some("tools")),
            (br#"{"model":"m","messages":[{"role":"user","content":"x"}],"logit_bias":{"a":1}}"#, Some("logit_bias")),
            (br#"not json"#, None),
        ] {
            assert_eq!(param(body).as_deref(), want, "{}", String::from_utf8_lossy(body));
        }
        let part = br#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#;
        assert_eq!(parse_chat(part).map(|_| ()).unwrap_err().message, "user message: content part type 'image_url' is not supported (text only)");
    }

    #[test]
    fn constraints_map_to_the_engines() {
        use mlx_serving_engine::text::grammar::Constraint;
        let chat = |extra: &str| parse_chat(format!(r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}]{extra}}}"#).as_bytes()).unwrap().reqs.remove(0);
        assert_eq!(chat(r#","response_format":{"type":"json_object"}"#).constraint, Some(Constraint::JsonObject));
        assert_eq!(chat(r#","structured_outputs":{"choice":["a.b","c"]}"#).constraint, Some(Constraint::Regex(r"(a\.b)|(c)".into())));
        assert_eq!(chat(r#","logit_bias":{"7":-100}"#).sampling.logit_bias, vec![(7, -100.0)]);
        let r = chat(r#","tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"required","parallel_tool_calls":false"#);
        assert_eq!((r.tools.len(), r.tool_choice, r.parallel_tool_calls), (1, mlx_serving_engine::text::tools::ToolChoice::Required, false));
    }
}
