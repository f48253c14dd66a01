//! What a request goes through on the caller's thread before it reaches
//! its model's worker: canary routing, the request rules, templating and
//! tokenization, its grammar's compile, admission (in-flight, queue and
//! breaker limits) and its feature flags.

use super::*;

/// Requests in `submit` under their caller's id, and cancels that came
/// before their `submit` did.
#[derive(Default)]
pub(super) struct Pending {
    pub(super) listed: Vec<(String, Arc<AtomicBool>)>,
    early: Vec<(String, Instant)>,
}

/// How long a cancel waits for its request's `submit` to begin.
const EARLY_CANCEL_KEPT: Duration = Duration::from_secs(10);
use crate::request::{Field, InvalidParam, PromptFit};
use crate::text::output::{OutputParser, ReasoningFormat};
use crate::text::grammar::Constraint;
use crate::text::tools::{self, ToolChoice};

impl Engine {
    /// Validates and queues a request; its tokens arrive on the handle.
    pub fn submit(&self, req: GenerateRequest) -> Result<RequestHandle, EngineError> {
        self.submit_with_cancel(req, Arc::new(AtomicBool::new(false)))
    }

    /// `submit`, stopped by `cancel` at any point: while its prompt is
    /// templated, waits for its turn or is tokenized (`submit` then returns
    /// `Cancelled`), and after, as by dropping the handle. For a caller that
    /// may leave while `submit` runs on another thread (an HTTP client that
    /// disconnects).
    pub fn submit_with_cancel(&self, mut req: GenerateRequest, cancel: Arc<AtomicBool>) -> Result<RequestHandle, EngineError> {
        let t_submit = Instant::now();
        let id = self.next_request.fetch_add(1, Ordering::Relaxed) + 1;
        let rid = req.request_id.clone().unwrap_or_else(|| id.to_string());
        // A canary's name routes to one of its arms by the request id.
        let mut arm = None;
        if let Some((model, a)) = self.shared.control.lock().unwrap().route(&req.model, &rid) {
            req.model = model;
            arm = Some(a);
        }
        let w = self.worker(&req.model)?;
        let config = self.config();
        let _pending = self.pending(req.request_id.as_deref(), &cancel);
        let (prompt, max_tokens, opened_think) = {
            let _turn = self.prepare_turn(&cancel)?;
            self.tokenize_request(&w, &req, &config, &cancel)?
        };
        if cancel.load(Ordering::Relaxed) {
            return Err(EngineError::Cancelled);
        }
        let (guide, lazy_guide) = self.guides(&w, &req)?;
        let offers_tools = !req.tools.is_empty() && req.tool_choice != ToolChoice::None;
        let reasoning = match req.reasoning_format {
            ReasoningFormat::Inline => false,
            ReasoningFormat::Parsed => true,
            // A chat with a model that thinks, or a prompt that opened a block.
            ReasoningFormat::Auto => opened_think || (w.template.thinks && matches!(req.input, Input::Messages(_))),
        };
        let timeout_ms = [req.timeout_ms, w.info.request_timeout_ms]
            .into_iter()
            .flatten()
            .min()
            .or(Some(config.streaming.request_timeout).filter(|&t| t > 0));
        // With a flags file, priority classes apply to the requests the
        // `batching.priority_scheduling` rollout includes.
        let priority = match self.feature_flags() {
            Some(f) if !f.current().evaluate("batching.priority_scheduling", &rid).enabled => Priority::Default,
            _ => req.priority,
        };
        let (in_flight, queued, ticket) = self.admit(&w, &req.model, priority, prompt.len(), &config)?;
        let (mut features, prefix_cache, speculative) = self.gated_features(&rid, &config);
        let (events_tx, events_rx) = unbounded_channel();
        let unread = Arc::new(AtomicUsize::new(0));
        if let Some(a) = arm {
            features.push(format!("canary.{}", a.as_str()));
        }
        let prompt_tokens = prompt.clone();
        let job = Job {
            prompt,
            max_tokens,
            min_tokens: req.min_tokens,
            sampling: req.sampling,
            stop_sequences: req.stop_sequences,
            stop_token_ids: req.stop_token_ids,
            ignore_eos: req.ignore_eos,
            top_logprobs: req.top_logprobs,
            priority,
            cache_salt: req.cache_salt,
            prefix_cache,
            speculative,
            pin_prefix: req.pin_prefix,
            features,
            deadline: timeout_ms.map(|ms| (t_submit + Duration::from_millis(ms), ms)),
            t_submit,
            cancel: cancel.clone(),
            unread: unread.clone(),
            events: events_tx,
            in_flight: Some(in_flight),
            queued: Some(queued),
            ticket,
            guide,
            lazy_guide,
            // Under a JSON, regex or grammar constraint the output is what
            // it says, never a call.
            output: OutputParser::new(reasoning, opened_think, (offers_tools && req.constraint.is_none()).then_some((req.tools.as_slice(), w.info.tool_call_format))),
        };
        w.tx.send(Msg::Job(Box::new(job))).map_err(|_| EngineError::ModelNotLoaded(req.model.clone()))?;
        Ok(RequestHandle { id, prompt_tokens, events: events_rx, unread, cancel })
    }

