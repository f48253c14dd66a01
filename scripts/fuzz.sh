#!/usr/bin/env bash
# Fuzzes the model-file parsers (GGUF, safetensors) and the path from a
# file's shape numbers to a loaded model, for a bounded time each:
#   bash scripts/fuzz.sh [seconds per target, default 60]
# Under a memory limit: one allocation over 1 GiB, or 2 GiB resident, is a
# finding (a size taken from the file before it was checked).
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
# Seeds come from real files: the default model's first 64 KiB (GGUF) and a
# parity fixture's weights (safetensors). A crash leaves its input under
# fuzz/artifacts/<target>/; keep it as a regression test and fix the parser.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
mkdir -p fuzz/corpus/gguf_header fuzz/corpus/safetensors_header fuzz/corpus/model_shapes
for f in crates/engine/tests/fixtures/*/model.gguf; do cp "$f" "fuzz/corpus/gguf_header/$(basename "$(dirname "$f")").gguf"; done
[ -f models/SmolLM2-135M-Instruct.Q4_1.gguf ] && head -c 65536 models/SmolLM2-135M-Instruct.Q4_1.gguf > fuzz/corpus/gguf_header/smollm2-head.gguf
for f in crates/engine/tests/fixtures/*/mlx/model.safetensors; do cp "$f" "fuzz/corpus/safetensors_header/$(basename "$(dirname "$(dirname "$f")")").safetensors"; done
# model_shapes: a mode byte, then (key, u64) pairs (GGUF) or a config.json (MLX).
printf '\000\001\002\000\000\000\000\000\000\000' > fuzz/corpus/model_shapes/gguf-layers
{ printf '\001'; cat crates/engine/tests/fixtures/llama/mlx/config.json; } > fuzz/corpus/model_shapes/mlx-config
cd fuzz
for target in gguf_header safetensors_header model_shapes; do
  cargo +nightly fuzz run "$target" "corpus/$target" -- -max_total_time="$secs" -max_len=1048576 -malloc_limit_mb=1024 -rss_limit_mb=2048 2>&1 | tail -n 4
done
