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

mod constraints;
use constraints::{constraint_and_tools, logit_bias};

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
    MinTokens,
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
            Field::MinTokens => "minTokens",
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
            Field::MinTokens => "min_tokens",
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
    /// Tokens generated before an end-of-generation token, a stop token id
    /// or a stop sequence may end the output (vLLM's `min_tokens`).
    pub min_tokens: Option<Number>,
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
        let min_tokens = match self.min_tokens {
            Some(m) => m.whole(Field::MinTokens, 0..=u32::MAX as i128, "an integer from 0 to 2^32 - 1")? as usize,
            None => 0,
        };
        let d = SamplingParams::default();
        // A finite number past f32's range would turn into `inf` on the way.
        let float = |field: Field, v: Option<f64>, dflt: f32| match v {
            Some(x) if x.is_finite() && (x as f32).is_infinite() => Err(InvalidParam::new(field, format!("must be a finite number, got {x:e}"))),
            Some(x) => Ok(x as f32),
            None => Ok(dflt),
        };
        let sampling = SamplingParams {
            temperature: float(Field::Temperature, self.temperature, defaults.temperature)?,
            top_k: match self.top_k {
                Some(k) => k.whole(Field::TopK, 0..=(1 << 53) - 1, "an integer from 0 to 2^53 - 1")? as usize,
                None => 0,
            },
            top_p: float(Field::TopP, self.top_p, d.top_p)?,
            min_p: float(Field::MinP, self.min_p, d.min_p)?,
            repetition_penalty: float(Field::RepetitionPenalty, self.repetition_penalty, d.repetition_penalty)?,
            presence_penalty: float(Field::PresencePenalty, self.presence_penalty, d.presence_penalty)?,
            frequency_penalty: float(Field::FrequencyPenalty, self.frequency_penalty, d.frequency_penalty)?,
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
            min_tokens,
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
        if let Some(m) = self.max_tokens.filter(|&m| (self.min_tokens as i64) > m) {
            return Err(InvalidParam::new(Field::MinTokens, format!("must be at most max_tokens ({m}), got {}", self.min_tokens)));
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
    /// `streaming.maxTokens`; `None`: what the context holds.
    pub max_tokens_cap: Option<usize>,
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
        let cap = self.max_tokens_cap.unwrap_or(room);
        if let (Some(m), Some(cap)) = (req.max_tokens, self.max_tokens_cap) {
            if m as u64 > cap as u64 {
                return Err(InvalidParam::new(Field::MaxTokens, format!("{m} exceeds the configured limit streaming.maxTokens = {cap}")));
            }
        }
        if let Some(m) = req.max_tokens {
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
mod tests;
