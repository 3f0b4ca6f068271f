#!/usr/bin/env python
"""Random-weight Z-Image pipelines (diffusers layout) for the zturbo-vs-diffusers comparison.

Usage:  python make_model.py SHAPE [--root target/compare-models]   -> prints the model folder

  tiny    the committed test fixture tests/fixtures/tiny-z-image (nothing is built)
  medium  the real Z-Image-Turbo proportions at reduced width/depth, built here with fixed seeds and
          saved under <root>/medium/ (git-ignored; reused when its `done` marker exists)
  sd-turbo  stabilityai/sd-turbo's shapes (865 M UNet, OpenCLIP ViT-H text tower, SD VAE) with the
          tiny fixture's 802-token tokenizer (the only change: a smaller embedding table), under
          <root>/sd-turbo/ — the model CPU users actually run

Also:   python make_model.py latents H W [C] [--root ...]   -> prints the initial noise both sides
        start from, <root>/latents-HxW.safetensors for Z-Image's 16 channels or
        <root>/latents-CxHxW.safetensors otherwise (torch.randn, seed 42, tensor `latents`).

Weights follow tests/fixtures/gen/common.py:reinit_ (N(0,1)/sqrt(fan_in) matrices, 1+N(0,0.1^2)
norm scales, N(0,0.05^2) biases) so activations stay O(1) through every layer, as in a trained model.
"""

import argparse
import json
import os
import shutil
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "tiny-z-image")
SD_FIXTURE = os.path.join(REPO, "tests", "fixtures", "tiny-sd-turbo")
sys.path.insert(0, os.path.join(REPO, "tests", "fixtures", "gen"))
from common import reinit_, write_json  # noqa: E402

SEED_TEXT_ENCODER = 3001
SEED_TRANSFORMER = 3002
SEED_VAE = 3003
SEED_UNET = 3004
SEED_LATENTS = 42
VERSION = 1  # bump when a config below changes: an existing folder is rebuilt

# Real Z-Image-Turbo: dim 3840, 30 heads x 128, 30 layers, 2 refiner layers, axes_dims [32,48,48];
# Qwen3-4B text encoder hidden 2560 (= cap_feat_dim, 2/3 of the DiT width), 36 layers, 32 q heads x 128,
# 8 kv heads, intermediate 9728 (3.8x hidden). "medium" keeps head_dim 128, the RoPE axes, the refiner
# depth, the FFN ratio (int(dim/3*8)), the text/DiT width ratio (~0.75), GQA 4:1 and the MLP ratio (3.8x),
# at dim 1024 / 8 layers, so that matrix products dominate as they do in the real model.
MEDIUM_TRANSFORMER = dict(
    all_patch_size=[2],
    all_f_patch_size=[1],
    in_channels=16,
    dim=1024,
    n_layers=8,
    n_refiner_layers=2,
    n_heads=8,
    n_kv_heads=8,
    norm_eps=1e-05,
    qk_norm=True,
    cap_feat_dim=768,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[32, 48, 48],
    axes_lens=[1536, 512, 512],
)

MEDIUM_TEXT_ENCODER = dict(
    head_dim=128,
    hidden_size=768,
    intermediate_size=2944,
    num_attention_heads=8,
    num_hidden_layers=8,
    num_key_value_heads=2,
)

# Half the real VAE's widths ([128, 256, 512, 512]) with the real layout (4 up blocks, 3 resnets each,
# mid attention, 32 groups): 4x fewer conv FLOPs. At real width the decode alone takes ~75 s (candle)
# at 512^2 on 2 cores, which would put one medium@512 comparison (12 runs) near half an hour; at half
# width it still runs the same 3x3 convolutions at 64-256 channels, the kernels where candle is slow.
MEDIUM_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[64, 128, 256, 256],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    latents_mean=None,
    latents_std=None,
    force_upcast=True,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
)


# stabilityai/sd-turbo (SD 2.1 architecture at 512²): its unet, text_encoder and vae configs.
SD_TURBO_UNET = dict(
    act_fn="silu",
    attention_head_dim=[5, 10, 20, 20],
    block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False,
    cross_attention_dim=1024,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    downsample_padding=1,
    dual_cross_attention=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-05,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    upcast_attention=False,
    use_linear_projection=True,
)
SD_TURBO_TEXT_ENCODER = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_attention_heads=16,
    num_hidden_layers=23,
    projection_dim=512,
    hidden_act="gelu",
)
SD_VAE = dict(
    act_fn="silu",
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=768,
    scaling_factor=0.18215,
)


def save_random(model, seed, path):
    """Fixture-style weights for a freshly built diffusers model, saved in its own layout."""
    reinit_(model.float().eval(), seed)
    model.save_pretrained(path, safe_serialization=True)