    /// Waits for a turn to template and tokenize (one per core); the turn
    /// ends when the guard is dropped.
    pub(super) fn prepare_turn(&self, cancel: &AtomicBool) -> Result<impl Drop + '_, EngineError> {
        struct Turn<'a>(&'a (Mutex<usize>, std::sync::Condvar));
        impl Drop for Turn<'_> {
            fn drop(&mut self) {
                *self.0 .0.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
                self.0 .1.notify_one();
            }
        }
        // Once: on Linux the answer reads cgroup files.
        static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let (count, free) = &self.preparing;
        let mut n = count.lock().unwrap_or_else(|p| p.into_inner());
        while *n >= cores {
            if cancel.load(Ordering::Relaxed) {
                return Err(EngineError::Cancelled);
            }
            n = free.wait_timeout(n, Duration::from_millis(20)).unwrap_or_else(|p| p.into_inner()).0;
        }
        *n += 1;
        Ok(Turn(&self.preparing))
    }

    /// Lists a request being prepared under its caller's id until the guard
    /// is dropped (`cancel_pending`).
    fn pending<'a>(&'a self, request_id: Option<&str>, cancel: &Arc<AtomicBool>) -> impl Drop + 'a {
        struct Listed<'a>(&'a Mutex<Pending>, Option<Arc<AtomicBool>>);
        impl Drop for Listed<'_> {
            fn drop(&mut self) {
                if let Some(c) = self.1.take() {
                    self.0.lock().unwrap_or_else(|p| p.into_inner()).listed.retain(|(_, f)| !Arc::ptr_eq(f, &c));
                }
            }
        }
        let listed = request_id.map(|id| {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = p.early.iter().position(|(e, _)| e == id) {
                p.early.remove(i);
                cancel.store(true, Ordering::Relaxed);
            }
            p.listed.push((id.to_owned(), cancel.clone()));
            cancel.clone()
        });
        Listed(&self.pending, listed)
    }

    /// Cancels the requests with this caller's id that are still being
    /// templated, tokenized or waiting for their turn; their `submit`
    /// returns `Cancelled`. (A submitted request stops by its handle.) A
    /// cancel that arrives before its `submit` has begun (the JavaScript
    /// call is still on its way to a thread) waits a few seconds for it.
    pub fn cancel_pending(&self, request_id: &str) {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let mut found = false;
        for (_, c) in p.listed.iter().filter(|(id, _)| id == request_id) {
            c.store(true, Ordering::Relaxed);
            found = true;
        }
        if !found {
            let now = Instant::now();
            p.early.retain(|(_, at)| now.duration_since(*at) < EARLY_CANCEL_KEPT);
            if p.early.len() < 1024 {
                p.early.push((request_id.to_owned(), now));
            }
        }
    }

    /// The checked, tokenized prompt, the tokens it may generate, and
    /// whether the prompt ends inside an opened `<think>` block.
    fn tokenize_request(&self, w: &Worker, req: &GenerateRequest, config: &RuntimeConfig, cancel: &AtomicBool) -> Result<(Vec<u32>, usize, bool), EngineError> {
        req.validate()?;
        req.check_limits(&config.limits)?;
        if let Some(&(t, _)) = req.sampling.logit_bias.iter().find(|&&(t, _)| t as usize >= w.info.vocab_size) {
            return Err(InvalidParam::new(Field::LogitBias, format!("names token {t}, outside the vocabulary (size {})", w.info.vocab_size)).into());
        }
        let tk = &w.tokenizer;
        let max_prompt = config.limits.max_prompt_tokens;
        // A prompt found over the limit from its first part alone.
        let over = |n: usize| InvalidParam::sentence(req.prompt_field(), format!("prompt tokens: more than {n} exceeds the limit of {max_prompt} (limits.maxPromptTokens)"));
        let mut opened_think = false;
        let prompt = match &req.input {
            Input::Prompt(text) => {
                opened_think = crate::text::output::thinking(None, text).1;
                tk.encode_within(text, tk.add_bos, true, max_prompt)?.map_err(over)?
            }
            Input::Tokens(ids) => {
                PromptFit::check_vocabulary(ids, w.info.vocab_size)?;
                ids.clone()
            }
            Input::Messages(msgs) => {
                let tools: &[_] = if req.tool_choice == ToolChoice::None { &[] } else { &req.tools };
                let text = w.template.render_with_tools(msgs, tools, true, config.limits.max_prompt_chars, Some(cancel))?;
                opened_think = crate::text::output::thinking(None, &text).1;
                // Templates write BOS themselves when the model wants one.
                tk.encode_within(&text, false, true, max_prompt)?.map_err(over)?
            }
        };
        let max_tokens = PromptFit {
            n_prompt_tokens: prompt.len(),
            context_length: w.info.context_length,
            kv_positions: w.counters.kv_blocks_total.load(Ordering::Relaxed) * config.kv_cache.block_size,
            max_prompt_tokens: config.limits.max_prompt_tokens,
            max_tokens_cap: config.streaming.max_tokens,
        }
        .max_tokens(req)?;
        Ok((prompt, max_tokens, opened_think))
    }

    /// The compiled grammars of the request, on the caller's thread: the
    /// one its output follows from the start (its constraint, or the tool
    /// call it requires), and the one a tool call the model opens on its
    /// own follows (`tool_choice: auto`).
    fn guides(&self, w: &Worker, req: &GenerateRequest) -> Result<(Option<Guide>, Option<Guide>), EngineError> {
        let (parallel, choice, format) = (req.parallel_tool_calls, &req.tool_choice, w.info.tool_call_format);
        let (now, lazy) = match (&req.constraint, tools::call_grammar(&req.tools, choice, parallel, format)) {
            (Some(c), _) => (Some((req.constraint_field(), c.clone())), None),
            (None, Some(c)) => (Some((Field::Tools, c)), None),
            (None, None) => (None, tools::rest_of_call_grammar(&req.tools, choice, parallel, format).map(|c| (Field::Tools, c))),
        };
        if now.is_none() && lazy.is_none() {
            return Ok((None, None));
        }
        let grammars = w
            .grammars()
            .as_ref()
            .map_err(|e| EngineError::Internal(format!("cannot build the grammar compiler for this model: {e}")))?;
        let compile = |g: Option<(Field, Constraint)>| -> Result<Option<Guide>, EngineError> {
            let Some((field, c)) = g else { return Ok(None) };
            Ok(Some(grammars.compile(&c).map_err(|e| InvalidParam::new(field, format!("cannot be used: {e}")))?))
        };
        Ok((compile(now)?, compile(lazy)?))
    }

    /// Admission: a bounded number of requests in flight per model, a
    /// bounded queue of requests and prompt tokens waiting to run (QoS
    /// actions may have lowered the limits for now), then the breaker. The
    /// guards it returns give the slots back when the request ends.
    fn admit(
        &self,
        w: &Worker,
        model: &str,
        priority: Priority,
        n_prompt_tokens: usize,
        config: &RuntimeConfig,
    ) -> Result<(InFlight, Queued, BreakerTicket), EngineError> {
        let (knobs, c) = (&self.shared.knobs, &w.counters);
        if priority == Priority::Background && knobs.shed_background() {
            return Err(Knobs::shed_error());
        }
        let limit = knobs.max_streams(config.streaming.max_concurrent_streams);
        if c.in_flight.fetch_add(1, Ordering::Relaxed) >= limit {
            c.in_flight.fetch_sub(1, Ordering::Relaxed);
            return Err(EngineError::Overloaded(format!("{limit} requests are in flight (streaming.maxConcurrentStreams)")));
        }
        let in_flight = InFlight(c.clone());
        let sched = &config.scheduler;
        let max_queued = knobs.max_queued(sched.max_queued_requests);
        let n_queued = c.queued.fetch_add(1, Ordering::Relaxed);
        let n_tokens = c.queued_tokens.fetch_add(n_prompt_tokens, Ordering::Relaxed);
        let queued = Queued(c.clone(), n_prompt_tokens);
        if n_queued >= max_queued {
            return Err(EngineError::Overloaded(format!("{n_queued} requests are queued (scheduler.maxQueuedRequests)")));
        }
        // A queue holding nothing admits any prompt the cache can hold.
        if n_queued > 0 && n_tokens + n_prompt_tokens > sched.max_queued_tokens {
            return Err(EngineError::Overloaded(format!(
                "{n_tokens} prompt tokens are queued; {n_prompt_tokens} more exceed scheduler.maxQueuedTokens"
            )));
        }
        c.last_used_ms.store(self.t_start.elapsed().as_millis() as u64, Ordering::Relaxed);

        // Last, so a refusal above never takes the half-open probe's place.
        let admission = w.breaker.admit(Instant::now()).map_err(|wait| {
            EngineError::Overloaded(format!(
                "model '{model}' is failing: its circuit breaker is open after consecutive failures; next probe in {} ms",
                wait.as_millis()
            ))
        })?;
        Ok((in_flight, queued, BreakerTicket { breaker: w.breaker.clone(), admission, settled: false }))
    }

    /// The gated features on for request id `rid` (counted), and whether
    /// they give it the prefix cache and speculative decoding. Without a
    /// flags file every gated feature follows the runtime config; with one,
    /// speculation needs both `speculative.enabled` and the flag.
    fn gated_features(&self, rid: &str, config: &RuntimeConfig) -> (Vec<String>, bool, bool) {
        let Some(store) = self.feature_flags() else {
            return (Vec::new(), true, config.speculative.enabled);
        };
        let flags = store.current();
        let mut counts = self.flag_counts.lock().unwrap();
        let mut features = Vec::new();
        for &name in GATED_FEATURES {
            // The config says whether speculation runs at all; the flag, for whom.
            let runs = name != "ttft_pipeline.speculative" || config.speculative.enabled;
            let on = runs && flags.evaluate(name, rid).enabled;
            *counts.entry((name.to_owned(), on)).or_default() += 1;
            if on {
                features.push(name.to_owned());
            }
        }
        let on = |f: &str| features.iter().any(|x| x == f);
        let (prefix_cache, speculative) = (on("ttft_pipeline.kv_prefetch"), on("ttft_pipeline.speculative"));
        (features, prefix_cache, speculative)
    }
}
