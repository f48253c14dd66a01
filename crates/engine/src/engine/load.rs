//! Loading and unloading models: opening the file on a backend, the
//! model's id, eviction under `model_cache.maxModels`, starting and
//! stopping its worker.

use super::*;

/// Opens a model file or folder and describes it (no worker yet).
pub(super) fn open_model(canonical: PathBuf, id: String, request_timeout_ms: Option<u64>, backend: BackendKind) -> Result<(Arc<dyn Model>, Tokenizer, ModelInfo), EngineError> {
    let crate::models::Opened { model, tokenizer, weight_format } = crate::models::open_on(&canonical, backend)?;
    let model: Arc<dyn Model> = Arc::from(model);
    let cfg = model.config();
    if tokenizer.vocab_size() > cfg.vocab_size {
        return Err(EngineError::ModelLoad {
            path: canonical.display().to_string(),
            reason: format!("tokenizer has {} tokens but the model {}", tokenizer.vocab_size(), cfg.vocab_size),
        });
    }
    let info = ModelInfo {
        id,
        path: canonical,
        architecture: cfg.architecture.clone(),
        context_length: cfg.context_length,
        vocab_size: cfg.vocab_size,
        weight_bytes: model.weight_bytes(),
        decode_weight_bytes: model.decode_weight_bytes(),
        kv_bytes_per_position: model.kv_bytes_per_position(),
        warmup_ms: 0.0,
        request_timeout_ms,
        file_type: weight_format,
        last_access_ms: 0,
        draft_model: None,
        backend,
        tool_call_format: CallFormat::Hermes,
    };
    Ok((model, tokenizer, info))
}

/// The file or folder a load names, and the id it gets (the caller's, or
/// one made from the name).
pub(super) fn resolve(path: &Path, id: Option<String>) -> Result<(PathBuf, String), EngineError> {
    let canonical = std::fs::canonicalize(path)
        .map_err(|e| EngineError::ModelLoad { path: path.display().to_string(), reason: format!("cannot open: {e}") })?;
    let id = id.unwrap_or_else(|| model_id_for(path));
    if id.is_empty() {
        return Err(EngineError::InvalidParams("model id must not be empty".into()));
    }
    // An id names the worker's thread, metrics labels and URLs: no control
    // characters (a NUL once made naming the thread panic).
    if id.len() > MAX_MODEL_ID || id.chars().any(char::is_control) {
        return Err(EngineError::InvalidParams(format!("model id must be at most {MAX_MODEL_ID} bytes without control characters")));
    }
    Ok((canonical, id))
}

const MAX_MODEL_ID: usize = 256;

/// The ids being loaded and how many loads hold a place under
/// `model_cache.maxModels`.
#[derive(Default)]
pub(super) struct Loading {
    ids: Mutex<(HashSet<String>, usize)>,
    done: std::sync::Condvar,
}

/// An id being loaded, until dropped.
pub(super) struct LoadingId<'a> {
    loading: &'a Loading,
    id: String,
    holds_place: bool,
}

impl Loading {
    /// Waits for any load of `id` in progress to end, then claims it.
    pub(super) fn claim(&self, id: &str) -> LoadingId<'_> {
        let mut g = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        while g.0.contains(id) {
            g = self.done.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.0.insert(id.to_owned());
        LoadingId { loading: self, id: id.to_owned(), holds_place: false }
    }
    /// Waits for a load holding a place to end; false if none does.
    fn wait_for_a_place(&self) -> bool {
        let g = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        if g.1 == 0 {
            return false;
        }
        drop(self.done.wait(g).unwrap_or_else(|p| p.into_inner()));
        true
    }
}

impl Drop for LoadingId<'_> {
    fn drop(&mut self) {
        let mut g = self.loading.ids.lock().unwrap_or_else(|p| p.into_inner());
        g.0.remove(&self.id);
        if self.holds_place {
            g.1 -= 1;
        }
        drop(g);
        self.loading.done.notify_all();
    }
}

fn model_id_for(path: &Path) -> String {
    // A folder's whole name; a file's name without its extension.
    let name = if path.is_dir() { path.file_name() } else { path.file_stem() };
    let stem = name.and_then(|s| s.to_str()).unwrap_or("model");
    stem.to_owned()
}

