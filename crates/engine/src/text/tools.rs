//! Tool calling: the tools a request offers, how they reach the prompt (the
//! model's own template through its `tools` variable, or a system turn that
//! describes them for templates without tool support), the grammar that
//! makes `required` and named tool choices produce a valid call, and the
//! parser that turns `<tool_call>{json}</tool_call>` blocks in the output
//! into calls.
//!
//! The call format is the Hermes one (Qwen 2.5 and 3, SmolLM3, Hermes and
//! most templates with tool support): a JSON object with `name` and
//! `arguments` between `<tool_call>` tags, one block per call.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::text::chat::ChatMessage;
use crate::text::grammar::Constraint;

pub const CALL_OPEN: &str = "<tool_call>";
pub const CALL_CLOSE: &str = "</tool_call>";

/// A function the model may call (OpenAI's `{type: "function", function}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: Function,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Function {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON schema of the arguments object (none: no arguments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// Whether and which tool the model must call.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum ToolChoice {
    /// The model decides (calls are parsed out of its output).
    #[default]
    Auto,
    /// No calls: the tools are not offered at all.
    None,
    /// At least one call, of any tool (grammar-constrained).
    Required,
    /// A call of this tool (grammar-constrained).
    Named(String),
}

impl ToolChoice {
    /// `auto`, `none`, `required` or `{type: "function", function: {name}}`.
    pub fn parse(v: &Value) -> Result<Self, String> {
        match v {
            Value::String(s) => match s.as_str() {
                "auto" => Ok(ToolChoice::Auto),
                "none" => Ok(ToolChoice::None),
                "required" => Ok(ToolChoice::Required),
                other => Err(format!("must be auto, none, required or a named function, got '{other}'")),
            },
            Value::Object(_) => match v.pointer("/function/name").and_then(Value::as_str) {
                Some(name) if v.get("type").is_none_or(|t| t == "function") => Ok(ToolChoice::Named(name.to_owned())),
                _ => Err("must name a function as {\"type\": \"function\", \"function\": {\"name\": ...}}".into()),
            },
            other => Err(format!("must be a string or an object, got {other}")),
        }
    }
}

/// What makes a tool list unusable: the error reads after the field name.
pub fn check_tools(tools: &[Tool], choice: &ToolChoice) -> Result<(), (bool, String)> {
    for (i, t) in tools.iter().enumerate() {
        if t.kind != "function" {
            return Err((true, format!("[{i}].type must be \"function\", got '{}'", t.kind)));
        }
        let name = &t.function.name;
        if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            return Err((true, format!("[{i}].function.name must be 1 to 64 letters, digits, '_' or '-', got {name:?}")));
        }
        if tools[..i].iter().any(|u| &u.function.name == name) {
            return Err((true, format!("[{i}].function.name '{name}' is defined twice")));
        }
        match &t.function.parameters {
            None | Some(Value::Object(_)) => {}
            Some(other) => return Err((true, format!("[{i}].function.parameters must be a JSON schema object, got {other}"))),
        }
    }
    match choice {
        ToolChoice::Named(n) if !tools.iter().any(|t| &t.function.name == n) => Err((false, format!("names '{n}', which is not among the tools"))),
        ToolChoice::Required | ToolChoice::Named(_) if tools.is_empty() => Err((false, "requires tools".into())),
        _ => Ok(()),
    }
}

/// The JSON schema of one call of `t`: `{"name": ..., "arguments": ...}`.
fn call_schema(t: &Tool) -> Value {
    let args = t.function.parameters.clone().unwrap_or_else(|| json!({"type": "object", "properties": {}}));
    json!({
        "type": "object",
        "properties": {"name": {"const": t.function.name}, "arguments": args},
        "required": ["name", "arguments"],
        "additionalProperties": false,
    })
}

/// The grammar of the output when a call is required: one call block (or
/// several, with `parallel`), of any tool or of the named one.
pub fn call_grammar(tools: &[Tool], choice: &ToolChoice, parallel: bool) -> Option<Constraint> {
    let allowed: Vec<&Tool> = match choice {
        ToolChoice::Auto | ToolChoice::None => return None,
        ToolChoice::Required => tools.iter().collect(),
        ToolChoice::Named(n) => tools.iter().filter(|t| &t.function.name == n).collect(),
    };
    Some(calls_grammar(&allowed, parallel, "call"))
}

