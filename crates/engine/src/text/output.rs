//! What a sequence's output text is made of: content, the model's reasoning
//! (`<think>...</think>`, qwen3 and the DeepSeek-R1 distills) and tool calls.
//! The worker passes every piece of released text through one
//! `OutputParser`; reasoning is split off first, so a call written while
//! thinking stays part of the reasoning.

use crate::text::tools::{CallFormat, CallParser, Tool, ToolCallDelta};

pub const THINK_OPEN: &str = "<think>";
pub const THINK_CLOSE: &str = "</think>";

/// Whether reasoning is split out of the content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReasoningFormat {
    /// Split when the chat template speaks of `<think>` (the model reasons).
    #[default]
    Auto,
    /// Always split `<think>` blocks out.
    Parsed,
    /// Leave them in the content, as the model wrote them.
    Inline,
}

impl ReasoningFormat {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(ReasoningFormat::Auto),
            "parsed" => Some(ReasoningFormat::Parsed),
            "inline" => Some(ReasoningFormat::Inline),
            _ => None,
        }
    }
}

/// Text released by a piece of output, by kind.
#[derive(Debug, Default, PartialEq)]
pub struct Parsed {
    pub content: String,
    pub reasoning: String,
    pub calls: Vec<ToolCallDelta>,
}

impl Parsed {
    pub fn extend(&mut self, other: Parsed) {
        self.content.push_str(&other.content);
        self.reasoning.push_str(&other.reasoning);
        self.calls.extend(other.calls);
    }
}

/// Splits `<think>` blocks out of streamed text; text that may be the start
/// of a tag is held back until it is known.
#[derive(Debug, Default)]
struct ThinkSplit {
    buf: String,
    thinking: bool,
}

impl ThinkSplit {
    /// (content, reasoning) released by `text`.
    fn push(&mut self, text: &str) -> (String, String) {
        self.buf.push_str(text);
        let (mut content, mut reasoning) = (String::new(), String::new());
        loop {
            let (tag, out) = if self.thinking { (THINK_CLOSE, &mut reasoning) } else { (THINK_OPEN, &mut content) };
            if let Some(at) = self.buf.find(tag) {
                out.push_str(&self.buf[..at]);
                self.buf.drain(..at + tag.len());
                self.thinking = !self.thinking;
                continue;
            }
            let keep = crate::text::tools::partial_suffix(&self.buf, tag);
            out.push_str(&self.buf[..self.buf.len() - keep]);
            self.buf.drain(..self.buf.len() - keep);
            return (content, reasoning);
        }
    }

    fn finish(&mut self) -> (String, String) {
        let rest = std::mem::take(&mut self.buf);
        if self.thinking { (String::new(), rest) } else { (rest, String::new()) }
    }
}

/// One sequence's output parser.
#[derive(Debug, Default)]
pub struct OutputParser {
    think: Option<ThinkSplit>,
    calls: Option<CallParser>,
}

impl OutputParser {
    /// `reasoning`: split `<think>` blocks out, starting inside one when the
    /// prompt opened it; `tools`: the tools whose calls are parsed out of
    /// the content, and how they are written (none: no parsing).
    pub fn new(reasoning: bool, starts_thinking: bool, tools: Option<(&[Tool], CallFormat)>) -> Self {
        OutputParser {
            think: reasoning.then(|| ThinkSplit { buf: String::new(), thinking: starts_thinking }),
            calls: tools.map(|(tools, format)| CallParser::new(tools, format)),
        }
    }