impl Engine {
    /// Makes room for one more model: evicts the least recently used model
    /// with nothing in flight, or refuses when every model is busy. Returns
    /// the ids it unloaded.
    fn evict_for_one_more(&self, claim: &mut LoadingId) -> Result<Vec<String>, EngineError> {
        let max = self.config().model_cache.max_models;
        let mut evicted = Vec::new();
        loop {
            let victim = {
                let models = self.shared.models.lock().unwrap();
                // Loads of other ids in progress count: each will add a model.
                let mut g = self.loading.ids.lock().unwrap_or_else(|p| p.into_inner());
                if models.len() + g.1 < max {
                    g.1 += 1;
                    claim.holds_place = true;
                    return Ok(evicted);
                }
                drop(g);
                models
                    .values()
                    .filter(|w| w.counters.in_flight.load(Ordering::Relaxed) == 0)
                    .min_by_key(|w| w.counters.last_used_ms.load(Ordering::Relaxed))
                    .map(|w| w.info.id.clone())
            };
            match victim {
                Some(id) => {
                    // Another caller may have removed it meanwhile; loop and re-check.
                    if self.unload_model(&id).is_ok() {
                        evicted.push(id);
                    }
                }
                // A model being loaded holds the place: once it is in, it
                // may be the one to evict.
                None if self.loading.wait_for_a_place() => {}
                None => {
                    return Err(EngineError::Overloaded(format!(
                        "model_cache.maxModels ({max}) models are loaded and all are serving requests"
                    )))
                }
            }
        }
    }

    /// Loads a GGUF model and starts its worker. Loading a path that is
    /// already loaded returns the existing model.
    pub fn load_model(&self, path: impl AsRef<Path>, id: Option<String>) -> Result<ModelInfo, EngineError> {
        self.load_model_with(path, id, ModelOptions::default())
    }

    /// `load_model` with per-model settings.
    pub fn load_model_with(&self, path: impl AsRef<Path>, id: Option<String>, options: ModelOptions) -> Result<ModelInfo, EngineError> {
        self.load(path, id, options).map(|l| l.info)
    }

