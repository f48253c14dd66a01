#!/usr/bin/env bash
# Fuzzes the model-file parsers (GGUF, safetensors) for a bounded time each:
#   bash scripts/fuzz.sh [seconds per target, default 60]
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
# Seeds come from real files: the default model's first 64 KiB (GGUF) and a
# parity fixture's weights (safetensors). A crash leaves its input under
# fuzz/artifacts/<target>/; keep it as a regression test and fix the parser.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
mkdir -p fuzz/corpus/gguf_header fuzz/corpus/safetensors_header
for f in crates/engine/tests/fixtures/*/model.gguf; do cp "$f" "fuzz/corpus/gguf_header/$(basename "$(dirname "$f")").gguf"; done
[ -f models/SmolLM2-135M-Instruct.Q4_1.gguf ] && head -c 65536 models/SmolLM2-135M-Instruct.Q4_1.gguf > fuzz/corpus/gguf_header/smollm2-head.gguf
for f in crates/engine/tests/fixtures/*/mlx/model.safetensors; do cp "$f" "fuzz/corpus/safetensors_header/$(basename "$(dirname "$(dirname "$f")")").safetensors"; done
cd fuzz
for target in gguf_header safetensors_header; do
  cargo +nightly fuzz run "$target" "corpus/$target" -- -max_total_time="$secs" -max_len=1048576 -rss_limit_mb=4096 2>&1 | tail -n 4
done
