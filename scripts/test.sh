#!/usr/bin/env bash
# Runs every test: the Rust workspace, the engine's load / generate / abort /
# unload cycle under valgrind (leakcheck.sh), then the TypeScript suite on the
# real default model with Node's test runner (through tsx). Run setup.sh
# first (`npm test` does).
set -euo pipefail
cd "$(dirname "$0")/.."
# setup.sh fetched libmlx: the MLX crate's tests must run, not skip.
MLX_REQUIRED=1 cargo test --workspace --release
bash scripts/leakcheck.sh
node --import tsx --test --test-concurrency=1 __test__/*.test.ts
