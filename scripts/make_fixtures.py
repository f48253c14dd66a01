"""Builds the parity fixtures under crates/engine/tests/fixtures/.

For every architecture the engine supports, a tiny random model is built
with mlx-lm's own model class, quantized (or not) the way mlx-lm quantizes,
saved as an MLX model folder with mlx-lm's own writer, and - where the
weights have an exact GGUF form - written again as a GGUF file in
llama.cpp's conventions for that architecture. mlx-lm then computes the
reference logits (float32 activations over the very same weight values):
every position of a prompt in one call, and a greedy continuation with its
KV cache. The Rust test `tests/parity.rs` compares against these.

Run from the repository root with a Python that has mlx (mlx-cpu on Linux),
mlx-lm, numpy, gguf and tokenizers:

    python scripts/make_fixtures.py [NAME ...]   # all fixtures, or only those named

Deterministic: running it twice writes identical files.
"""

import json
import shutil
import sys
from pathlib import Path

import gguf
import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import quantize_model, save_config, save_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

OUT = Path(__file__).resolve().parent.parent / "crates/engine/tests/fixtures"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PROMPT = [101, 7, 200, 45, 45, 9, 130, 256, 3, 77, 18]
DECODE_STEPS = 6
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

BASE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=512,
)

# name: (model_type, extra config, quantization (bits, group) or None or dtype, gguf?)
FIXTURES = {
    "llama": ("llama", dict(rope_theta=50000.0, tie_word_embeddings=False), (4, 32), True),
    "llama3_scaled": (
        "llama",
        dict(rope_theta=500000.0, tie_word_embeddings=True,
             rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position_embeddings=64)),
        (4, 32),
        True,
    ),
    "llama_q8": ("llama", dict(tie_word_embeddings=True), (8, 64), False),
    "llama_f16": ("llama", dict(tie_word_embeddings=False), "float16", True),
    "mistral": ("mistral", dict(rope_theta=1000000.0, tie_word_embeddings=False), (4, 64), True),
    "qwen2": ("qwen2", dict(rope_theta=1000000.0, tie_word_embeddings=True), (4, 64), True),
    "qwen2_bf16": ("qwen2", dict(tie_word_embeddings=False), "bfloat16", False),
    "qwen3": ("qwen3", dict(head_dim=32, rope_theta=1000000.0, tie_word_embeddings=True), (4, 32), True),
    "qwen3_moe": (
        "qwen3_moe",
        dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
             decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
             rope_theta=1000000.0, tie_word_embeddings=False),
        (4, 32),
        True,
    ),
    "gemma2": (
        "gemma2",
        dict(num_hidden_layers=4, head_dim=32, query_pre_attn_scalar=32, attn_logit_softcapping=2.0,
             final_logit_softcapping=5.0, sliding_window=4096, hidden_activation="gelu_pytorch_tanh",
             rope_theta=10000.0),
        (4, 64),
        True,
    ),
    # Six layers: five slide over a window of 4 (with their own rope base), the
    # sixth is global, as in the released models and in GGUF's fixed pattern.
    "gemma3": (
        "gemma3_text",
        dict(num_hidden_layers=6, head_dim=32, query_pre_attn_scalar=32, sliding_window=4,
             sliding_window_pattern=6, rope_theta=1000000.0, rope_local_base_freq=10000.0),
        (4, 64),
        True,
    ),
    "phi3": ("phi3", dict(rope_theta=10000.0, tie_word_embeddings=False), (4, 32), True),
    # Long-context scalings, their trained context set to 64 so that every
    # band of the 8 rotated pairs is touched.
    "qwen2_yarn": (
        "qwen2",
        dict(rope_theta=1000000.0, tie_word_embeddings=True,
             rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=64)),
        (4, 64),
        True,
    ),
    "phi3_longrope": (
        "phi3",
        dict(rope_theta=10000.0, tie_word_embeddings=False, original_max_position_embeddings=64,
             rope_scaling=dict(type="longrope", short_factor=[1.0 + 0.05 * i for i in range(8)],
                               long_factor=[1.0 + 1.5 * i for i in range(8)])),
        (4, 32),
        True,
    ),
}

GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "qwen3_moe": "qwen3moe", "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}


