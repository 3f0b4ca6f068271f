#!/usr/bin/env python
"""diffusers/torch side of the op-level profile (zturbo's side: benches/compare_ops.rs, same op names
and shapes). Run by hand with the comparison's venv:

    OMP_NUM_THREADS=2 benches/compare/.venv/bin/python benches/compare/ops_torch.py \
        --model target/compare-models/medium --size 512 --threads 2

Prints one JSON object per line: {"op", "ms", "gflops"} (median of --reps after one warm-up). `dit.block`
and `dit.block.attention` / `dit.block.feed_forward` are timed with forward hooks inside a real pipeline
call (median over the main layers); the rest are the same torch calls diffusers makes, on random inputs.
"""

import argparse
import json
import statistics
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from diffusers import ZImagePipeline

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    def emit(op, ms, flops=0.0):
        print(json.dumps({"op": op, "ms": ms, "gflops": (flops / ms / 1e6) if flops else None}), flush=True)

    def timeit(op, flops, f):
        with torch.no_grad():
            f()
            ts = []
            for _ in range(a.reps):
                t = time.perf_counter()
                f()
                ts.append((time.perf_counter() - t) * 1e3)
        emit(op, statistics.median(ts), flops)

    pipe = ZImagePipeline.from_pretrained(a.model, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    tr = pipe.transformer
    cfg = tr.config
    d, h = cfg.dim, cfg.n_heads
    hd = d // h
    ffn = int(d / 3 * 8)
    side = a.size // 16
    n_img = side * side
    L = -(-n_img // 32) * 32 + 32
    lf = float(L)

    # Whole blocks, inside a real call (2 steps, guidance off).
    times = {}

    def hook(name):
        def pre(m, args, kwargs=None):
            times.setdefault(name, []).append(-time.perf_counter())

        def post(m, args, out):
            times[name][-1] += time.perf_counter()

        return pre, post

    handles = []
    for i, layer in enumerate(tr.layers):
        for name, mod in (("dit.block", layer), ("dit.block.attention", layer.attention),
                          ("dit.block.feed_forward", layer.feed_forward)):
            pre, post = hook(name)
            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    conv_times = {}
    for mod in pipe.vae.decoder.modules():
        if isinstance(mod, torch.nn.Conv2d) and mod.kernel_size == (3, 3):
            def pre(m, args):
                m._t0 = time.perf_counter()

            def post(m, args, out):
                key = f"vae.conv3x3.{m.in_channels}to{m.out_channels}@{args[0].shape[-1]}"
                conv_times.setdefault(key, []).append((time.perf_counter() - m._t0) * 1e3)

            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    lat = torch.randn((1, 16, a.size // 8, a.size // 8), generator=torch.Generator().manual_seed(42))
    for _ in range(2):
        pipe(prompt="a serene mountain lake at dawn", height=a.size, width=a.size, num_inference_steps=2,
             guidance_scale=0.0, latents=lat.clone(), output_type="np")
    for hnd in handles:
        hnd.remove()
    block_flops = 2 * lf * (4 * d * d + 3 * d * ffn) + 4 * lf * lf * d
    for name in ("dit.block", "dit.block.attention", "dit.block.feed_forward"):
        emit(name + " (in pipeline)", statistics.median(times[name]) * 1e3, block_flops if name == "dit.block" else 0)

    x = torch.randn(1, L, d)
    hidden = torch.randn(1, L, ffn)
    gate = torch.randn(1, L, ffn)
    lay = tr.layers[0]
    timeit("dit.linear.dim_to_dim", 2 * lf * d * d, lambda: lay.attention.to_q(x))
    timeit("dit.linear.dim_to_ffn", 2 * lf * d * ffn, lambda: lay.feed_forward.w1(x))
    timeit("dit.linear.ffn_to_dim", 2 * lf * d * ffn, lambda: lay.feed_forward.w2(hidden))
    timeit("dit.ffn.silu_mul", 0, lambda: F.silu(gate) * hidden)
    timeit("dit.rms_norm", 0, lambda: lay.attention_norm1(x))
    xh = x.unflatten(-1, (h, hd))
    timeit("dit.qk_norm", 0, lambda: lay.attention.norm_q(xh))
    q = xh.transpose(1, 2).contiguous()
    k, v = q * 0.5, q * 0.25
    attn_mm = 2 * lf * lf * d
    timeit("dit.attn.qk_matmul", attn_mm, lambda: q @ k.transpose(-1, -2))
    scores = q @ k.transpose(-1, -2)
    timeit("dit.attn.softmax", 0, lambda: scores.softmax(-1))
    probs = scores.softmax(-1)
    timeit("dit.attn.pv_matmul", attn_mm, lambda: probs @ v)
    # What diffusers runs: SDPA on [B, L, H, D] inputs transposed to [B, H, L, D] (a fused kernel).
    timeit("dit.attn.sdpa_total", 2 * attn_mm, lambda: F.scaled_dot_product_attention(q, k, v))

    for key in sorted(conv_times, key=lambda s: (-int(s.split("@")[1]), s)):
        cin, rest = key.split(".")[-1].split("to")
        cout, hw = rest.split("@")
        flops = 2.0 * int(cin) * int(cout) * 9 * int(hw) ** 2
        emit(key + " (in pipeline)", statistics.median(conv_times[key]), flops)
    px = a.size
    for cin, cout, hw in [(256, 256, px // 8), (256, 256, px // 4), (256, 128, px // 2), (128, 128, px // 2),
                          (128, 64, px), (64, 64, px),
                          # SD-Turbo's UNet levels (latent px/8), as in benches/compare_ops.rs.
                          (320, 320, px // 8), (640, 640, px // 16), (1920, 640, px // 16),
                          (1280, 1280, px // 32), (2560, 1280, px // 32), (1280, 1280, px // 64)]:
        conv = torch.nn.Conv2d(cin, cout, 3, padding=1)
        inp = torch.randn(1, cin, hw, hw)
        timeit(f"vae.conv3x3.{cin}to{cout}@{hw}", 2.0 * cin * cout * 9 * hw * hw, lambda: conv(inp))
    gn = torch.nn.GroupNorm(32, 64, eps=1e-6)
    big = torch.randn(1, 64, px, px)
    timeit(f"vae.group_norm.64@{px}", 0, lambda: gn(big))
    timeit(f"vae.silu.64@{px}", 0, lambda: F.silu(big))
    half = torch.randn(1, 128, px // 2, px // 2)
    timeit(f"vae.upsample_nearest.128@{px // 2}", 0, lambda: F.interpolate(half, scale_factor=2.0, mode="nearest"))


if __name__ == "__main__":
    main()
