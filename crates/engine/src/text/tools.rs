//! Tool calling: the tools a request offers, how they reach the prompt (the
//! model's own template through its `tools` variable, or a system turn that
//! describes them for templates without tool support), the grammar that
//! makes `required` and named tool choices produce a valid call, and the
//! parser that turns `<tool_call>{json}</tool_call>` blocks in the output
//! into calls.
//!
//! Four call formats (`CallFormat`), picked per model: Hermes (Qwen 2.5 and
//! 3, SmolLM3, Hermes and most templates with tool support), a JSON object
//! with `name` and `arguments` between `<tool_call>` tags, one block per
//! call; Mistral's, the `[TOOL_CALLS]` control token then a JSON array of
//! such objects; Mistral's from tokenizer v11 on, `[TOOL_CALLS]` before
//! each call's name and `[ARGS]` before its arguments object; and Llama
//! 3.1+'s, a reply that is one bare JSON object with `name` and
//! `parameters`. That bare object is read in any of them.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::text::chat::ChatMessage;
use crate::text::grammar::Constraint;

pub const CALL_OPEN: &str = "<tool_call>";
pub const CALL_CLOSE: &str = "</tool_call>";
/// Mistral's control token before a list of calls (before each call from
/// tokenizer v11 on).
pub const MISTRAL_CALLS: &str = "[TOOL_CALLS]";
/// Mistral's control token between a call's name and its arguments
/// (tokenizer v11 on).
pub const MISTRAL_ARGS: &str = "[ARGS]";

/// How a model writes its tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CallFormat {
    /// `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, a block per call.
    #[default]
    Hermes,
    /// `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]` (Mistral 7B
    /// v0.3, Mixtral 8x22B, Mistral Nemo): the control token's id.
    Mistral(u32),
    /// `[TOOL_CALLS]name[ARGS]{...}`, again for each further call (Mistral
    /// Small 3.2, Magistral, Devstral, Ministral 3): both control tokens' ids.
    MistralV11 { calls: u32, args: u32 },
    /// `{"name": ..., "parameters": {...}}` as the whole reply, one call
    /// (Llama 3.1, 3.2, 3.3).
    Llama3,
}

/// The control tokens of a vocabulary that call formats use.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CallTokens {
    /// `[TOOL_CALLS]`.
    pub calls: Option<u32>,
    /// `[ARGS]`.
    pub args: Option<u32>,
}

impl CallFormat {
    /// A model's format: Mistral's when its vocabulary has `[TOOL_CALLS]` as
    /// a control token and its chat template writes it (v11's when it writes
    /// an `[ARGS]` control token too); Llama 3's when the template is Llama
    /// 3's with the `ipython` role that tool results take from 3.1 on; else
    /// Hermes.
    pub fn detect(tokens: CallTokens, template_source: Option<&str>) -> Self {
        let writes = |tag: &str| template_source.is_some_and(|t| t.contains(tag));
        match tokens {
            CallTokens { calls: Some(calls), args: Some(args) } if writes(MISTRAL_CALLS) && writes(MISTRAL_ARGS) => CallFormat::MistralV11 { calls, args },
            CallTokens { calls: Some(id), .. } if writes(MISTRAL_CALLS) => CallFormat::Mistral(id),
            _ if writes("<|start_header_id|>") && writes("ipython") => CallFormat::Llama3,
            _ => CallFormat::Hermes,
        }
    }

