#!/usr/bin/env python
"""zturbo against itself at two precisions, interleaved in the same time window (no diffusers).

Usage:  python benches/compare/ab.py BENCH_BIN [--rounds 2] [--size 512] [--steps 8] [--a f32] [--b int8]

BENCH_BIN is the compare_zturbo bench executable (run.sh prints how it is built); the model is
target/compare-models/medium and the latents target/compare-models/latents-SxS.safetensors (make_model.py).
Both processes load once, then alternate single runs (a, b, then b, a ...) after one warm-up each, so a
shared host's load hits both alike; prints the median step, denoise, decode and total times, their ratio
b / a, and each side's peak memory. Threads: 2 unless RAYON_NUM_THREADS is set.
"""

import argparse
import json
import os
import statistics
import subprocess

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bench_bin")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--a", default="f32")
    ap.add_argument("--b", default="int8")
    a = ap.parse_args()
    root = os.path.join(REPO, "target", "compare-models")
    common = ["--model", os.path.join(root, "medium"), "--width", str(a.size), "--height", str(a.size),
              "--steps", str(a.steps), "--cfg", "1.0",
              "--init-latents", os.path.join(root, f"latents-{a.size}x{a.size}.safetensors")]
    n = os.environ.get("RAYON_NUM_THREADS", "2")
    env = dict(os.environ, RAYON_NUM_THREADS=n, CANDLE_NUM_THREADS=n, ZTURBO_LOG="warn")
    sides = [a.a, a.b]
    procs = {}
    for p in sides:
        procs[p] = subprocess.Popen([a.bench_bin] + common + ["--precision", p], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
        print(p, procs[p].stdout.readline().strip(), flush=True)
    runs = {p: [] for p in sides}
    for i in range(a.rounds + 1):
        for p in (sides if i % 2 == 0 else sides[::-1]):
            procs[p].stdin.write("run\n")
            procs[p].stdin.flush()
            r = json.loads(procs[p].stdout.readline())
            print(f"{'warm-up' if i == 0 else f'round {i}'} {p}: total {r['total_s']:.2f} s", flush=True)
            if i > 0:
                runs[p].append(r)
    for p in sides:
        procs[p].stdin.close()
        procs[p].wait()

    def med(p, key):
        if key == "step_s":
            return statistics.median(s for r in runs[p] for s in r["steps_s"])
        return statistics.median(r[key] for r in runs[p])

    print(f"\n| stage | {a.a} median | {a.b} median | ratio ({a.b}/{a.a}) |\n|---|---|---|---|")
    for key, name in (("step_s", "denoise step"), ("denoise_s", "denoise (all steps)"),
                      ("vae_decode_s", "VAE decode"), ("total_s", "total")):
        x, y = med(a.a, key), med(a.b, key)
        print(f"| {name} | {x:.2f} s | {y:.2f} s | {y / x:.2f} |")
    for p in sides:
        print(f"peak memory {p}: {runs[p][0]['peak_memory_bytes'] / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
