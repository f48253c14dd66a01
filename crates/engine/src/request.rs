//! The request contract every frontend speaks. The TypeScript API, the HTTP
//! server and Rust callers fill a `RequestSpec` (every field optional, values
//! as they were sent) and `resolve` turns it into a checked `GenerateRequest`.
//! Every rule about a request's fields lives in this file, once; an error
//! names its `Field`, so each frontend says it in its own words (`topP` in
//! TypeScript, `top_p` with OpenAI's `param` over HTTP).

use std::fmt;

use serde::Deserialize;
use serde_json::Value;

use crate::text::chat::ChatMessage;
use crate::control::config::Limits;
use crate::engine::{GenerateRequest, Input, Priority, MAX_TOP_LOGPROBS};
use crate::sampler::SamplingParams;
use crate::text::grammar::Constraint;
use crate::text::output::ReasoningFormat;
use crate::text::tools::{self, Tool, ToolChoice};

/// Most entries of `logitBias` (OpenAI's limit).
pub const MAX_LOGIT_BIAS: usize = 300;
/// Most bytes of a schema, regex or grammar; llguidance's own limits bound
/// what compiling it may cost.
pub const MAX_CONSTRAINT_BYTES: usize = 1 << 20;

/// The request fields an error can be about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Model,
    Prompt,
    PromptTokens,
    Messages,
    MaxTokens,
    Temperature,
    TopP,
    TopK,
    MinP,
    RepetitionPenalty,
    PresencePenalty,
    FrequencyPenalty,
    Seed,
    StopSequences,
    StopTokenIds,
    TopLogprobs,
    TimeoutMs,
    Priority,
    ResponseFormat,
    Regex,
    Grammar,
    Tools,
    ToolChoice,
    LogitBias,
    ReasoningFormat,
}

impl Field {
    /// The name in `RequestSpec` and the TypeScript API.
    pub fn name(self) -> &'static str {
        match self {
            Field::Model => "model",
            Field::Prompt => "prompt",
            Field::PromptTokens => "prompt.tokens",
            Field::Messages => "messages",
            Field::MaxTokens => "maxTokens",
            Field::Temperature => "temperature",
            Field::TopP => "topP",
            Field::TopK => "topK",
            Field::MinP => "minP",
            Field::RepetitionPenalty => "repetitionPenalty",
            Field::PresencePenalty => "presencePenalty",
            Field::FrequencyPenalty => "frequencyPenalty",
            Field::Seed => "seed",
            Field::StopSequences => "stopSequences",
            Field::StopTokenIds => "stopTokenIds",
            Field::TopLogprobs => "topLogprobs",
            Field::TimeoutMs => "timeoutMs",
            Field::Priority => "priority",
            Field::ResponseFormat => "responseFormat",
            Field::Regex => "regex",
            Field::Grammar => "grammar",
            Field::Tools => "tools",
            Field::ToolChoice => "toolChoice",
            Field::LogitBias => "logitBias",
            Field::ReasoningFormat => "reasoningFormat",
        }
    }

    /// A JSON value of this field as its type (for frontends that receive
    /// it untyped), or the field refused by name.
    pub fn parse<T: serde::de::DeserializeOwned>(self, v: Value) -> Result<T, InvalidParam> {
        serde_json::from_value(v).map_err(|e| InvalidParam::new(self, format!("is malformed: {e}")))
    }

    /// OpenAI's name on the wire (vLLM's for its extensions).
    pub fn openai_name(self) -> &'static str {
        match self {
            Field::PromptTokens => "prompt",
            Field::MaxTokens => "max_tokens",
            Field::TopP => "top_p",
            Field::TopK => "top_k",
            Field::MinP => "min_p",
            Field::RepetitionPenalty => "repetition_penalty",
            Field::PresencePenalty => "presence_penalty",
            Field::FrequencyPenalty => "frequency_penalty",
            Field::StopSequences => "stop",
            Field::StopTokenIds => "stop_token_ids",
            Field::TopLogprobs => "top_logprobs",
            Field::TimeoutMs => "timeout_ms",
            Field::ResponseFormat => "response_format",
            Field::ToolChoice => "tool_choice",
            Field::LogitBias => "logit_bias",
            Field::ReasoningFormat => "reasoning_format",
            other => other.name(),
        }
    }
}

