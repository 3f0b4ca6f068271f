#!/usr/bin/env bash
# Where the GPU time of one 1024² Z-Image-Turbo generation goes, on a CUDA machine, from the repository
# root, given binaries built elsewhere with `--features cuda` (README.md, "GPU build"):
#
#   benches/gpu_profile.sh <folder with zturbo[.xz], memory[.xz] [, init_latents.safetensors]> <output folder>
#
# 1. the memory bench, performance mode, CFG 1.0 (writes the real-shaped random-weight model to
#    $ZT_MODEL_DIR on first use): warm time and peak device memory per job;
# 2. one `zturbo generate` of the same job with ZTURBO_PROFILE=1: encode / denoise / decode times and
#    the device-synchronised share of every DiT stage (qkv, qk-norm + RoPE, attention, out projection,
#    feed-forward, norms, residual adds, adaLN). Synchronising adds a little time; read the shares.
set -uo pipefail
BIN=${1:?binary folder}
OUT=${2:?output folder}
mkdir -p "$OUT"
ZT_MODEL_DIR=${ZT_MODEL_DIR:-/tmp/zturbo-real}
# shellcheck source=benches/gpu_env.sh
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

echo "== 1. memory bench, performance, CFG 1.0, 1024², 8 steps"
"$WORK/memory" --model-dir "$ZT_MODEL_DIR" --shape real --sizes 1024 --steps 8 --cfg 1.0 --runs "${RUNS:-2}" \
  --device cuda --precision auto --modes performance > "$OUT/memory_perf.txt" 2> "$OUT/memory_perf.err"
cat "$OUT/memory_perf.txt"; tail -3 "$OUT/memory_perf.err"

if [ "${CFG18:-0}" = 1 ]; then
  echo "== 1b. memory bench, performance, CFG 1.8 (two denoiser passes per step)"
  "$WORK/memory" --model-dir "$ZT_MODEL_DIR" --shape real --sizes 1024 --steps 8 --cfg 1.8 --runs 1 \
    --device cuda --precision auto --modes performance > "$OUT/memory_perf_cfg1.8.txt" 2> "$OUT/memory_perf_cfg1.8.err"
  cat "$OUT/memory_perf_cfg1.8.txt"; tail -2 "$OUT/memory_perf_cfg1.8.err"
fi

if [ -f "$BIN/init_latents.safetensors" ]; then
  echo "== tiny golden on the GPU (f32): final latents saved for comparison with the diffusers golden"
  timeout 120 "$WORK/zturbo" generate --model tests/fixtures/tiny-z-image --device cuda --precision f32 --enhance off \
    --prompt "a serene mountain lake at dawn" --width 128 --height 128 --steps 8 --seed 42 --cfg 1.0 \
    --init-latents "$BIN/init_latents.safetensors" --save-latents "$OUT/tiny_cfg0.safetensors" \
    --output "$OUT/tiny_cfg0.png" > "$OUT/tiny_cfg0.log" 2>&1
  tail -1 "$OUT/tiny_cfg0.log"
fi

echo "== 2. profile of one generation"
ZTURBO_PROFILE=1 timeout 240 "$WORK/zturbo" generate --model "$ZT_MODEL_DIR" --device cuda --precision auto \
  --enhance off --prompt "a serene mountain lake at dawn" --width 1024 --height 1024 --steps 8 --cfg 1.0 \
  --seed 42 --memory-mode performance --output "$OUT/profile.png" > "$OUT/profile.log" 2>&1
grep -v "^\s*$" "$OUT/profile.log" | tail -20
echo "== done"
