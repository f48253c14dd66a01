//! One request being served: the event streams of its choices (`n`), each
//! its own engine sequence, merged and turned into OpenAI's streaming
//! chunks or into one response body.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};
use mlx_serving_engine::engine::{Event, FinishReason, GenerateRequest, RequestHandle, Stats};
use mlx_serving_engine::text::tokenizer::StreamDecoder;
use mlx_serving_engine::text::tools::ToolCall;
use mlx_serving_engine::EngineError;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::{engine_error_response, Api, AppState};

/// One choice's progress.
#[derive(Default)]
struct Choice {
    /// Characters of the tokens so far (legacy logprobs' `text_offset`),
    /// counted from the tokens themselves: text held back for a possible
    /// stop sequence is released later but still sits at its own token.
    chars: CharCount,
    /// Whether a chunk went out (the first one carries the role).
    started: bool,
    done: bool,
}

/// Characters of a token stream, each counted once its bytes are all in:
/// the characters the stream's text has so far.
#[derive(Default)]
struct CharCount {
    chars: usize,
    text: StreamDecoder,
}

impl CharCount {
    fn push(&mut self, bytes: &[u8]) {
        self.chars += self.text.push(bytes).chars().count();
    }
}

/// What the response looks like, beside its choices' events.
pub(crate) struct Shape {
    pub id: String,
    pub model: String,
    pub api: Api,
    pub created: u64,
    pub logprobs: bool,
    pub include_usage: bool,
}

pub(crate) struct Run {
    state: Arc<AppState>,
    /// Each choice's events, tagged with its index; `None`: its stream
    /// ended without a final event (model unloaded, shutdown).
    events: mpsc::Receiver<(usize, Option<Event>)>,
    _permit: OwnedSemaphorePermit,
    shape: Shape,
    choices: Vec<Choice>,
    /// Over the finished choices: the prompt (counted once) and the output.
    prompt_tokens: usize,
    generated: usize,
    /// First token of choice 0, seconds; choice 0's finish.
    ttft_s: f64,
    stopped: bool,
    finished: bool,
}