/// A request field that breaks a rule.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidParam {
    pub field: Field,
    /// The element of a list field at fault.
    pub index: Option<usize>,
    reason: String,
    /// `reason` reads after the field's name ("must be ..."); otherwise it
    /// is a sentence of its own.
    after_name: bool,
}

impl InvalidParam {
    /// `field` followed by `reason`: "topP must be in (0, 1], got 2".
    pub fn new(field: Field, reason: impl Into<String>) -> Self {
        InvalidParam { field, index: None, reason: reason.into(), after_name: true }
    }

    /// A sentence of its own that concerns `field`; `{name}` in it stands
    /// for the field's name.
    pub fn sentence(field: Field, text: impl Into<String>) -> Self {
        InvalidParam { field, index: None, reason: text.into(), after_name: false }
    }

    fn at(mut self, index: usize) -> Self {
        self.index = Some(index);
        self
    }

    /// The message, calling the field `name` (a frontend's own name for it).
    pub fn message(&self, name: &str) -> String {
        match (self.after_name, self.index) {
            (false, _) => self.reason.replace("{name}", name),
            (true, None) => format!("{name} {}", self.reason),
            (true, Some(i)) => format!("{name}[{i}] {}", self.reason),
        }
    }
}

impl fmt::Display for InvalidParam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message(self.field.name()))
    }
}

/// A number as a frontend received it: JSON integers exactly, JavaScript's
/// f64 as it is (NaN and fractions included, so that they are refused by
/// name rather than rounded).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Number {
    Int(i64),
    UInt(u64),
    Float(f64),
}

impl From<f64> for Number {
    fn from(v: f64) -> Self {
        Number::Float(v)
    }
}
impl From<i64> for Number {
    fn from(v: i64) -> Self {
        Number::Int(v)
    }
}
impl From<u64> for Number {
    fn from(v: u64) -> Self {
        Number::UInt(v)
    }
}
impl From<u32> for Number {
    fn from(v: u32) -> Self {
        Number::UInt(v as u64)
    }
}

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Number::Int(v) => write!(f, "{v}"),
            Number::UInt(v) => write!(f, "{v}"),
            Number::Float(v) => write!(f, "{v}"),
        }
    }
}

impl Number {
    /// The value if it is an integer; f64 integers up to 2^64 convert exactly.
    fn integer(self) -> Option<i128> {
        match self {
            Number::Int(v) => Some(v as i128),
            Number::UInt(v) => Some(v as i128),
            Number::Float(v) if v.is_finite() && v.fract() == 0.0 && v.abs() < 1.9e19 => Some(v as i128),
            Number::Float(_) => None,
        }
    }

    /// The value as an integer in `range`, or `field` refused with `what`.
    fn whole(self, field: Field, range: std::ops::RangeInclusive<i128>, what: &str) -> Result<i128, InvalidParam> {
        match self.integer() {
            Some(v) if range.contains(&v) => Ok(v),
            _ => Err(InvalidParam::new(field, format!("must be {what}, got {self}"))),
        }
    }
}

const TOKEN_ID: (std::ops::RangeInclusive<i128>, &str) = (0..=u32::MAX as i128, "a token id (an integer from 0 to 2^32 - 1)");

fn token_ids(field: Field, ids: Vec<Number>) -> Result<Vec<u32>, InvalidParam> {
    ids.into_iter()
        .enumerate()
        .map(|(i, t)| t.whole(field, TOKEN_ID.0, TOKEN_ID.1).map(|v| v as u32).map_err(|e| e.at(i)))
        .collect()
}

