#!/usr/bin/env bash
# Builds what the package ships: npm packages, libmlx (for the mlx backend),
# the native addon (release; skipped when newer than every source) and the
# TypeScript API in dist/. Run by scripts/setup.sh and by deploy/Dockerfile.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[build] %s\n' "$*" >&2; }

if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  log "installing npm packages"
  npm ci --no-audit --no-fund
fi

bash scripts/fetch-mlx.sh

addon=$(ls mlx-serving.*.node 2>/dev/null | head -n 1 || true)
if [ -n "$addon" ] && [ -z "$(find Cargo.toml Cargo.lock build.rs src crates .mlx/.installed -newer "$addon" -print -quit 2>/dev/null)" ]; then
  log "native addon is current ($addon)"
else
  log "building the native addon (release)"
  npx napi build --platform --release -p mlx-serving-node >&2
fi

log "compiling the TypeScript API"
npx tsc -p tsconfig.json
