#!/usr/bin/env bash
# GPU check, run on a CUDA machine from the repository root, given binaries built elsewhere with
# `--features cuda` (recipe in README.md, "GPU build"):
#
#   benches/gpu_check.sh <folder with `zturbo` and the `memory` bench binary> <output folder>
#
# 1. parity on the GPU: the tiny golden runs through `zturbo generate --device cuda --precision f32`
#    (latents saved for comparison with the diffusers goldens on any machine);
# 2. the real-shaped Z-Image-Turbo (6.15 B DiT + Qwen3-4B, random bf16 weights written once to
#    $ZT_MODEL_DIR) at 1024², 8 steps: every memory mode, CFG 1.8 and 1.0, time and peak device memory.
set -euo pipefail
BIN=${1:?binary folder}
OUT=${2:?output folder}
mkdir -p "$OUT"
ZT_MODEL_DIR=${ZT_MODEL_DIR:-/tmp/zturbo-real}
RUNS=${RUNS:-3}

# The CUDA 13 libraries of the preinstalled PyTorch (cu13 build) provide libcublas.so.13 & co.
SP=$(python3 -c 'import site;print(site.getsitepackages()[0])' 2>/dev/null || true)
if [ -n "$SP" ] && [ -d "$SP/nvidia/cu13/lib" ]; then
  export LD_LIBRARY_PATH="$SP/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1 || true
cat "$OUT/gpu.txt"
ldd "$BIN/zturbo" | grep -E "cuda|cublas|curand|not found" > "$OUT/ldd.txt" || true

echo "== 1. tiny golden parity on the GPU"
for run in cfg0 cfg18; do
  extra=(--cfg 1.0)
  [ "$run" = cfg18 ] && extra=(--cfg 2.8 --negative-prompt blurry)
  "$BIN/zturbo" generate --model tests/fixtures/tiny-z-image --device cuda --precision f32 --enhance off \
    --prompt "a serene mountain lake at dawn" --width 128 --height 128 --steps 8 --seed 42 "${extra[@]}" \
    --init-latents "$BIN/init_latents.safetensors" --save-latents "$OUT/tiny_$run.safetensors" \
    --output "$OUT/tiny_$run.png" 2>&1 | tail -3
done

echo "== 2. real-shaped model, 1024², 8 steps"
"$BIN/memory" --model-dir "$ZT_MODEL_DIR" --shape real --sizes 1024 --steps 8 --cfg 1.8 --runs "$RUNS" \
  --device cuda --precision auto --modes performance,balanced,low 2>&1 | tee "$OUT/memory_real_cfg1.8.txt"
"$BIN/memory" --model-dir "$ZT_MODEL_DIR" --shape real --sizes 1024 --steps 8 --cfg 1.0 --runs "$RUNS" \
  --device cuda --precision auto --modes performance 2>&1 | tee "$OUT/memory_real_cfg1.0.txt"
echo "== done"
