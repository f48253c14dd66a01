//! OpenAI request bodies and their translation to engine requests. Fields
//! clients commonly send but that do not change our output (`user`,
//! `n: 1`, ...) are accepted; fields we cannot honour are rejected with a
//! 400 that names them, never silently ignored.

use mlx_serving_engine::chat::ChatMessage;
use mlx_serving_engine::engine::{GenerateRequest, Input, Priority};
use mlx_serving_engine::sampler::SamplingParams;
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

/// OpenAI's default `max_tokens` for legacy completions.
const COMPLETIONS_DEFAULT_MAX_TOKENS: i64 = 16;
/// Most stop sequences a request may carry (OpenAI's limit).
const MAX_STOP_SEQUENCES: usize = 4;
/// Most choices (`n`) per request; each is a sequence of its own.
pub const MAX_CHOICES: i64 = 16;

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
/// null, an empty `tools` / `logit_bias`, `response_format` text, or
/// bookkeeping (`metadata`, `store`, ...). `tools` or a JSON
/// `response_format` silently dropped would hand a client plain text it
/// cannot use.
fn refuse_unsupported(fields: &Map<String, Value>) -> Result<(), String> {
    for (k, v) in fields {
        let empty = v.as_array().is_some_and(|a| a.is_empty()) || v.as_object().is_some_and(|o| o.is_empty());
        let harmless = v.is_null()
            || matches!(k.as_str(), "metadata" | "store" | "service_tier" | "parallel_tool_calls")
            || (matches!(k.as_str(), "tools" | "functions" | "logit_bias") && empty)
            || (matches!(k.as_str(), "tool_choice" | "function_call") && v == "none")
            || (k == "best_of" && v == 1)
            || (k == "response_format" && v.get("type").and_then(Value::as_str) == Some("text"));
        if !harmless {
            return bad(format!("{k} is not supported"));
        }
    }
    Ok(())
}

/// A message's fields beyond role and content: a name changes nothing here.
fn refuse_unsupported_in_message(fields: &Map<String, Value>, role: &str) -> Result<(), String> {
    for (k, v) in fields {
        let empty = v.as_array().is_some_and(|a| a.is_empty());
        if !(v.is_null() || k == "name" || (k == "tool_calls" && empty)) {
            return bad(format!("{role} message: {k} is not supported"));
        }
    }
    Ok(())
}

/// Request fields an error message may start with.
const FIELDS: &[&str] = &[
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
    "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "stop", "stream", "stream_options", "n",
    "logprobs", "top_logprobs", "echo", "priority", "cache_salt", "user", "ignore_eos",
];

/// OpenAI's `param` for one of our parse errors: the field it names first,
/// `messages` for a message's, the field refused as unsupported.
pub fn param_of(msg: &str) -> Option<String> {
    if msg.contains(" message: ") {
        return Some("messages".into());
    }
    if let Some(field) = msg.strip_suffix(" is not supported") {
        return Some(field.to_owned());
    }
    let first = msg.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).next()?;
    FIELDS.contains(&first).then(|| first.to_owned())
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default, deserialize_with = "nullable")]
    pub include_usage: bool,
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Deserialize, Default)]
pub struct Common {
    pub model: String,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<i64>,
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
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(flatten)]
    pub common: Common,
    pub messages: Vec<ChatMessageIn>,
    #[serde(default, deserialize_with = "nullable")]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
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
    pub req: GenerateRequest,
    /// Choices to generate (`n`), each its own sequence.
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: bool,
}

fn bad<T>(msg: impl Into<String>) -> Result<T, String> {
    Err(msg.into())
}

