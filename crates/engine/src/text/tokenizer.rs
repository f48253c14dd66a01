//! Tokenizer built from GGUF metadata (`tokenizer.ggml.*`) on the
//! `tokenizers` crate, plus streaming detokenization that never emits broken
//! UTF-8.
//!
//! Pre-tokenization follows llama.cpp's per-`tokenizer.ggml.pre` regexes so
//! that token ids match llama.cpp's for the same file.

use std::collections::HashMap;

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::EngineError;
use crate::formats::filebuf::{read_text, MAX_MODEL_TEXT};
use crate::formats::gguf::{GgufFile, MetaValue};

/// GPT-2's word split, as llama.cpp writes it.
const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// ggml token types.
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// Texts that end a turn in common chat formats; llama.cpp treats these as
/// end-of-generation too when the file marks them as control tokens.
const END_OF_TURN_TEXTS: &[&str] =
    &["<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "</s>"];

pub struct Tokenizer {
    /// Splits out control tokens written in the text (`<|im_start|>`).
    with_special: tokenizers::Tokenizer,
    /// Treats control-token texts as plain text.
    plain: tokenizers::Tokenizer,
    /// Bytes each token contributes to output text (control tokens: none).
    pieces: Vec<Vec<u8>>,
    texts: Vec<String>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// Every id that ends generation (EOS, EOT and end-of-turn controls).
    pub eog_ids: Vec<u32>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("vocab", &self.pieces.len()).field("eos", &self.eos_id).finish()
    }
}

/// GPT-2's reversible byte-to-character map: printable bytes map to
/// themselves, the rest to code points from 256 up.
fn byte_level_decode_table() -> HashMap<char, u8> {
    let mut printable: Vec<u8> = (b'!'..=b'~').chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut map: HashMap<char, u8> = printable.iter().map(|&b| (char::from(b), b)).collect();
    let mut next = 256u32;
    printable.sort_unstable();
    for b in 0..=255u8 {
        if printable.binary_search(&b).is_err() {
            map.insert(char::from_u32(next).unwrap(), b);
            next += 1;
        }
    }
    map
}

fn strings(g: &GgufFile, key: &str) -> Result<Vec<String>, EngineError> {
    let arr = g
        .get(key)
        .and_then(MetaValue::as_array)
        .ok_or_else(|| EngineError::Tokenizer(format!("GGUF has no '{key}' array")))?;
    arr.iter()
        .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| EngineError::Tokenizer(format!("'{key}' holds a non-string"))))
        .collect()
}

/// Byte-level BPE (GPT-2 style) from its merges, split first by the
/// pre-tokenizer regex llama.cpp uses for `tokenizer.ggml.pre`.
fn gpt2_base(g: &GgufFile, tokens: &[String]) -> Result<tokenizers::Tokenizer, EngineError> {
    let merges = strings(g, "tokenizer.ggml.merges")?;
    let vocab: HashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let merges: Vec<(String, String)> = merges
        .iter()
        .map(|m| m.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())).ok_or_else(|| EngineError::Tokenizer(format!("malformed merge '{m}'"))))
        .collect::<Result<_, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
        .build()
        .map_err(|e| EngineError::Tokenizer(format!("cannot build BPE: {e}")))?;
    let pre = g.get_str("tokenizer.ggml.pre").unwrap_or("default");
    let split = |re: &str| -> Result<PreTokenizerWrapper, EngineError> {
        Split::new(SplitPattern::Regex(re.into()), SplitDelimiterBehavior::Isolated, false)
            .map(PreTokenizerWrapper::Split)
            .map_err(|e| EngineError::Tokenizer(format!("bad pre-tokenizer regex: {e}")))
    };
    let mut steps = match pre {
        // Digits split one by one first, then GPT-2's word split.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => vec![split(r"\p{N}")?, split(GPT2_REGEX)?],
        "llama-bpe" | "llama3" | "falcon3" | "pixtral" => vec![split(LLAMA3_REGEX)?],
        "qwen2" | "qwen35" | "stablelm2" | "deepseek-r1-qwen" => vec![split(QWEN2_REGEX)?],
        "default" | "gpt2" | "gpt-2" | "mpt" | "olmo" | "jais" => vec![split(GPT2_REGEX)?],
        other => return Err(EngineError::Tokenizer(format!("pre-tokenizer '{other}' is not supported yet"))),
    };
    steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)));
    let mut base = tokenizers::Tokenizer::new(bpe);
    base.with_pre_tokenizer(Some(Sequence::new(steps)));
    base.with_decoder(Some(ByteLevel::default()));
    Ok(base)
}