    /// `hermes`, `mistral`, `mistral-v11` (which need the model's control
    /// tokens) or `llama3`.
    pub fn parse(name: &str, tokens: CallTokens) -> Result<Self, String> {
        let missing = |t: &str| format!("is {name}, but this model's vocabulary has no {t} control token");
        match (name, tokens) {
            ("hermes", _) => Ok(CallFormat::Hermes),
            ("llama3", _) => Ok(CallFormat::Llama3),
            ("mistral" | "mistral-v11", CallTokens { calls: None, .. }) => Err(missing(MISTRAL_CALLS)),
            ("mistral", CallTokens { calls: Some(id), .. }) => Ok(CallFormat::Mistral(id)),
            ("mistral-v11", CallTokens { calls: Some(calls), args: Some(args) }) => Ok(CallFormat::MistralV11 { calls, args }),
            ("mistral-v11", _) => Err(missing(MISTRAL_ARGS)),
            (other, _) => Err(format!("must be hermes, mistral, mistral-v11 or llama3, got '{other}'")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CallFormat::Hermes => "hermes",
            CallFormat::Mistral(_) => "mistral",
            CallFormat::MistralV11 { .. } => "mistral-v11",
            CallFormat::Llama3 => "llama3",
        }
    }

    /// The text that opens calls in the output (control tokens as their
    /// text); none where a call is the whole reply.
    fn tag(self) -> Option<&'static str> {
        match self {
            CallFormat::Hermes => Some(CALL_OPEN),
            CallFormat::Mistral(_) | CallFormat::MistralV11 { .. } => Some(MISTRAL_CALLS),
            CallFormat::Llama3 => None,
        }
    }
}

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
        if name.is_empty() || !name_chars(name) {
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

/// Whether `name` is within a tool name's limits (at most 64 of ASCII
/// letters, digits, `_` and `-`); empty passes, for a name being written.
fn name_chars(name: &str) -> bool {
    name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The JSON schema of `t`'s arguments (none given: an object).
fn args_schema(t: &Tool) -> Value {
    t.function.parameters.clone().unwrap_or_else(|| json!({"type": "object", "properties": {}}))
}

/// The JSON schema of one call of `t`: `{"name": ..., "<args>": ...}`.
fn call_schema(t: &Tool, args: &str) -> Value {
    json!({
        "type": "object",
        "properties": {"name": {"const": t.function.name}, args: args_schema(t)},
        "required": ["name", args],
        "additionalProperties": false,
    })
}

/// `schema` for llguidance's `%json`, written as templates' `tojson` writes
/// JSON (`": "` and `", "`), so the model sees the spacing it was taught.
fn json_rule(schema: Value) -> String {
    json!({"x-guidance": {"whitespace_flexible": false, "key_separator": ": ", "item_separator": ", "}, "allOf": [schema]}).to_string()
}

/// The grammar of the output when a call is required: one call block (or
/// several, with `parallel`), of any tool or of the named one.
pub fn call_grammar(tools: &[Tool], choice: &ToolChoice, parallel: bool, format: CallFormat) -> Option<Constraint> {
    let allowed: Vec<&Tool> = match choice {
        ToolChoice::Auto | ToolChoice::None => return None,
        ToolChoice::Required => tools.iter().collect(),
        ToolChoice::Named(n) => tools.iter().filter(|t| &t.function.name == n).collect(),
    };
    Some(calls_grammar(&allowed, parallel, "call", format))
}

/// With `tool_choice: auto`, the grammar of what follows a `<tool_call>`
/// the model opened on its own (llama.cpp's lazy grammar): the rest of
/// that call, then more calls or the end. The worker attaches it when the
/// tag appears (Llama 3: when the reply opens `{"name": "`), so a call the
/// model starts is always a valid one.
pub fn rest_of_call_grammar(tools: &[Tool], choice: &ToolChoice, parallel: bool, format: CallFormat) -> Option<Constraint> {
    match choice {
        ToolChoice::Auto if !tools.is_empty() => Some(calls_grammar(&tools.iter().collect::<Vec<_>>(), parallel, "rest", format)),
        _ => None,
    }
}

/// Calls of `allowed` in `format`; `first` is `call` (from the opening tag)
/// or `rest` (after an opening tag already written).
fn calls_grammar(allowed: &[&Tool], parallel: bool, first: &str, format: CallFormat) -> Constraint {
    // Llama 3's templates name the arguments "parameters".
    let key = if format == CallFormat::Llama3 { "parameters" } else { "arguments" };
    let schema = json_rule(match allowed {
        [one] => call_schema(one, key),
        many => json!({"anyOf": many.iter().map(|t| call_schema(t, key)).collect::<Vec<_>>()}),
    });
    Constraint::Lark(match format {
        CallFormat::Hermes => {
            let more = if parallel { "(\"\\n\" call)*" } else { "" };
            format!(
                "start: {first} {more}\ncall: {open:?} rest\nrest: \"\\n\" body \"\\n\" {close:?}\nbody: %json {schema}\n",
                open = CALL_OPEN,
                close = CALL_CLOSE,
            )
        }
        // The control token by id (llguidance's `<[id]>`), then one array.
        CallFormat::Mistral(id) => {
            let more = if parallel { "(\", \" body)*" } else { "" };
            format!("start: {first}\ncall: <[{id}]> rest\nrest: \" [\" body {more} \"]\"\nbody: %json {schema}\n")
        }
        // Each call: the control token, the name, `[ARGS]`, the name's
        // arguments (names are ASCII letters, digits, `_` and `-`).
        CallFormat::MistralV11 { calls, args } => {
            let more = if parallel { " call*" } else { "" };
            let names: Vec<String> = allowed.iter().enumerate().map(|(i, t)| format!("{:?} <[{args}]> args{i}", t.function.name)).collect();
            let bodies: String = allowed.iter().enumerate().map(|(i, t)| format!("args{i}: %json {}\n", json_rule(args_schema(t)))).collect();
            format!("start: {first}{more}\ncall: <[{calls}]> rest\nrest: {}\n{bodies}", names.join(" | "))
        }
        // The reply is the call; the format has one call per reply.
        CallFormat::Llama3 => format!("start: %json {schema}\n"),
    })
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

/// A piece of a tool call the model is making. The first piece of each
/// call (by `index`, in order) names it; the `arguments` of its pieces,
/// joined, are the call's arguments as JSON text. Every piece repeats the
/// call's `id` and `name`, so a reader can start at any of them.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCallDelta {
    /// The call's place among the request's calls, from 0.
    pub index: usize,
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// A short id unique within this process, in OpenAI's `call_` form.
fn call_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    format!("call_{:016x}", t.rotate_left(17) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Where a scan of JSON text is: nesting depth, inside a string, after a
/// backslash in one.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Scan {
    depth: u32,
    in_str: bool,
    esc: bool,
}

impl Scan {
    /// Takes the next byte; true when it closes the outermost object or array.
    fn feed(&mut self, b: u8) -> bool {
        if self.in_str {
            (self.esc, self.in_str) = match (self.esc, b) {
                (true, _) => (false, true),
                (false, b'\\') => (true, true),
                (false, b'"') => (false, false),
                _ => (false, true),
            };
            return false;
        }
        match b {
            b'"' => self.in_str = true,
            b'{' | b'[' => self.depth += 1,
            b'}' | b']' if self.depth > 0 => {
                self.depth -= 1;
                return self.depth == 0;
            }
            _ => {}
        }
        false
    }
}

/// Where the object or array at the start of `s` ends, once it has.
fn json_end(s: &str) -> Option<usize> {
    let mut scan = Scan::default();
    s.bytes().position(|b| scan.feed(b)).map(|i| i + 1)
}

/// How far an open call has been sent.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum Block {
    /// Not yet known whether it starts `{"name": "...", "arguments": {`.
    #[default]
    Header,
    /// It does not: it is parsed whole when it ends.
    Whole,
    /// Its arguments are being sent: the call's text is out up to `at`,
    /// where the scan of the arguments object stands.
    Args { at: usize, scan: Scan },
    /// Its arguments are out; what is left of it is not.
    Sent,
}

/// Mistral's list of calls after `[TOOL_CALLS]`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum List {
    /// Before its `[`.
    Start,
    /// Before a call, a `,` or the closing `]`.
    Between,
}

/// Splits streamed output into content text and tool calls. Text that may
/// be the start of the format's opening tag is held back until it is known
/// not to be.
///
/// A call that starts `{"name": "<tool>", "arguments": {` (the order our
/// grammars write) is sent as it is written: its name at once, then its
/// arguments text as it grows, as OpenAI streams calls. Any other call is
/// parsed whole when it ends (its closing tag; in Mistral's list, its
/// closing brace) and is a call if its JSON is one, else content. An output
/// that is one bare JSON object naming an offered tool (Llama 3.x's format:
/// `{"name": ..., "parameters": ...}`) is a call too; such an output is held
/// back whole until it ends, so it is known to be one.
#[derive(Debug, Default)]
pub struct CallParser {
    format: CallFormat,
    /// Outside a call: text not yet released. Inside: the call so far.
    buf: String,
    block: Option<Block>,
    list: Option<List>,
    /// Mistral v11: after `[TOOL_CALLS]`, before the name's `[ARGS]`.
    naming: bool,
    n_calls: usize,
    /// The call being sent (its id and name).
    current: Option<(String, String)>,
    /// The text after an opening tag that the last push completed.
    opened: Option<String>,
    /// The tools a call may name (empty: any name).
    names: Vec<String>,
    /// Whether the output began with `{` (`None`: only whitespace so far).
    bare: Option<bool>,
    /// Llama 3: whether that `{` began `{"name": "` (`None`: not known yet),
    /// which makes it a call read as a block.
    named: Option<bool>,
}

impl CallParser {
    pub fn new(tools: &[Tool], format: CallFormat) -> Self {
        CallParser { format, names: tools.iter().map(|t| t.function.name.clone()).collect(), ..Default::default() }
    }

    pub fn n_calls(&self) -> usize {
        self.n_calls
    }

    /// The text of `token` when it is the format's control token (which
    /// renders as nothing elsewhere): the parser must see it.
    pub fn control_text(&self, token: u32) -> Option<&'static str> {
        match self.format {
            CallFormat::Mistral(calls) | CallFormat::MistralV11 { calls, .. } if calls == token => Some(MISTRAL_CALLS),
            CallFormat::MistralV11 { args, .. } if args == token => Some(MISTRAL_ARGS),
            _ => None,
        }
    }

    /// When the last push completed an opening tag: the text after it.
    pub fn open_call(&self) -> Option<&str> {
        self.opened.as_deref()
    }

    /// Content released by `text`, and the pieces of calls it wrote.
    pub fn push(&mut self, text: &str) -> (String, Vec<ToolCallDelta>) {
        self.opened = None;
        self.buf.push_str(text);
        if self.bare.is_none() {
            self.bare = self.buf.trim_start().chars().next().map(|c| c == '{');
        }
        // Llama 3's call has no tag: a reply that opens `{"name": "` is one
        // (llama.cpp triggers there too), read as a block from its start so
        // that its arguments stream; other JSON stays free.
        if self.format == CallFormat::Llama3 && self.bare == Some(true) && self.named.is_none() {
            self.named = opens_named_object(&self.buf);
            if self.named == Some(true) {
                self.opened = Some(self.buf.trim_start().to_owned());
                self.bare = Some(false);
                self.block = Some(Block::Header);
            }
        }
        if self.bare != Some(false) {
            return (String::new(), Vec::new());
        }
        let tag = self.format.tag();
        let (mut content, mut calls) = (String::new(), Vec::new());
        loop {
            if let Some(block) = self.block {
                // Where the call's text ends, and where what closes it does.
                let end = match self.format {
                    CallFormat::Hermes => self.buf.find(CALL_CLOSE).map(|at| (at, at + CALL_CLOSE.len())),
                    CallFormat::Mistral(_) | CallFormat::MistralV11 { .. } | CallFormat::Llama3 => json_end(&self.buf).map(|at| (at, at)),
                };
                self.advance(block, end.map_or(self.buf.len(), |e| e.0), &mut calls);
                let Some((at, closed)) = end else { break };
                match self.block {
                    Some(Block::Header | Block::Whole) => match call_of(&self.buf[..at]).map(|c| self.emit(c)) {
                        Some(c) => calls.push(c),
                        None if self.list.is_some() => content.push_str(&self.buf[..closed]),
                        None => content.push_str(&format!("{}{}", tag.unwrap_or_default(), &self.buf[..closed])),
                    },
                    // Closed before its arguments were: what was sent is the call.
                    Some(Block::Args { .. }) => self.n_calls += 1,
                    _ => {}
                }
                self.buf.drain(..closed);
                self.block = None;
                self.current = None;
                continue;
            }
            if self.naming {
                // `name[ARGS]`: a name the tools offer starts a call whose
                // arguments stream from here; anything else is content.
                let Some(at) = self.buf.find(MISTRAL_ARGS) else {
                    let name = &self.buf[..self.buf.len() - partial_suffix(&self.buf, MISTRAL_ARGS)];
                    if name_chars(name) {
                        break;
                    }
                    content.push_str(MISTRAL_CALLS);
                    self.naming = false;
                    continue;
                };
                self.naming = false;
                let name = self.buf[..at].to_owned();
                if name.is_empty() || !self.offers(&name) {
                    content.push_str(MISTRAL_CALLS);
                    continue;
                }
                self.buf.drain(..at + MISTRAL_ARGS.len());
                calls.push(self.start_call(name));
                self.block = Some(Block::Args { at: 0, scan: Scan::default() });
                continue;
            }
            if let Some(list) = self.list {
                let skip = |c: char| c.is_whitespace() || (list == List::Between && c == ',');
                let n = self.buf.len() - self.buf.trim_start_matches(skip).len();
                self.buf.drain(..n);
                match (list, self.buf.as_bytes().first()) {
                    (_, None) => break,
                    (List::Start, Some(b'[')) => {
                        self.buf.drain(..1);
                        self.list = Some(List::Between);
                    }
                    (List::Between, Some(b'{')) => self.block = Some(Block::Header),
                    (List::Between, Some(b']')) => {
                        self.buf.drain(..1);
                        self.list = None;
                    }
                    // Not a list of calls: the rest is content.
                    _ => self.list = None,
                }
                continue;
            }
            if let Some((at, tag)) = tag.and_then(|t| Some((self.buf.find(t)?, t))) {
                content.push_str(&self.buf[..at]);
                self.buf.drain(..at + tag.len());
                self.opened = Some(self.buf.clone());
                match self.format {
                    CallFormat::Hermes => self.block = Some(Block::Header),
                    CallFormat::Mistral(_) => self.list = Some(List::Start),
                    CallFormat::MistralV11 { .. } => self.naming = true,
                    CallFormat::Llama3 => unreachable!("no tag"),
                }
                continue;
            }
            let keep = tag.map_or(0, |t| partial_suffix(&self.buf, t));
            content.push_str(&self.buf[..self.buf.len() - keep]);
            self.buf.drain(..self.buf.len() - keep);
            break;
        }
        (content, calls)
    }

    /// Whether a call may name `name` (any name where no tools were given).
    fn offers(&self, name: &str) -> bool {
        self.names.is_empty() || self.names.iter().any(|n| n == name)
    }

    /// Opens a call of `name` whose arguments will stream: its first piece.
    fn start_call(&mut self, name: String) -> ToolCallDelta {
        let id = call_id();
        self.current = Some((id.clone(), name.clone()));
        ToolCallDelta { index: self.n_calls, id, name, arguments: String::new() }
    }

    /// Sends what the open call's first `end` bytes add to it.
    fn advance(&mut self, block: Block, end: usize, calls: &mut Vec<ToolCallDelta>) {
        let mut block = block;
        if block == Block::Header {
            block = match call_header(&self.buf[..end]) {
                Err(true) => Block::Header,
                Ok((name, args)) if self.offers(&name) => {
                    calls.push(self.start_call(name));
                    Block::Args { at: args, scan: Scan::default() }
                }
                _ => Block::Whole,
            };
        }
        if let Block::Args { mut at, mut scan } = block {
            let sent = at;
            let bytes = self.buf.as_bytes();
            let mut done = false;
            while at < end && !done {
                done = scan.feed(bytes[at]);
                at += 1;
            }
            if at > sent {
                let (id, name) = self.current.clone().expect("a call is being sent");
                calls.push(ToolCallDelta { index: self.n_calls, id, name, arguments: self.buf[sent..at].to_owned() });
            }
            if done {
                self.n_calls += 1;
            }
            block = if done { Block::Sent } else { Block::Args { at, scan } };
        }
        self.block = Some(block);
    }

    /// What is left at the end: a call that never closed counts if its JSON
    /// is whole (or if its arguments were being sent: the output was cut,
    /// which its finish reason says); anything else is content.
    pub fn finish(&mut self) -> (String, Vec<ToolCallDelta>) {
        let rest = std::mem::take(&mut self.buf);
        if self.bare == Some(true) {
            let named = |v: &Value| v.get("name").and_then(Value::as_str).is_some_and(|n| self.names.iter().any(|t| t == n));
            return match serde_json::from_str::<Value>(rest.trim()) {
                Ok(v) if named(&v) => (String::new(), call_of(&rest).map(|c| self.emit(c)).into_iter().collect()),
                _ => (rest, Vec::new()),
            };
        }
        let in_list = self.list.take().is_some();
        match self.block.take() {
            None if std::mem::take(&mut self.naming) => (format!("{MISTRAL_CALLS}{rest}"), Vec::new()),
            None => (rest, Vec::new()),
            Some(Block::Args { .. }) => {
                self.n_calls += 1;
                (String::new(), Vec::new())
            }
            Some(Block::Sent) => (String::new(), Vec::new()),
            Some(Block::Header | Block::Whole) => match call_of(&rest).map(|c| self.emit(c)) {
                Some(c) => (String::new(), vec![c]),
                None if in_list => (rest, Vec::new()),
                None => (format!("{}{rest}", self.format.tag().unwrap_or_default()), Vec::new()),
            },
        }
    }

    /// A whole call (name, arguments) as the next call's only piece.
    fn emit(&mut self, (name, arguments): (String, String)) -> ToolCallDelta {
        self.n_calls += 1;
        ToolCallDelta { index: self.n_calls - 1, id: call_id(), name, arguments }
    }
}