/// A prompt: text, or token ids (`{tokens: [...]}`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PromptSpec {
    Text(String),
    Tokens { tokens: Vec<Number> },
}

/// A generation request as a frontend received it; `resolve` checks it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestSpec {
    pub model: Option<String>,
    pub prompt: Option<PromptSpec>,
    pub messages: Option<Vec<ChatMessage>>,
    pub max_tokens: Option<Number>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<Number>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub seed: Option<Number>,
    pub stop_sequences: Option<Vec<String>>,
    pub stop_token_ids: Option<Vec<Number>>,
    pub ignore_eos: Option<bool>,
    pub top_logprobs: Option<Number>,
    /// Milliseconds; a fraction rounds up.
    pub timeout_ms: Option<f64>,
    /// `urgent`, `default` or `background`.
    pub priority: Option<String>,
    pub cache_salt: Option<String>,
    pub request_id: Option<String>,
    pub pin_prefix: Option<bool>,
    /// `{type: "json_object"}` or `{type: "json_schema", schema, strict?}`
    /// (`text`: no constraint).
    pub response_format: Option<ResponseFormat>,
    /// The whole output matches this regex.
    pub regex: Option<String>,
    /// The output follows this Lark grammar (llguidance's dialect).
    pub grammar: Option<String>,
    /// Functions the model may call (OpenAI's shape).
    pub tools: Option<Vec<Tool>>,
    /// `auto`, `none`, `required` or `{type: "function", function: {name}}`.
    pub tool_choice: Option<Value>,
    /// Several calls in one reply (default true).
    pub parallel_tool_calls: Option<bool>,
    /// Token id (as a string, JSON's only key type) to a bias in [-100, 100].
    pub logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    /// `auto` (split `<think>` blocks out when the model writes them),
    /// `parsed` (always) or `inline` (never).
    pub reasoning_format: Option<String>,
}

/// What the output's text must be.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema {
        schema: Value,
        /// Accepted for OpenAI's sake: the output always follows the schema.
        #[serde(default)]
        strict: Option<bool>,
    },
}

/// What a field left out means, where frontends differ (OpenAI's
/// temperature is 1, the engine's 0; legacy completions stop at 16 tokens).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestDefaults {
    pub temperature: f32,
    pub max_tokens: Option<i64>,
}

impl Default for RequestDefaults {
    fn default() -> Self {
        RequestDefaults { temperature: SamplingParams::default().temperature, max_tokens: None }
    }
}

