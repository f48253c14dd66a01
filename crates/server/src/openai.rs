//! OpenAI request bodies and their translation to the engine's request spec,
//! which checks the fields. What is left here is the wire format's own:
//! `n`, streaming, the logprobs shapes, OpenAI's conventions (`top_k: -1`,
//! negative seeds, at most 4 stops). Fields clients commonly send but that
//! do not change our output (`user`, `n: 1`, ...) are accepted; fields we
//! cannot honour are rejected with a 400 that names them, never silently
//! ignored.

use mlx_serving_engine::text::chat::ChatMessage;
use mlx_serving_engine::engine::GenerateRequest;
use mlx_serving_engine::request::{InvalidParam, Number, PromptSpec, RequestDefaults, RequestSpec};
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
fn refuse_unsupported(fields: &Map<String, Value>) -> Result<(), BadRequest> {
    for (k, v) in fields {
        let empty = v.as_array().is_some_and(|a| a.is_empty()) || v.as_object().is_some_and(|o| o.is_empty());
        let harmless = v.is_null()
            || matches!(k.as_str(), "metadata" | "store" | "service_tier" | "parallel_tool_calls")
            || (matches!(k.as_str(), "tools" | "functions" | "logit_bias") && empty)
            || (matches!(k.as_str(), "tool_choice" | "function_call") && v == "none")
            || (k == "best_of" && v == 1)
            || (k == "response_format" && v.get("type").and_then(Value::as_str) == Some("text"));
        if !harmless {
            return bad(k, format!("{k} is not supported"));
        }
    }
    Ok(())
}

/// A message's fields beyond role and content: a name changes nothing here.
fn refuse_unsupported_in_message(fields: &Map<String, Value>, role: &str) -> Result<(), BadRequest> {
    for (k, v) in fields {
        let empty = v.as_array().is_some_and(|a| a.is_empty());
        if !(v.is_null() || k == "name" || (k == "tool_calls" && empty)) {
            return bad("messages", format!("{role} message: {k} is not supported"));
        }
    }
    Ok(())
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
pub struct StreamOptions {
    #[serde(default, deserialize_with = "nullable")]
    pub include_usage: bool,
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Deserialize, Default)]
pub struct Common {
    pub model: String,
    pub max_tokens: Option<Number>,
    pub max_completion_tokens: Option<Number>,
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
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(flatten)]
    pub common: Common,
    pub messages: Vec<ChatMessageIn>,
    #[serde(default, deserialize_with = "nullable")]
    pub logprobs: bool,
    pub top_logprobs: Option<Number>,
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

/// The spec of what the endpoints share, and `n`, `stream`, `include_usage`.
fn common_to_spec(c: Common) -> Result<(RequestSpec, usize, bool, bool), BadRequest> {
    let n = c.n.unwrap_or(1);
    if !(1..=MAX_CHOICES).contains(&n) {
        return bad("n", format!("n must be from 1 to {MAX_CHOICES}, got {n}"));
    }
    let stop = match c.stop {
        None => vec![],
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    };
    if stop.len() > MAX_STOP_SEQUENCES {
        return bad("stop", format!("stop takes at most {MAX_STOP_SEQUENCES} sequences, got {}", stop.len()));
    }
    let include_usage = c.stream_options.as_ref().is_some_and(|o| o.include_usage);
    if c.stream_options.is_some() && !c.stream {
        return bad("stream_options", "stream_options is only allowed when stream is true");
    }
    let spec = RequestSpec {
        model: Some(c.model),
        max_tokens: c.max_completion_tokens.or(c.max_tokens),
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
        cache_salt: c.cache_salt,
        request_id: c.user,
        ..RequestSpec::default()
    };
    Ok((spec, n as usize, c.stream, include_usage))
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
    let messages = r
        .messages
        .into_iter()
        .map(|m| {
            refuse_unsupported_in_message(&m.other, &m.role)?;
            Ok(ChatMessage::new(m.role.clone(), content_text(&m.role, m.content)?))
        })
        .collect::<Result<Vec<_>, BadRequest>>()?;
    let (mut spec, n, stream, include_usage) = common_to_spec(r.common)?;
    spec.messages = Some(messages);
    spec.top_logprobs = r.top_logprobs;
    let req = spec.resolve(&RequestDefaults { temperature: OPENAI_DEFAULT_TEMPERATURE, max_tokens: None })?;
    if !r.logprobs && req.top_logprobs > 0 {
        return bad("top_logprobs", "top_logprobs requires logprobs: true");
    }
    Ok(Parsed { req, n, stream, include_usage, logprobs: r.logprobs })
}