def byte_chars():
    """GPT-2's printable stand-ins for the 256 byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return [out[b] for b in range(256)]


def tokenizer_vocab():
    chars = byte_chars()
    vocab = chars + ["ab", "abab"] + SPECIALS
    merges = [("a", "b"), ("ab", "ab")]
    return vocab, merges


def write_tokenizer(folder: Path):
    vocab, merges = tokenizer_vocab()
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "add_bos_token": False,
        "chat_template": TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast",
    }, indent=2) + "\n")
    eos = [vocab.index("<|im_end|>"), vocab.index("<|endoftext|>")]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}, indent=2) + "\n")
    return len(vocab)


def build(name, model_type, extra, quant):
    vocab, _ = tokenizer_vocab()
    config = dict(BASE, model_type=model_type, vocab_size=len(vocab), **extra)
    model_cls, args_cls = mlx_lm.utils._get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    # Deterministic, non-degenerate weights: N(0, 1/sqrt(fan_in)) matrices,
    # norms near 1 (Gemma: near 0, as it multiplies by 1 + w).
    seed = sum(ord(c) for c in name)
    rng = np.random.default_rng(seed)
    gemma = model_type.startswith("gemma")

    def init(path, p):
        if "norm" in path:
            base = 0.0 if gemma else 1.0
            return mx.array(base + 0.1 * rng.standard_normal(p.shape), dtype=mx.float32)
        if p.ndim == 1:  # biases
            return mx.array(0.1 * rng.standard_normal(p.shape), dtype=mx.float32)
        fan_in = p.shape[-1]
        scale = 1.0 if "embed" in path else 1.5 / np.sqrt(fan_in)
        return mx.array(scale * rng.standard_normal(p.shape), dtype=mx.float32)

    flat = tree_flatten(model.parameters())
    model.load_weights([(k, init(k, v)) for k, v in flat])
    dtype = {"float16": mx.float16, "bfloat16": mx.bfloat16}.get(quant, mx.float16)
    model.set_dtype(dtype)
    if isinstance(quant, tuple):
        bits, group = quant

        def predicate(path, module):
            if path.endswith("mlp.gate"):
                return False  # the MoE router stays dense (as a GGUF F16 tensor too)
            if name == "llama_q8" and path == "model.layers.0.mlp.down_proj":
                return {"group_size": 32, "bits": 4, "mode": "affine"}
            return True

        model, config = quantize_model(model, config, group, bits, quant_predicate=predicate)
    mx.eval(model.parameters())
    return model, config


def reference(model):
    """mlx-lm's logits in float32 over the same weight values."""
    model.update(tree_map(lambda p: p.astype(mx.float32) if p.dtype in (mx.float16, mx.bfloat16) else p,
                          model.parameters()))
    prefill = model(mx.array([PROMPT]))[0]
    cache = make_prompt_cache(model)
    logits = model(mx.array([PROMPT]), cache=cache)[0, -1]
    greedy, decode = [], []
    for _ in range(DECODE_STEPS):
        tok = int(mx.argmax(logits).item())
        greedy.append(tok)
        logits = model(mx.array([[tok]]), cache=cache)[0, -1]
        decode.append(logits)
    r = lambda a: [float(f"{v:.5g}") for v in np.array(a, dtype=np.float32)]
    return {"prompt": PROMPT, "prefill_logits": [r(row) for row in prefill], "greedy": greedy,
            "decode_logits": [r(row) for row in decode]}


# ---- GGUF ---------------------------------------------------------------

def unpack(words: np.ndarray, bits: int) -> np.ndarray:
    """uint32 words [rows, n] to values [rows, n * 32 / bits]."""
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None, :]
    v = (words[:, :, None] >> shifts) & ((1 << bits) - 1)
    return v.reshape(words.shape[0], -1).astype(np.uint8)


