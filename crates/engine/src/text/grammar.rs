//! Constrained decoding: a request's JSON schema, regex or Lark grammar
//! compiled by llguidance against this model's own vocabulary, and the
//! per-sequence state that masks each step's logits to the tokens the
//! grammar allows.
//!
//! Compiling happens on the caller's thread (`Grammars::compile`, bounded by
//! llguidance's `ParserLimits`), never on the worker. The worker holds one
//! `Guide` per constrained sequence: the mask for its next token is computed
//! while the forward pass runs (`Guide::prepare`), applied before sampling,
//! and the chosen token is committed afterwards.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{InferenceCapabilities, SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use crate::text::tokenizer::Tokenizer;

/// What a request constrains its output to.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// Any JSON object (OpenAI's `json_object`).
    JsonObject,
    /// A value valid against this JSON schema.
    JsonSchema(Value),
    /// Text matching the regex, whole.
    Regex(String),
    /// A Lark grammar (llguidance's dialect).
    Lark(String),
}

/// How generated JSON is laid out: one space after `:` and `,`, no other
/// whitespace. Small models given free whitespace can spend their whole
/// token budget on newlines inside an object.
const JSON_LAYOUT: &str = r#"{"whitespace_flexible": false, "key_separator": ": ", "item_separator": ", "}"#;

impl Constraint {
    /// The grammar llguidance compiles.
    pub fn grammar(&self) -> TopLevelGrammar {
        match self {
            Constraint::JsonObject => TopLevelGrammar::from_json_schema(with_layout(json!({"type": "object"}))),
            Constraint::JsonSchema(s) => TopLevelGrammar::from_json_schema(with_layout(s.clone())),
            Constraint::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Constraint::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        }
    }

    /// A key that is equal for constraints that compile alike.
    fn key(&self) -> String {
        match self {
            Constraint::JsonObject => "o".into(),
            Constraint::JsonSchema(s) => format!("j{s}"),
            Constraint::Regex(rx) => format!("r{rx}"),
            Constraint::Lark(g) => format!("l{g}"),
        }
    }
}

/// A schema with our JSON layout, unless it sets llguidance's own options.
fn with_layout(mut schema: Value) -> Value {
    if let Value::Object(m) = &mut schema {
        m.entry("x-guidance").or_insert_with(|| serde_json::from_str(JSON_LAYOUT).expect("valid layout"));
    }
    schema
}

/// Our tokenizer as llguidance sees it: each token's bytes (control tokens
/// as the 0xFF marker then their text), and our own encoder for the strings
/// a grammar forces, so forced text tokenizes as the model was trained.
struct Env {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        match std::str::from_utf8(s) {
            Ok(text) => self.tokenizer.encode(text, false, false).unwrap_or_else(|_| self.trie.greedy_tokenize(s)),
            // Part of a character: no canonical split exists, take the longest tokens.
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// Most compiled grammars kept per model for reuse (each maps a constraint
/// to a ready matcher; a request takes a copy).
const CACHE_ENTRIES: usize = 64;

/// One model's grammar compiler.
pub struct Grammars {
    factory: ParserFactory,
    cache: Mutex<HashMap<String, Matcher>>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").finish_non_exhaustive()
    }
}

impl Grammars {
    /// Builds the token trie of `tokenizer` for a model whose logits have
    /// `n_logits` entries (ids past the tokenizer's are never allowed).
    pub fn new(tokenizer: Arc<Tokenizer>, n_logits: usize) -> Result<Self, String> {
        let n = n_logits.max(tokenizer.vocab_size());
        let words: Vec<Vec<u8>> = (0..n as u32)
            .map(|id| match tokenizer.piece(id) {
                [] => match tokenizer.token_text(id) {
                    Some(t) if !t.is_empty() => [&[TokTrie::SPECIAL_TOKEN_MARKER][..], t.as_bytes()].concat(),
                    _ => Vec::new(),
                },
                piece => piece.to_vec(),
            })
            .collect();
        let eos: Vec<u32> = match tokenizer.eog_ids.as_slice() {
            [] => tokenizer.eos_id.into_iter().collect(),
            ids => ids.to_vec(),
        };
        let first = *eos.first().ok_or("the tokenizer has no end-of-generation token")?;
        let trie = TokTrie::from(&TokRxInfo::new(n as u32, first), &words).with_eos_tokens(&eos);
        let env: TokEnv = Arc::new(Env { trie, tokenizer });
        let caps = InferenceCapabilities { ff_tokens: true, ..Default::default() };
        let mut factory = ParserFactory::new(&env, caps, &llguidance::earley::SlicedBiasComputer::general_slices()).map_err(|e| e.to_string())?;
        factory.quiet();
        *factory.limits_mut() = ParserLimits { verbose_errors: false, ..ParserLimits::default() };
        Ok(Grammars { factory, cache: Mutex::new(HashMap::new()) })
    }