/// Sends choice `i`'s events on until its last one, or until the run is
/// gone (then dropping `h` cancels the sequence, even while queued). `then`
/// runs at its first token or its end, once its prompt has been prefilled.
async fn forward(i: usize, mut h: RequestHandle, tx: mpsc::Sender<(usize, Option<Event>)>, mut then: Option<Box<dyn FnOnce() + Send>>) {
    loop {
        let ev = tokio::select! {
            ev = h.recv() => ev,
            _ = tx.closed() => return,
        };
        if matches!(ev, Some(Event::Token { .. } | Event::Done(_))) {
            if let Some(f) = then.take() {
                f();
            }
        }
        let last = !matches!(ev, Some(Event::Token { .. } | Event::ToolCall(_)));
        if tx.send((i, ev)).await.is_err() || last {
            return;
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        // The client left first; the forwarders then drop their handles,
        // which cancels the sequences.
        if !self.finished {
            self.state.metrics.request_aborted();
        }
    }
}

impl Run {
    /// Serves `first` (choice 0) and, once its prompt is in the prefix
    /// cache (its first token), submits `rest` (choices 1..), so they share
    /// those blocks instead of each prefilling the prompt again.
    pub fn new(state: Arc<AppState>, first: RequestHandle, rest: Vec<GenerateRequest>, permit: OwnedSemaphorePermit, shape: Shape) -> Run {
        let n = 1 + rest.len();
        let (tx, events) = mpsc::channel(16 * n);
        let then: Option<Box<dyn FnOnce() + Send>> = (!rest.is_empty()).then(|| {
            let (engine, tx) = (state.engine.clone(), tx.clone());
            Box::new(move || {
                tokio::spawn(async move {
                    let submitted = tokio::task::spawn_blocking(move || rest.into_iter().map(|r| engine.submit(r)).collect::<Vec<_>>()).await;
                    let submitted = submitted.unwrap_or_else(|e| vec![Err(EngineError::Internal(e.to_string()))]);
                    for (k, r) in submitted.into_iter().enumerate() {
                        match r {
                            Ok(h) => drop(tokio::spawn(forward(k + 1, h, tx.clone(), None))),
                            Err(e) => return drop(tx.send((k + 1, Some(Event::Error(e)))).await),
                        }
                    }
                });
            }) as Box<dyn FnOnce() + Send>
        });
        tokio::spawn(forward(0, first, tx, then));
        let choices = (0..n).map(|_| Choice::default()).collect();
        Run { state, events, _permit: permit, shape, choices, prompt_tokens: 0, generated: 0, ttft_s: 0.0, stopped: false, finished: false }
    }

    /// A token as logprobs show it: its text, or where its bytes are only
    /// part of a character, OpenAI's `bytes:\xNN...` form (so two such
    /// tokens never share a key); and the bytes themselves.
    fn token_repr(&self, id: u32) -> (String, Vec<u8>) {
        let bytes = self.state.engine.token_bytes(&self.shape.model, id).unwrap_or_default();
        let text = match std::str::from_utf8(&bytes) {
            Ok(s) => s.to_owned(),
            Err(_) => "bytes:".to_owned() + &bytes.iter().map(|b| format!("\\x{b:02x}")).collect::<String>(),
        };
        (text, bytes)
    }

    /// Choice `i`'s logprob entry for a token (legacy: with its `offset`).
    fn logprob_entry(&mut self, i: usize, token_id: u32, logprob: f32, top: &[(u32, f32)]) -> Value {
        let (text, bytes) = self.token_repr(token_id);
        let chars = &mut self.choices[i].chars;
        let offset = chars.chars;
        chars.push(&bytes);
        match self.shape.api {
            Api::Chat => json!({
                "token": text, "logprob": logprob, "bytes": bytes,
                "top_logprobs": top.iter().map(|&(t, lp)| {
                    let (s, b) = self.token_repr(t);
                    json!({ "token": s, "logprob": lp, "bytes": b })
                }).collect::<Vec<_>>(),
            }),
            Api::Completion => json!({
                "token": text, "logprob": logprob, "offset": offset,
                "top": top.iter().map(|&(t, lp)| (self.token_repr(t).0, Value::from(lp))).collect::<Map<_, _>>(),
            }),
        }
    }

    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.generated,
            "total_tokens": self.prompt_tokens + self.generated,
        })
    }

    /// A choice's final event; returns whether every choice is done (the
    /// request then counts once in the metrics, as vLLM counts it).
    fn choice_done(&mut self, i: usize, stats: &Stats) -> bool {
        self.prompt_tokens = stats.n_prompt_tokens;
        self.generated += stats.n_generated_tokens;
        if i == 0 {
            self.ttft_s = stats.t_first_token_ms / 1e3;
            self.stopped = stats.finish_reason != FinishReason::Length;
        }
        self.choices[i].done = true;
        self.finished = self.choices.iter().all(|c| c.done);
        if self.finished {
            self.state.metrics.request_done(self.prompt_tokens, self.generated, self.ttft_s, self.stopped);
        }
        self.finished
    }

    fn failed(&mut self) {
        self.finished = true;
        self.state.metrics.request_failed();
    }

    /// A streaming chunk of choice `i` carrying `text` and `reasoning` (and
    /// its logprob entry).
    fn delta_chunk(&mut self, i: usize, text: &str, reasoning: &str, logprob: Option<Value>, finish: Option<&str>) -> Value {
        let first = !self.choices[i].started;
        self.choices[i].started = true;
        let s = &self.shape;
        let mut chunk = match s.api {
            Api::Chat => {
                let mut delta = Map::new();
                if first {
                    delta.insert("role".into(), "assistant".into());
                }
                if !reasoning.is_empty() {
                    delta.insert("reasoning_content".into(), reasoning.into());
                }
                if !text.is_empty() || (first && finish.is_none() && reasoning.is_empty()) {
                    delta.insert("content".into(), text.into());
                }
                json!({
                    "id": s.id, "object": "chat.completion.chunk", "created": s.created, "model": s.model,
                    "choices": [{ "index": i, "delta": delta,
                        "logprobs": logprob.map(|l| json!({ "content": [l] })), "finish_reason": finish }],
                })
            }
            Api::Completion => {
                let lp = logprob.map(|l| {
                    json!({ "tokens": [l["token"]], "token_logprobs": [l["logprob"]], "top_logprobs": [l["top"]], "text_offset": [l["offset"]] })
                });
                json!({
                    "id": s.id, "object": "text_completion", "created": s.created, "model": s.model,
                    "choices": [{ "index": i, "text": text, "logprobs": lp, "finish_reason": finish }],
                })
            }
        };
        // OpenAI: with include_usage, every chunk but the last has usage null.
        if s.include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    }

    /// The streaming chunks of one tool call: its header (index, id, name,
    /// empty arguments), then its arguments.
    fn tool_call_chunks(&mut self, i: usize, c: &ToolCall) -> [Value; 2] {
        let first = !self.choices[i].started;
        self.choices[i].started = true;
        let s = &self.shape;
        let chunk = |delta: Value| {
            let mut v = json!({
                "id": s.id, "object": "chat.completion.chunk", "created": s.created, "model": s.model,
                "choices": [{ "index": i, "delta": delta, "logprobs": null, "finish_reason": null }],
            });
            if s.include_usage {
                v["usage"] = Value::Null;
            }
            v
        };
        let mut head = json!({ "tool_calls": [{ "index": c.index, "id": c.id, "type": "function",
            "function": { "name": c.name, "arguments": "" } }] });
        if first {
            head["role"] = "assistant".into();
            head["content"] = Value::Null;
        }
        [chunk(head), chunk(json!({ "tool_calls": [{ "index": c.index, "function": { "arguments": c.arguments } }] }))]
    }

    pub fn into_sse(self) -> impl Stream<Item = Result<SseEvent, Infallible>> {
        struct St {
            run: Run,
            out: VecDeque<SseEvent>,
            done: bool,
        }
        let data = |v: &Value| SseEvent::default().data(v.to_string());
        stream::unfold(St { run: self, out: VecDeque::new(), done: false }, move |mut st| async move {
            loop {
                if let Some(ev) = st.out.pop_front() {
                    return Some((Ok(ev), st));
                }
                if st.done {
                    return None;
                }
                match st.run.events.recv().await {
                    Some((i, Some(Event::Token { text, reasoning, token_id, logprob, top_logprobs }))) => {
                        let lp = match (st.run.shape.logprobs, logprob) {
                            (true, Some(l)) => Some(st.run.logprob_entry(i, token_id, l, &top_logprobs)),
                            _ => None,
                        };
                        // Tokens that release no text (held back) send nothing yet.
                        if !text.is_empty() || !reasoning.is_empty() || lp.is_some() || !st.run.choices[i].started {
                            let chunk = st.run.delta_chunk(i, &text, &reasoning, lp, None);
                            st.out.push_back(data(&chunk));
                        }
                    }
                    Some((i, Some(Event::ToolCall(c)))) => {
                        for chunk in st.run.tool_call_chunks(i, &c) {
                            st.out.push_back(data(&chunk));
                        }
                    }
                    Some((i, Some(Event::Done(stats)))) => {
                        let last = st.run.delta_chunk(i, "", "", None, Some(stats.finish_reason.as_str()));
                        st.out.push_back(data(&last));
                        if st.run.choice_done(i, &stats) {
                            if st.run.shape.include_usage {
                                let s = &st.run.shape;
                                let obj = if s.api == Api::Chat { "chat.completion.chunk" } else { "text_completion" };
                                let usage = json!({ "id": s.id, "object": obj, "created": s.created,
                                    "model": s.model, "choices": [], "usage": st.run.usage() });
                                st.out.push_back(data(&usage));
                            }
                            st.out.push_back(SseEvent::default().data("[DONE]"));
                            st.done = true;
                        }
                    }
                    // One choice failing ends the request (the others are
                    // cancelled as the run goes).
                    Some((_, Some(Event::Error(e)))) => {
                        st.run.failed();
                        let err = json!({ "error": { "message": e.to_string(), "type": "server_error", "code": e.code() } });
                        st.out.push_back(data(&err));
                        st.out.push_back(SseEvent::default().data("[DONE]"));
                        st.done = true;
                    }
                    Some((_, None)) | None => {
                        st.run.failed();
                        let err = json!({ "error": { "message": "generation ended unexpectedly", "type": "server_error", "code": "Cancelled" } });
                        st.out.push_back(data(&err));
                        st.done = true;
                    }
                }
            }
        })
    }

    pub async fn collect(mut self) -> Response {
        let n = self.choices.len();
        let mut texts = vec![String::new(); n];
        let mut entries: Vec<Vec<Value>> = vec![Vec::new(); n];
        let mut reasons = vec![""; n];
        let mut calls: Vec<Vec<Value>> = vec![Vec::new(); n];
        let mut reasonings = vec![String::new(); n];
        loop {
            match self.events.recv().await {
                Some((i, Some(Event::Token { text, reasoning, token_id, logprob, top_logprobs }))) => {
                    reasonings[i].push_str(&reasoning);
                    if let (true, Some(l)) = (self.shape.logprobs, logprob) {
                        let e = self.logprob_entry(i, token_id, l, &top_logprobs);
                        entries[i].push(e);
                    }
                    texts[i].push_str(&text);
                }
                Some((i, Some(Event::ToolCall(c)))) => {
                    calls[i].push(json!({ "id": c.id, "type": "function", "function": { "name": c.name, "arguments": c.arguments } }));
                }
                Some((i, Some(Event::Done(stats)))) => {
                    reasons[i] = stats.finish_reason.as_str();
                    if self.choice_done(i, &stats) {
                        break;
                    }
                }
                Some((_, Some(Event::Error(e)))) => {
                    self.failed();
                    return engine_error_response(&e);
                }
                Some((_, None)) | None => {
                    self.failed();
                    return engine_error_response(&EngineError::Cancelled);
                }
            }
        }
        let s = &self.shape;
        let logprobs = s.logprobs;
        let choices: Vec<Value> = (0..n)
            .map(|i| {
                let (text, entries, reason) = (std::mem::take(&mut texts[i]), &entries[i], reasons[i]);
                match s.api {
                    Api::Chat => {
                        let calls = std::mem::take(&mut calls[i]);
                        let mut message = json!({ "role": "assistant", "content": text });
                        let reasoning = std::mem::take(&mut reasonings[i]);
                        if !reasoning.is_empty() {
                            message["reasoning_content"] = reasoning.into();
                        }
                        if !calls.is_empty() {
                            // OpenAI: a reply of calls alone has null content.
                            if text.is_empty() {
                                message["content"] = Value::Null;
                            }
                            message["tool_calls"] = calls.into();
                        }
                        json!({ "index": i, "message": message,
                            "logprobs": logprobs.then(|| json!({ "content": entries })), "finish_reason": reason })
                    }
                    Api::Completion => {
                        let field = |k: &str| entries.iter().map(|e| e[k].clone()).collect::<Vec<_>>();
                        let lp = logprobs.then(|| {
                            json!({ "tokens": field("token"), "token_logprobs": field("logprob"),
                                "top_logprobs": field("top"), "text_offset": field("offset") })
                        });
                        json!({ "index": i, "text": text, "logprobs": lp, "finish_reason": reason })
                    }
                }
            })
            .collect();
        let object = if s.api == Api::Chat { "chat.completion" } else { "text_completion" };
        Json(json!({ "id": s.id, "object": object, "created": s.created, "model": s.model, "choices": choices, "usage": self.usage() }))
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::CharCount;

    #[test]
    fn characters_count_once_complete() {
        let mut c = CharCount::default();
        let smile = "😀".as_bytes();
        c.push(b"ab");
        c.push(&smile[..2]);
        assert_eq!(c.chars, 2, "half a character is not one yet");
        c.push(&smile[2..]);
        c.push(b"\xffz");
        assert_eq!(c.chars, 5, "a, b, the emoji, one replacement, z");
    }
}