def save_text_encoder(tmp, fixture, overrides, build, seed, keep=lambda k: True):
    """The fixture's text-encoder config with `overrides`, random weights (tensors `keep` accepts)."""
    from safetensors.torch import save_file

    with open(os.path.join(fixture, "text_encoder", "config.json")) as f:
        cfg = json.load(f)
    cfg.update(overrides)
    te_dir = os.path.join(tmp, "text_encoder")
    write_json(os.path.join(te_dir, "config.json"), cfg)
    torch.manual_seed(seed)
    te = build(te_dir).float().eval()
    reinit_(te, seed)
    sd = {k: v.contiguous() for k, v in te.state_dict().items() if keep(k)}
    save_file(sd, os.path.join(te_dir, "model.safetensors"), metadata={"format": "pt"})


def build_sd_turbo(tmp):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    save_text_encoder(tmp, SD_FIXTURE, SD_TURBO_TEXT_ENCODER,
                      lambda d: CLIPTextModel(CLIPTextConfig.from_pretrained(d)), SEED_TEXT_ENCODER)
    torch.manual_seed(SEED_UNET)
    save_random(UNet2DConditionModel(**SD_TURBO_UNET), SEED_UNET, os.path.join(tmp, "unet"))
    torch.manual_seed(SEED_VAE)
    save_random(AutoencoderKL(**SD_VAE), SEED_VAE, os.path.join(tmp, "vae"))


def build_medium(tmp):
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    te = dict(MEDIUM_TEXT_ENCODER, max_window_layers=MEDIUM_TEXT_ENCODER["num_hidden_layers"])
    save_text_encoder(tmp, FIXTURE, te, lambda d: Qwen3ForCausalLM(Qwen3Config.from_pretrained(d)),
                      SEED_TEXT_ENCODER, keep=lambda k: not k.startswith("lm_head."))
    torch.manual_seed(SEED_TRANSFORMER)
    save_random(ZImageTransformer2DModel(**MEDIUM_TRANSFORMER), SEED_TRANSFORMER,
                os.path.join(tmp, "transformer"))
    torch.manual_seed(SEED_VAE)
    save_random(AutoencoderKL(**MEDIUM_VAE), SEED_VAE, os.path.join(tmp, "vae"))


# shape: (builder, fixture whose tokenizer, scheduler and pipeline index the model reuses)
BUILDERS = {"medium": (build_medium, FIXTURE), "sd-turbo": (build_sd_turbo, SD_FIXTURE)}


def build(shape, out):
    """Builds `shape` in `out`.partial, then renames it into place with a `done` marker."""
    import diffusers

    builder, fixture = BUILDERS[shape]
    tmp = out + ".partial"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    for sub in ("tokenizer", "scheduler"):
        shutil.copytree(os.path.join(fixture, sub), os.path.join(tmp, sub))
    shutil.copy(os.path.join(fixture, "model_index.json"), tmp)
    builder(tmp)
    write_json(
        os.path.join(tmp, "done"),
        {"version": VERSION, "diffusers": diffusers.__version__, "torch": torch.__version__},
    )
    if os.path.exists(out):
        shutil.rmtree(out)
    os.rename(tmp, out)


def model_dir(shape, root):
    if shape == "tiny":
        return FIXTURE
    if shape not in BUILDERS:
        raise SystemExit(f"unknown shape {shape!r} (tiny, medium, sd-turbo)")
    out = os.path.join(root, shape)
    marker = os.path.join(out, "done")
    current = False
    if os.path.exists(marker):
        with open(marker) as f:
            current = json.load(f).get("version") == VERSION
    if not current:
        print(f"building the {shape} model in {out} ...", file=sys.stderr)
        build(shape, out)
    return out


def latents_file(h, w, root, channels=16):
    name = f"latents-{h}x{w}" if channels == 16 else f"latents-{channels}x{h}x{w}"
    path = os.path.join(root, name + ".safetensors")
    if not os.path.exists(path):
        from safetensors.torch import save_file

        g = torch.Generator("cpu").manual_seed(SEED_LATENTS)
        lat = torch.randn((1, channels, h // 8, w // 8), generator=g, dtype=torch.float32)
        os.makedirs(root, exist_ok=True)
        save_file({"latents": lat}, path)
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", help="tiny | medium | sd-turbo | latents")
    ap.add_argument("size", nargs="*", type=int, help="for latents: H W [C]")
    ap.add_argument("--root", default=os.path.join(REPO, "target", "compare-models"))
    a = ap.parse_args()
    if a.what == "latents":
        h, w = a.size[:2]
        print(latents_file(h, w, a.root, *a.size[2:3]))
    else:
        print(model_dir(a.what, a.root))


if __name__ == "__main__":
    main()