impl RequestSpec {
    pub fn resolve(self, defaults: &RequestDefaults) -> Result<GenerateRequest, InvalidParam> {
        let model = self.model.ok_or_else(|| InvalidParam::new(Field::Model, "is required"))?;
        let input = match (self.prompt, self.messages) {
            (Some(PromptSpec::Text(text)), None) => Input::Prompt(text),
            (Some(PromptSpec::Tokens { tokens }), None) => Input::Tokens(token_ids(Field::PromptTokens, tokens)?),
            (None, Some(messages)) => Input::Messages(messages),
            (None, None) => return Err(InvalidParam::sentence(Field::Prompt, "either prompt or messages is required")),
            (Some(_), Some(_)) => return Err(InvalidParam::sentence(Field::Prompt, "give either prompt or messages, not both")),
        };
        let max_tokens = match self.max_tokens {
            Some(m) => Some(m.whole(Field::MaxTokens, 1..=i64::MAX as i128, "a positive integer")? as i64),
            None => defaults.max_tokens,
        };
        let d = SamplingParams::default();
        let float = |v: Option<f64>, dflt: f32| v.map_or(dflt, |x| x as f32);
        let sampling = SamplingParams {
            temperature: float(self.temperature, defaults.temperature),
            top_k: match self.top_k {
                Some(k) => k.whole(Field::TopK, 0..=(1 << 53) - 1, "an integer from 0 to 2^53 - 1")? as usize,
                None => 0,
            },
            top_p: float(self.top_p, d.top_p),
            min_p: float(self.min_p, d.min_p),
            repetition_penalty: float(self.repetition_penalty, d.repetition_penalty),
            presence_penalty: float(self.presence_penalty, d.presence_penalty),
            frequency_penalty: float(self.frequency_penalty, d.frequency_penalty),
            seed: match self.seed {
                Some(s) => Some(s.whole(Field::Seed, 0..=u64::MAX as i128, "an integer from 0 to 2^64 - 1")? as u64),
                None => None,
            },
            logit_bias: Vec::new(),
        };
        let top_logprobs = match self.top_logprobs {
            Some(n) => n.whole(Field::TopLogprobs, 0..=MAX_TOP_LOGPROBS as i128, &format!("an integer from 0 to {MAX_TOP_LOGPROBS}"))?
                as usize,
            None => 0,
        };
        let timeout_ms = match self.timeout_ms {
            Some(t) if t.is_finite() && t > 0.0 => Some(t.ceil() as u64),
            Some(t) => return Err(InvalidParam::new(Field::TimeoutMs, format!("must be a positive number, got {t}"))),
            None => None,
        };
        let priority = match self.priority.as_deref() {
            None => Priority::Default,
            Some(p) => Priority::parse(p)
                .ok_or_else(|| InvalidParam::new(Field::Priority, format!("must be urgent, default or background, got '{p}'")))?,
        };
        let (constraint, tools, tool_choice) = constraint_and_tools(self.response_format, self.regex, self.grammar, self.tools, self.tool_choice)?;
        let sampling = SamplingParams { logit_bias: logit_bias(self.logit_bias.unwrap_or_default())?, ..sampling };
        let req = GenerateRequest {
            model,
            input,
            max_tokens,
            sampling,
            stop_sequences: self.stop_sequences.unwrap_or_default(),
            stop_token_ids: token_ids(Field::StopTokenIds, self.stop_token_ids.unwrap_or_default())?,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            top_logprobs,
            timeout_ms,
            priority,
            cache_salt: self.cache_salt,
            request_id: self.request_id,
            pin_prefix: self.pin_prefix.unwrap_or(false),
            constraint,
            tools,
            tool_choice,
            parallel_tool_calls: self.parallel_tool_calls.unwrap_or(true),
            reasoning_format: match self.reasoning_format.as_deref() {
                None => ReasoningFormat::Auto,
                Some(f) => ReasoningFormat::parse(f)
                    .ok_or_else(|| InvalidParam::new(Field::ReasoningFormat, format!("must be auto, parsed or inline, got '{f}'")))?,
            },
        };
        req.validate()?;
        Ok(req)
    }
}