/// Whether `s` begins `{"name": "` (whitespace aside): `None` while it may
/// still.
fn opens_named_object(s: &str) -> Option<bool> {
    const OPEN: &str = "{\"name\":\"";
    let got: String = s.chars().filter(|c| !c.is_whitespace()).take(OPEN.len()).collect();
    match got.len() == OPEN.len() {
        true => Some(got == OPEN),
        false if OPEN.starts_with(&got) => None,
        false => Some(false),
    }
}

/// A call's whole JSON as its name and arguments, if it is a call.
fn call_of(body: &str) -> Option<(String, String)> {
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    let name = v.get("name")?.as_str()?.to_owned();
    // Llama-style templates say "parameters".
    let args = v.get("arguments").or_else(|| v.get("parameters")).map(arguments_value).unwrap_or(json!({}));
    Some((name, args.to_string()))
}

/// Reads `{"name": "<name>", "arguments": ` (or `"parameters"`) at the
/// start of `s`: the name and where the arguments object begins. `Err(true)`:
/// `s` may still become such a start; `Err(false)`: it cannot, or the
/// arguments are not an object.
fn call_header(s: &str) -> Result<(String, usize), bool> {
    let b = s.as_bytes();
    let mut i = 0;
    let skip = |i: &mut usize| {
        while b.get(*i).is_some_and(u8::is_ascii_whitespace) {
            *i += 1;
        }
    };
    let byte = |i: &mut usize, c: u8| {
        skip(i);
        match b.get(*i) {
            None => Err(true),
            Some(&x) if x == c => {
                *i += 1;
                Ok(())
            }
            _ => Err(false),
        }
    };
    let string = |i: &mut usize| -> Result<String, bool> {
        byte(i, b'"')?;
        let start = *i - 1;
        loop {
            match b.get(*i) {
                None => return Err(true),
                Some(b'\\') => *i += 2,
                Some(b'"') => break,
                _ => *i += 1,
            }
        }
        *i += 1;
        serde_json::from_str(&s[start..*i]).map_err(|_| false)
    };
    byte(&mut i, b'{')?;
    if string(&mut i)? != "name" {
        return Err(false);
    }
    byte(&mut i, b':')?;
    let name = string(&mut i)?;
    byte(&mut i, b',')?;
    if !matches!(string(&mut i)?.as_str(), "arguments" | "parameters") {
        return Err(false);
    }
    byte(&mut i, b':')?;
    let at = {
        skip(&mut i);
        i
    };
    byte(&mut i, b'{')?;
    Ok((name, at))
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

    /// Content and calls (pieces joined) of `out` pushed `chunk` chars at a time.
    fn parse(p: &mut CallParser, out: &str, chunk: usize) -> (String, Vec<ToolCallDelta>) {
        let (mut content, mut calls) = (String::new(), Vec::<ToolCallDelta>::new());
        let mut add = |c: &str, k: Vec<ToolCallDelta>| {
            content.push_str(c);
            for d in k {
                match calls.get_mut(d.index) {
                    Some(call) => {
                        assert_eq!((&call.id, &call.name), (&d.id, &d.name));
                        call.arguments.push_str(&d.arguments);
                    }
                    None => {
                        assert_eq!(d.index, calls.len(), "calls start in order");
                        calls.push(d);
                    }
                }
            }
        };
        let chars: Vec<char> = out.chars().collect();
        for piece in chars.chunks(chunk) {
            let (c, k) = p.push(&piece.iter().collect::<String>());
            add(&c, k);
        }
        let (c, k) = p.finish();
        add(&c, k);
        (content, calls)
    }

    const HERMES: CallFormat = CallFormat::Hermes;

    #[test]
    fn parser_splits_content_and_calls_across_any_chunking() {
        let out = "Let me check.<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Pa}r\\\"is\", \"n\": [1, {}]}}\n</tool_call>\n<tool_call>{\"name\":\"f\",\"arguments\":\"{}\"}</tool_call>";
        for chunk in [1, 2, 3, 7, out.len()] {
            let mut p = CallParser::new(&[], HERMES);
            let (content, calls) = parse(&mut p, out, chunk);
            assert_eq!(content, "Let me check.\n", "chunk {chunk}");
            assert_eq!(calls.len(), 2);
            // Streamed arguments are the model's own text; whole ones are re-serialized.
            assert_eq!((calls[0].index, calls[0].name.as_str(), calls[0].arguments.as_str()), (0, "get_weather", r#"{"city": "Pa}r\"is", "n": [1, {}]}"#));
            assert_eq!((calls[1].index, calls[1].arguments.as_str()), (1, "{}"));
            assert_ne!(calls[0].id, calls[1].id);
            assert_eq!(p.n_calls(), 2);
        }
    }

    #[test]
    fn a_call_is_named_as_soon_as_written_and_its_arguments_stream_as_they_grow() {
        let mut p = CallParser::new(&[tool("get_weather", json!({"type": "object"}))], HERMES);
        let (c, k) = p.push("Sure. <tool_call>\n{\"name\": \"get_weath");
        assert_eq!((c.as_str(), k.len(), p.open_call()), ("Sure. ", 0, Some("\n{\"name\": \"get_weath")));
        let (_, k) = p.push("er\", \"arguments\": ");
        assert!(k.is_empty() && p.open_call().is_none(), "the arguments have not begun: {k:?}");
        let (_, k) = p.push("{\"ci");
        assert_eq!(k.iter().map(|d| (d.index, d.name.as_str(), d.arguments.as_str())).collect::<Vec<_>>(), [(0, "get_weather", ""), (0, "get_weather", "{\"ci")]);
        let (_, k) = p.push("ty\": \"Oslo\"}}\n</tool");
        assert_eq!(k.iter().map(|d| d.arguments.as_str()).collect::<Vec<_>>(), ["ty\": \"Oslo\"}"]);
        assert_eq!(p.push("_call>\nafter"), ("\nafter".into(), vec![]));
        assert_eq!(p.n_calls(), 1);
        // Cut inside the arguments: what was sent stays the call (the finish reason says it was cut).
        let mut p = CallParser::new(&[], HERMES);
        let (_, calls) = parse(&mut p, "<tool_call>{\"name\": \"f\", \"parameters\": {\"a\": [1, 2", 4);
        assert_eq!((calls.len(), calls[0].arguments.as_str(), p.n_calls()), (1, "{\"a\": [1, 2", 1));
        // A name that is not offered, or another key order, waits for the whole block.
        let mut p = CallParser::new(&[tool("g", json!({}))], HERMES);
        assert_eq!(p.push("<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": 1"), (String::new(), vec![]));
        let mut p = CallParser::new(&[], HERMES);
        assert_eq!(p.push("<tool_call>{\"arguments\": {\"a\": 1}, \"name\": \"f\""), (String::new(), vec![]));
        let (_, k) = p.push("}</tool_call>");
        assert_eq!((k.len(), k[0].arguments.as_str()), (1, "{\"a\":1}"));
    }

    #[test]
    fn call_headers_are_read_in_any_state() {
        let s = " { \"name\" : \"a\\u0062\" ,\n\"arguments\": {";
        assert_eq!(call_header(s), Ok(("ab".into(), s.rfind('{').unwrap())));
        for more in ["", "{", "{\"na", "{\"name\": \"f", "{\"name\": \"f\", \"arguments\":", "{\"name\": \"f\\"] {
            assert_eq!(call_header(more), Err(true), "{more:?}");
        }
        for no in ["[", "{\"id\": 1", "{\"name\": 3", "{\"name\": \"f\", \"args\": {", "{\"name\": \"f\", \"arguments\": \"{}\""] {
            assert_eq!(call_header(no), Err(false), "{no:?}");
        }
    }

    #[test]
    fn mistral_lists_of_calls_are_parsed_streamed_and_whole() {
        let mistral = CallFormat::Mistral(5);
        let out = "On it.[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}, {\"arguments\": {\"z\": \"]\"}, \"name\": \"f\"}]";
        for chunk in [1, 3, 8, out.len()] {
            let mut p = CallParser::new(&[], mistral);
            let (content, calls) = parse(&mut p, out, chunk);
            assert_eq!(content, "On it.", "chunk {chunk}");
            let got: Vec<_> = calls.iter().map(|c| (c.index, c.name.as_str(), c.arguments.as_str())).collect();
            assert_eq!(got, [(0, "get_weather", "{\"city\": \"Oslo\"}"), (1, "f", "{\"z\":\"]\"}")], "chunk {chunk}");
        }
        // The first call is named before its arguments end.
        let mut p = CallParser::new(&[], mistral);
        let (_, k) = p.push("[TOOL_CALLS] [{\"name\": \"g\", \"arguments\": {\"a\"");
        assert_eq!(k.iter().map(|d| d.arguments.as_str()).collect::<Vec<_>>(), ["", "{\"a\""]);
        // "<tool_call>" is plain text for Mistral, and a list that is not one is content.
        let (content, calls) = parse(&mut CallParser::new(&[], mistral), "a <tool_call>{}</tool_call>", 2);
        assert_eq!((content.as_str(), calls.len()), ("a <tool_call>{}</tool_call>", 0));
        let (content, calls) = parse(&mut CallParser::new(&[], mistral), "[TOOL_CALLS] sorry, [{\"x\": 1}]", 2);
        assert_eq!((content.as_str(), calls.len()), ("sorry, [{\"x\": 1}]", 0));
        let (content, calls) = parse(&mut CallParser::new(&[], mistral), "[TOOL_CALLS] [{\"x\": 1}] then", 2);
        assert_eq!((content.as_str(), calls.len()), ("{\"x\": 1} then", 0));
    }

    #[test]
    fn mistral_v11_calls_are_named_at_args_and_their_arguments_streamed() {
        let v11 = CallFormat::MistralV11 { calls: 5, args: 6 };
        let tools = [tool("get_weather", json!({"type": "object"})), tool("f", json!({}))];
        let out = "On it.[TOOL_CALLS]get_weather[ARGS]{\"city\": \"O}s\\\"lo\"}[TOOL_CALLS]f[ARGS]{}";
        for chunk in [1, 2, 5, out.len()] {
            let mut p = CallParser::new(&tools, v11);
            let (content, calls) = parse(&mut p, out, chunk);
            assert_eq!(content, "On it.", "chunk {chunk}");
            let got: Vec<_> = calls.iter().map(|c| (c.index, c.name.as_str(), c.arguments.as_str())).collect();
            assert_eq!(got, [(0, "get_weather", "{\"city\": \"O}s\\\"lo\"}"), (1, "f", "{}")], "chunk {chunk}");
            assert_eq!(p.n_calls(), 2);
        }
        // Named at `[ARGS]`, before the arguments are written.
        let mut p = CallParser::new(&tools, v11);
        assert_eq!(p.push("[TOOL_CALLS]get_wea"), (String::new(), vec![]));
        assert_eq!(p.open_call(), Some("get_wea"));
        let (_, k) = p.push("ther[ARGS]{\"ci");
        assert_eq!(k.iter().map(|d| (d.name.as_str(), d.arguments.as_str())).collect::<Vec<_>>(), [("get_weather", ""), ("get_weather", "{\"ci")]);
        // The control tokens' texts come from their ids.
        assert_eq!((p.control_text(5), p.control_text(6), p.control_text(7)), (Some(MISTRAL_CALLS), Some(MISTRAL_ARGS), None));
        // Not a name, a tool not offered, or cut before `[ARGS]`: content.
        for text in ["[TOOL_CALLS] sure, {\"x\": 1}", "[TOOL_CALLS]rm_rf[ARGS]{}", "[TOOL_CALLS]get_weather", "a [TOOL_CALLS]"] {
            for chunk in [1, 3, text.len()] {
                assert_eq!(parse(&mut CallParser::new(&tools, v11), text, chunk), (text.to_owned(), vec![]), "{text:?} by {chunk}");
            }
        }
    }

    #[test]
    fn llama3_calls_are_the_whole_reply_and_open_at_their_name() {
        let tools = [tool("get_weather", json!({"type": "object"}))];
        let out = " {\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}";
        for chunk in [1, 4, out.len()] {
            let (content, calls) = parse(&mut CallParser::new(&tools, CallFormat::Llama3), out, chunk);
            assert_eq!((content.as_str(), calls.len()), ("", 1), "chunk {chunk}");
            assert_eq!((calls[0].name.as_str(), calls[0].arguments.as_str()), ("get_weather", r#"{"city": "Oslo"}"#));
        }
        // The call opens (for the lazy grammar) once `{"name": "` is written, and only then;
        // it is named as soon as its name is written, and its arguments stream.
        let mut p = CallParser::new(&tools, CallFormat::Llama3);
        for (piece, opened) in [(" {", None), ("\"na", None), ("me\": \"g", Some("{\"name\": \"g")), ("et_weather\", ", None)] {
            assert_eq!(p.push(piece), (String::new(), vec![]));
            assert_eq!(p.open_call(), opened, "after {piece:?}");
        }
        let (_, k) = p.push("\"parameters\": {\"ci");
        assert_eq!(k.iter().map(|d| (d.name.as_str(), d.arguments.as_str())).collect::<Vec<_>>(), [("get_weather", ""), ("get_weather", "{\"ci")]);
        let (_, k) = p.push("ty\": \"Oslo\"}}\n");
        assert_eq!((k.len(), k[0].arguments.as_str(), p.n_calls()), (1, "ty\": \"Oslo\"}", 1));
        // An object naming a tool in another key order is read whole at its end.
        let (content, calls) = parse(&mut CallParser::new(&tools, CallFormat::Llama3), "{\"parameters\": {}, \"name\": \"get_weather\"}", 2);
        assert_eq!((content.as_str(), calls.len(), calls[0].arguments.as_str()), ("", 1, "{}"));
        let mut p = CallParser::new(&tools, CallFormat::Llama3);
        for piece in ["{\"answer\"", ": 42}"] {
            p.push(piece);
            assert_eq!(p.open_call(), None);
        }
        // `required`: the reply is one object naming "parameters", even with parallel calls allowed.
        let Some(Constraint::Lark(g)) = call_grammar(&tools, &ToolChoice::Required, true, CallFormat::Llama3) else { panic!() };
        assert!(g.starts_with("start: %json {") && g.contains("\"parameters\"") && !g.contains("arguments") && g.lines().count() == 1, "{g}");
        // Tags of other formats are text; other JSON is content.
        for text in ["<tool_call>{\"name\": \"get_weather\", \"arguments\": {}}</tool_call>", "{\"answer\": 42}", "[TOOL_CALLS] [{}]"] {
            assert_eq!(parse(&mut CallParser::new(&tools, CallFormat::Llama3), text, 3), (text.to_owned(), vec![]), "{text}");
        }
    }

    #[test]
    fn formats_are_detected_from_the_template_and_named_overrides_checked() {
        let (calls, both) = (CallTokens { calls: Some(5), args: None }, CallTokens { calls: Some(5), args: Some(6) });
        assert_eq!(CallFormat::detect(calls, Some("{{ '[TOOL_CALLS] [' }}")), CallFormat::Mistral(5));
        assert_eq!(CallFormat::detect(both, Some("{{ '[TOOL_CALLS] [' }}")), CallFormat::Mistral(5));
        assert_eq!(CallFormat::detect(both, Some("'[TOOL_CALLS]' + name + '[ARGS]'")), CallFormat::MistralV11 { calls: 5, args: 6 });
        assert_eq!(CallFormat::detect(calls, Some("'[TOOL_CALLS]' + name + '[ARGS]'")), CallFormat::Mistral(5));
        assert_eq!(CallFormat::detect(calls, Some("<tool_call>")), CallFormat::Hermes);
        assert_eq!(CallFormat::detect(CallTokens::default(), Some("[TOOL_CALLS]")), CallFormat::Hermes);
        assert_eq!(CallFormat::parse("mistral", calls), Ok(CallFormat::Mistral(5)));
        assert_eq!(CallFormat::parse("mistral-v11", both), Ok(CallFormat::MistralV11 { calls: 5, args: 6 }));
        assert!(CallFormat::parse("mistral", CallTokens::default()).unwrap_err().contains("no [TOOL_CALLS]"));
        assert!(CallFormat::parse("mistral-v11", calls).unwrap_err().contains("no [ARGS]"));
        assert!(CallFormat::parse("pythonic", both).unwrap_err().contains("hermes, mistral, mistral-v11 or llama3"));
        let llama = "<|start_header_id|>{{ m.role }}<|end_header_id|>{% if m.role == 'ipython' %}";
        assert_eq!(CallFormat::detect(CallTokens::default(), Some(llama)), CallFormat::Llama3);
        assert_eq!(CallFormat::detect(CallTokens::default(), Some("<|start_header_id|>{{ m.role }}")), CallFormat::Hermes);
        for f in [CallFormat::Hermes, CallFormat::Mistral(5), CallFormat::MistralV11 { calls: 5, args: 6 }, CallFormat::Llama3] {
            assert_eq!(CallFormat::parse(f.name(), both), Ok(f));
        }
    }

    #[test]
    fn malformed_calls_stay_content_and_an_unclosed_whole_call_counts() {
        let mut p = CallParser::new(&[], CallFormat::Hermes);
        let (c, k) = p.push("a <tool_call>not json</tool_call> b <tool");
        assert_eq!((c.as_str(), k.len()), ("a <tool_call>not json</tool_call> b ", 0));
        assert_eq!(p.finish(), ("<tool".into(), vec![]));
        let mut p = CallParser::new(&[], CallFormat::Hermes);
        p.push("<tool_call>{\"arguments\": {}, \"name\": \"f\"}");
        let (c, k) = p.finish();
        assert_eq!((c.as_str(), k.len()), ("", 1));
    }

    #[test]
    fn a_bare_json_output_naming_a_tool_is_a_call_and_other_json_is_content() {
        let tools = [tool("get_weather", json!({"type": "object"}))];
        let run = |text: &str| parse(&mut CallParser::new(&tools, HERMES), text, 1);
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