    /// A fresh matcher for `c`; the error says why it cannot be used.
    pub fn compile(&self, c: &Constraint) -> Result<Guide, String> {
        let key = c.key();
        if let Some(m) = self.cache.lock().unwrap().get(&key) {
            return Ok(Guide::new(m.deep_clone()));
        }
        let parser = self.factory.create_parser(c.grammar()).map_err(|e| e.to_string())?;
        let mut m = Matcher::new(Ok(parser));
        // A grammar that compiles but allows nothing is refused now rather
        // than failing its first step.
        let mask = m.compute_mask().map_err(|e| e.to_string())?;
        if mask.is_zero() {
            return Err("the grammar matches no text".into());
        }
        m.reset().map_err(|e| e.to_string())?;
        let mut cache = self.cache.lock().unwrap();
        if cache.len() >= CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(key, m.deep_clone());
        Ok(Guide::new(m))
    }
}

/// One sequence's position in its grammar.
pub struct Guide {
    matcher: Matcher,
    /// The mask for the next token, once computed.
    mask: Option<Result<SimpleVob, String>>,
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guide").field("stopped", &self.matcher.is_stopped()).finish()
    }
}

impl Guide {
    fn new(matcher: Matcher) -> Self {
        Guide { matcher, mask: None }
    }

    /// Computes the next token's mask (the part worth running beside the
    /// forward pass).
    pub fn prepare(&mut self) {
        if self.mask.is_none() {
            self.mask = Some(self.matcher.compute_mask().map_err(|e| e.to_string()));
        }
    }

    /// Sets every logit the grammar forbids to -inf. An error means the
    /// grammar cannot continue from here.
    pub fn apply(&mut self, logits: &mut [f32]) -> Result<(), String> {
        self.prepare();
        let mask = match self.mask.as_ref().expect("prepared above") {
            Ok(m) => m,
            Err(e) => return Err(e.clone()),
        };
        if mask.is_zero() {
            return Err("the grammar allows no token here".into());
        }
        // A word of the mask at a time: most words of a narrow grammar's
        // mask are all zeros (a fill), a wide one's all ones (skipped).
        let words = mask.as_slice();
        for (w, chunk) in logits.chunks_mut(32).enumerate() {
            match words.get(w).copied().unwrap_or(0) {
                u32::MAX if chunk.len() == 32 => {}
                0 => chunk.fill(f32::NEG_INFINITY),
                bits => {
                    for (b, l) in chunk.iter_mut().enumerate() {
                        *l = if bits >> b & 1 == 0 { f32::NEG_INFINITY } else { *l };
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether the grammar allows `token` next.
    pub fn allows(&mut self, token: u32) -> bool {
        self.prepare();
        matches!(&self.mask, Some(Ok(m)) if m.is_allowed(token))
    }

    /// Advances past the chosen token.
    pub fn commit(&mut self, token: u32) -> Result<(), String> {
        self.mask = None;
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    /// Tokens the grammar forces next (none if there is a choice); the
    /// caller commits them.
    pub fn forced(&mut self) -> Vec<u32> {
        self.matcher.compute_ff_tokens()
    }

    /// Commits `tokens` if the grammar accepts all of them from here.
    pub fn accept_all(&mut self, tokens: &[u32]) -> bool {
        self.mask = None;
        self.accepted_prefix(tokens) == tokens.len() && self.matcher.consume_tokens(tokens).is_ok()
    }

    /// How many of `tokens` the grammar accepts in a row from here.
    pub fn accepted_prefix(&mut self, tokens: &[u32]) -> usize {
        self.matcher.validate_tokens(tokens).unwrap_or(0)
    }

    /// The grammar is complete and allows nothing more.
    pub fn finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grammars() -> Grammars {
        let tk = Arc::new(crate::text::tokenizer::tests::tiny_tokenizer());
        let n = tk.vocab_size();
        Grammars::new(tk, n).unwrap()
    }

    /// Greedy decoding where the "model" prefers token ids in `pref` order.
    fn run(g: &mut Guide, tk: &Tokenizer, n: usize, steps: usize) -> String {
        let mut out = Vec::new();
        for step in 0..steps {
            for t in g.forced() {
                g.commit(t).unwrap();
                out.push(t);
            }
            if g.finished() {
                break;
            }
            let mut logits: Vec<f32> = (0..n).map(|i| ((i * 7919 + step * 31) % 101) as f32).collect();
            g.apply(&mut logits).unwrap();
            let tok = crate::sampler::argmax(&logits);
            if tk.is_eog(tok) {
                break;
            }
            g.commit(tok).unwrap();
            out.push(tok);
        }
        tk.decode(&out)
    }

    #[test]
    fn a_regex_constrains_every_token() {
        let gs = grammars();
        let tk = crate::text::tokenizer::tests::tiny_tokenizer();
        let mut g = gs.compile(&Constraint::Regex("(yes|no)!".into())).unwrap();
        let text = run(&mut g, &tk, tk.vocab_size(), 20);
        assert!(text == "yes!" || text == "no!", "{text:?}");
    }

    #[test]
    fn bad_grammars_are_refused_at_compile_time() {
        let gs = grammars();
        assert!(gs.compile(&Constraint::Lark("start: ( ".into())).is_err());
        assert!(gs.compile(&Constraint::JsonSchema(json!({"type": "nonsense"}))).is_err());
        assert!(gs.compile(&Constraint::Regex("[".into())).is_err());
    }
}