/// The one constraint a request's output follows, and the tools it offers.
fn constraint_and_tools(
    format: Option<ResponseFormat>,
    regex: Option<String>,
    grammar: Option<String>,
    tools: Option<Vec<Tool>>,
    choice: Option<Value>,
) -> Result<(Option<Constraint>, Vec<Tool>, ToolChoice), InvalidParam> {
    let mut given: Vec<(Field, Constraint)> = Vec::new();
    match format {
        None | Some(ResponseFormat::Text) => {}
        Some(ResponseFormat::JsonObject) => given.push((Field::ResponseFormat, Constraint::JsonObject)),
        Some(ResponseFormat::JsonSchema { schema, .. }) => {
            if !schema.is_object() && !schema.is_boolean() {
                return Err(InvalidParam::new(Field::ResponseFormat, format!("schema must be a JSON schema object, got {schema}")));
            }
            given.push((Field::ResponseFormat, Constraint::JsonSchema(schema)));
        }
    }
    given.extend(regex.map(|r| (Field::Regex, Constraint::Regex(r))));
    given.extend(grammar.map(|g| (Field::Grammar, Constraint::Lark(g))));
    if given.len() > 1 {
        return Err(InvalidParam::sentence(given[1].0, "give at most one of a JSON response format, a regex and a grammar"));
    }
    for (field, c) in &given {
        let size = match c {
            Constraint::JsonObject => 0,
            Constraint::JsonSchema(s) => s.to_string().len(),
            Constraint::Regex(t) | Constraint::Lark(t) => t.len(),
        };
        if size > MAX_CONSTRAINT_BYTES {
            return Err(InvalidParam::new(*field, format!("is {size} bytes, over the limit of {MAX_CONSTRAINT_BYTES}")));
        }
    }
    let tools = tools.unwrap_or_default();
    let choice = match choice {
        None => ToolChoice::Auto,
        Some(v) => ToolChoice::parse(&v).map_err(|e| InvalidParam::new(Field::ToolChoice, e))?,
    };
    tools::check_tools(&tools, &choice).map_err(|(on_tools, e)| {
        if on_tools {
            InvalidParam::sentence(Field::Tools, format!("{{name}}{e}"))
        } else {
            InvalidParam::new(Field::ToolChoice, e)
        }
    })?;
    let forced = matches!(choice, ToolChoice::Required | ToolChoice::Named(_));
    if forced && !given.is_empty() {
        return Err(InvalidParam::sentence(Field::ToolChoice, "a required tool call cannot be combined with a JSON response format, a regex or a grammar"));
    }
    Ok((given.pop().map(|g| g.1), tools, choice))
}

/// `logitBias` as (token, bias) pairs.
fn logit_bias(map: std::collections::BTreeMap<String, f64>) -> Result<Vec<(u32, f32)>, InvalidParam> {
    if map.len() > MAX_LOGIT_BIAS {
        return Err(InvalidParam::new(Field::LogitBias, format!("has {} entries, over the limit of {MAX_LOGIT_BIAS}", map.len())));
    }
    map.into_iter()
        .map(|(k, v)| {
            let id = k.parse::<u32>().map_err(|_| InvalidParam::new(Field::LogitBias, format!("keys must be token ids, got '{k}'")))?;
            if !(-100.0..=100.0).contains(&v) {
                return Err(InvalidParam::new(Field::LogitBias, format!("values must be in [-100, 100], got {v} for token {id}")));
            }
            Ok((id, v as f32))
        })
        .collect()
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), InvalidParam> {
        let bad = |field, what: &str, v: f32| Err(InvalidParam::new(field, format!("must be {what}, got {v}")));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(Field::Temperature, "a finite number >= 0", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(Field::TopP, "in (0, 1]", self.top_p);
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(Field::MinP, "in [0, 1]", self.min_p);
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(Field::RepetitionPenalty, "a finite number > 0", self.repetition_penalty);
        }
        for (field, v) in [(Field::PresencePenalty, self.presence_penalty), (Field::FrequencyPenalty, self.frequency_penalty)] {
            if !v.is_finite() || !(-2.0..=2.0).contains(&v) {
                return bad(field, "in [-2, 2]", v);
            }
        }
        Ok(())
    }
}

impl GenerateRequest {
    /// The rules that need no model: what `resolve` checks last, and what
    /// `Engine::submit` checks of a request built in Rust.
    pub fn validate(&self) -> Result<(), InvalidParam> {
        self.sampling.validate()?;
        if let Some(m) = self.max_tokens.filter(|&m| m <= 0) {
            return Err(InvalidParam::new(Field::MaxTokens, format!("must be a positive integer, got {m}")));
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return Err(InvalidParam::new(Field::TopLogprobs, format!("must be at most {MAX_TOP_LOGPROBS}, got {}", self.top_logprobs)));
        }
        if self.stop_sequences.iter().any(String::is_empty) {
            return Err(InvalidParam::sentence(Field::StopSequences, "stop sequences must not be empty strings"));
        }
        if let Input::Messages(m) = &self.input {
            if m.is_empty() {
                return Err(InvalidParam::new(Field::Messages, "must not be empty"));
            }
        }
        Ok(())
    }

