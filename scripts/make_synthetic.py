"""Writes GGUF models of real shapes with random weights, for benchmarks at
the sizes people serve (the default model fits in a server's last-level
cache; these stream from DRAM).

Every tensor is in the block format and the mix a real file of that name
uses (llama.cpp's Q4_K_M: Q6_K for the output/tied embedding, for attn_v
and ffn_down in the first and last eighth of the layers and every third
layer between, Q4_K elsewhere), with random block contents scaled so that
activations stay finite. Metadata and tokenizer come from the default
model (SmolLM2's 49,152-token vocabulary), so prompts tokenize as usual.

    python3 scripts/make_synthetic.py [--out models/synthetic] [NAME ...]

Needs the PyPI package `gguf` (and numpy). Deterministic: the same name
gives the same bytes.
"""

import argparse
import sys
from pathlib import Path

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"

# name: (architecture, hidden, layers, heads, kv heads, ffn, rope base, q/k/v bias, mix)
MODELS = {
    # Llama-3.2-1B's shapes.
    "llama-1b-q4_0": ("llama", 2048, 16, 32, 8, 8192, 500000.0, False, "q4_0"),
    "llama-1b-q4_k_m": ("llama", 2048, 16, 32, 8, 8192, 500000.0, False, "q4_k_m"),
    # Qwen2.5-1.5B's shapes (its q/k/v projections carry biases).
    "qwen2-1.5b-q4_k_m": ("qwen2", 1536, 28, 12, 2, 8960, 1000000.0, True, "q4_k_m"),
    # Llama-3.2-3B's shapes.
    "llama-3b-q4_k_m": ("llama", 3072, 28, 24, 8, 8192, 500000.0, False, "q4_k_m"),
}


def f16_bytes(rng, n, scale):
    """n random positive f16 scales around `scale`, as bytes."""
    return (rng.uniform(0.5, 1.5, n) * scale).astype(np.float16).view(np.uint8).reshape(n, 2)


def random_blocks(rng, qtype, rows, cols):
    """A rows x cols matrix of random `qtype` blocks; weights have a
    standard deviation near 0.02, as trained models' do."""
    n = rows * cols // gguf.GGML_QUANT_SIZES[qtype][0]
    raw = lambda width: rng.integers(0, 256, (n, width), dtype=np.uint8)  # noqa: E731
    if qtype == Q.Q4_0:  # d, 16 bytes of nibbles (value - 8)
        blocks = np.concatenate([f16_bytes(rng, n, 0.02 / 4.6), raw(16)], axis=1)
    elif qtype == Q.Q8_0:  # d, 32 int8
        blocks = np.concatenate([f16_bytes(rng, n, 0.02 / 74), raw(32)], axis=1)
    elif qtype == Q.Q4_K:  # d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
        blocks = np.concatenate([f16_bytes(rng, n, 0.02 / 150), f16_bytes(rng, n, 0.02 / 300), raw(12), raw(128)], axis=1)
    elif qtype == Q.Q6_K:  # ql, qh, 16 int8 scales, d
        scales = rng.integers(1, 32, (n, 16), dtype=np.int8).view(np.uint8)
        blocks = np.concatenate([raw(128), raw(64), scales, f16_bytes(rng, n, 0.02 / 300)], axis=1)
    else:
        raise ValueError(qtype)
    return np.ascontiguousarray(blocks).reshape(rows, -1)


def layer_qtype(mix, kind, layer, n_layers):
    if mix == "q4_0":
        return Q.Q4_0
    # llama.cpp's use_more_bits for Q4_K_M.
    more = layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2
    return Q.Q6_K if kind in ("attn_v", "ffn_down") and more else Q.Q4_K


def copy_tokenizer(reader, writer):
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)


def write(name, out_dir):
    arch, hidden, n_layers, n_heads, n_kv, ffn, rope_base, bias, mix = MODELS[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    head_dim = hidden // n_heads
    reader = gguf.GGUFReader(DEFAULT_MODEL)
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    path = out_dir / f"{name}.gguf"
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"synthetic {name}")
    w.add_context_length(8192)
    w.add_embedding_length(hidden)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope_base)
    w.add_layer_norm_rms_eps(1e-5 if arch == "llama" else 1e-6)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if mix == "q4_0" else gguf.LlamaFileType.MOSTLY_Q4_K_M)
    copy_tokenizer(reader, w)

    ones = lambda n: np.ones(n, dtype=np.float32)  # noqa: E731
    # Tied embeddings (as all four reference models have): the output layer's Q6_K.
    w.add_tensor("token_embd.weight", random_blocks(rng, Q.Q6_K, n_vocab, hidden), raw_dtype=Q.Q6_K)
    for i in range(n_layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones(hidden))
        for kind, rows in [("attn_q", hidden), ("attn_k", n_kv * head_dim), ("attn_v", n_kv * head_dim), ("attn_output", hidden)]:
            qt = layer_qtype(mix, kind, i, n_layers)
            w.add_tensor(p + kind + ".weight", random_blocks(rng, qt, rows, hidden), raw_dtype=qt)
            if bias and kind != "attn_output":
                w.add_tensor(p + kind + ".bias", rng.normal(0, 0.02, rows).astype(np.float32))
        w.add_tensor(p + "ffn_norm.weight", ones(hidden))
        for kind, rows, cols in [("ffn_gate", ffn, hidden), ("ffn_up", ffn, hidden), ("ffn_down", hidden, ffn)]:
            qt = layer_qtype(mix, kind, i, n_layers)
            w.add_tensor(p + kind + ".weight", random_blocks(rng, qt, rows, cols), raw_dtype=qt)
    w.add_tensor("output_norm.weight", ones(hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{path}: {path.stat().st_size / 1e6:.0f} MB")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "models/synthetic")
    ap.add_argument("names", nargs="*", metavar="NAME", help=", ".join(MODELS))
    args = ap.parse_args()
    unknown = [n for n in args.names if n not in MODELS]
    if unknown:
        sys.exit(f"unknown model {unknown[0]!r}; known: {', '.join(MODELS)}")
    if not DEFAULT_MODEL.exists():
        sys.exit(f"{DEFAULT_MODEL} is missing: run `npm run setup` first")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.names or MODELS:
        write(name, args.out)


if __name__ == "__main__":
    main()