def q4_1_rows(w, scales, biases, group):
    """MLX 4-bit rows as Q4_1 blocks (exact): bytes [rows, cols / 32 * 20]."""
    q = unpack(np.array(w), 4)
    rows, cols = q.shape
    s = np.repeat(np.array(scales.astype(mx.float16)), group // 32, axis=1).astype(np.float16)
    b = np.repeat(np.array(biases.astype(mx.float16)), group // 32, axis=1).astype(np.float16)
    q = q.reshape(rows, cols // 32, 32)
    nib = q[:, :, :16] | (q[:, :, 16:] << 4)
    blocks = np.concatenate([s.view(np.uint8).reshape(rows, -1, 2), b.view(np.uint8).reshape(rows, -1, 2), nib], axis=2)
    return blocks.reshape(rows, -1)


def rope_permute(a: np.ndarray, n_heads: int) -> np.ndarray:
    """Hugging Face rotary layout to llama.cpp's (rows of each head interleaved)."""
    rows = a.shape[0]
    hd = rows // n_heads
    return a.reshape(n_heads, 2, hd // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def gguf_name(hf: str, model_type: str) -> str:
    if hf == "model.embed_tokens":
        return "token_embd"
    if hf == "model.norm":
        return "output_norm"
    if hf == "lm_head":
        return "output"
    parts = hf.split(".")
    i, rest = parts[2], ".".join(parts[3:])
    table = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv",
        "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
        "post_attention_layernorm": "post_attention_norm" if model_type.startswith("gemma") else "ffn_norm",
        "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
        "mlp.gate_up_proj": "ffn_up", "mlp.gate": "ffn_gate_inp",
        "mlp.switch_mlp.gate_proj": "ffn_gate_exps", "mlp.switch_mlp.up_proj": "ffn_up_exps",
        "mlp.switch_mlp.down_proj": "ffn_down_exps",
    }
    return f"blk.{i}.{table[rest]}"


def write_gguf(path: Path, model, config, model_type, quant):
    arch = GGUF_ARCH[model_type]
    w = gguf.GGUFWriter(str(path), arch)
    n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(config.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if model_type == "gemma2":
        w.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        w.add_final_logit_softcapping(config["final_logit_softcapping"])
    if model_type.startswith("gemma"):
        w.add_sliding_window(config["sliding_window"])
    if model_type == "qwen3_moe":
        w.add_expert_count(config["num_experts"])
        w.add_expert_used_count(config["num_experts_per_tok"])
        w.add_expert_feed_forward_length(config["moe_intermediate_size"])
    scaling = config.get("rope_scaling")
    if scaling and scaling.get("rope_type") == "llama3":
        # As llama.cpp's converter writes them: per-pair divisors of the frequencies.
        base, dim = config["rope_theta"], head_dim
        old, low, high, factor = (scaling["original_max_position_embeddings"], scaling["low_freq_factor"],
                                  scaling["high_freq_factor"], scaling["factor"])
        factors = []
        for i in range(dim // 2):
            wavelen = 2 * np.pi * base ** (2 * i / dim)
            if wavelen < old / high:
                factors.append(1.0)
            elif wavelen > old / low:
                factors.append(factor)
            else:
                smooth = (old / wavelen - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        w.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))
    if scaling and scaling.get("type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(scaling["factor"])
        w.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
    if scaling and scaling.get("type") == "longrope":
        # As llama.cpp's Phi-3 converter writes them: both factor lists as
        # tensors, the query/key multiplier as the attention factor.
        old, ctx = config["original_max_position_embeddings"], config["max_position_embeddings"]
        w.add_tensor("rope_factors_long.weight", np.array(scaling["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(scaling["short_factor"], dtype=np.float32))
        w.add_rope_scaling_attn_factors(float(np.sqrt(1 + np.log(ctx / old) / np.log(old))))
        w.add_rope_scaling_orig_ctx_len(old)
    vocab, merges = tokenizer_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab)
    w.add_token_merges([f"{a} {b}" for a, b in merges])
    w.add_token_types([3 if t in SPECIALS else 1 for t in vocab])
    w.add_eos_token_id(vocab.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)

    params = dict(tree_flatten(model.parameters()))
    adjacent = model_type in ("llama", "mistral")
    gemma = model_type.startswith("gemma")
    bases = sorted({k.rsplit(".", 1)[0] for k in params})
    for base in bases:
        name = gguf_name(base, model_type)
        heads = n_heads if base.endswith("q_proj") else n_kv if base.endswith("k_proj") else None
        perm = (lambda a: rope_permute(a, heads)) if adjacent and heads else (lambda a: a)
        if f"{base}.scales" in params:
            group = config["quantization"].get(base, {}).get("group_size", quant[1])
            wq, s, b = params[f"{base}.weight"], params[f"{base}.scales"], params[f"{base}.biases"]
            if wq.ndim == 3:  # stacked experts
                data = np.stack([q4_1_rows(wq[e], s[e], b[e], group) for e in range(wq.shape[0])])
            else:
                data = perm(q4_1_rows(wq, s, b, group))
            w.add_tensor(f"{name}.weight", data, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
            # Independent check: gguf's own dequantizer gives MLX's values.
            deq = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q4_1)
            want = np.array(mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=group, bits=4))
            want = want if wq.ndim == 3 else perm(want)
            assert deq.shape == want.shape and np.array_equal(deq, want), (base, deq.shape, want.shape, np.abs(deq - want).max() if deq.shape == want.shape else None)
        for suffix in ("weight", "bias"):
            key = f"{base}.{suffix}"
            if key not in params or f"{base}.scales" in params and suffix == "weight":
                continue
            a = np.array(params[key].astype(mx.float32))
            if "norm" in base and gemma:
                a = a + 1.0  # llama.cpp multiplies by the stored Gemma norm weight
            a = perm(a)
            if a.ndim == 1 or quant != "float16":
                w.add_tensor(f"{name}.{suffix}", a.astype(np.float32))
            else:
                w.add_tensor(f"{name}.{suffix}", a.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main(names):
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.iterdir():  # README.md stays
        if old.is_dir() and (not names or old.name in names):
            shutil.rmtree(old)
    for name, (model_type, extra, quant, with_gguf) in FIXTURES.items():
        if names and name not in names:
            continue
        model, config = build(name, model_type, extra, quant)
        folder = OUT / name / "mlx"
        folder.mkdir(parents=True)
        save_model(folder, model)
        save_config(dict(config), folder / "config.json")
        write_tokenizer(folder)
        if with_gguf:
            write_gguf(OUT / name / "model.gguf", model, config, model_type, quant)
        ref = reference(model)
        ref = {"model_type": model_type, "mlx_lm": mlx_lm.__version__, **ref}
        (OUT / name / "reference.json").write_text(json.dumps(ref) + "\n")
        size = sum(f.stat().st_size for f in (OUT / name).rglob("*") if f.is_file())
        print(f"{name:<12} {model_type:<10} {str(quant):<10} gguf={with_gguf} {size / 1e3:.0f} KB")


if __name__ == "__main__":
    unknown = set(sys.argv[1:]) - set(FIXTURES)
    if unknown:
        sys.exit(f"unknown fixtures: {sorted(unknown)} (known: {', '.join(FIXTURES)})")
    main(set(sys.argv[1:]))
