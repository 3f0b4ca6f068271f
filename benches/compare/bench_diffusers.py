#!/usr/bin/env python
"""diffusers' side of the zturbo comparison: one pipeline (CPU, float32, or bfloat16 with --dtype) kept loaded — the class the
model folder's model_index.json names (ZImagePipeline, StableDiffusionPipeline for SD-Turbo); every
stdin line `run` (or `run OUT_DIR`, which also writes the final latents and the RGB8 image) runs one
generation from the shared initial latents and prints one JSON line of per-stage times on stdout.

Stages, measured around the pipeline's own calls (nothing in diffusers is changed):
  text_encode_s  pipe.encode_prompt (Z-Image: tokenize to max_sequence_length=512, Qwen3 forward,
                 unpad; SD: CLIP to 77 tokens)
  steps_s        per denoising step: between consecutive callback_on_step_end calls, the first
                 from the loop start (Z-Image: scheduler.set_begin_index, called just before the
                 loop; SD: the end of prepare_latents, its last call of note before the loop)
  vae_decode_s   last step's end -> image in memory (latent unscale + vae.decode + postprocess "np")
  vae_only_s     vae.decode alone
  total_s        the whole pipe(...) call
The driver (compare.py) alternates these runs with zturbo's and sets the same thread count on both.
"""

import argparse
import json
import os
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--width", type=int, required=True)
    ap.add_argument("--height", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--cfg", type=float, default=1.0, help="ComfyUI scale: guidance_scale = cfg - 1")
    ap.add_argument("--prompt", default="a serene mountain lake at dawn")
    ap.add_argument("--negative-prompt", default="blurry")
    ap.add_argument("--init-latents", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="torch_dtype of the whole pipeline (bfloat16: diffusers' own best setting on a CPU "
                         "that multiplies bf16 natively)")
    a = ap.parse_args()

    # Protocol lines go to the real stdout; anything the libraries print goes to stderr.
    proto = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr

    import numpy as np
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as dlog
    from safetensors.torch import load_file, save_file

    dlog.set_verbosity_error()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    dtype = getattr(torch, a.dtype)
    pipe = DiffusionPipeline.from_pretrained(a.model, torch_dtype=dtype, local_files_only=True)
    pipe.to("cpu")
    pipe.set_progress_bar_config(disable=True)
    # clone(): tensors straight from safetensors may be unaligned, which changes some CPU kernels.
    init = load_file(a.init_latents)["latents"].clone().to(dtype)
    guidance_scale = max(a.cfg - 1.0, 0.0)

    marks = {}

    def wrap(obj, name, before=None, after=None):
        orig = getattr(obj, name)

        def f(*args, **kw):
            if before:
                marks[before] = time.perf_counter()
            r = orig(*args, **kw)
            if after:
                marks[after] = time.perf_counter()
            return r

        setattr(obj, name, f)

    wrap(pipe, "encode_prompt", before="enc0", after="enc1")
    wrap(pipe, "prepare_latents", after="latents1")
    if type(pipe).__name__ == "ZImagePipeline":
        wrap(pipe.scheduler, "set_begin_index", after="loop0")
    wrap(pipe.vae, "decode", before="vae0", after="vae1")

    proto.write(
        json.dumps(
            {
                "ready": True,
                "threads": torch.get_num_threads(),
                "load_s": time.perf_counter() - t0,
                "torch": torch.__version__,
                "precision": "f32" if a.dtype == "float32" else "bf16",
            }
        )
        + "\n"
    )

    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        if words[0] != "run":
            raise SystemExit(f"unknown command {words[0]!r}")
        save_dir = words[1] if len(words) > 1 else None
        marks.clear()
        step_ends = []
        final = {}

        def cb(p, i, t, kw):
            step_ends.append(time.perf_counter())
            final["latents"] = kw["latents"]
            return {}

        start = time.perf_counter()
        out = pipe(
            prompt=a.prompt,
            negative_prompt=a.negative_prompt if guidance_scale > 0 else None,
            height=a.height,
            width=a.width,
            num_inference_steps=a.steps,
            guidance_scale=guidance_scale,
            latents=init.clone(),
            output_type="np",
            callback_on_step_end=cb,
            callback_on_step_end_tensor_inputs=["latents"],
        )
        end = time.perf_counter()
        prev = marks.get("loop0", marks["latents1"])
        steps = []
        for t in step_ends:
            steps.append(t - prev)
            prev = t
        if save_dir:
            os.makedirs(save_dir, exist_ok=True)
            save_file({"latents": final["latents"].float().contiguous()}, os.path.join(save_dir, "latents.safetensors"))
            rgb = (out.images[0] * 255).round().astype(np.uint8)  # as VaeImageProcessor.numpy_to_pil
            rgb.tofile(os.path.join(save_dir, "image.rgb"))
        proto.write(
            json.dumps(
                {
                    "text_encode_s": marks["enc1"] - marks["enc0"],
                    "steps_s": steps,
                    "denoise_s": step_ends[-1] - marks.get("loop0", marks["latents1"]),
                    "vae_decode_s": end - step_ends[-1],
                    "vae_only_s": marks["vae1"] - marks["vae0"],
                    "total_s": end - start,
                }
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