/// The engine request, and `n`, `stream`, `include_usage`.
fn common_to_request(c: Common, input: Input, default_max: Option<i64>) -> Result<(GenerateRequest, usize, bool, bool), String> {
    let n = c.n.unwrap_or(1);
    if !(1..=MAX_CHOICES).contains(&n) {
        return bad(format!("n must be from 1 to {MAX_CHOICES}, got {n}"));
    }
    let stop = match c.stop {
        None => vec![],
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    };
    if stop.len() > MAX_STOP_SEQUENCES {
        return bad(format!("stop takes at most {MAX_STOP_SEQUENCES} sequences, got {}", stop.len()));
    }
    let d = SamplingParams::default();
    let top_k = match c.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => return bad(format!("top_k must be -1, 0 or positive, got {k}")),
    };
    let seed = match c.seed {
        None => None,
        Some(s) if s >= 0 => Some(s as u64),
        // Negative seeds are valid for OpenAI clients; keep them reproducible.
        Some(s) => Some(s as u64),
    };
    let sampling = SamplingParams {
        // OpenAI's default temperature is 1.
        temperature: c.temperature.unwrap_or(1.0),
        top_k,
        top_p: c.top_p.unwrap_or(d.top_p),
        min_p: c.min_p.unwrap_or(d.min_p),
        repetition_penalty: c.repetition_penalty.unwrap_or(d.repetition_penalty),
        presence_penalty: c.presence_penalty.unwrap_or(d.presence_penalty),
        frequency_penalty: c.frequency_penalty.unwrap_or(d.frequency_penalty),
        seed,
    };
    let include_usage = c.stream_options.as_ref().is_some_and(|o| o.include_usage);
    if c.stream_options.is_some() && !c.stream {
        return bad("stream_options is only allowed when stream is true");
    }
    Ok((
        GenerateRequest {
            model: c.model,
            input,
            max_tokens: c.max_completion_tokens.or(c.max_tokens).or(default_max),
            sampling,
            stop_sequences: stop,
            stop_token_ids: vec![],
            ignore_eos: c.ignore_eos,
            top_logprobs: 0,
            timeout_ms: None,
            priority: match c.priority.as_deref() {
                None => Priority::Default,
                Some(p) => Priority::parse(p).map_err(|e| e.to_string())?,
            },
            cache_salt: c.cache_salt,
            request_id: c.user,
            pin_prefix: false,
        },
        n as usize,
        c.stream,
        include_usage,
    ))
}

/// Message content as a string: plain text, or the text parts of an array.
fn content_text(role: &str, v: Option<Value>) -> Result<String, String> {
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    (Some("text"), None) => return bad(format!("{role} message: a text part needs a string \"text\"")),
                    (Some(ty), _) => return bad(format!("{role} message: content part type '{ty}' is not supported (text only)")),
                    (None, _) => return bad(format!("{role} message: a content part needs a \"type\"")),
                }
            }
            Ok(out)
        }
        Some(other) => bad(format!("{role} message: content must be a string or an array of text parts, got {other}")),
    }
}

