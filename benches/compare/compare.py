#!/usr/bin/env python
"""Drives the zturbo-vs-diffusers comparison (run.sh calls it with the venv's python).

For each case it starts both sides once (model loaded, as a server would hold it), checks that they
compute the same thing (final latents and image from the same initial noise), runs one warm-up each,
then R rounds of one run per side, alternating which side goes first (ABBA...), so a slow spell of a
shared machine falls on both. Prints a markdown table per case and, last, the machine-readable
`like_for_like:` line (both sides f32) and `summary:` line (zturbo --precision, default auto, with the image
PSNR between the sides) for medium@512.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))

# label: (model shape, image size, steps or None for --steps, latent channels). Z-Image runs
# --steps (8 by default); SD-Turbo, a 1-4 step model, runs 4.
CASES = {
    "tiny@128": ("tiny", 128, None, 16),
    "medium@256": ("medium", 256, None, 16),
    "medium@512": ("medium", 512, None, 16),
    "sd-turbo@512": ("sd-turbo", 512, 4, 4),
}
DEFAULT_CASES = ["tiny@128", "medium@256", "medium@512"]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


class Side:
    """One long-lived benchmark process speaking the line protocol (`run [dir]` -> one JSON line)."""

    def __init__(self, name, cmd, env):
        self.name = name
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1, cwd=REPO
        )
        self.ready = self._read()

    def _read(self):
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise SystemExit(f"{self.name}: the benchmark process exited (code {self.proc.wait()})")
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)

    def run(self, save_dir=None):
        self.proc.stdin.write("run" + (f" {save_dir}" if save_dir else "") + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=60)


def read_latents(path):
    from safetensors.numpy import load_file

    return load_file(path)["latents"].astype("float64")


def check_outputs(dz, dd):
    import numpy as np

    lz, ld = read_latents(os.path.join(dz, "latents.safetensors")), read_latents(
        os.path.join(dd, "latents.safetensors")
    )
    if lz.shape != ld.shape:
        raise SystemExit(f"final latents differ in shape: zturbo {lz.shape}, diffusers {ld.shape}")
    lat = float(np.abs(lz - ld).max())
    iz = np.fromfile(os.path.join(dz, "image.rgb"), dtype=np.uint8).astype(int)
    idd = np.fromfile(os.path.join(dd, "image.rgb"), dtype=np.uint8).astype(int)
    img = int(np.abs(iz - idd).max()) if iz.shape == idd.shape else None
    spread = int(idd.max() - idd.min())
    psnr = None
    if iz.shape == idd.shape:
        mse = float(((iz - idd) ** 2).mean())
        psnr = float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
    return {"latents_max_abs_diff": lat, "latents_max_abs": float(np.abs(ld).max()),
            "latents_rel_diff": lat / max(float(np.abs(ld).max()), 1e-12), "image_max_level_diff": img,
            "image_psnr_db": psnr, "image_range_levels": spread}


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def fmt_s(x):
    if x >= 10:
        return f"{x:.1f} s"
    if x >= 1:
        return f"{x:.2f} s"
    return f"{x * 1000:.1f} ms"


def stage_medians(runs):
    steps = [s for r in runs for s in r["steps_s"]]
    return {
        "text encode": median([r["text_encode_s"] for r in runs]),
        "denoise step (median of all steps)": median(steps),
        "denoise (all steps)": median([r["denoise_s"] for r in runs]),
        "VAE decode": median([r["vae_decode_s"] for r in runs]),
        "total": median([r["total_s"] for r in runs]),
    }


def run_case(label, model, size, steps, channels, a, bench_bin, env_common, precision, ddtype="float32"):
    lat = subprocess.check_output(
        [sys.executable, os.path.join(HERE, "make_model.py"), "latents", str(size), str(size), str(channels)],
        text=True, cwd=REPO,
    ).strip()
    common = ["--model", model, "--width", str(size), "--height", str(size), "--steps", str(steps),
              "--cfg", str(a.cfg), "--init-latents", lat]
    zt_extra = ["--precision", precision]
    out_dir = os.path.join(REPO, "target", "compare-runs", label.replace("@", "-") + "-" + precision
                           + ("" if ddtype == "float32" else "-vs-" + ddtype))
    log(f"== {label}: starting both sides ({model})")
    zt = Side("zturbo", [bench_bin] + common + zt_extra, env_common)
    dp = Side("diffusers", [sys.executable, os.path.join(HERE, "bench_diffusers.py")] + common +
              ["--threads", str(a.threads), "--dtype", ddtype], env_common)
    for s in (zt, dp):
        if s.ready["threads"] != a.threads:
            raise SystemExit(f"{s.name} runs {s.ready['threads']} threads, not {a.threads}")
    # Warm-up (also the parity check: both write their final latents and image).
    t0 = time.perf_counter()
    wz = zt.run(os.path.join(out_dir, "zturbo"))
    wd = dp.run(os.path.join(out_dir, "diffusers"))
    parity = check_outputs(os.path.join(out_dir, "zturbo"), os.path.join(out_dir, "diffusers"))
    log(f"   warm-up: zturbo {wz['total_s']:.2f} s, diffusers {wd['total_s']:.2f} s; parity {parity}")
    if wz.get("notices"):
        log(f"   zturbo notices: {wz['notices']}")
    # f32 on both sides agrees to ~1e-5 (abs). With bf16 matrix operands (zturbo's CPU default where
    # the CPU multiplies bf16 natively) the final latents carry bf16 rounding: accepted up to
    # --bf16-tolerance of the latents' range, and reported (with the image PSNR) in the table.
    # The same bound holds for int8 products (--precision int8: the DiT's projections in int8) and for
    # diffusers run in bfloat16.
    narrow = (bool(zt.ready.get("cpu_bf16_products")) and "bf16" in str(zt.ready.get("precision"))) \
        or "int8" in str(zt.ready.get("precision")) or ddtype != "float32"
    limit = a.bf16_tolerance * parity["latents_max_abs"] if narrow else a.tolerance
    if parity["latents_max_abs_diff"] > limit:
        raise SystemExit(
            f"{label}: final latents differ by {parity['latents_max_abs_diff']:.3g} > {limit:.3g}: "
            "the two sides do not compute the same thing, so the timing would be meaningless")
    runs = {"zturbo": [], "diffusers": []}
    for i in range(a.runs):
        order = [zt, dp] if i % 2 == 0 else [dp, zt]
        for s in order:
            r = s.run()
            if s is zt and r.get("notices"):
                raise SystemExit(f"zturbo adapted the run ({r['notices']}): not comparable")
            runs[s.name].append(r)
        log(f"   round {i + 1}/{a.runs}: zturbo {runs['zturbo'][-1]['total_s']:.2f} s, "
            f"diffusers {runs['diffusers'][-1]['total_s']:.2f} s")
    zt.close()
    dp.close()
    mz, md = stage_medians(runs["zturbo"]), stage_medians(runs["diffusers"])
    return {
        "label": label,
        "size": size,
        "steps": steps,
        "medians": {"zturbo": mz, "diffusers": md},
        "ratios": {k: mz[k] / md[k] for k in mz},
        "parity": parity,
        "wall_s": time.perf_counter() - t0,
        "runs": runs,
        "ready": {"zturbo": zt.ready, "diffusers": dp.ready},
        "vae_only_s": median([r["vae_only_s"] for r in runs["diffusers"]]),
    }


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    fl = line.split(":", 1)[1].split()
                    simd = "avx512f" if "avx512f" in fl else ("avx2" if "avx2" in fl else "no avx2")
                    vnni = [f for f in ("avx512_vnni", "avx_vnni") if f in fl]
                    bf16 = [f for f in ("amx_bf16", "avx512_bf16") if f in fl]
                    return ", ".join([simd] + vnni[:1] + bf16[:1])
    except OSError:
        pass
    return "?"


def host_bf16_native():
    """The CPU multiplies bf16 natively (AVX512-BF16 or AMX) and zturbo is allowed to use it."""
    if os.environ.get("ZTURBO_CPU_BF16") == "0":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    fl = line.split(":", 1)[1].split()
                    return "avx512_bf16" in fl or "amx_bf16" in fl
    except OSError:
        pass
    return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench-bin", required=True, help="the compare_zturbo bench executable")
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES),
                    help="comma-separated: " + ", ".join(CASES) + " (default: the Z-Image ones)")
    ap.add_argument("--runs", type=int, default=5, help="timed rounds per case (one run per side each)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--cfg", type=float, default=1.0, help="ComfyUI scale (1.0 = off = diffusers guidance 0)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--tolerance", type=float, default=1e-3, help="max |latents diff| accepted (f32)")
    ap.add_argument("--precision", default="auto",
                    help="zturbo --precision: auto (bf16 operands where the CPU has them natively, else f32), f32 or int8")
    ap.add_argument("--bf16-tolerance", type=float, default=0.05,
                    help="max |latents diff| / max |latents| accepted when zturbo runs bf16 operands")
    ap.add_argument("--diffusers-bf16", choices=["auto", "on", "off"], default="auto",
                    help="also time diffusers in bfloat16 against zturbo bf16 (auto: where the CPU multiplies "
                         "bf16 natively)")
    ap.add_argument("--json", default=os.path.join(REPO, "target", "compare-runs", "results.json"))
    a = ap.parse_args()
    if a.runs < 5:
        log("note: fewer than 5 timed rounds; medians will be noisy")

    env = dict(os.environ)
    n = str(a.threads)
    # candle: rayon pool + gemm (RAYON_NUM_THREADS) and its barrier pool (CANDLE_NUM_THREADS);
    # torch: intra-op threads (set_num_threads in the script) and the OpenMP/MKL runtimes.
    env.update(RAYON_NUM_THREADS=n, CANDLE_NUM_THREADS=n, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n,
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               ZTURBO_LOG="warn")
    models = {}
    results = []
    for label in a.cases.split(","):
        label = label.strip()
        if label not in CASES:
            raise SystemExit(f"unknown case {label!r} ({', '.join(CASES)})")
        shape, size, steps, channels = CASES[label]
        if shape not in models:
            models[shape] = subprocess.check_output(
                [sys.executable, os.path.join(HERE, "make_model.py"), shape], text=True, cwd=REPO
            ).strip()
        # Like for like (zturbo f32 against diffusers f32), then zturbo's --precision (default
        # auto: bf16 operands where the CPU has them natively) against the same diffusers f32.
        for prec in dict.fromkeys(["f32", a.precision]):
            r = run_case(label, models[shape], size, steps or a.steps, channels, a, a.bench_bin, env, prec)
            r["zturbo_precision_arg"] = prec
            r["diffusers_dtype"] = "float32"
            results.append(r)
        # diffusers' own best setting where bf16 is native: the whole pipeline in bfloat16, against
        # zturbo's `auto`, which there is bf16 matrix operands with f32 accumulation.
        if a.diffusers_bf16 == "on" or (a.diffusers_bf16 == "auto" and host_bf16_native()):
            r = run_case(label, models[shape], size, steps or a.steps, channels, a, a.bench_bin, env, "auto",
                         ddtype="bfloat16")
            r["zturbo_precision_arg"] = "auto"
            r["diffusers_dtype"] = "bfloat16"
            results.append(r)

    import diffusers
    import torch

    zr = results[0]["ready"]["zturbo"] if results else {}
    zprec = (f"zturbo {zr.get('precision', '?')}"
             + (" (bf16 matrix operands via MKL, f32 accumulation)" if zr.get("cpu_bf16_products")
                and "bf16" in str(zr.get("precision")) else "")
             + ", diffusers float32")
    hw = (f"{cpu_model()} ({cpu_flags()}), {os.cpu_count()} logical CPUs, {a.threads} threads per side; "
          f"{zprec}; {a.steps} steps (sd-turbo: 4), cfg {a.cfg:g} (diffusers guidance_scale {max(a.cfg - 1, 0):g}); "
          f"{a.runs} timed rounds after 1 warm-up, alternating; "
          f"zturbo (candle 0.11, bench profile) vs diffusers {diffusers.__version__} / torch {torch.__version__}; "
          f"Python {platform.python_version()}")
    print(f"hardware: {hw}")
    print()
    for r in results:
        p = r["parity"]
        psnr = p.get("image_psnr_db")
        psnr_s = "identical" if psnr == float("inf") else (f"{psnr:.1f} dB" if psnr is not None else "n/a")
        zp = r["ready"]["zturbo"].get("precision", "?")
        print(f"### {r['label']}, {r['steps']} steps, zturbo --precision {r['zturbo_precision_arg']} "
              f"(resolved: {zp}) vs diffusers {r.get('diffusers_dtype', 'float32')}  (final latents max |diff| {p['latents_max_abs_diff']:.2e} = "
              f"{100 * p['latents_rel_diff']:.2g} % of their range, image max diff "
              f"{p['image_max_level_diff']} levels, PSNR {psnr_s})")
        print()
        print("| stage | diffusers median | zturbo median | ratio (zturbo/diffusers) |")
        print("|---|---|---|---|")
        for k in r["medians"]["zturbo"]:
            d, z = r["medians"]["diffusers"][k], r["medians"]["zturbo"][k]
            print(f"| {k} | {fmt_s(d)} | {fmt_s(z)} | {z / d:.2f} |")
        print()
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump({"hardware": hw, "results": results}, f, indent=1)
    print(f"(raw runs: {os.path.relpath(a.json, REPO)})")
    def line(r, name, psnr):
        if r is None:
            return f"{name}: total_ratio=nan step_ratio=nan" + (" psnr_db=nan" if psnr else "") + " (medium@512 not run)"
        rt = r["ratios"]
        out = f"{name}: total_ratio={rt['total']:.3f} step_ratio={rt['denoise step (median of all steps)']:.3f}"
        if psnr:
            v = r["parity"].get("image_psnr_db")
            out += " psnr_db=" + ("inf" if v == float("inf") else (f"{v:.1f}" if v is not None else "nan"))
        return out

    def pick(label, prec):
        return next((r for r in results if r["label"] == label and r["zturbo_precision_arg"] == prec
                     and r.get("diffusers_dtype", "float32") == "float32"), None)

    # Every case's lines first (sd-turbo@512 included; `bf16[...]`: zturbo bf16 against diffusers
    # bfloat16, where run), then the two medium@512 lines last.
    for r in results:
        if r.get("diffusers_dtype", "float32") != "float32":
            print(line(r, f"bf16[{r['label']}]", True))
            continue
        tag = "like_for_like" if r["zturbo_precision_arg"] == "f32" else "summary"
        print(line(r, f"{tag}[{r['label']}]", tag == "summary"))
    print(line(pick("medium@512", "f32"), "like_for_like", False))
    print(line(pick("medium@512", a.precision), "summary", True))


if __name__ == "__main__":
    main()
