#!/usr/bin/env bash
# zturbo vs diffusers, side by side on this machine's CPU (see benches/compare/README.md).
#   benches/compare/run.sh [--cases tiny@128,medium@256,medium@512] [--runs 5] [--steps 8]
#                          [--threads N] [--cfg 1.0] [--precision auto|f32] [--no-mkl]
# Creates benches/compare/.venv from requirements.txt when missing, builds the Rust side in the
# bench profile, builds the random-weight models under target/compare-models/, and prints one table
# per case and precision; the last two lines are `like_for_like: total_ratio=... step_ratio=...`
# (both f32) and `summary: total_ratio=... step_ratio=... psnr_db=...` (zturbo auto), medium@512.
set -euo pipefail
cd "$(dirname "$0")/../.."
here=benches/compare
# COMPARE_VENV: an existing venv with the requirements (torch, diffusers) instead of creating one.
venv=${COMPARE_VENV:-$here/.venv}
if [ -n "${COMPARE_VENV:-}" ]; then
  : # used as it is
elif [ ! -x "$venv/bin/python" ] || ! cmp -s "$here/requirements.txt" "$venv/requirements.txt"; then
  echo "creating $venv from $here/requirements.txt ..." >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt" >&2
  cp "$here/requirements.txt" "$venv/requirements.txt"
fi
# zturbo is built with MKL (required: --features mkl; build.rs fetches the static libraries from
# PyPI) unless --no-mkl (ZTURBO_MKL=0: pure-Rust products).
features=(--features mkl)
args=()
for a in "$@"; do
  if [ "$a" = "--no-mkl" ]; then features=(); export ZTURBO_MKL=0; else args+=("$a"); fi
done
set -- "${args[@]+"${args[@]}"}"
echo "building the zturbo side (cargo bench profile${features[*]:+, ${features[*]}}) ..." >&2
bench_bin=$(cargo bench --locked "${features[@]}" --bench compare_zturbo --no-run --message-format=json 2>/dev/null \
  | "$venv/bin/python" -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "compare_zturbo" and m.get("executable"):
        print(m["executable"])')
if [ -z "$bench_bin" ]; then
  cargo bench --locked "${features[@]}" --bench compare_zturbo --no-run >&2  # show the build error
  exit 1
fi
exec "$venv/bin/python" "$here/compare.py" --bench-bin "$bench_bin" "$@"
