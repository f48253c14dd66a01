//! Draft models for speculative decoding: attaching one to a loaded model's
//! worker (which drafts with it, see `worker.rs`), detaching it, and
//! checking that two models can pair.

use super::*;

/// Whether one model can draft for another (`Engine::draft_compatibility`).
#[derive(Debug, Clone)]
pub struct DraftCompatibility {
    /// No errors: the pair works (warnings say where it may not pay off).
    pub compatible: bool,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    pub primary: ModelInfo,
    pub draft: ModelInfo,
}

/// A draft model can draft for a primary model when their tokenizers give
/// every id the same text (guesses are token ids); it helps only when it is
/// much cheaper to run.
fn draft_compatibility(primary: (&ModelInfo, &Tokenizer), draft: (&ModelInfo, &Tokenizer)) -> DraftCompatibility {
    let ((p, pt), (d, dt)) = (primary, draft);
    let (mut errors, mut warnings) = (Vec::new(), Vec::new());
    if pt.vocab_size() != dt.vocab_size() {
        errors.push(format!("vocabulary sizes differ: {} has {} tokens, {} has {}", p.id, pt.vocab_size(), d.id, dt.vocab_size()));
    } else if let Some(i) = (0..pt.vocab_size() as u32).find(|&i| pt.token_text(i) != dt.token_text(i)) {
        errors.push(format!(
            "vocabularies differ at token {i}: {:?} in {} but {:?} in {}",
            pt.token_text(i).unwrap_or(""),
            p.id,
            dt.token_text(i).unwrap_or(""),
            d.id
        ));
    }
    if pt.bos_id != dt.bos_id || pt.eos_id != dt.eos_id {
        warnings.push("BOS/EOS tokens differ: the draft's own end-of-text guesses are checked like any other".into());
    }
    if d.weight_bytes >= p.weight_bytes {
        warnings.push(format!(
            "the draft ({} MB) is not smaller than the primary ({} MB): expect no speedup",
            d.weight_bytes >> 20,
            p.weight_bytes >> 20
        ));
    }
    if d.context_length < p.context_length {
        warnings.push(format!("the draft's context ({}) is shorter than the primary's ({}): no guesses past it", d.context_length, p.context_length));
    }
    DraftCompatibility { compatible: errors.is_empty(), errors, warnings, primary: p.clone(), draft: d.clone() }
}

impl Engine {
    /// Loads `path` as the draft model of the loaded model `primary`: its
    /// requests with speculative decoding on then take their guesses from
    /// it (see `speculative.rs`) instead of prompt lookup. Replaces a draft
    /// already attached. The draft gets its own KV cache with as many
    /// positions as the primary's. Errors: `ModelNotLoaded` for `primary`,
    /// `ModelLoadError` for the file, `InvalidParams` when the two
    /// vocabularies differ.
    pub fn load_draft_model(&self, primary: &str, path: impl AsRef<Path>, id: Option<String>) -> Result<ModelInfo, EngineError> {
        let w = self.worker(primary)?;
        let (canonical, id) = resolve(path.as_ref(), id)?;
        let (model, tokenizer, info) = open_model(canonical, id, None, w.info.backend)?;
        let report = draft_compatibility((&w.info, &w.tokenizer), (&info, &tokenizer));
        if !report.compatible {
            return Err(EngineError::InvalidParams(format!(
                "'{}' cannot draft for '{primary}': {}",
                info.id,
                report.errors.join("; ")
            )));
        }
        let n_blocks = w.counters.kv_blocks_total.load(Ordering::Relaxed);
        let block_size = self.config().kv_cache.block_size;
        let drafter = worker::Drafter {
            kv: model.new_kv_store(block_size, n_blocks),
            pool: BlockPool::new(n_blocks, block_size, false),
            model,
        };
        // Sent under the lock, so concurrent loads leave the description of the draft that runs.
        let mut slot = w.draft.lock().unwrap();
        w.tx.send(Msg::Drafter(Some(drafter))).map_err(|_| EngineError::ModelNotLoaded(primary.to_owned()))?;
        *slot = Some((info.clone(), Arc::new(tokenizer)));
        Ok(info)
    }

    /// Detaches the draft model of `model` (a primary's id or its draft's),
    /// or of every model when `None`. Returns the ids of the drafts removed.
    pub fn unload_draft_model(&self, model: Option<&str>) -> Result<Vec<String>, EngineError> {
        let workers: Vec<Arc<Worker>> = self.shared.models.lock().unwrap().values().cloned().collect();
        let mut removed = Vec::new();
        for w in &workers {
            let mut draft = w.draft.lock().unwrap();
            let matches = match (model, draft.as_ref()) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(m), Some((d, _))) => m == w.info.id || m == d.id,
            };
            if matches {
                let _ = w.tx.send(Msg::Drafter(None));
                removed.push(draft.take().unwrap().0.id);
            }
        }
        match model {
            Some(m) if removed.is_empty() && !workers.iter().any(|w| w.info.id == m) => Err(EngineError::ModelNotLoaded(m.to_owned())),
            _ => Ok(removed),
        }
    }

    /// Whether `draft` (a loaded model or an attached draft) can draft for
    /// the loaded model `primary`, and why not or where it may not pay off.
    pub fn draft_compatibility(&self, primary: &str, draft: &str) -> Result<DraftCompatibility, EngineError> {
        let workers: Vec<Arc<Worker>> = self.shared.models.lock().unwrap().values().cloned().collect();
        let p = workers.iter().find(|w| w.info.id == primary).ok_or_else(|| EngineError::ModelNotLoaded(primary.to_owned()))?;
        let d = workers
            .iter()
            .find(|w| w.info.id == draft)
            .map(|w| (w.info.clone(), w.tokenizer.clone()))
            .or_else(|| workers.iter().find_map(|w| w.draft.lock().unwrap().as_ref().filter(|(i, _)| i.id == draft).cloned()))
            .ok_or_else(|| EngineError::ModelNotLoaded(draft.to_owned()))?;
        Ok(draft_compatibility((&self.info_of(p), &p.tokenizer), (&d.0, &d.1)))
    }

}