    /// The field the output constraint came in.
    pub fn constraint_field(&self) -> Field {
        match self.constraint {
            Some(Constraint::Regex(_)) => Field::Regex,
            Some(Constraint::Lark(_)) => Field::Grammar,
            _ => Field::ResponseFormat,
        }
    }

    /// The field the prompt came in.
    pub fn prompt_field(&self) -> Field {
        match self.input {
            Input::Prompt(_) => Field::Prompt,
            Input::Tokens(_) => Field::PromptTokens,
            Input::Messages(_) => Field::Messages,
        }
    }

    /// The configured bounds on what a request may carry (`limits.*`),
    /// checked before any tokenization work.
    pub fn check_limits(&self, lim: &Limits) -> Result<(), InvalidParam> {
        let over = |field, what: &str, n: usize, max: usize, key: &str| {
            if n > max {
                return Err(InvalidParam::sentence(field, format!("{what}: {n} exceeds the limit of {max} (limits.{key})")));
            }
            Ok(())
        };
        let stops = Field::StopSequences;
        over(stops, "stop sequences", self.stop_sequences.len(), lim.max_stop_sequences, "maxStopSequences")?;
        for s in &self.stop_sequences {
            over(stops, "stop sequence characters", s.chars().count(), lim.max_stop_sequence_chars, "maxStopSequenceChars")?;
        }
        over(Field::StopTokenIds, "stop token ids", self.stop_token_ids.len(), lim.max_stop_token_ids, "maxStopTokenIds")?;
        match &self.input {
            Input::Prompt(text) => over(Field::Prompt, "prompt characters", text.len(), lim.max_prompt_chars, "maxPromptChars"),
            Input::Tokens(ids) => over(Field::PromptTokens, "prompt tokens", ids.len(), lim.max_prompt_tokens, "maxPromptTokens"),
            Input::Messages(msgs) => {
                over(Field::Messages, "messages", msgs.len(), lim.max_messages, "maxMessages")?;
                let chars = msgs.iter().map(|m| m.content.len() + m.role.len()).sum();
                over(Field::Messages, "message characters", chars, lim.max_prompt_chars, "maxPromptChars")
            }
        }
    }
}

/// The room a tokenized prompt leaves, and what the request may generate in it.
pub struct PromptFit {
    pub n_prompt_tokens: usize,
    pub context_length: usize,
    /// Positions the KV cache holds.
    pub kv_positions: usize,
    pub max_prompt_tokens: usize,
    /// `streaming.maxTokens`.
    pub max_tokens_cap: usize,
}

impl PromptFit {
    /// Tokens the request may generate: an explicit `maxTokens` the context
    /// cannot hold is refused (as OpenAI and vLLM do), rather than cut
    /// short; left out, it is what fits.
    pub fn max_tokens(&self, req: &GenerateRequest) -> Result<usize, InvalidParam> {
        let (n, ctx, field) = (self.n_prompt_tokens, self.context_length, req.prompt_field());
        if n == 0 {
            return Err(InvalidParam::sentence(field, "the prompt is empty"));
        }
        if n > self.max_prompt_tokens {
            let max = self.max_prompt_tokens;
            return Err(InvalidParam::sentence(field, format!("prompt tokens: {n} exceeds the limit of {max} (limits.maxPromptTokens)")));
        }
        if n >= ctx {
            return Err(InvalidParam::sentence(field, format!("the prompt has {n} tokens but the context holds {ctx}")));
        }
        let room = ctx - n;
        let cap = self.max_tokens_cap;
        if let Some(m) = req.max_tokens {
            if m as u64 > cap as u64 {
                return Err(InvalidParam::new(Field::MaxTokens, format!("{m} exceeds the configured limit streaming.maxTokens = {cap}")));
            }
            if m as u64 > room as u64 {
                return Err(InvalidParam::sentence(
                    Field::MaxTokens,
                    format!("the context holds {ctx} tokens: the prompt's {n} and {{name}} {m} do not fit"),
                ));
            }
        }
        if n >= self.kv_positions {
            let kv = self.kv_positions;
            return Err(InvalidParam::sentence(field, format!("the prompt has {n} tokens but the KV cache holds {kv} (kv_cache.memoryMiB)")));
        }
        Ok(req.max_tokens.map_or(cap, |m| m as usize).min(room))
    }

