#!/usr/bin/env bash
# GPU check, run on a CUDA machine from the repository root, given binaries built elsewhere with
# `--features cuda` (recipe in README.md, "GPU build"):
#
#   benches/gpu_check.sh <folder with zturbo[.xz], memory[.xz], init_latents.safetensors> <output folder>
#
# 1. parity on the GPU: the tiny golden runs through `zturbo generate --device cuda --precision f32`
#    (latents saved, compared with the diffusers goldens afterwards on any machine), also with the
#    tiny GGUF transformer (issue 16: dequantized per product on the GPU);
# 2. the real-shaped Z-Image-Turbo (6.15 B DiT + Qwen3-4B, random bf16 weights written once to
#    $ZT_MODEL_DIR) at 1024², 8 steps: every memory mode at CFG 1.8, performance at CFG 1.0 — time and
#    peak device memory;
# 3. issue 16's grid: weights bf16, fp8, q8_0, q4_k × --memory-budget none, 12GiB, 8GiB, 6GiB, each
#    cell one `memory --modes auto` run (warm-up + RUNS timed jobs) — mode, time, peak device memory
#    and the guard's notices. The quantized files are written once next to $ZT_MODEL_DIR by the
#    bench (zturbo quantize's code). Cells run most important first and stop being started after
#    GRID_SECONDS (default 420), so one call fits the per-call limit; `STAGES=3` runs only the grid
#    (a second call finishes it: cells already in $OUT are skipped).
#
# Every stage writes its result as soon as it has it; $OUT/grid.md is the grid's table and
# $OUT/targets.txt checks issue 16's targets (q8_0 at 12 GiB ≤ 1.3× unconstrained bf16; q4_k fits
# 8 GiB with no guard notice).
set -uo pipefail
BIN=${1:?binary folder}
OUT=${2:?output folder}
mkdir -p "$OUT"
ZT_MODEL_DIR=${ZT_MODEL_DIR:-/tmp/zturbo-real}
RUNS=${RUNS:-1}
RUNS18=${RUNS18:-1}
STAGES=${STAGES:-1,2,3}
GRID_SECONDS=${GRID_SECONDS:-420}
# shellcheck source=benches/gpu_env.sh
source "$(dirname "$0")/gpu_env.sh"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nproc; free -g | head -2; df -h /tmp | tail -1
  ldd "$WORK/zturbo" | grep -E "cuda|cublas|curand|nvrtc|not found"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
has() { case ",$STAGES," in *",$1,"*) return 0 ;; esac; return 1; }

if has 1; then
  echo "== 1. tiny golden parity on the GPU"
  for run in cfg0 cfg18 gguf; do
    extra=(--cfg 1.0)
    [ "$run" = cfg18 ] && extra=(--cfg 2.8 --negative-prompt blurry)
    [ "$run" = gguf ] && extra=(--cfg 1.0 --transformer tests/fixtures/tiny-z-image-files/dit-q4_k.gguf)
    timeout 120 "$WORK/zturbo" generate --model tests/fixtures/tiny-z-image --device cuda --precision f32 --enhance off \
      --prompt "a serene mountain lake at dawn" --width 128 --height 128 --steps 8 --seed 42 "${extra[@]}" \
      --init-latents "$BIN/init_latents.safetensors" --save-latents "$OUT/tiny_$run.safetensors" \
      --output "$OUT/tiny_$run.png" > "$OUT/tiny_$run.log" 2>&1
    tail -2 "$OUT/tiny_$run.log"
  done
fi

if has 2; then
  echo "== 2. real-shaped model, 1024², 8 steps"
  "$WORK/memory" --model-dir "$ZT_MODEL_DIR" --shape real --sizes 1024 --steps 8 --cfg 1.0 --runs "$RUNS" \
    --device cuda --precision auto --modes performance > "$OUT/memory_real_cfg1.0.txt" 2> "$OUT/memory_real_cfg1.0.err"
  cat "$OUT/memory_real_cfg1.0.txt"; tail -3 "$OUT/memory_real_cfg1.0.err"
  "$WORK/memory" --model-dir "$ZT_MODEL_DIR" --shape real --sizes 1024 --steps 8 --cfg 1.8 --runs "$RUNS18" \
    --device cuda --precision auto --modes performance,balanced,low > "$OUT/memory_real_cfg1.8.txt" 2> "$OUT/memory_real_cfg1.8.err"
  cat "$OUT/memory_real_cfg1.8.txt"; tail -3 "$OUT/memory_real_cfg1.8.err"