    /// `load_model_with`, also saying which models it unloaded to make room.
    pub fn load(&self, path: impl AsRef<Path>, id: Option<String>, options: ModelOptions) -> Result<Loaded, EngineError> {
        let path = path.as_ref();
        if options.request_timeout_ms == Some(0) {
            return Err(EngineError::InvalidParams("requestTimeoutMs must be at least 1".into()));
        }
        let (canonical, id) = resolve(path, id)?;
        let mut claim = self.loading.claim(&id);
        if let Some(w) = self.shared.models.lock().unwrap().get(&id) {
            if w.info.path == canonical && w.info.backend == options.backend {
                return Ok(Loaded { info: w.info.clone(), evicted: Vec::new() });
            }
            if w.info.path == canonical {
                return Err(EngineError::InvalidParams(format!(
                    "model id '{id}' is already loaded on the {} backend; give the {} one another id",
                    w.info.backend.name(),
                    options.backend.name()
                )));
            }
            return Err(EngineError::InvalidParams(format!(
                "model id '{id}' is already loaded from {}",
                w.info.path.display()
            )));
        }

        let evicted = self.evict_for_one_more(&mut claim)?;
        let (model, tokenizer, mut info) = open_model(canonical, id.clone(), options.request_timeout_ms, options.backend)?;
        let canonical = info.path.clone();
        let text_of = |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or("").to_owned();
        let source = tokenizer.chat_template.as_deref().unwrap_or_else(|| crate::text::chat::default_template(&model.config().architecture));
        let template = ChatTemplate::new(Some(source), &text_of(tokenizer.bos_id), &text_of(tokenizer.eos_id))
            .map_err(|e| EngineError::ModelLoad { path: canonical.display().to_string(), reason: e.to_string() })?;
        let call_tokens = CallTokens { calls: tokenizer.control_token(MISTRAL_CALLS), args: tokenizer.control_token(MISTRAL_ARGS) };
        info.tool_call_format = match &options.tool_call_format {
            None => CallFormat::detect(call_tokens, Some(source)),
            Some(name) => CallFormat::parse(name, call_tokens).map_err(|e| EngineError::InvalidParams(format!("toolCallFormat {e}")))?,
        };
        let tokenizer = Arc::new(tokenizer);
        let (tx, rx) = mpsc::channel();
        let counters = Arc::new(Counters::default());
        counters.last_used_ms.store(self.t_start.elapsed().as_millis() as u64, Ordering::Relaxed);
        let config = self.config();
        let kv_cfg = &config.kv_cache;
        let n_blocks = config.kv_cache_bytes() / (model.kv_bytes_per_position() * kv_cfg.block_size).max(1);
        if n_blocks < 2 {
            return Err(EngineError::ModelLoad {
                path: info.path.display().to_string(),
                reason: format!("kv_cache.memoryMiB = {} holds fewer than two blocks of this model", kv_cfg.memory_mib),
            });
        }
        let kv = model.new_kv_store(kv_cfg.block_size, n_blocks);
        let pool = BlockPool::new(n_blocks, kv_cfg.block_size, kv_cfg.prefix_caching);
        counters.kv_blocks_total.store(n_blocks, Ordering::Relaxed);
        counters.kv_block_bytes.store(kv.block_bytes(), Ordering::Relaxed);
        let settings = Settings {
            max_batch: config.max_batch(),
            prefill_chunk: config.scheduler.prefill_chunk,
            prefetch_waiting: config.scheduler.prefetch_waiting && kv_cfg.prefix_caching,
            stream_buffer: config.scheduler.stream_buffer,
            speculative: config.speculative.clone(),
        };
        let warm = self.warmup_enabled();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = {
            let (tokenizer, counters, latency, knobs) =
                (tokenizer.clone(), counters.clone(), self.latency.clone(), self.shared.knobs.clone());
            std::thread::Builder::new()
                .name(format!("mlx-serving:{id}"))
                .spawn(move || {
                    let mut w = WorkerLoop::new(model, tokenizer, counters, latency, knobs, kv, pool, settings);
                    let took = if warm { w.warm_up() } else { Duration::ZERO };
                    let _ = ready_tx.send(took);
                    w.run(rx)
                })
                .map_err(|e| EngineError::Internal(format!("cannot start model thread: {e}")))?
        };
        let grammars = Arc::new(GrammarsCell::new());
        let trie_build = {
            let (cell, tokenizer, n_logits) = (grammars.clone(), tokenizer.clone(), info.vocab_size);
            std::thread::Builder::new()
                .name(format!("mlx-serving:trie:{id}"))
                .spawn(move || {
                    grammars_of(&cell, &tokenizer, n_logits);
                })
                .ok()
        };
        // Loading returns once the model is warm: the first request is then no slower than the tenth.
        info.warmup_ms = ready_rx.recv().map_err(|_| EngineError::Internal("model thread ended during warmup".into()))?.as_secs_f64() * 1e3;
        let breaker = Arc::new(Breaker::new(config.qos.circuit_breaker));
        let worker = Arc::new(Worker {
            info: info.clone(),
            tokenizer,
            draft: Mutex::new(None),
            template,
            grammars,
            trie_build: Mutex::new(trie_build),
            tx,
            counters,
            breaker,
            thread: Mutex::new(Some(thread)),
        });

        let mut models = self.shared.models.lock().unwrap();
        if let Some(existing) = models.get(&id) {
            // Another caller loaded the same id meanwhile; keep theirs.
            let existing = existing.clone();
            drop(models);
            worker.stop();
            return Ok(Loaded { info: existing.info.clone(), evicted });
        }
        models.insert(id, worker);
        drop(models);
        self.start_control();
        Ok(Loaded { info, evicted })
    }

    /// Stops the model's worker; its running requests end with `Cancelled`.
    pub fn unload_model(&self, id: &str) -> Result<(), EngineError> {
        let mut models = self.shared.models.lock().unwrap();
        let w = models.remove(id).ok_or_else(|| EngineError::ModelNotLoaded(id.to_owned()))?;
        let counted = self.retire(&w);
        drop(models);
        self.stop_worker(&w, counted);
        Ok(())
    }
}
