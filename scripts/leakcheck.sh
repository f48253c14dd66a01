#!/usr/bin/env bash
# Runs the engine's load / generate / abort / unload cycle (the `leak_cycle`
# test in crates/engine/src/leakcheck.rs) under valgrind's memcheck. Fails on
# definitely lost memory or any memory error. Possibly lost and still
# reachable blocks pass: they are process-lifetime globals (rayon's pool
# threads, which are never joined; lazily built statics).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[leakcheck] %s\n' "$*" >&2; }

if ! command -v valgrind >/dev/null; then
  log "valgrind is missing: run scripts/setup.sh (as root) or install valgrind"
  exit 1
fi

# The same cargo selection as test.sh's `cargo test`: features unify per
# selection, so `-p mlx-serving-engine` would build a second test binary.
bin=$(cargo test --workspace --release --no-run --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"] \
            and t.get("name") == "mlx_serving_engine" and "lib" in t.get("kind", []):
        print(m["executable"])
')
[ -x "$bin" ] || { log "cannot find the engine's test binary"; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s%N)
rc=0
RAYON_NUM_THREADS=2 valgrind --leak-check=full --show-leak-kinds=definite \
  --errors-for-leak-kinds=definite --error-exitcode=1 --num-callers=30 \
  --log-file="$tmp/valgrind.log" \
  "$bin" --exact leakcheck::leak_cycle --test-threads=1 >"$tmp/test.log" 2>&1 || rc=$?
secs=$(awk -v a="$start" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')

# With nothing left on the heap valgrind prints no LEAK SUMMARY: 0 bytes.
bytes() {
  local n
  n=$(sed -n "s/.*$1: \([0-9,]*\) bytes.*/\1/p" "$tmp/valgrind.log" | tr -d , | head -1)
  echo "${n:-0}"
}
errors=$(sed -n 's/.*ERROR SUMMARY: \([0-9]*\) errors.*/\1/p' "$tmp/valgrind.log" | tail -1)
log "definitely lost: $(bytes 'definitely lost') B, indirectly lost: $(bytes 'indirectly lost') B, errors: ${errors:-?}, ${secs} s"

# A filter that matches nothing would pass silently: the test must have run.
if [ "$rc" = 0 ] && ! grep -q '^test result: ok. 1 passed' "$tmp/test.log"; then
  log "leak_cycle did not run"
  rc=1
fi
if [ "$rc" != 0 ]; then
  cat "$tmp/test.log" "$tmp/valgrind.log" >&2
  log "FAILED (exit $rc): definitely lost memory, a memory error or a failing test (details above)"
  exit 1
fi
