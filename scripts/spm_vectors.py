"""Writes crates/engine/src/testdata/spm.json: a small SentencePiece BPE
vocabulary (as GGUF stores one: pieces, scores, token types) trained here
with the `sentencepiece` package, and texts with the ids sentencepiece
itself gives them, so the GGUF SentencePiece tokenizer is checked against
the reference implementation. Run with a Python that has sentencepiece."""

import io
import json
from pathlib import Path

import sentencepiece as spm

OUT = Path(__file__).resolve().parent.parent / "crates/engine/src/testdata/spm.json"
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello there, how are you today?",
    "A tokenizer splits text into pieces; the model sees their ids.",
    "Numbers like 12345 and 2026 appear, as do symbols: #, %, & and (brackets).",
    "Sentences repeat words: the the the, token token, piece piece piece.",
    "Unicode too: café, naïve, Straße, 東京, and emoji 🙂 fall back to bytes.",
] * 20

model = io.BytesIO()
spm.SentencePieceTrainer.train(
    sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=520, model_type="bpe",
    byte_fallback=True, character_coverage=0.995, split_digits=True, add_dummy_prefix=True,
    # As Llama and Mistral were trained: no text normalisation, spaces kept as they are.
    normalization_rule_name="identity", remove_extra_whitespaces=False,
    bos_id=1, eos_id=2, unk_id=0, pad_id=-1, user_defined_symbols=["<|im_start|>", "<|im_end|>"],
)
sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
pieces, scores, types = [], [], []
for i in range(sp.get_piece_size()):
    pieces.append(sp.id_to_piece(i))
    scores.append(sp.get_score(i))
    # ggml token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte
    types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                 else 4 if pieces[-1].startswith("<|") else 1)
texts = [
    "Hello world!",
    "The quick brown fox",
    " leading space and  double  spaces",
    "café 東京 🙂 unseen: ꙮ",
    "digits 2026 and 12345",
    "tokens token tokenizer",
    "",
    "line one\nline two",
]
cases = [{"text": t, "ids": sp.encode(t)} for t in texts]
OUT.write_text(json.dumps({"pieces": pieces, "scores": scores, "types": types, "cases": cases}, ensure_ascii=False) + "\n")
print(OUT, OUT.stat().st_size, [len(c["ids"]) for c in cases])
