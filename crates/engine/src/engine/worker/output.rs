//! How a sequence's tokens become its caller's events: each sampled token
//! (and the tokens its grammar forces) is detokenized, matched against stop
//! sequences and split into content, reasoning and tool calls; sequences
//! that end are retired, their blocks freed and their stats sent.

use super::*;
use crate::text::output::Parsed;

impl WorkerLoop {
    /// Takes the sampled next token of `s` and sends what it releases, with
    /// the alternatives `top` (OpenAI's `top_logprobs`); then the tokens its
    /// grammar forces, if any, which the next step computes like a prompt.
    pub(super) fn emit(tk: &Tokenizer, counters: &Counters, latency: &LatencyMetrics, s: &mut Sequence, sampled: Sampled, top: Vec<(u32, f32)>) -> Outcome {
        let tok = sampled.token;
        let now = Instant::now();
        match s.t_last_token {
            None => {
                s.t_first_token = Some(now);
                let ttft = (now - s.job.t_submit).as_secs_f64();
                latency.record(|h| h.ttft.observe(ttft));
                counters.window.lock().unwrap().ttft(now_s(), ttft * 1e3);
            }
            Some(last) => latency.record(|h| h.itl.observe((now - last).as_secs_f64())),
        }
        s.t_last_token = Some(now);
        if (tk.is_eog(tok) && !s.job.ignore_eos) || s.job.stop_token_ids.contains(&tok) {
            return Outcome::Finished(FinishReason::Stop);
        }
        let mut outcome = Self::append(tk, counters, s, tok, Some(sampled.logprob), top);
        let forced = match (&outcome, s.job.guide.as_mut()) {
            (Outcome::Continue, Some(g)) => g.forced(),
            _ => Vec::new(),
        };
        for t in forced {
            outcome = Self::append(tk, counters, s, t, None, Vec::new());
            if !matches!(outcome, Outcome::Continue) {
                break;
            }
        }
        outcome
    }

    /// Appends one output token: advances the grammar, detokenizes, matches
    /// stop sequences, parses tool calls, and sends the token's event.
    pub(super) fn append(tk: &Tokenizer, counters: &Counters, s: &mut Sequence, tok: u32, logprob: Option<f32>, top: Vec<(u32, f32)>) -> Outcome {
        s.tokens.push(tok);
        s.n_generated += 1;
        counters.generated_tokens.fetch_add(1, Ordering::Relaxed);
        counters.window.lock().unwrap().tokens(now_s(), 1);
        let mut complete = false;
        if let Some(g) = s.job.guide.as_mut() {
            if let Err(e) = g.commit(tok) {
                return Outcome::Failed(EngineError::Grammar(format!("the output cannot continue: {e}")));
            }
            complete = g.finished();
        }
        let piece = match s.job.output.control_text(tok) {
            Some(text) => text.as_bytes(),
            None => tk.piece(tok),
        };
        let text = s.decoder.push(piece);
        // Stop sequences count from the first token past `min_tokens`.
        let (text, stopped) = if s.n_generated <= s.job.min_tokens { (text, false) } else { s.stop.push(&text) };
        let outcome = if stopped || complete {
            Outcome::Finished(FinishReason::Stop)
        } else if s.n_generated >= s.job.max_tokens {
            Outcome::Finished(FinishReason::Length)
        } else {
            Outcome::Continue
        };
        let mut out = s.job.output.push(&text);
        // The model opened a tool call on its own: the rest of it follows
        // the tools' grammar, from whatever came after the tag.
        if s.job.guide.is_none() && !stopped {
            if let (Some(after), Some(_)) = (s.job.output.open_call(), s.job.lazy_guide.as_ref()) {
                let mut g = s.job.lazy_guide.take().expect("checked above");
                let written = tk.encode(after, false, false).unwrap_or_default();
                if g.accept_all(&written) {
                    s.job.guide = Some(g);
                }
            }
        }
        match outcome {
            // Bytes after a stop sequence are not output.
            _ if stopped => {
                drop(s.decoder.finish());
                out.extend(s.job.output.finish());
            }
            // The last token carries what was held back, so a stream has
            // one token event per generated token.
            Outcome::Finished(_) => out.extend(held_back(s)),
            _ => {}
        }
        if Self::send(s, tok, logprob, top, out).is_err() {
            return Outcome::Abandoned;
        }
        outcome
    }

