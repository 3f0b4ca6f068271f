# Sourced by the GPU scripts (gpu_check.sh, gpu_profile.sh) with BIN set: unpacks the carried
# binaries `zturbo` and `memory` (plain or .xz) into $WORK and puts the CUDA 13 libraries of the GPU
# machine's preinstalled PyTorch (cu13 build: libcublas.so.13 & co.) on the library path.
WORK=$(mktemp -d)
for b in zturbo memory; do
  if [ -f "$BIN/$b.xz" ]; then
    python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" "$BIN/$b.xz" "$WORK/$b"
  else
    cp "$BIN/$b" "$WORK/$b"
  fi
  chmod +x "$WORK/$b"
done
SP=$(python3 -c 'import site;print(site.getsitepackages()[0])' 2>/dev/null || true)
if [ -n "$SP" ] && [ -d "$SP/nvidia/cu13/lib" ]; then
  export LD_LIBRARY_PATH="$SP/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
fi
