#!/usr/bin/env bash
# Installs Intel MKL's static libraries from PyPI under target/mkl through pip. build.rs does the same
# by itself (curl, the pinned wheel of build.rs) on x86-64 Linux; this script is the manual route (a
# proxy pip knows about, or a retry after target/mkl/fetch-failed). About 250 MB download.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=target/mkl
version=2026.2.0
libs_tag=seq1
if [ -f "$dest/lib/libmkl_core.a" ] && [ "$(cat "$dest/version" 2>/dev/null)" = "$version-$libs_tag" ]; then
  exit 0
fi
py=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching mkl-static $version from PyPI ..." >&2
"$py" -m pip download --quiet --disable-pip-version-check --no-deps --dest "$tmp" \
  "mkl-static==$version" >&2
rm -rf "$dest"
mkdir -p "$dest/lib"
"$py" - "$tmp" "$dest/lib" <<'PY'
import sys, zipfile, pathlib
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
want = {"libmkl_intel_lp64.a", "libmkl_sequential.a", "libmkl_core.a"}
for whl in src.glob("*.whl"):
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            base = name.rsplit("/", 1)[-1]
            if base in want:
                (dst / base).write_bytes(z.read(name))
                want.discard(base)
if want:
    sys.exit(f"missing from the wheel: {sorted(want)}")
PY
echo "$version-$libs_tag" > "$dest/version"
rm -f "$dest/fetch-failed"
echo "MKL static libraries in $dest/lib" >&2
