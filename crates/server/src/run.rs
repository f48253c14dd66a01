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
use mlx_serving_engine::engine::{Event, RequestHandle, Stats};
use mlx_serving_engine::EngineError;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::{engine_error_response, Api, AppState};

/// One choice's progress.
#[derive(Default)]
struct Choice {
    /// Characters of output so far (legacy logprobs' `text_offset`).
    text_chars: usize,
    /// Whether a chunk went out (the first one carries the role).
    started: bool,
    done: bool,
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
    finished: bool,
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
    pub fn new(state: Arc<AppState>, handles: Vec<RequestHandle>, permit: OwnedSemaphorePermit, shape: Shape) -> Run {
        let (tx, events) = mpsc::channel(16 * handles.len());
        let n = handles.len();
        for (i, mut h) in handles.into_iter().enumerate() {
            let tx = tx.clone();
            tokio::spawn(async move {
                loop {
                    let ev = tokio::select! {
                        ev = h.recv() => ev,
                        // The run is gone: stop at once, even while queued.
                        _ = tx.closed() => return,
                    };
                    let last = !matches!(ev, Some(Event::Token { .. }));
                    if tx.send((i, ev)).await.is_err() || last {
                        return;
                    }
                }
            });
        }
        let choices = (0..n).map(|_| Choice::default()).collect();
        Run { state, events, _permit: permit, shape, choices, prompt_tokens: 0, generated: 0, finished: false }
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

    fn logprob_entry(&self, token_id: u32, logprob: f32, top: &[(u32, f32)]) -> Value {
        let (text, bytes) = self.token_repr(token_id);
        match self.shape.api {
            Api::Chat => json!({
                "token": text, "logprob": logprob, "bytes": bytes,
                "top_logprobs": top.iter().map(|&(t, lp)| {
                    let (s, b) = self.token_repr(t);
                    json!({ "token": s, "logprob": lp, "bytes": b })
                }).collect::<Vec<_>>(),
            }),
            Api::Completion => json!({
                "token": text, "logprob": logprob,
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

    /// A choice's final event; returns whether every choice is done.
    fn choice_done(&mut self, i: usize, stats: &Stats) -> bool {
        self.state.metrics.request_done(
            stats.n_prompt_tokens,
            stats.n_generated_tokens,
            stats.t_first_token_ms / 1e3,
            stats.finish_reason == mlx_serving_engine::engine::FinishReason::Stop,
        );
        self.prompt_tokens = stats.n_prompt_tokens;
        self.generated += stats.n_generated_tokens;
        self.choices[i].done = true;
        self.finished = self.choices.iter().all(|c| c.done);
        self.finished
    }

    fn failed(&mut self) {
        self.finished = true;
        self.state.metrics.request_failed();
    }

    /// A streaming chunk of choice `i` carrying `text` (and its logprob entry).
    fn delta_chunk(&mut self, i: usize, text: &str, logprob: Option<Value>, finish: Option<&str>) -> Value {
        let c = &mut self.choices[i];
        let (offset, first) = (c.text_chars, !c.started);
        c.text_chars += text.chars().count();
        c.started = true;
        let s = &self.shape;
        let mut chunk = match s.api {
            Api::Chat => {
                let mut delta = Map::new();
                if first {
                    delta.insert("role".into(), "assistant".into());
                }
                if !text.is_empty() || (first && finish.is_none()) {
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
                    json!({ "tokens": [l["token"]], "token_logprobs": [l["logprob"]], "top_logprobs": [l["top"]], "text_offset": [offset] })
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
                    Some((i, Some(Event::Token { text, token_id, logprob, top_logprobs }))) => {
                        let lp = match (st.run.shape.logprobs, logprob) {
                            (true, Some(l)) => Some(st.run.logprob_entry(token_id, l, &top_logprobs)),
                            _ => None,
                        };
                        // Tokens that release no text (held back) send nothing yet.
                        if !text.is_empty() || lp.is_some() || !st.run.choices[i].started {
                            let chunk = st.run.delta_chunk(i, &text, lp, None);
                            st.out.push_back(data(&chunk));
                        }
                    }
                    Some((i, Some(Event::Done(stats)))) => {
                        let last = st.run.delta_chunk(i, "", None, Some(stats.finish_reason.as_str()));
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
        loop {
            match self.events.recv().await {
                Some((i, Some(Event::Token { text, token_id, logprob, top_logprobs }))) => {
                    if let (true, Some(l)) = (self.shape.logprobs, logprob) {
                        let mut e = self.logprob_entry(token_id, l, &top_logprobs);
                        if self.shape.api == Api::Completion {
                            e["offset"] = texts[i].chars().count().into();
                        }
                        entries[i].push(e);
                    }
                    texts[i].push_str(&text);
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
                    Api::Chat => json!({ "index": i, "message": { "role": "assistant", "content": text },
                        "logprobs": logprobs.then(|| json!({ "content": entries })), "finish_reason": reason }),
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
