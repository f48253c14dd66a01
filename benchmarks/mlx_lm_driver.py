"""mlx-lm's side of benchmarks/mlx-vs-mlx-lm.ts: loads an MLX model folder
with mlx-lm and answers one JSON request per stdin line with one JSON line:
{"tokens": [...], "n": 16} -> {"ttftMs": ..., "decodeTokPerS": ..., "generated": ...}.
Greedy (mlx-lm's default sampler); the prompt is given as token ids so
both engines see the same tokens."""
import json
import sys
import time

from mlx_lm import load, stream_generate


def main():
    model, tokenizer = load(sys.argv[1])
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        t0 = time.perf_counter()
        t_first = None
        n = 0
        for _ in stream_generate(model, tokenizer, req["tokens"], max_tokens=req["n"]):
            n += 1
            if n == 1:
                t_first = time.perf_counter()
        t_end = time.perf_counter()
        decode = (n - 1) / (t_end - t_first) if n > 1 else 0.0
        print(json.dumps({"ttftMs": (t_first - t0) * 1e3, "decodeTokPerS": decode, "generated": n}), flush=True)


if __name__ == "__main__":
    main()