/// SentencePiece BPE (`tokenizer.ggml.model = llama`: Llama 2, Mistral,
/// Gemma, Phi-3): spaces become U+2581 (with one in front when
/// `add_space_prefix`), pieces merge pairwise, the pair whose merged piece
/// scores highest first, and what no piece covers falls back to byte
/// tokens `<0xAB>`. As merges: every way to split a piece into two pieces,
/// ranked by the whole piece's score.
fn spm_base(g: &GgufFile, tokens: &[String]) -> Result<tokenizers::Tokenizer, EngineError> {
    use tokenizers::normalizers::{Prepend, Replace, Sequence as NormSeq};
    let scores: Vec<f64> = match g.get("tokenizer.ggml.scores").and_then(MetaValue::numbers) {
        Some(a) if a.len() == tokens.len() => a,
        _ => return Err(EngineError::Tokenizer("SentencePiece vocabulary without one score per token".into())),
    };
    let vocab: HashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let mut ranked: Vec<(f64, u32, String, String)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        // Splitting costs the square of a piece's length; SentencePiece
        // learns pieces of at most 16 characters by default, so a longer one
        // is a user-defined symbol (matched whole, never merged into) or a
        // hostile file (one 300k-character token took 9.6 s here).
        if piece.len() > MAX_MERGED_PIECE {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            let (a, b) = piece.split_at(at);
            if vocab.contains_key(a) && vocab.contains_key(b) {
                ranked.push((scores[id], id as u32, a.to_owned(), b.to_owned()));
            }
        }
    }
    ranked.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(vocab[&x.2].cmp(&vocab[&y.2])));
    let merges = ranked.into_iter().map(|(_, _, a, b)| (a, b)).collect();
    let unk = tokens.iter().position(|t| t == "<unk>").map(|i| tokens[i].clone());
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
        .byte_fallback(true);
    if let Some(u) = unk {
        builder = builder.unk_token(u);
    }
    let bpe = builder.build().map_err(|e| EngineError::Tokenizer(format!("cannot build SentencePiece BPE: {e}")))?;
    let mut base = tokenizers::Tokenizer::new(bpe);
    let space = Replace::new(" ", "\u{2581}").map_err(|e| EngineError::Tokenizer(e.to_string()))?;
    let prefix = g.get("tokenizer.ggml.add_space_prefix").and_then(MetaValue::as_bool).unwrap_or(true);
    let steps = if prefix { vec![Prepend::new("\u{2581}".into()).into(), space.into()] } else { vec![space.into()] };
    base.with_normalizer(Some(NormSeq::new(steps)));
    Ok(base)
}

/// The longest SentencePiece piece, in bytes, that merges can build.
const MAX_MERGED_PIECE: usize = 256;

/// The bytes a SentencePiece token stands for.
fn spm_piece(t: &str, ty: i64) -> Vec<u8> {
    const TOKEN_BYTE: i64 = 6;
    if ty == TOKEN_BYTE {
        if let Some(b) = t.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')).and_then(|h| u8::from_str_radix(h, 16).ok()) {
            return vec![b];
        }
    }
    t.replace('\u{2581}', " ").into_bytes()
}

impl Tokenizer {
    pub fn from_gguf(g: &GgufFile) -> Result<Self, EngineError> {
        let model = g.get_str("tokenizer.ggml.model").unwrap_or("");
        if model != "gpt2" && model != "llama" {
            return Err(EngineError::Tokenizer(format!(
                "tokenizer model '{model}' is not supported yet (byte-level BPE 'gpt2' and SentencePiece 'llama' are)"
            )));
        }
        let tokens = strings(g, "tokenizer.ggml.tokens")?;
        let types: Vec<i64> = match g.get("tokenizer.ggml.token_type") {
            Some(v) => v.numbers().ok_or_else(|| EngineError::Tokenizer("token_type is not an array of numbers".into()))?.into_iter().map(|x| x as i64).collect(),
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(EngineError::Tokenizer("token_type and tokens differ in length".into()));
        }
        let mut base = if model == "llama" { spm_base(g, &tokens)? } else { gpt2_base(g, &tokens)? };

        let specials: Vec<AddedToken> = types
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == TOKEN_CONTROL || t == TOKEN_USER_DEFINED)
            .map(|(i, &t)| AddedToken::from(tokens[i].clone(), t == TOKEN_CONTROL))
            .collect();
        base.add_special_tokens(&specials);
        let with_special = base.clone();
        let mut plain = base;
        // llama.cpp splits user-defined tokens out of text always, control
        // tokens only when asked to parse specials.
        plain.set_encode_special_tokens(true);