    /// Sends a token's event (its parsed text), then the calls it completed.
    pub(super) fn send(s: &mut Sequence, tok: u32, logprob: Option<f32>, top: Vec<(u32, f32)>, out: Parsed) -> Result<(), ()> {
        let ev = Event::Token { text: out.content, reasoning: out.reasoning, token_id: tok, logprob, top_logprobs: top };
        s.job.unread.fetch_add(1, Ordering::Relaxed);
        s.job.events.send(ev).map_err(drop)?;
        for c in out.calls {
            s.job.events.send(Event::ToolCall(c)).map_err(drop)?;
        }
        Ok(())
    }

    /// Removes the sequences for which `decide` gives an outcome, frees
    /// their blocks, and tells their callers how they ended.
    pub(super) fn retire(&mut self, mut decide: impl FnMut(&Sequence) -> Option<Outcome>) {
        let mut ended = Vec::new();
        let mut kept = Vec::with_capacity(self.running.len());
        for s in std::mem::take(&mut self.running) {
            match decide(&s) {
                None | Some(Outcome::Continue) => kept.push(s),
                Some(outcome) => ended.push((s, outcome)),
            }
        }
        self.running = kept;
        for (s, outcome) in ended.iter_mut() {
            // Before any final event, like the counters: a caller that sees
            // its request end may submit the next one at once, within the
            // in-flight limit.
            s.job.in_flight.take();
            s.job.ticket.settle(match outcome {
                Outcome::Finished(_) => breaker::Outcome::Success,
                Outcome::Failed(EngineError::Generation(_) | EngineError::Internal(_)) => breaker::Outcome::Failure,
                _ => breaker::Outcome::Neutral,
            });
            if s.job.pin_prefix && matches!(outcome, Outcome::Finished(_)) {
                // One more reference per full block: it never becomes evictable.
                for &key in &s.keys {
                    if let Some(b) = self.pool.lookup(key) {
                        if !self.pinned.contains(&b) {
                            self.pinned.push(b);
                        } else {
                            self.pool.release(b);
                        }
                    }
                }
            }
            s.release_blocks(&mut self.pool);
            if let Some(d) = self.drafter.as_mut() {
                d.release(s);
            }
        }
        // Counters first, so a caller that sees its last event also sees the
        // engine without its sequence.
        self.publish();
        for (s, outcome) in ended {
            match outcome {
                Outcome::Continue | Outcome::Abandoned => {}
                Outcome::Failed(e) => {
                    let failure = matches!(e, EngineError::Generation(_) | EngineError::Internal(_));
                    self.counters.window.lock().unwrap().error(now_s(), failure);
                    let _ = s.job.events.send(Event::Error(e));
                }
                Outcome::Finished(reason) => self.finish(s, reason),
            }
        }
    }

    pub(super) fn finish(&self, mut s: Sequence, reason: FinishReason) {
        // Ended by an end-of-generation token, which has no event of its
        // own: what was held back comes as one more event.
        let tail = held_back(&mut s);
        if tail != Parsed::default() {
            let last = *s.tokens.last().unwrap();
            let _ = Self::send(&mut s, last, None, Vec::new(), tail);
        }
        // A reply that called tools ends with OpenAI's `tool_calls`.
        let reason = match reason {
            FinishReason::Stop if s.job.output.n_calls() > 0 => FinishReason::ToolCalls,
            other => other,
        };
        let now = Instant::now();
        let t_first = s.t_first_token.unwrap_or(now);
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let decode_s = (now - t_first).as_secs_f64();
        let stats = Stats {
            n_prompt_tokens: s.job.prompt.len(),
            n_generated_tokens: s.n_generated,
            t_first_token_ms: ms(t_first - s.job.t_submit),
            t_total_ms: ms(now - s.job.t_submit),
            decode_tokens_per_s: if s.n_generated > 1 && decode_s > 0.0 { (s.n_generated - 1) as f64 / decode_s } else { 0.0 },
            finish_reason: reason,
            features: std::mem::take(&mut s.job.features),
        };
        self.latency.record(|h| h.e2e.observe((now - s.job.t_submit).as_secs_f64()));
        self.counters.completed.fetch_add(1, Ordering::Relaxed);
        self.counters.window.lock().unwrap().ok(now_s(), stats.t_total_ms);
        let _ = s.job.events.send(Event::Done(stats));
    }

    pub(super) fn fail_all(&mut self, e: EngineError) {
        self.retire(|_| Some(Outcome::Failed(e.clone())));
    }
}

/// Text held back for UTF-8 or for a possible stop sequence that never
/// completed: it belongs to the output once the sequence ends.
fn held_back(s: &mut Sequence) -> Parsed {
    let tail = s.decoder.finish();
    let (mut tail, stopped) = s.stop.push(&tail);
    if !stopped {
        tail.push_str(&s.stop.flush());
    }
    let mut out = s.job.output.push(&tail);
    out.extend(s.job.output.finish());
    out
}
