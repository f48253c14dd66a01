#!/usr/bin/env bash
# Puts libmlx and its headers under .mlx/ (the MLX backend's build finds them
# there, or wherever MLX_DIR points): the platform's MLX wheel from PyPI,
# unpacked as it is (libmlx.so finds its BLAS/LAPACK through its own rpath).
# No Python is needed at run time; pip only downloads.
#   MLX_WHEEL=mlx-cuda-13 bash scripts/fetch-mlx.sh   # NVIDIA (or mlx-cuda-12)
set -euo pipefail
cd "$(dirname "$0")/.."

MLX_VERSION=0.32.4
case "$(uname -s)" in
  Darwin) default=mlx-metal ;;
  *) default=mlx-cpu ;;
esac
WHEEL="${MLX_WHEEL:-$default}"
DEST=.mlx
STAMP="$DEST/.installed"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WHEEL==$MLX_VERSION" ]; then
  exit 0
fi
printf '[setup] fetching %s==%s (libmlx for the MLX backend)\n' "$WHEEL" "$MLX_VERSION" >&2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps --disable-pip-version-check -q -d "$tmp" "$WHEEL==$MLX_VERSION"
rm -rf "$DEST"
mkdir -p "$DEST"
python3 - "$tmp" "$DEST" <<'PY'
import glob, os, sys, zipfile
tmp, dest = sys.argv[1:]
wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if ".dist-info/" in info.filename:
            continue
        path = z.extract(info, dest)
        # Zip files carry Unix modes in the high bits; keep libraries executable.
        mode = info.external_attr >> 16
        if mode:
            os.chmod(path, mode)
PY
test -f "$DEST/mlx/include/mlx/mlx.h" || { echo "[setup] $WHEEL has no MLX headers" >&2; exit 1; }
echo "$WHEEL==$MLX_VERSION" > "$STAMP"
