"""Writes crates/engine/src/testdata/kquants.json: random Q4_K, Q5_K,
Q6_K super-blocks and Q5_0, Q5_1 blocks with the values llama.cpp's Python package (`gguf`)
dequantizes them to, so the Rust reader is checked against an independent
implementation. Run with a Python that has numpy and gguf."""

import json
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

OUT = Path(__file__).resolve().parent.parent / "crates/engine/src/testdata/kquants.json"
rng = np.random.default_rng(7)


def blocks(qtype, n):
    size = {T.Q4_K: 144, T.Q5_K: 176, T.Q6_K: 210, T.Q5_0: 22, T.Q5_1: 24}[qtype]
    b = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    # Keep the f16 scales finite and small: d (and dmin) at the front, Q6_K's d at the end.
    d = (rng.standard_normal((n, 2)) * 0.01).astype(np.float16).view(np.uint8)
    if qtype == T.Q6_K:
        b[:, 208:210] = d[:, :2]
    elif qtype == T.Q5_0:
        b[:, 0:2] = d[:, :2]
    else:
        b[:, 0:4] = d
    return b


out = {}
for qtype in (T.Q4_K, T.Q5_K, T.Q6_K, T.Q5_0, T.Q5_1):
    b = blocks(qtype, 2 if qtype in (T.Q4_K, T.Q5_K, T.Q6_K) else 16)
    vals = quants.dequantize(b.reshape(-1), qtype)
    out[qtype.name] = {"bytes": b.reshape(-1).tolist(), "values": [float(v) for v in vals.reshape(-1)]}
OUT.parent.mkdir(parents=True, exist_ok=True)
OUT.write_text(json.dumps(out) + "\n")
print(OUT, OUT.stat().st_size)