/// With `tool_choice: auto`, the grammar of what follows a `<tool_call>`
/// the model opened on its own (llama.cpp's lazy grammar): the rest of
/// that call, then more calls or the end. The worker attaches it when the
/// tag appears, so a call the model starts is always a valid one.
pub fn rest_of_call_grammar(tools: &[Tool], choice: &ToolChoice, parallel: bool) -> Option<Constraint> {
    match choice {
        ToolChoice::Auto if !tools.is_empty() => Some(calls_grammar(&tools.iter().collect::<Vec<_>>(), parallel, "rest")),
        _ => None,
    }
}

/// Call blocks of `allowed`; `first` is `call` (a whole block) or `rest`
/// (a block whose opening tag is already written).
fn calls_grammar(allowed: &[&Tool], parallel: bool, first: &str) -> Constraint {
    let schema = match allowed {
        [one] => call_schema(one),
        many => json!({"anyOf": many.iter().map(|t| call_schema(t)).collect::<Vec<_>>()}),
    };
    let schema = json!({"x-guidance": {"whitespace_flexible": false, "key_separator": ": ", "item_separator": ", "}, "allOf": [schema]});
    let more = if parallel { "(\"\\n\" call)*" } else { "" };
    Constraint::Lark(format!(
        "start: {first} {more}\ncall: {open:?} rest\nrest: \"\\n\" body \"\\n\" {close:?}\nbody: %json {schema}\n",
        open = CALL_OPEN,
        close = CALL_CLOSE,
    ))
}

/// The system turn that offers `tools` to a model whose template cannot.
pub fn describe_tools(tools: &[Tool]) -> String {
    let mut s = String::from(
        "You can call functions. These are available, as JSON schemas:\n<tools>\n",
    );
    for t in tools {
        s.push_str(&serde_json::to_string(t).expect("tools serialize"));
        s.push('\n');
    }
    s.push_str(
        "</tools>\nTo call one, reply with a JSON object holding the function's name and its arguments between tags:\n\
         <tool_call>\n{\"name\": \"function_name\", \"arguments\": {\"arg\": \"value\"}}\n</tool_call>",
    );
    s
}

/// The conversation as a template without tool support can render it: the
/// tools described in the system turn, earlier calls written out as the
/// assistant wrote them, and tool results as user turns.
pub fn messages_without_tool_support(messages: &[ChatMessage], tools: &[Tool]) -> Vec<ChatMessage> {
    let mut out = Vec::with_capacity(messages.len() + 1);
    let mut rest = messages;
    if !tools.is_empty() {
        let offer = describe_tools(tools);
        match messages.first() {
            Some(m) if m.role == "system" => {
                out.push(ChatMessage::new("system", format!("{}\n\n{offer}", m.content)));
                rest = &messages[1..];
            }
            _ => out.push(ChatMessage::new("system", offer)),
        }
    }
    out.extend(rest.iter().cloned().map(plain_message));
    out
}

fn plain_message(m: ChatMessage) -> ChatMessage {
    match m.role.as_str() {
        "tool" => ChatMessage::new("user", format!("<tool_response>\n{}\n</tool_response>", m.content)),
        _ if !m.tool_calls.is_empty() => {
            let mut text = m.content.clone();
            for c in &m.tool_calls {
                let args = c.pointer("/function/arguments").map(arguments_value).unwrap_or(json!({}));
                let name = c.pointer("/function/name").cloned().unwrap_or(Value::Null);
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&format!("{CALL_OPEN}\n{}\n{CALL_CLOSE}", json!({"name": name, "arguments": args})));
            }
            ChatMessage::new(m.role, text)
        }
        _ => ChatMessage::new(m.role, m.content),
    }
}

/// OpenAI sends a call's arguments as a JSON string; templates expect the
/// object (a string that is not JSON stays a string).
pub fn arguments_value(v: &Value) -> Value {
    match v {
        Value::String(s) => serde_json::from_str(s).unwrap_or_else(|_| v.clone()),
        other => other.clone(),
    }
}

/// A call the model made.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// Its place among the request's calls, from 0.
    pub index: usize,
    pub id: String,
    pub name: String,
    /// The arguments object as JSON text.
    pub arguments: String,
}

