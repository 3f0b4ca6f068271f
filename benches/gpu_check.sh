#!/usr/bin/env bash
# GPU check, run on a CUDA machine from the repository root, given binaries built elsewhere with
# `--features cuda` (recipe in README.md, "GPU build"):
#
#   benches/gpu_check.sh <folder with zturbo[.xz], memory[.xz], init_latents.safetensors> <output folder>
#
# 1. parity on the GPU: the tiny golden runs through `zturbo generate --device cuda --precision f32`
#    (latents saved, compared with the diffusers goldens afterwards on any machine);
# 2. the real-shaped Z-Image-Turbo (6.15 B DiT + Qwen3-4B, random bf16 weights written once to
#    $ZT_MODEL_DIR) at 1024², 8 steps: every memory mode at CFG 1.8, performance at CFG 1.0 — time and
#    peak device memory. Every stage writes its result as soon as it has it.
set -uo pipefail
BIN=${1:?binary folder}
OUT=${2:?output folder}
mkdir -p "$OUT"
ZT_MODEL_DIR=${ZT_MODEL_DIR:-/tmp/zturbo-real}
RUNS=${RUNS:-2}
RUNS18=${RUNS18:-1}
# shellcheck source=benches/gpu_env.sh
source "$(dirname "$0")/gpu_env.sh"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nproc; free -g | head -2
  ldd "$WORK/zturbo" | grep -E "cuda|cublas|curand|nvrtc|not found"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

echo "== 1. tiny golden parity on the GPU"
for run in cfg0 cfg18; do
  extra=(--cfg 1.0)
  [ "$run" = cfg18 ] && extra=(--cfg 2.8 --negative-prompt blurry)
  timeout 120 "$WORK/zturbo" generate --model tests/fixtures/tiny-z-image --device cuda --precision f32 --enhance off \
    --prompt "a serene mountain lake at dawn" --width 128 --height 128 --steps 8 --seed 42 "${extra[@]}" \
    --init-latents "$BIN/init_latents.safetensors" --save-latents "$OUT/tiny_$run.safetensors" \
    --output "$OUT/tiny_$run.png" > "$OUT/tiny_$run.log" 2>&1
  tail -2 "$OUT/tiny_$run.log"
done

echo "== 2. real-shaped model, 1024², 8 steps"
"$WORK/memory" --model-dir "$ZT_MODEL_DIR" --shape real --sizes 1024 --steps 8 --cfg 1.0 --runs "$RUNS" \
  --device cuda --precision auto --modes performance > "$OUT/memory_real_cfg1.0.txt" 2> "$OUT/memory_real_cfg1.0.err"
cat "$OUT/memory_real_cfg1.0.txt"; tail -3 "$OUT/memory_real_cfg1.0.err"
"$WORK/memory" --model-dir "$ZT_MODEL_DIR" --shape real --sizes 1024 --steps 8 --cfg 1.8 --runs "$RUNS18" \
  --device cuda --precision auto --modes performance,balanced,low > "$OUT/memory_real_cfg1.8.txt" 2> "$OUT/memory_real_cfg1.8.err"
cat "$OUT/memory_real_cfg1.8.txt"; tail -3 "$OUT/memory_real_cfg1.8.err"
echo "== done"
