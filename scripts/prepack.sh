#!/usr/bin/env bash
# Runs before `npm pack` / `npm publish`: the package ships the built addon
# and dist/, so both must exist; the addon loses its debug info (line tables
# for perf and callgrind in a checkout, 50 MB nobody installing needs) but
# keeps its symbols, so profiles of an installed package still name functions.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
addons=(*.node)
if [ ${#addons[@]} -eq 0 ] || [ ! -f dist/index.js ]; then
  echo "prepack: build first (npm run setup): no addon or no dist/" >&2
  exit 1
fi
for f in "${addons[@]}"; do
  case "$(uname -s)" in
    Darwin) strip -S "$f" ;;
    *) objcopy --strip-debug "$f" ;;
  esac
done