    /// See `CallParser::control_text`.
    pub fn control_text(&self, token: u32) -> Option<&'static str> {
        self.calls.as_ref().and_then(|c| c.control_text(token))
    }

    pub fn n_calls(&self) -> usize {
        self.calls.as_ref().map_or(0, CallParser::n_calls)
    }

    /// Inside a tool call block: the text after its opening tag so far.
    pub fn open_call(&self) -> Option<&str> {
        self.calls.as_ref().and_then(CallParser::open_call)
    }

    pub fn push(&mut self, text: &str) -> Parsed {
        let (content, reasoning) = match self.think.as_mut() {
            Some(t) => t.push(text),
            None => (text.to_owned(), String::new()),
        };
        self.route(content, reasoning)
    }

    /// What is held back at the end.
    pub fn finish(&mut self) -> Parsed {
        let (content, reasoning) = self.think.as_mut().map(ThinkSplit::finish).unwrap_or_default();
        let mut out = self.route(content, reasoning);
        if let Some(c) = self.calls.as_mut() {
            let (content, calls) = c.finish();
            out.extend(Parsed { content, reasoning: String::new(), calls });
        }
        out
    }

    fn route(&mut self, content: String, reasoning: String) -> Parsed {
        match self.calls.as_mut() {
            Some(c) => {
                let (content, calls) = c.push(&content);
                Parsed { content, reasoning, calls }
            }
            None => Parsed { content, reasoning, calls: Vec::new() },
        }
    }
}

/// Whether a model reasons in `<think>` blocks (its template writes them),
/// and whether the rendered prompt already opened one (DeepSeek-R1 distills
/// end the generation prompt with `<think>\n`).
pub fn thinking(template_source: Option<&str>, prompt: &str) -> (bool, bool) {
    let opened = prompt.trim_end().ends_with(THINK_OPEN);
    (opened || template_source.is_some_and(|t| t.contains(THINK_OPEN) || t.contains(THINK_CLOSE)), opened)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(p: &mut OutputParser, text: &str, chunk: usize) -> Parsed {
        let mut out = Parsed::default();
        let chars: Vec<char> = text.chars().collect();
        for piece in chars.chunks(chunk) {
            out.extend(p.push(&piece.iter().collect::<String>()));
        }
        out.extend(p.finish());
        out
    }

    #[test]
    fn reasoning_is_split_out_under_any_chunking_and_calls_inside_it_stay_reasoning() {
        let text = "<think>\nI should call <tool_call>{\"name\": \"x\", \"arguments\": {}}</tool_call> maybe\n</think>\n\nHello <tool_call>{\"name\": \"f\", \"arguments\": {\"a\": 1}}</tool_call>";
        for chunk in [1, 2, 5, 9, text.len()] {
            let out = run(&mut OutputParser::new(true, false, Some((&[], CallFormat::Hermes))), text, chunk);
            assert_eq!(out.reasoning, "\nI should call <tool_call>{\"name\": \"x\", \"arguments\": {}}</tool_call> maybe\n", "chunk {chunk}");
            assert_eq!(out.content, "\n\nHello ");
            assert!(out.calls.iter().all(|c| (c.index, c.name.as_str()) == (0, "f")), "{:?}", out.calls);
            assert_eq!(out.calls.iter().map(|c| c.arguments.as_str()).collect::<String>(), "{\"a\": 1}");
        }
    }

    #[test]
    fn a_prompt_that_opened_the_block_starts_inside_it_and_inline_keeps_everything() {
        let out = run(&mut OutputParser::new(true, true, None), "plan</think>answer", 3);
        assert_eq!((out.reasoning.as_str(), out.content.as_str()), ("plan", "answer"));
        // Unterminated reasoning stays reasoning; a lone "<thi" at the end is content.
        let out = run(&mut OutputParser::new(true, false, None), "a <thi", 1);
        assert_eq!((out.reasoning.as_str(), out.content.as_str()), ("", "a <thi"));
        let out = run(&mut OutputParser::new(true, false, None), "<think>still going", 4);
        assert_eq!((out.reasoning.as_str(), out.content.as_str()), ("still going", ""));
        let out = run(&mut OutputParser::new(false, false, None), "<think>x</think>y", 2);
        assert_eq!(out.content, "<think>x</think>y");
        assert_eq!(thinking(Some("{% if x %}<think>{% endif %}"), "hi"), (true, false));
        assert_eq!(thinking(None, "<|im_start|>assistant\n<think>\n"), (true, true));
        assert_eq!(thinking(Some("plain"), "hi"), (false, false));
    }
}