fi

if has 3; then
  echo "== 3. weights × budget grid, 1024², 8 steps, CFG 1.0 (auto mode)"
  started=$(date +%s)
  # Most important first: the baseline and the issue's two targets.
  CELLS=${CELLS:-"bf16:none q8_0:12GiB q4_k:8GiB q4_k:6GiB q8_0:8GiB fp8:12GiB bf16:12GiB bf16:8GiB q8_0:none q4_k:none fp8:none q4_k:12GiB fp8:8GiB q8_0:6GiB fp8:6GiB bf16:6GiB"}
  for cell in $CELLS; do
    w=${cell%%:*}; b=${cell##*:}
    f="$OUT/grid_${w}_${b}.txt"
    if grep -q "^| 1024" "$f" 2>/dev/null; then continue; fi
    if [ $(( $(date +%s) - started )) -gt "$GRID_SECONDS" ]; then
      echo "grid: time is up before $cell (rerun with STAGES=3 to finish)"; break
    fi
    timeout 300 "$WORK/memory" --model-dir "$ZT_MODEL_DIR" --shape real --sizes 1024 --steps 8 --cfg 1.0 \
      --runs "$RUNS" --device cuda --precision auto --modes auto --weights "$w" --budget "$b" \
      > "$f" 2> "$OUT/grid_${w}_${b}.err"
    echo "$w $b: $(grep '^| 1024' "$f" || tail -1 "$OUT/grid_${w}_${b}.err") $(grep '^notices' "$f")"
  done
  {
    echo "| weights | budget | mode | peak device memory | median time | notices |"
    echo "|---|---|---|---|---|---|"
    for f in "$OUT"/grid_*.txt; do
      [ -f "$f" ] || continue
      cell=$(basename "$f" .txt); cell=${cell#grid_}; w=${cell%_*}; b=${cell##*_}
      row=$(grep '^| 1024' "$f" | head -1)
      [ -n "$row" ] || continue
      mode=$(echo "$row" | awk -F'|' '{gsub(/ /,"",$3); print $3}')
      peak=$(echo "$row" | awk -F'|' '{print $4}')
      time=$(echo "$row" | awk -F'|' '{print $5}')
      notes=$(grep '^notices' "$f" | sed 's/^notices[^:]*: //')
      echo "| $w | $b | $mode |$peak |$time | ${notes:-none} |"
    done
  } > "$OUT/grid.md"
  cat "$OUT/grid.md"
  secs() { grep '^| 1024' "$OUT/grid_$1.txt" 2>/dev/null | awk -F'|' '{gsub(/[ s]/,"",$5); print $5}'; }
  {
    base=$(secs bf16_none); q8=$(secs q8_0_12GiB)
    if [ -n "$base" ] && [ -n "$q8" ]; then
      python3 -c "b,q=$base,$q; print(f'q8_0 at 12 GiB: {q:.2f} s = {q/b:.2f}x unconstrained bf16 ({b:.2f} s); target <= 1.3x: ' + ('met' if q/b <= 1.3 else 'MISSED'))"
    else
      echo "q8_0 at 12 GiB vs bf16: not measured"
    fi
    if grep -q '^| 1024' "$OUT/grid_q4_k_8GiB.txt" 2>/dev/null; then
      peak=$(grep '^| 1024' "$OUT/grid_q4_k_8GiB.txt" | awk -F'|' '{print $4}')
      notes=$(grep '^notices' "$OUT/grid_q4_k_8GiB.txt")
      echo "q4_k at 8 GiB: peak$peak; guard notices: ${notes:-none} (target: fits, none)"
    else
      echo "q4_k at 8 GiB: did not run ($(tail -1 "$OUT/grid_q4_k_8GiB.err" 2>/dev/null))"
    fi
  } > "$OUT/targets.txt"
  cat "$OUT/targets.txt"
fi
echo "== done"