    /// Token ids given as the prompt must be in the vocabulary.
    pub fn check_vocabulary(ids: &[u32], vocab_size: usize) -> Result<(), InvalidParam> {
        match ids.iter().position(|&t| t as usize >= vocab_size) {
            Some(i) => Err(InvalidParam::sentence(
                Field::PromptTokens,
                format!("token id {} is outside the vocabulary (size {vocab_size})", ids[i]),
            )
            .at(i)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EngineError;

    fn spec(json: &str) -> Result<GenerateRequest, InvalidParam> {
        serde_json::from_str::<RequestSpec>(json).unwrap().resolve(&RequestDefaults::default())
    }

    #[test]
    fn a_spec_resolves_to_a_request_with_the_frontends_defaults() {
        let r = spec(r#"{"model":"m","prompt":{"tokens":[1,2]},"maxTokens":5,"topK":40,"seed":7,"stopTokenIds":[3],"priority":"urgent","timeoutMs":0.5}"#)
            .unwrap();
        assert!(matches!(r.input, Input::Tokens(ref t) if t == &[1, 2]));
        assert_eq!((r.max_tokens, r.sampling.top_k, r.sampling.seed, r.timeout_ms), (Some(5), 40, Some(7), Some(1)));
        assert_eq!((r.stop_token_ids, r.priority), (vec![3], Priority::Urgent));
        let openai = RequestDefaults { temperature: 1.0, max_tokens: Some(16) };
        let r = RequestSpec { model: Some("m".into()), prompt: Some(PromptSpec::Text("a".into())), ..Default::default() }.resolve(&openai).unwrap();
        assert_eq!((r.sampling.temperature, r.max_tokens), (1.0, Some(16)));
        // Seeds over 2^53 stay exact from JSON (OpenAI clients send negative ones as u64).
        let r = spec(r#"{"model":"m","prompt":"a","seed":18446744073709551615}"#).unwrap();
        assert_eq!(r.sampling.seed, Some(u64::MAX));
    }

    #[test]
    fn each_bad_field_is_named_in_the_frontends_words() {
        for (json, field, ours, openai) in [
            (r#"{"model":"m","prompt":"a","topP":2}"#, Field::TopP, "topP must be in (0, 1], got 2", "top_p must be in (0, 1], got 2"),
            (r#"{"model":"m","prompt":"a","maxTokens":2.5}"#, Field::MaxTokens, "maxTokens must be a positive integer, got 2.5", "max_tokens must be a positive integer, got 2.5"),
            (r#"{"model":"m","prompt":"a","maxTokens":0}"#, Field::MaxTokens, "maxTokens must be a positive integer, got 0", "max_tokens must be a positive integer, got 0"),
            (r#"{"model":"m","prompt":{"tokens":[1,-1]}}"#, Field::PromptTokens, "prompt.tokens[1] must be a token id (an integer from 0 to 2^32 - 1), got -1", "prompt[1] must be a token id (an integer from 0 to 2^32 - 1), got -1"),
            (r#"{"model":"m","prompt":"a","stopSequences":[""]}"#, Field::StopSequences, "stop sequences must not be empty strings", "stop sequences must not be empty strings"),
            (r#"{"model":"m"}"#, Field::Prompt, "either prompt or messages is required", "either prompt or messages is required"),
            (r#"{"model":"m","prompt":"a","messages":[]}"#, Field::Prompt, "give either prompt or messages, not both", "give either prompt or messages, not both"),
            (r#"{"model":"m","messages":[]}"#, Field::Messages, "messages must not be empty", "messages must not be empty"),
            (r#"{"model":"m","prompt":"a","priority":"high"}"#, Field::Priority, "priority must be urgent, default or background, got 'high'", "priority must be urgent, default or background, got 'high'"),
            (r#"{"model":"m","prompt":"a","seed":-1}"#, Field::Seed, "seed must be an integer from 0 to 2^64 - 1, got -1", "seed must be an integer from 0 to 2^64 - 1, got -1"),
        ] {
            let e = spec(json).unwrap_err();
            assert_eq!((e.field, e.to_string().as_str(), e.message(e.field.openai_name()).as_str()), (field, ours, openai), "{json}");
            assert_eq!(EngineError::from(e).code(), "InvalidParams");
        }
        // NaN cannot come from JSON, only from JavaScript.
        let nan = RequestSpec { model: Some("m".into()), prompt: Some(PromptSpec::Text("a".into())), max_tokens: Some(f64::NAN.into()), ..Default::default() };
        assert_eq!(nan.resolve(&RequestDefaults::default()).unwrap_err().to_string(), "maxTokens must be a positive integer, got NaN");
        assert!(serde_json::from_str::<RequestSpec>(r#"{"max_tokens":1}"#).is_err(), "unknown keys are refused");
    }

    #[test]
    fn validation_rejects_bad_sampling_values() {
        let params = |f: fn(&mut SamplingParams)| {
            let mut p = SamplingParams::default();
            f(&mut p);
            p
        };
        for p in [
            params(|p| p.temperature = f32::NAN),
            params(|p| p.temperature = -1.0),
            params(|p| p.top_p = 0.0),
            params(|p| p.top_p = 1.5),
            params(|p| p.min_p = 2.0),
            params(|p| p.repetition_penalty = 0.0),
            params(|p| p.presence_penalty = 5.0),
        ] {
            assert_eq!(EngineError::from(p.validate().unwrap_err()).code(), "InvalidParams", "{p:?}");
        }
        assert!(SamplingParams::default().validate().is_ok());
    }

    #[test]
    fn the_prompt_must_fit_the_context_the_cache_and_the_limits() {
        let fit = |n, ctx, kv| PromptFit { n_prompt_tokens: n, context_length: ctx, kv_positions: kv, max_prompt_tokens: 1000, max_tokens_cap: 64 };
        let mut req = GenerateRequest::new("m", Input::Prompt("a".into()));
        assert_eq!(fit(10, 100, 200).max_tokens(&req), Ok(64));
        assert_eq!(fit(90, 100, 200).max_tokens(&req), Ok(10));
        for (f, want) in [(fit(0, 100, 200), "the prompt is empty"), (fit(100, 100, 200), "context holds 100"), (fit(50, 100, 40), "KV cache holds 40"), (fit(1001, 2000, 2000), "limits.maxPromptTokens")] {
            let e = f.max_tokens(&req).unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
        }
        req.max_tokens = Some(65);
        assert_eq!(fit(10, 100, 200).max_tokens(&req).unwrap_err().message("max_tokens"), "max_tokens 65 exceeds the configured limit streaming.maxTokens = 64");
        req.max_tokens = Some(50);
        let e = fit(60, 100, 200).max_tokens(&req).unwrap_err();
        assert_eq!(e.message("max_tokens"), "the context holds 100 tokens: the prompt's 60 and max_tokens 50 do not fit");
        assert_eq!(PromptFit::check_vocabulary(&[1, 7, 9], 8).unwrap_err().index, Some(2));
    }
}