pub fn parse_chat(body: &[u8]) -> Result<Parsed, String> {
    let r: ChatRequest = serde_json::from_slice(body).map_err(|e| format!("invalid request body: {e}"))?;
    refuse_unsupported(&r.other)?;
    let messages = r
        .messages
        .into_iter()
        .map(|m| {
            refuse_unsupported_in_message(&m.other, &m.role)?;
            Ok(ChatMessage { content: content_text(&m.role, m.content)?, role: m.role })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let top = match (r.logprobs, r.top_logprobs) {
        (_, Some(n)) if !(0..=20).contains(&n) => return bad(format!("top_logprobs must be in [0, 20], got {n}")),
        (false, Some(n)) if n > 0 => return bad("top_logprobs requires logprobs: true"),
        (_, n) => n.unwrap_or(0) as usize,
    };
    let (mut req, n, stream, include_usage) = common_to_request(r.common, Input::Messages(messages), None)?;
    req.top_logprobs = top;
    Ok(Parsed { req, n, stream, include_usage, logprobs: r.logprobs })
}

pub fn parse_completion(body: &[u8]) -> Result<Parsed, String> {
    let r: CompletionRequest = serde_json::from_slice(body).map_err(|e| format!("invalid request body: {e}"))?;
    refuse_unsupported(&r.other)?;
    if r.echo {
        return bad("echo is not supported");
    }
    let input = match r.prompt {
        Value::String(s) => Input::Prompt(s),
        Value::Array(items) if items.iter().all(Value::is_u64) => {
            Input::Tokens(items.iter().map(|v| v.as_u64().unwrap().min(u32::MAX as u64) as u32).collect())
        }
        Value::Array(items) if items.len() == 1 && items[0].is_string() => Input::Prompt(items[0].as_str().unwrap().to_owned()),
        Value::Array(_) => return bad("prompt must be a string, one string in an array, or an array of token ids"),
        other => return bad(format!("prompt must be a string or token ids, got {other}")),
    };
    let top = match r.logprobs {
        None => None,
        Some(n) if (0..=5).contains(&n) => Some(n as usize),
        Some(n) => return bad(format!("logprobs must be in [0, 5], got {n}")),
    };
    let (mut req, n, stream, include_usage) = common_to_request(r.common, input, Some(COMPLETIONS_DEFAULT_MAX_TOKENS))?;
    req.top_logprobs = top.unwrap_or(0);
    Ok(Parsed { req, n, stream, include_usage, logprobs: top.is_some() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_request_maps_to_engine_request() {
        let p = parse_chat(
            br#"{"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"hi"}]}],
                "max_tokens":5,"temperature":0,"stop":"x","stream":true,"stream_options":{"include_usage":true},
                "logprobs":true,"top_logprobs":3,"user":"ignored"}"#,
        )
        .unwrap();
        assert!(p.stream && p.include_usage && p.logprobs);
        assert_eq!(p.req.max_tokens, Some(5));
        assert_eq!(p.req.top_logprobs, 3);
        assert_eq!(p.req.stop_sequences, vec!["x"]);
        match p.req.input {
            Input::Messages(m) => assert_eq!(m[1].content, "hi"),
            _ => panic!(),
        }
    }

    #[test]
    fn completion_prompt_forms() {
        assert!(matches!(parse_completion(br#"{"model":"m","prompt":"a"}"#).unwrap().req.input, Input::Prompt(_)));
        assert!(matches!(parse_completion(br#"{"model":"m","prompt":[1,2]}"#).unwrap().req.input, Input::Tokens(_)));
        assert_eq!(parse_completion(br#"{"model":"m","prompt":"a"}"#).unwrap().req.max_tokens, Some(16));
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
    }

    #[test]
    fn fields_we_cannot_honour_are_named_and_harmless_ones_pass() {
        let chat = |extra: &str| parse_chat(format!(r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}]{extra}}}"#).as_bytes()).map(|_| ());
        for (extra, named) in [
            (r#","tools":[{"type":"function","function":{"name":"f"}}]"#, "tools is not supported"),
            (r#","response_format":{"type":"json_object"}"#, "response_format is not supported"),
            (r#","logit_bias":{"50256":-100}"#, "logit_bias is not supported"),
            (r#","foo_bar":1"#, "foo_bar is not supported"),
            (r#","tool_choice":"auto""#, "tool_choice is not supported"),
            (r#","name":"x""#, "name is not supported"),
            (r#","tool_calls":[]"#, "tool_calls is not supported"),
        ] {
            assert_eq!(chat(extra).unwrap_err(), named, "{extra}");
        }
        for extra in [
            r#","tools":[],"logit_bias":{},"tool_choice":"none","response_format":{"type":"text"}"#,
            r#","metadata":{"a":"b"},"store":false,"parallel_tool_calls":true,"suffix":null"#,
            r#","stream":null,"logprobs":null,"ignore_eos":null"#,
        ] {
            assert_eq!(chat(extra), Ok(()), "{extra}");
        }
        let tool_call = br#"{"model":"m","messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"1"}]}]}"#;
        assert_eq!(parse_chat(tool_call).map(|_| ()).unwrap_err(), "assistant message: tool_calls is not supported");
        assert!(parse_completion(br#"{"model":"m","prompt":"a","suffix":"z"}"#).map(|_| ()).unwrap_err().contains("suffix"));
        assert!(parse_completion(br#"{"model":"m","prompt":"a","echo":null,"stream":null,"best_of":1}"#).is_ok());
        let named = br#"{"model":"m","messages":[{"role":"user","content":"hi","name":"ann","tool_calls":[]}]}"#;
        assert!(parse_chat(named).is_ok());
        for (msg, param) in [
            ("foo is not supported", Some("foo")),
            ("assistant message: tool_calls is not supported", Some("messages")),
            ("top_k must be -1, 0 or positive, got -5", Some("top_k")),
            ("n must be from 1 to 16, got 17", Some("n")),
            ("invalid request body: expected value at line 1 column 1", None),
        ] {
            assert_eq!(param_of(msg).as_deref(), param, "{msg}");
        }
        let part = br#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#;
        assert_eq!(parse_chat(part).map(|_| ()).unwrap_err(), "user message: content part type 'image_url' is not supported (text only)");
    }
}