/// A short id unique within this process, in OpenAI's `call_` form.
fn call_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    format!("call_{:016x}", t.rotate_left(17) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Splits streamed output into content text and tool calls. Text that may
/// be the start of `<tool_call>` is held back until it is known not to be.
/// An output that is one bare JSON object naming an offered tool (Llama
/// 3.x's format: `{"name": ..., "parameters": ...}`) is a call too; such an
/// output is held back whole until it ends, so it is known to be one.
#[derive(Debug, Default)]
pub struct CallParser {
    buf: String,
    in_call: bool,
    n_calls: usize,
    /// The tools a bare JSON call may name.
    names: Vec<String>,
    /// Whether the output began with `{` (`None`: only whitespace so far).
    bare: Option<bool>,
}

impl CallParser {
    pub fn new(tools: &[Tool]) -> Self {
        CallParser { names: tools.iter().map(|t| t.function.name.clone()).collect(), ..Default::default() }
    }

    pub fn n_calls(&self) -> usize {
        self.n_calls
    }

    /// Inside a call block: the text after its opening tag so far.
    pub fn open_call(&self) -> Option<&str> {
        self.in_call.then_some(self.buf.as_str())
    }

    /// Content released by `text`, and the calls it completed.
    pub fn push(&mut self, text: &str) -> (String, Vec<ToolCall>) {
        self.buf.push_str(text);
        if self.bare.is_none() {
            self.bare = self.buf.trim_start().chars().next().map(|c| c == '{');
        }
        if self.bare != Some(false) {
            return (String::new(), Vec::new());
        }
        let (mut content, mut calls) = (String::new(), Vec::new());
        loop {
            if !self.in_call {
                if let Some(at) = self.buf.find(CALL_OPEN) {
                    content.push_str(&self.buf[..at]);
                    self.buf.drain(..at + CALL_OPEN.len());
                    self.in_call = true;
                    continue;
                }
                let keep = partial_suffix(&self.buf, CALL_OPEN);
                content.push_str(&self.buf[..self.buf.len() - keep]);
                self.buf.drain(..self.buf.len() - keep);
                break;
            }
            let Some(at) = self.buf.find(CALL_CLOSE) else { break };
            let body: String = self.buf.drain(..at + CALL_CLOSE.len()).collect();
            match self.call(&body[..at]) {
                Some(c) => calls.push(c),
                None => content.push_str(&format!("{CALL_OPEN}{body}")),
            }
            self.in_call = false;
        }
        (content, calls)
    }

    /// What is left at the end: a call whose closing tag never came counts
    /// if its JSON is whole; anything else is content.
    pub fn finish(&mut self) -> (String, Vec<ToolCall>) {
        let rest = std::mem::take(&mut self.buf);
        if self.bare == Some(true) {
            let named = |v: &Value| v.get("name").and_then(Value::as_str).is_some_and(|n| self.names.iter().any(|t| t == n));
            return match serde_json::from_str::<Value>(rest.trim()) {
                Ok(v) if named(&v) => (String::new(), self.call(rest.trim()).into_iter().collect()),
                _ => (rest, Vec::new()),
            };
        }
        if !self.in_call {
            return (rest, Vec::new());
        }
        self.in_call = false;
        match self.call(&rest) {
            Some(c) => (String::new(), vec![c]),
            None => (format!("{CALL_OPEN}{rest}"), Vec::new()),
        }
    }

    fn call(&mut self, body: &str) -> Option<ToolCall> {
        let v: Value = serde_json::from_str(body.trim()).ok()?;
        let name = v.get("name")?.as_str()?.to_owned();
        // Llama-style templates say "parameters".
        let args = v.get("arguments").or_else(|| v.get("parameters")).map(arguments_value).unwrap_or(json!({}));
        let c = ToolCall { index: self.n_calls, id: call_id(), name, arguments: args.to_string() };
        self.n_calls += 1;
        Some(c)
    }
}

/// Length of the longest end of `s` that begins `tag` (and so may be its start).
pub(crate) fn partial_suffix(s: &str, tag: &str) -> usize {
    (1..tag.len().min(s.len() + 1)).rev().find(|&n| s.is_char_boundary(s.len() - n) && tag.starts_with(&s[s.len() - n..])).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(name: &str, params: Value) -> Tool {
        Tool { kind: "function".into(), function: Function { name: name.into(), description: Some("d".into()), parameters: Some(params), strict: None } }
    }

    #[test]
    fn parser_splits_content_and_calls_across_any_chunking() {
        let out = "Let me check.<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>{\"name\":\"f\",\"arguments\":\"{}\"}</tool_call>";
        for chunk in [1, 2, 3, 7, out.len()] {
            let mut p = CallParser::new(&[]);
            let (mut content, mut calls) = (String::new(), Vec::new());
            let bytes: Vec<char> = out.chars().collect();
            for piece in bytes.chunks(chunk) {
                let (c, k) = p.push(&piece.iter().collect::<String>());
                content.push_str(&c);
                calls.extend(k);
            }
            let (c, k) = p.finish();
            content.push_str(&c);
            calls.extend(k);
            assert_eq!(content, "Let me check.\n", "chunk {chunk}");
            assert_eq!(calls.len(), 2);
            assert_eq!((calls[0].index, calls[0].name.as_str(), calls[0].arguments.as_str()), (0, "get_weather", r#"{"city":"Paris"}"#));
            assert_eq!((calls[1].index, calls[1].arguments.as_str()), (1, "{}"));
            assert_ne!(calls[0].id, calls[1].id);
        }
    }

    #[test]
    fn malformed_calls_stay_content_and_an_unclosed_whole_call_counts() {
        let mut p = CallParser::new(&[]);
        let (c, k) = p.push("a <tool_call>not json</tool_call> b <tool");
        assert_eq!((c.as_str(), k.len()), ("a <tool_call>not json</tool_call> b ", 0));
        assert_eq!(p.finish(), ("<tool".into(), vec![]));
        let mut p = CallParser::new(&[]);
        p.push("<tool_call>{\"name\": \"f\", \"arguments\": {}}");
        let (c, k) = p.finish();
        assert_eq!((c.as_str(), k.len()), ("", 1));
    }

    #[test]
    fn a_bare_json_output_naming_a_tool_is_a_call_and_other_json_is_content() {
        let tools = [tool("get_weather", json!({"type": "object"}))];
        let run = |text: &str| {
            let mut p = CallParser::new(&tools);
            let (mut content, mut calls) = (String::new(), Vec::new());
            for ch in text.chars() {
                let (c, k) = p.push(&ch.to_string());
                content.push_str(&c);
                calls.extend(k);
            }
            let (c, k) = p.finish();
            content.push_str(&c);
            calls.extend(k);
            (content, calls)
        };
        let (content, calls) = run(" {\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}");
        assert_eq!((content.as_str(), calls.len()), ("", 1));
        assert_eq!((calls[0].name.as_str(), calls[0].arguments.as_str()), ("get_weather", r#"{"city":"Oslo"}"#));
        for other in ["{\"name\": \"unknown\", \"parameters\": {}}", "{\"answer\": 42}", "{not json", "plain {\"name\": \"get_weather\"}"] {
            assert_eq!(run(other), (other.to_owned(), vec![]), "{other}");
        }
    }

    #[test]
    fn tools_and_choices_are_checked() {
        let ok = [tool("get_weather", json!({"type": "object"}))];
        assert!(check_tools(&ok, &ToolChoice::Named("get_weather".into())).is_ok());
        assert!(check_tools(&ok, &ToolChoice::Named("nope".into())).unwrap_err().1.contains("not among the tools"));
        assert!(check_tools(&[], &ToolChoice::Required).is_err());
        assert!(check_tools(&[tool("bad name", json!({}))], &ToolChoice::Auto).unwrap_err().1.contains("function.name"));
        assert!(check_tools(&[tool("f", json!([1]))], &ToolChoice::Auto).unwrap_err().1.contains("parameters"));
        assert!(check_tools(&[tool("f", json!({})), tool("f", json!({}))], &ToolChoice::Auto).unwrap_err().1.contains("twice"));
        assert_eq!(ToolChoice::parse(&json!({"type": "function", "function": {"name": "f"}})), Ok(ToolChoice::Named("f".into())));
        assert!(ToolChoice::parse(&json!("sometimes")).is_err());
    }

    #[test]
    fn fallback_messages_describe_tools_and_replay_calls() {
        let mut call = ChatMessage::new("assistant", "");
        call.tool_calls = vec![json!({"id": "1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}})];
        let msgs = [ChatMessage::new("user", "hi"), call, ChatMessage::new("tool", "42")];
        let out = messages_without_tool_support(&msgs, &[tool("f", json!({"type": "object"}))]);
        let roles: Vec<&str> = out.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert!(out[0].content.contains("\"name\":\"f\""));
        assert_eq!(out[2].content, "<tool_call>\n{\"name\":\"f\",\"arguments\":{\"x\":1}}\n</tool_call>");
        assert_eq!(out[3].content, "<tool_response>\n42\n</tool_response>");
    }
}