pub fn parse_completion(body: &[u8]) -> Result<Parsed, BadRequest> {
    let r: CompletionRequest = serde_json::from_slice(body).map_err(unreadable)?;
    refuse_unsupported(&r.other)?;
    if r.echo {
        return bad("echo", "echo is not supported");
    }
    let prompt = match r.prompt {
        Value::String(s) => PromptSpec::Text(s),
        Value::Array(items) if items.iter().all(Value::is_number) => {
            PromptSpec::Tokens { tokens: items.into_iter().map(serde_json::from_value).collect::<Result<_, _>>().map_err(unreadable)? }
        }
        Value::Array(mut items) if items.len() == 1 && items[0].is_string() => {
            let Some(Value::String(s)) = items.pop() else { unreachable!() };
            PromptSpec::Text(s)
        }
        Value::Array(_) => return bad("prompt", "prompt must be a string, one string in an array, or an array of token ids"),
        other => return bad("prompt", format!("prompt must be a string or token ids, got {other}")),
    };
    // The legacy API's alternatives per token: 0 to 5.
    let top = match r.logprobs {
        None => None,
        Some(n) if (0..=5).contains(&n) => Some(n as u64),
        Some(n) => return bad("logprobs", format!("logprobs must be in [0, 5], got {n}")),
    };
    let (mut spec, n, stream, include_usage) = common_to_spec(r.common)?;
    spec.prompt = Some(prompt);
    spec.top_logprobs = top.map(Number::from);
    let defaults = RequestDefaults { temperature: OPENAI_DEFAULT_TEMPERATURE, max_tokens: Some(COMPLETIONS_DEFAULT_MAX_TOKENS) };
    Ok(Parsed { req: spec.resolve(&defaults)?, n, stream, include_usage, logprobs: top.is_some() })
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
            (r#","tools":[{"type":"function","function":{"name":"f"}}]"#, "tools is not supported"),
            (r#","response_format":{"type":"json_object"}"#, "response_format is not supported"),
            (r#","logit_bias":{"50256":-100}"#, "logit_bias is not supported"),
            (r#","foo_bar":1"#, "foo_bar is not supported"),
            (r#","tool_choice":"auto""#, "tool_choice is not supported"),
            (r#","name":"x""#, "name is not supported"),
            (r#","tool_calls":[]"#, "tool_calls is not supported"),
        ] {
            assert_eq!(chat(extra).unwrap_err().message, named, "{extra}");
        }
        for extra in [
            r#","tools":[],"logit_bias":{},"tool_choice":"none","response_format":{"type":"text"}"#,
            r#","metadata":{"a":"b"},"store":false,"parallel_tool_calls":true,"suffix":null"#,
            r#","stream":null,"logprobs":null,"ignore_eos":null"#,
        ] {
            assert_eq!(chat(extra), Ok(()), "{extra}");
        }
        let tool_call = br#"{"model":"m","messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"1"}]}]}"#;
        assert_eq!(parse_chat(tool_call).map(|_| ()).unwrap_err().message, "assistant message: tool_calls is not supported");
        assert!(parse_completion(br#"{"model":"m","prompt":"a","suffix":"z"}"#).map(|_| ()).unwrap_err().message.contains("suffix"));
        assert!(parse_completion(br#"{"model":"m","prompt":"a","echo":null,"stream":null,"best_of":1}"#).is_ok());
        let named = br#"{"model":"m","messages":[{"role":"user","content":"hi","name":"ann","tool_calls":[]}]}"#;
        assert!(parse_chat(named).is_ok());
        for (body, want) in [
            (&br#"{"model":"m","messages":[],"foo":1}"#[..], Some("foo")),
            (tool_call, Some("messages")),
            (br#"{"model":"m","messages":[],"top_k":-5}"#, Some("top_k")),
            (br#"{"model":"m","messages":[],"n":17}"#, Some("n")),
            (br#"not json"#, None),
        ] {
            assert_eq!(param(body).as_deref(), want, "{}", String::from_utf8_lossy(body));
        }
        let part = br#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#;
        assert_eq!(parse_chat(part).map(|_| ()).unwrap_err().message, "user message: content part type 'image_url' is not supported (text only)");
    }
}
