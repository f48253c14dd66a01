#!/usr/bin/env bash
# Runs every test: the Rust workspace, then the TypeScript suite on the real
# default model with Node's test runner (through tsx). Run setup.sh first
# (`npm test` does).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --release
node --import tsx --test --test-concurrency=1 __test__/*.test.ts