        let table = byte_level_decode_table();
        let pieces = tokens
            .iter()
            .zip(&types)
            .map(|(t, &ty)| match ty {
                TOKEN_CONTROL => Vec::new(),
                TOKEN_USER_DEFINED => t.as_bytes().to_vec(),
                _ if model == "llama" => spm_piece(t, ty),
                _ => t.chars().map(|c| table.get(&c).copied()).collect::<Option<Vec<u8>>>().unwrap_or_else(|| t.as_bytes().to_vec()),
            })
            .collect();

        let id = |key: &str| g.get_u64(key).filter(|&i| (i as usize) < tokens.len()).map(|i| i as u32);
        let bos_id = id("tokenizer.ggml.bos_token_id");
        let eos_id = id("tokenizer.ggml.eos_token_id");
        let mut eog_ids: Vec<u32> = [eos_id, id("tokenizer.ggml.eot_token_id"), id("tokenizer.ggml.eom_token_id")]
            .into_iter()
            .flatten()
            .collect();
        for (i, t) in tokens.iter().enumerate() {
            if types[i] == TOKEN_CONTROL && END_OF_TURN_TEXTS.contains(&t.as_str()) && !eog_ids.contains(&(i as u32)) {
                eog_ids.push(i as u32);
            }
        }
        // SentencePiece vocabularies add BOS unless the file says otherwise.
        let add_bos = g.get("tokenizer.ggml.add_bos_token").and_then(MetaValue::as_bool).unwrap_or(model == "llama");
        let chat_template = g.get_str("tokenizer.chat_template").map(str::to_owned);
        Ok(Tokenizer { with_special, plain, pieces, texts: tokens, bos_id, eos_id, eog_ids, add_bos, chat_template })
    }

    /// The tokenizer of a Hugging Face / MLX model folder: `tokenizer.json`,
    /// with BOS/EOS and the chat template from `tokenizer_config.json` (or
    /// `chat_template.jinja`) and extra end-of-generation ids from
    /// `generation_config.json` and `config.json`.
    pub fn from_hf_dir(dir: &std::path::Path) -> Result<Self, EngineError> {
        let read_json = |name: &str| -> Result<Option<serde_json::Value>, EngineError> {
            match read_text(&dir.join(name), MAX_MODEL_TEXT) {
                Ok(text) => serde_json::from_str(&text)
                    .map(Some)
                    .map_err(|e| EngineError::Tokenizer(format!("{name}: {e}"))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(EngineError::Tokenizer(format!("{name}: {e}"))),
            }
        };
        let json = read_json("tokenizer.json")?.ok_or_else(|| EngineError::Tokenizer("the folder has no tokenizer.json".into()))?;
        let base: tokenizers::Tokenizer = serde_json::from_value(json.clone())
            .map_err(|e| EngineError::Tokenizer(format!("tokenizer.json: {e}")))?;
        let cfg = read_json("tokenizer_config.json")?.unwrap_or_default();

        let n = base.get_vocab_size(true);
        let added = base.get_added_tokens_decoder();
        let texts: Vec<String> = (0..n as u32).map(|i| base.id_to_token(i).unwrap_or_default()).collect();
        // Byte-level BPE (GPT-2 style) spells bytes as printable characters;
        // SentencePiece-style vocabularies spell spaces as U+2581 and raw
        // bytes as `<0xAB>`.
        let byte_level = json["decoder"].to_string().contains("\"ByteLevel\"");
        let table = byte_level_decode_table();
        let pieces = texts
            .iter()
            .enumerate()
            .map(|(i, t)| match added.get(&(i as u32)) {
                Some(a) if a.special => Vec::new(),
                Some(_) => t.as_bytes().to_vec(),
                None if byte_level => t.chars().map(|c| table.get(&c).copied()).collect::<Option<Vec<u8>>>().unwrap_or_else(|| t.as_bytes().to_vec()),
                None => match t.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')).and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) if t.len() == 6 => vec![b],
                    _ => t.replace('\u{2581}', " ").into_bytes(),
                },
            })
            .collect();

        let token_id = |v: &serde_json::Value| -> Option<u32> {
            let text = v.as_str().or_else(|| v["content"].as_str())?;
            base.token_to_id(text)
        };
        let bos_id = token_id(&cfg["bos_token"]);
        let eos_id = token_id(&cfg["eos_token"]);
        let mut eog_ids: Vec<u32> = eos_id.into_iter().collect();
        for extra in [read_json("generation_config.json")?, read_json("config.json")?].into_iter().flatten() {
            let ids = match &extra["eos_token_id"] {
                serde_json::Value::Array(a) => a.iter().filter_map(|v| v.as_u64()).collect(),
                v => v.as_u64().into_iter().collect::<Vec<_>>(),
            };
            eog_ids.extend(ids.into_iter().filter(|&i| (i as usize) < n).map(|i| i as u32));
        }
        for (&i, a) in &added {
            if a.special && END_OF_TURN_TEXTS.contains(&a.content.as_str()) {
                eog_ids.push(i);
            }
        }
        eog_ids.sort_unstable();
        eog_ids.dedup();
        // BOS is added when the config says so, or when the post-processor's
        // single-sequence template starts with a special token (Llama 3).
        let add_bos = cfg["add_bos_token"].as_bool().unwrap_or_else(|| {
            json["post_processor"]["single"][0].get("SpecialToken").is_some()
        }) && bos_id.is_some();
        let chat_template = match &cfg["chat_template"] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(named) => named
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(str::to_owned),
            _ => read_text(&dir.join("chat_template.jinja"), MAX_MODEL_TEXT).ok(),
        };
        let with_special = base.clone();
        let mut plain = base;
        plain.set_encode_special_tokens(true);
        Ok(Tokenizer { with_special, plain, pieces, texts, bos_id, eos_id, eog_ids, add_bos, chat_template })
    }

    /// This tokenizer as a Hugging Face `tokenizer.json` (what `convert`
    /// writes next to the weights).
    pub fn to_hf_json(&self) -> Result<String, String> {
        self.with_special.to_string(true).map_err(|e| e.to_string())
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// Token ids of `text`. `parse_special` splits out control-token texts
    /// (what a rendered chat template needs); `add_bos` prepends BOS when the
    /// model has one.
    pub fn encode(&self, text: &str, add_bos: bool, parse_special: bool) -> Result<Vec<u32>, EngineError> {
        let tk = if parse_special { &self.with_special } else { &self.plain };
        let enc = tk.encode(text, false).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos {
            ids.extend(self.bos_id);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// `encode`, or `Err(n)`: the text surely has more than `max` tokens, at
    /// least `n`. Of a text longer than twice `max` tokens of 8 bytes (real
    /// text averages about 4), that much is tokenized first; if it alone
    /// holds more than `max` tokens (beyond a margin for the word cut at its
    /// end) the rest is never tokenized: a 1 MiB prompt over the default
    /// limit costs a quarter of its tokenization.
    pub fn encode_within(&self, text: &str, add_bos: bool, parse_special: bool, max: usize) -> Result<Result<Vec<u32>, usize>, EngineError> {
        const MARGIN: usize = 64;
        let part = max.saturating_add(MARGIN).saturating_mul(8);
        if text.len() > 2 * part {
            let mut cut = part;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            let n = self.encode(&text[..cut], false, parse_special)?.len();
            if n > max + MARGIN {
                return Ok(Err(n - MARGIN));
            }
        }
        self.encode(text, add_bos, parse_special).map(Ok)
    }

    /// The text a token renders to (control tokens: none).
    pub fn piece(&self, id: u32) -> &[u8] {
        self.pieces.get(id as usize).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The token's vocabulary entry, as the template sees special tokens.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.texts.get(id as usize).map(String::as_str)
    }

    /// The id of the control token whose vocabulary text is `text`.
    pub fn control_token(&self, text: &str) -> Option<u32> {
        self.texts.iter().position(|t| t == text).map(|i| i as u32).filter(|&id| self.piece(id).is_empty())
    }

    pub fn is_eog(&self, id: u32) -> bool {
        self.eog_ids.contains(&id)
    }

    /// A token's bytes with control tokens as their vocabulary text (which
    /// `piece` renders as nothing): what `detokenize` and logprobs show.
    pub fn bytes_with_specials(&self, id: u32) -> &[u8] {
        match self.piece(id) {
            [] => self.token_text(id).unwrap_or_default().as_bytes(),
            piece => piece,
        }
    }

    /// Decodes a whole sequence (lossy for invalid UTF-8).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.decode_by(ids, Self::piece)
    }

    /// `decode` with control tokens as their text (`bytes_with_specials`).
    pub fn decode_with_specials(&self, ids: &[u32]) -> String {
        self.decode_by(ids, Self::bytes_with_specials)
    }

    fn decode_by<'a>(&'a self, ids: &[u32], bytes: impl Fn(&'a Self, u32) -> &'a [u8]) -> String {
        let all: Vec<u8> = ids.iter().flat_map(|&i| bytes(self, i).iter().copied()).collect();
        String::from_utf8_lossy(&all).into_owned()
    }
}

/// Turns a stream of token byte pieces into text, holding back a trailing
/// incomplete UTF-8 sequence until the bytes that complete it arrive.
#[derive(Default, Debug)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap());
                    match e.error_len() {
                        // Incomplete sequence at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        // Bytes that can never be valid: replace and go on.
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + n);
                        }
                    }
                }
            }
        }
    }

    /// Whatever is still held back, at the end of the stream.
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn a_sentencepiece_piece_of_300k_characters_loads_in_linear_time() {
        // Every split of every piece is looked up: quadratic in a piece's
        // length, 9.6 s for this one before pieces past 256 bytes were left
        // out of the merges.
        let pieces = ["<unk>", "<s>", "</s>", "\u{2581}", "a", "aa"].map(String::from).into_iter().chain(["a".repeat(300_000)]);
        let pieces: Vec<MetaValue> = pieces.map(MetaValue::Str).collect();
        let n = pieces.len();
        let md = vec![
            ("tokenizer.ggml.model", MetaValue::Str("llama".into())),
            ("tokenizer.ggml.tokens", MetaValue::Array(pieces)),
            ("tokenizer.ggml.scores", MetaValue::Array(vec![MetaValue::F32(-1.0); n])),
            ("tokenizer.ggml.token_type", MetaValue::Array([2, 3, 3].into_iter().chain([1; 4]).map(MetaValue::I32).collect())),
        ];
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), crate::formats::gguf::writer::write(&md, &[])).unwrap();
        let g = GgufFile::open(f.path()).unwrap();
        let t = std::time::Instant::now();
        let tk = Tokenizer::from_gguf(&g).unwrap();
        assert!(t.elapsed() < std::time::Duration::from_secs(2), "{:?}", t.elapsed());
        assert_eq!(tk.encode("aaaa", false, false).unwrap(), [3, 5, 5]);
    }

    #[test]
    fn sentencepiece_vocabularies_tokenize_as_sentencepiece_does() {
        // A vocabulary trained with the sentencepiece package, and its own
        // encodings of a few texts (scripts/spm_vectors.py).
        let v: serde_json::Value = serde_json::from_str(include_str!("../testdata/spm.json")).unwrap();
        let strs = |k: &str| v[k].as_array().unwrap().iter().map(|x| MetaValue::Str(x.as_str().unwrap().to_owned())).collect::<Vec<_>>();
        let md = vec![
            ("tokenizer.ggml.model", MetaValue::Str("llama".into())),
            ("tokenizer.ggml.tokens", MetaValue::Array(strs("pieces"))),
            ("tokenizer.ggml.scores", MetaValue::Array(v["scores"].as_array().unwrap().iter().map(|x| MetaValue::F32(x.as_f64().unwrap() as f32)).collect())),
            ("tokenizer.ggml.token_type", MetaValue::Array(v["types"].as_array().unwrap().iter().map(|x| MetaValue::I32(x.as_i64().unwrap() as i32)).collect())),
            ("tokenizer.ggml.bos_token_id", MetaValue::U32(1)),
            ("tokenizer.ggml.eos_token_id", MetaValue::U32(2)),
        ];
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), crate::formats::gguf::writer::write(&md, &[])).unwrap();
        let tk = Tokenizer::from_gguf(&GgufFile::open(f.path()).unwrap()).unwrap();
        assert!(tk.add_bos);
        for case in v["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            assert_eq!(tk.encode(text, false, false).unwrap(), want, "{text:?}");
            // Decoding gives the text back, with SentencePiece's leading space.
            if !text.is_empty() {
                assert_eq!(tk.decode(&want), format!(" {text}"), "{text:?}");
            }
        }
        assert_eq!(tk.encode("Hi", true, false).unwrap()[0], 1);
    }
    use crate::formats::gguf::writer::write;

    /// A tiny byte-level BPE vocabulary: all 256 byte tokens, a few merges, and
    /// ChatML control tokens.
    pub fn tiny_tokenizer_metadata() -> Vec<(&'static str, MetaValue)> {
        let table = byte_level_decode_table();
        let mut by_byte: Vec<(u8, char)> = table.iter().map(|(&c, &b)| (b, c)).collect();
        by_byte.sort();
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into(), "<|im_end|>".into()];
        let mut types = vec![3i32, 3, 3];
        for (_, c) in &by_byte {
            tokens.push(c.to_string());
            types.push(1);
        }
        let merges = ["h e", "l l", "he ll", "Ġ w", "o r"];
        for m in merges {
            tokens.push(m.replace(' ', ""));
            types.push(1);
        }
        vec![
            ("tokenizer.ggml.model", MetaValue::Str("gpt2".into())),
            ("tokenizer.ggml.pre", MetaValue::Str("smollm".into())),
            ("tokenizer.ggml.tokens", MetaValue::Array(tokens.into_iter().map(MetaValue::Str).collect())),
            ("tokenizer.ggml.token_type", MetaValue::Array(types.into_iter().map(MetaValue::I32).collect())),
            ("tokenizer.ggml.merges", MetaValue::Array(merges.iter().map(|m| MetaValue::Str(m.to_string())).collect())),
            ("tokenizer.ggml.bos_token_id", MetaValue::U32(1)),
            ("tokenizer.ggml.eos_token_id", MetaValue::U32(2)),
            (
                "tokenizer.chat_template",
                MetaValue::Str(
                    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".into(),
                ),
            ),
        ]
    }

    pub fn tiny_tokenizer() -> Tokenizer {
        let bytes = write(&tiny_tokenizer_metadata(), &[]);
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), bytes).unwrap();
        Tokenizer::from_gguf(&GgufFile::open(f.path()).unwrap()).unwrap()
    }

    #[test]
    fn round_trips_ascii_unicode_emoji_and_whitespace() {
        let tk = tiny_tokenizer();
        for text in ["hello world", "héllo wörld ✓", "emoji 🦀🚀 ok", "  tabs\tand\n\nnewlines  ", "fn main() { 42 }", ""] {
            let ids = tk.encode(text, false, false).unwrap();
            assert_eq!(tk.decode(&ids), text);
        }
    }

    #[test]
    fn applies_merges_and_isolates_digits() {
        let tk = tiny_tokenizer();
        let ids = tk.encode("hello 123", false, false).unwrap();
        let pieces: Vec<String> = ids.iter().map(|&i| tk.token_text(i).unwrap().to_owned()).collect();
        assert_eq!(pieces, ["hell", "o", "Ġ", "1", "2", "3"]);
    }

    #[test]
    fn control_tokens_split_only_when_asked() {
        let tk = tiny_tokenizer();
        assert_eq!(tk.encode("<|im_start|>", false, true).unwrap(), vec![1]);
        assert!(tk.encode("<|im_start|>", false, false).unwrap().len() > 1);
        assert_eq!(tk.encode("hi", true, false).unwrap()[0], 1);
        assert!(tk.is_eog(2));
        // Control tokens render as nothing in output text.
        assert_eq!(tk.decode(&[1, 2]), "");
    }

    #[test]
    fn stream_decoder_never_splits_a_character() {
        let text = "añ🦀z";
        let mut dec = StreamDecoder::default();
        let mut out = String::new();
        for b in text.as_bytes() {
            let s = dec.push(&[*b]);
            assert!(!s.contains('\u{FFFD}'));
            out.push_str(&s);
        }
        out.push_str(&dec.finish());
        assert_eq!(out, text);
        // Invalid bytes become one replacement character each, and decoding goes on.
        let mut dec = StreamDecoder::default();
        assert_eq!(dec.push(&[b'a', 0xFF, b'b']), "a\u{FFFD}b");
    }

    #[test]
    fn rejects_unsupported_tokenizer_models() {
        let mut md = tiny_tokenizer_metadata();
        md[0].1 = MetaValue::Str("llama".into());
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), write(&md, &[])).unwrap();
        let err = Tokenizer::from_gguf(&GgufFile::open(f.path()).unwrap()).unwrap_err();
        assert_eq!(err.code(), "TokenizerError");
    }
}
