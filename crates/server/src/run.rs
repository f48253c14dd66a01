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
use mlx_serving_engine::text::tools::ToolCallDelta;
use mlx_serving_engine::EngineError;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::{engine_error_response, Api, AppState};

/// One choice's progress.
#[derive(Default)]
struct Choice {
    /// The prompt it continues (an index into `Run::prompts`).
    prompt: usize,
    /// Characters of the tokens so far (legacy logprobs' `text_offset`),
    /// counted from the tokens themselves: text held back for a possible
    /// stop sequence is released later but still sits at its own token.
    chars: CharCount,
    /// Tokens out so far.
    generated: usize,
    /// Token ids not yet sent (`return_token_ids`): a token whose text is
    /// held back goes out with the next chunk.
    unsent_ids: Vec<u32>,
    /// Tool calls whose first chunk went out.
    calls_started: usize,
    /// Every token id (`return_token_ids`, whole responses).
    ids: Vec<u32>,
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
    pub fingerprint: String,
    /// Choices per prompt.
    pub n: usize,
    pub wire: crate::openai::Shape,
}

pub(crate) struct Run {
    state: Arc<AppState>,
    /// Each choice's events, tagged with its index; `None`: its stream
    /// ended without a final event (model unloaded, shutdown).
    events: mpsc::Receiver<(usize, Option<Event>)>,
    _permit: OwnedSemaphorePermit,
    shape: Shape,
    /// Choice `p * n + k` is prompt `p`'s `k`-th.
    choices: Vec<Choice>,
    /// Each prompt's tokens as the model read them.
    prompts: Vec<Vec<u32>>,
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
    /// Serves each prompt's first choice and, once that prompt is in the
    /// prefix cache (its first token), submits the prompt's other choices,
    /// so they share those blocks instead of each prefilling it again.
    pub fn new(state: Arc<AppState>, started: Vec<(RequestHandle, Vec<GenerateRequest>)>, permit: OwnedSemaphorePermit, shape: Shape) -> Run {
        let n = shape.n;
        let (tx, events) = mpsc::channel(16 * n * started.len());
        let mut prompts = Vec::with_capacity(started.len());
        for (p, (first, rest)) in started.into_iter().enumerate() {
            prompts.push(first.prompt_tokens.clone());
            let then: Option<Box<dyn FnOnce() + Send>> = (!rest.is_empty()).then(|| {
                let (engine, tx) = (state.engine.clone(), tx.clone());
                Box::new(move || {
                    tokio::spawn(async move {
                        let submitted = tokio::task::spawn_blocking(move || rest.into_iter().map(|r| engine.submit(r)).collect::<Vec<_>>()).await;
                        let submitted = submitted.unwrap_or_else(|e| vec![Err(EngineError::Internal(e.to_string()))]);
                        for (k, r) in submitted.into_iter().enumerate() {
                            let i = p * n + k + 1;
                            match r {
                                Ok(h) => drop(tokio::spawn(forward(i, h, tx.clone(), None))),
                                Err(e) => return drop(tx.send((i, Some(Event::Error(e)))).await),
                            }
                        }
                    });
                }) as Box<dyn FnOnce() + Send>
            });
            tokio::spawn(forward(p * n, first, tx.clone(), then));
        }
        let choices = (0..n * prompts.len()).map(|i| Choice { prompt: i / n, ..Choice::default() }).collect();
        Run { state, events, _permit: permit, shape, choices, prompts, ttft_s: 0.0, stopped: false, finished: false }
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

    /// Over the choices: each prompt counted once, and every output token.
    fn usage(&self) -> Value {
        let prompt: usize = self.prompts.iter().map(Vec::len).sum();
        let generated: usize = self.choices.iter().map(|c| c.generated).sum();
        json!({ "prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated })
    }

    /// Choice `i`'s usage so far (vLLM's `continuous_usage_stats`).
    fn choice_usage(&self, i: usize) -> Value {
        let (prompt, generated) = (self.prompts[self.choices[i].prompt].len(), self.choices[i].generated);
        json!({ "prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated })
    }

    /// A choice's token: counted, and its id kept where the client asked for ids.
    fn token_out(&mut self, i: usize, token_id: u32) {
        let c = &mut self.choices[i];
        c.generated += 1;
        if self.shape.wire.return_token_ids {
            c.unsent_ids.push(token_id);
            c.ids.push(token_id);
        }
    }

    /// A choice's final event; returns whether every choice is done (the
    /// request then counts once in the metrics, as vLLM counts it).
    fn choice_done(&mut self, i: usize, stats: &Stats) -> bool {
        if i == 0 {
            self.ttft_s = stats.t_first_token_ms / 1e3;
            self.stopped = stats.finish_reason != FinishReason::Length;
        }
        self.choices[i].done = true;
        self.finished = self.choices.iter().all(|c| c.done);
        if self.finished {
            let prompt: usize = self.prompts.iter().map(Vec::len).sum();
            let generated: usize = self.choices.iter().map(|c| c.generated).sum();
            self.state.metrics.request_done(prompt, generated, self.ttft_s, self.stopped);
        }
        self.finished
    }

    fn failed(&mut self) {
        self.finished = true;
        self.state.metrics.request_failed();
    }

    /// A streaming chunk with `choice` as its one choice.
    fn chunk(&self, i: usize, mut choice: Value) -> Value {
        let s = &self.shape;
        if s.wire.return_token_ids {
            choice["token_ids"] = json!(self.choices[i].unsent_ids);
            if s.api == Api::Completion && self.choices[i].generated == self.choices[i].unsent_ids.len() {
                // A choice's first chunk names the prompt it continues.
                choice["prompt_token_ids"] = json!(self.prompts[self.choices[i].prompt]);
            }
        }
        let object = if s.api == Api::Chat { "chat.completion.chunk" } else { "text_completion" };
        let mut chunk = json!({
            "id": s.id, "object": object, "created": s.created, "model": s.model,
            "system_fingerprint": s.fingerprint, "choices": [choice],
        });
        // OpenAI: with include_usage, every chunk but the last has usage
        // null; vLLM's continuous_usage_stats puts the usage so far there.
        if s.wire.include_usage {
            chunk["usage"] = if s.wire.continuous_usage { self.choice_usage(i) } else { Value::Null };
        }
        chunk
    }

    /// The chunks that open a chat stream: each choice's role, with empty
    /// content, before any token (as OpenAI and vLLM send them).
    fn role_chunks(&self) -> Vec<Value> {
        let lp = self.shape.wire.logprobs.then(|| json!({ "content": [] }));
        let mut out: Vec<Value> = (0..self.choices.len())
            .map(|i| self.chunk(i, json!({ "index": i, "delta": { "role": "assistant", "content": "" }, "logprobs": lp, "finish_reason": null })))
            .collect();
        if self.shape.wire.return_token_ids {
            if let Some(first) = out.first_mut() {
                first["prompt_token_ids"] = json!(self.prompts[0]);
            }
        }
        out
    }

    /// A streaming chunk of choice `i` carrying `text` and `reasoning` (and
    /// its logprob entry).
    fn delta_chunk(&mut self, i: usize, text: &str, reasoning: &str, logprob: Option<Value>, finish: Option<&str>) -> Value {
        let choice = match self.shape.api {
            Api::Chat => {
                let mut delta = Map::new();
                if !reasoning.is_empty() {
                    delta.insert("reasoning_content".into(), reasoning.into());
                }
                if !text.is_empty() || (finish.is_none() && reasoning.is_empty()) {
                    delta.insert("content".into(), text.into());
                }
                json!({ "index": i, "delta": delta, "logprobs": logprob.map(|l| json!({ "content": [l] })), "finish_reason": finish })
            }
            Api::Completion => {
                let lp = logprob.map(|l| {
                    json!({ "tokens": [l["token"]], "token_logprobs": [l["logprob"]], "top_logprobs": [l["top"]], "text_offset": [l["offset"]] })
                });
                json!({ "index": i, "text": text, "logprobs": lp, "finish_reason": finish })
            }
        };
        let chunk = self.chunk(i, choice);
        self.choices[i].unsent_ids.clear();
        chunk
    }

    /// The streaming chunks of a piece of a tool call: a call's first
    /// piece sends its header (index, id, name, empty arguments), as OpenAI
    /// does; then each piece its part of the arguments.
    fn tool_call_chunks(&mut self, i: usize, c: &ToolCallDelta) -> Vec<Value> {
        let delta = |delta: Value| json!({ "index": i, "delta": delta, "logprobs": null, "finish_reason": null });
        let mut out = Vec::with_capacity(2);
        if c.index >= self.choices[i].calls_started {
            self.choices[i].calls_started = c.index + 1;
            let head = json!({ "tool_calls": [{ "index": c.index, "id": c.id, "type": "function", "function": { "name": c.name, "arguments": "" } }] });
            out.push(self.chunk(i, delta(head)));
            self.choices[i].unsent_ids.clear();
        }
        if !c.arguments.is_empty() {
            let args = json!({ "tool_calls": [{ "index": c.index, "function": { "arguments": c.arguments } }] });
            out.push(self.chunk(i, delta(args)));
            self.choices[i].unsent_ids.clear();
        }
        out
    }

    pub fn into_sse(self) -> impl Stream<Item = Result<SseEvent, Infallible>> {
        struct St {
            run: Run,
            out: VecDeque<SseEvent>,
            done: bool,
        }
        let data = |v: &Value| SseEvent::default().data(v.to_string());
        let out: VecDeque<SseEvent> = match self.shape.api {
            Api::Chat => self.role_chunks().iter().map(data).collect(),
            Api::Completion => VecDeque::new(),
        };
        stream::unfold(St { run: self, out, done: false }, move |mut st| async move {
            loop {
                if let Some(ev) = st.out.pop_front() {
                    return Some((Ok(ev), st));
                }
                if st.done {
                    return None;
                }
                match st.run.events.recv().await {
                    Some((i, Some(Event::Token { text, reasoning, token_id, logprob, top_logprobs }))) => {
                        st.run.token_out(i, token_id);
                        let lp = match (st.run.shape.wire.logprobs, logprob) {
                            (true, Some(l)) => Some(st.run.logprob_entry(i, token_id, l, &top_logprobs)),
                            _ => None,
                        };
                        // Tokens that release no text (held back) send nothing yet,
                        // unless the client counts every token.
                        let counted = st.run.shape.wire.include_usage && st.run.shape.wire.continuous_usage;
                        if !text.is_empty() || !reasoning.is_empty() || lp.is_some() || counted {
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
                            if st.run.shape.wire.include_usage {
                                let s = &st.run.shape;
                                let obj = if s.api == Api::Chat { "chat.completion.chunk" } else { "text_completion" };
                                let usage = json!({ "id": s.id, "object": obj, "created": s.created, "model": s.model,
                                    "system_fingerprint": s.fingerprint, "choices": [], "usage": st.run.usage() });
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
        // Each choice's calls so far: id, name, arguments.
        let mut calls: Vec<Vec<(String, String, String)>> = vec![Vec::new(); n];
        let mut reasonings = vec![String::new(); n];
        loop {
            match self.events.recv().await {
                Some((i, Some(Event::Token { text, reasoning, token_id, logprob, top_logprobs }))) => {
                    self.token_out(i, token_id);
                    reasonings[i].push_str(&reasoning);
                    if let (true, Some(l)) = (self.shape.wire.logprobs, logprob) {
                        let e = self.logprob_entry(i, token_id, l, &top_logprobs);
                        entries[i].push(e);
                    }
                    texts[i].push_str(&text);
                }
                Some((i, Some(Event::ToolCall(c)))) => match calls[i].get_mut(c.index) {
                    Some(call) => call.2.push_str(&c.arguments),
                    None => calls[i].push((c.id, c.name, c.arguments)),
                },
                Some((i, Some(Event::Done(stats)))) => {
                    reasons[i] = stats.finish_reason.as_str();
                    if self.choice_done(i, &stats) {
                        break;
                    }
                }
                Some((_, Some(Event::Error(e)))) => {
                    self.failed();
                    return engine_error_response(&self.state, &e);
                }
                Some((_, None)) | None => {
                    self.failed();
                    return engine_error_response(&self.state, &EngineError::Cancelled);
                }
            }
        }
        let s = &self.shape;
        let (logprobs, ids) = (s.wire.logprobs, s.wire.return_token_ids);
        let choices: Vec<Value> = (0..n)
            .map(|i| {
                let (text, entries, reason) = (std::mem::take(&mut texts[i]), &entries[i], reasons[i]);
                let mut choice = match s.api {
                    Api::Chat => {
                        let calls: Vec<Value> = std::mem::take(&mut calls[i])
                            .into_iter()
                            .map(|(id, name, args)| json!({ "id": id, "type": "function", "function": { "name": name, "arguments": args } }))
                            .collect();
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
                        let mut c = json!({ "index": i, "text": text, "logprobs": lp, "finish_reason": reason });
                        if ids {
                            c["prompt_token_ids"] = json!(self.prompts[self.choices[i].prompt]);
                        }
                        c
                    }
                };
                if ids {
                    choice["token_ids"] = json!(self.choices[i].ids);
                }
                choice
            })
            .collect();
        let object = if s.api == Api::Chat { "chat.completion" } else { "text_completion" };
        let mut body = json!({ "id": s.id, "object": object, "created": s.created, "model": s.model,
            "system_fingerprint": s.fingerprint, "choices": choices, "usage": self.usage() });
        if ids && s.api == Api::Chat {
            body["prompt_token_ids"] = json!(self.prompts[0]);
        }
        Json(body).into_response()
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
