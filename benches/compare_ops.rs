//! Where the time of one medium-model generation goes, op by op, on zturbo's side (the diffusers side is
//! `benches/compare/ops_torch.py`, same shapes). Run by hand, not by CI:
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo bench --bench compare_ops -- --model target/compare-models/medium --size 512
//! ```
//!
//! Prints one JSON object per line: `{"op", "ms", "gflops"}` (median of `--reps` runs after one warm-up).

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use clap::Parser;
use serde_json::json;

use zturbo::families::z_image::config::DitConfig;
use zturbo::families::z_image::dit::{Block, RopeTables, SEQ_MULTI_OF};
use zturbo::families::ModelDir;
use zturbo::ops::act;
use zturbo::ops::attention::{attention, Attention};
use zturbo::ops::linear::{self, Lin};
use zturbo::ops::rms_norm;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    model: std::path::PathBuf,
    /// Image side in pixels.
    #[arg(long, default_value_t = 512)]
    size: usize,
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Comma-separated op-name prefixes to run (default: all).
    #[arg(long)]
    only: Option<String>,
    #[arg(long, hide = true)]
    bench: bool,
}

struct Timer {
    reps: usize,
    only: Option<Vec<String>>,
}

impl Timer {
    fn time(
        &self,
        op: &str,
        flops: f64,
        mut f: impl FnMut() -> candle_core::Result<Tensor>,
    ) -> Result<()> {
        if let Some(only) = &self.only {
            if !only.iter().any(|p| op.starts_with(p.as_str())) {
                return Ok(());
            }
        }
        drop(f()?);
        let mut ms: Vec<f64> = (0..self.reps)
            .map(|_| {
                let t = Instant::now();
                let out = f()?;
                let dt = t.elapsed().as_secs_f64() * 1e3;
                drop(out);
                Ok(dt)
            })
            .collect::<candle_core::Result<_>>()?;
        ms.sort_by(f64::total_cmp);
        let med = ms[ms.len() / 2];
        let gflops = (flops > 0.0).then(|| flops / med / 1e6);
        println!("{}", json!({ "op": op, "ms": med, "gflops": gflops }));
        Ok(())
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dev = Device::Cpu;
    let timer = Timer {
        reps: args.reps,
        only: args
            .only
            .as_ref()
            .map(|s| s.split(',').map(str::to_string).collect()),
    };
    let dir = ModelDir::open(&args.model)?;
    let cfg: DitConfig = dir.read_json("transformer/config.json")?;
    let vb = dir
        .open_weights("transformer")?
        .var_builder(DType::F32, &dev);

    // One main-layer block on the unified sequence of a batch-1, cfg-off step.
    let side = args.size / 16;
    let n_img = side * side;
    let l = n_img.div_ceil(SEQ_MULTI_OF) * SEQ_MULTI_OF + SEQ_MULTI_OF;
    let (d, h, hd, ffn) = (cfg.dim, cfg.n_heads, cfg.head_dim(), cfg.ffn_hidden());
    let lf = l as f64;
    let block = Block::new(
        &cfg,
        true,
        dir.open_weights("transformer")?
            .loader(DType::F32, &dev)
            .pp("layers")
            .pp(0),
    )?;
    let ids: Vec<[usize; 3]> = (0..l).map(|i| [33, i / side % side, i % side]).collect();
    let rope = RopeTables::new(&cfg).rope(&[ids], l, &dev)?;
    let x = Tensor::randn(0f32, 1.0, (1, l, d), &dev)?;
    let adaln = Tensor::randn(0f32, 1.0, (1, cfg.adaln_dim()), &dev)?;
    let block_flops =
        2.0 * lf * (4.0 * (d * d) as f64 + 3.0 * (d * ffn) as f64) + 4.0 * lf * lf * d as f64;
    timer.time("dit.block", block_flops, || {
        block.forward(&x, &rope, None, Some(&adaln))
    })?;

    // The same block with bf16 matrices and f32 activations (zturbo's CPU default when the build
    // has MKL and the CPU multiplies bf16 natively; otherwise candle converts, and this is slower).
    let vb16 = dir
        .open_weights("transformer")?
        .var_builder(DType::BF16, &dev);
    let block16 = Block::new(
        &cfg,
        true,
        dir.open_weights("transformer")?
            .loader(DType::BF16, &dev)
            .pp("layers")
            .pp(0),
    )?;
    timer.time("dit.block.bf16_operands", block_flops, || {
        block16.forward(&x, &rope, None, Some(&adaln))
    })?;
    let lin16 =
        |i: usize, o: usize, name: &str| Lin::new(i, o, false, vb16.pp("layers.0").pp(name));
    let (q16, w1_16, w2_16) = (
        lin16(d, d, "attention.to_q")?,
        lin16(d, ffn, "feed_forward.w1")?,
        lin16(ffn, d, "feed_forward.w2")?,
    );

    let lin = |i: usize, o: usize, name: &str| {
        candle_nn::linear_no_bias(i, o, vb.pp("layers.0").pp(name))
    };
    let to_q = lin(d, d, "attention.to_q")?;
    let w1 = lin(d, ffn, "feed_forward.w1")?;
    let w2 = lin(ffn, d, "feed_forward.w2")?;
    let hidden = Tensor::randn(0f32, 1.0, (1, l, ffn), &dev)?;
    timer.time("dit.linear.dim_to_dim", 2.0 * lf * (d * d) as f64, || {
        x.apply(&to_q)
    })?;
    timer.time("dit.linear.dim_to_ffn", 2.0 * lf * (d * ffn) as f64, || {
        x.apply(&w1)
    })?;
    timer.time("dit.linear.ffn_to_dim", 2.0 * lf * (d * ffn) as f64, || {
        hidden.apply(&w2)
    })?;
    timer.time(
        "dit.linear.dim_to_dim.bf16_operands",
        2.0 * lf * (d * d) as f64,
        || x.apply(&q16),
    )?;
    timer.time(
        "dit.linear.dim_to_ffn.bf16_operands",
        2.0 * lf * (d * ffn) as f64,
        || x.apply(&w1_16),
    )?;
    timer.time(
        "dit.linear.ffn_to_dim.bf16_operands",
        2.0 * lf * (d * ffn) as f64,
        || hidden.apply(&w2_16),
    )?;
    // Side by side: candle's product (its `gemm` crate, above) against `Lin` in f32 (MKL's sgemm
    // in MKL builds).
    let lin32 = |i: usize, o: usize, name: &str| Lin::new(i, o, false, vb.pp("layers.0").pp(name));
    let (q32, w1_32, w2_32) = (
        lin32(d, d, "attention.to_q")?,
        lin32(d, ffn, "feed_forward.w1")?,
        lin32(ffn, d, "feed_forward.w2")?,
    );
    for (name, lin, inp, flops) in [
        ("dim_to_dim", &q32, &x, 2.0 * lf * (d * d) as f64),
        ("dim_to_ffn", &w1_32, &x, 2.0 * lf * (d * ffn) as f64),
        ("ffn_to_dim", &w2_32, &hidden, 2.0 * lf * (d * ffn) as f64),
    ] {
        timer.time(&format!("dit.linear.{name}.lin_f32"), flops, || {
            inp.apply(lin)
        })?;
    }
    // The block's elementwise passes: candle's ops against the fused CPU passes.
    let a_out = Tensor::randn(0f32, 1.0, (1, l, d), &dev)?;
    let w_d = Tensor::randn(1f32, 0.1, d, &dev)?;
    let s_d = Tensor::randn(1f32, 0.1, (1, 1, d), &dev)?;
    timer.time("dit.norm_scale.candle", 0.0, || {
        candle_nn::ops::rms_norm(&a_out, &w_d, 1e-5)?.broadcast_mul(&s_d)
    })?;
    timer.time("dit.norm_scale.fused", 0.0, || {
        rms_norm::rms_norm_scale(&a_out, &w_d, Some(&s_d), 1e-5)
    })?;
    timer.time("dit.norm_gate_add.candle", 0.0, || {
        &x + candle_nn::ops::rms_norm(&a_out, &w_d, 1e-5)?.broadcast_mul(&s_d)?
    })?;
    timer.time("dit.norm_gate_add.fused", 0.0, || {
        rms_norm::rms_norm_gate_add(&x, &a_out, &w_d, Some(&s_d), 1e-5)
    })?;
    {
        let xh = x.reshape((1, l, h, hd))?;
        let hd_w = Tensor::randn(1f32, 0.1, hd, &dev)?;
        let cos = Tensor::randn(0f32, 1.0, (1, l, hd / 2), &dev)?;
        let sin = Tensor::randn(0f32, 1.0, (1, l, hd / 2), &dev)?;
        timer.time("dit.qk_prep.candle", 0.0, || {
            let n = candle_nn::ops::rms_norm(&xh, &hd_w, 1e-5)?;
            let t = n.transpose(1, 2)?.contiguous()?;
            candle_nn::rotary_emb::rope_i(&t, &cos, &sin)? * 0.088
        })?;
        timer.time("dit.qk_prep.fused", 0.0, || {
            rms_norm::qk_norm_rope(&xh, Some(&hd_w), 1e-5, &cos, &sin, 0.088)
        })?;
    }

    let gate = Tensor::randn(0f32, 1.0, (1, l, ffn), &dev)?;
    timer.time("dit.ffn.silu_mul.candle", 0.0, || {
        candle_nn::ops::silu(&gate)? * &hidden
    })?;
    timer.time("dit.ffn.silu_mul", 0.0, || act::silu_mul(&gate, &hidden))?;

    let norm_w = Tensor::ones(d, DType::F32, &dev)?;
    timer.time("dit.rms_norm", 0.0, || {
        candle_nn::ops::rms_norm(&x, &norm_w, 1e-5)
    })?;
    let xh = x.reshape((1, l, h, hd))?;
    let hd_w = Tensor::ones(hd, DType::F32, &dev)?;
    timer.time("dit.qk_norm", 0.0, || {
        candle_nn::ops::rms_norm(&xh, &hd_w, 1e-5)
    })?;
    timer.time("dit.heads_transpose", 0.0, || {
        xh.transpose(1, 2)?.contiguous()
    })?;
    let q = xh.transpose(1, 2)?.contiguous()?;
    let k = (&q * 0.5)?;
    let v = (&q * 0.25)?;
    let cos = Tensor::randn(0f32, 1.0, (1, l, hd / 2), &dev)?;
    let sin = Tensor::randn(0f32, 1.0, (1, l, hd / 2), &dev)?;
    timer.time("dit.rope_i", 0.0, || {
        candle_nn::rotary_emb::rope_i(&q, &cos, &sin)
    })?;
    timer.time("dit.attn.scale_q", 0.0, || &q * 0.088)?;
    let attn_mm = 2.0 * lf * lf * d as f64;
    timer.time("dit.attn.qk_matmul", attn_mm, || q.matmul(&k.t()?))?;
    let scores = q.matmul(&k.t()?)?;
    timer.time("dit.attn.softmax", 0.0, || {
        candle_nn::ops::softmax_last_dim(&scores)
    })?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    timer.time("dit.attn.pv_matmul", attn_mm, || probs.matmul(&v))?;
    timer.time("dit.attn.qk_matmul.bf16_operands", attn_mm, || {
        linear::matmul(&q, &k.t()?, true)
    })?;
    timer.time("dit.attn.pv_matmul.bf16_operands", attn_mm, || {
        linear::matmul(&probs, &v, true)
    })?;
    timer.time("dit.attn.fused_bf16_operands", 2.0 * attn_mm, || {
        let q = (&q * 0.088)?;
        let opts = Attention {
            bf16_products: true,
            ..Attention::default()
        };
        attention(&q, &k, &v, &opts)
    })?;
    timer.time("dit.attn.fused_f32", 2.0 * attn_mm, || {
        let q = (&q * 0.088)?;
        let opts = Attention {
            bf16_products: false,
            ..Attention::default()
        };
        attention(&q, &k, &v, &opts)
    })?;
    timer.time("dit.attn.sdpa_total", 2.0 * attn_mm, || {
        let s = (&q * 0.088)?.matmul(&k.t()?)?;
        candle_nn::ops::softmax_last_dim(&s)?.matmul(&v)
    })?;
    timer.time("dit.attn.merge_heads", 0.0, || {
        q.transpose(1, 2)?.reshape((1, l, d))
    })?;

    // VAE decoder convolutions of the medium model at this image size (3×3, stride 1, pad 1).
    let px = args.size;
    let convs = [
        (256, 256, px / 8),
        (256, 256, px / 4),
        (256, 128, px / 2),
        (128, 128, px / 2),
        (128, 64, px),
        (64, 64, px),
        (128, 128, px),
        (256, 256, px / 2),
        // SD-Turbo's UNet levels at this size (latent px/8).
        (320, 320, px / 8),
        (640, 640, px / 16),
        (1920, 640, px / 16),
        (1280, 1280, px / 32),
        (2560, 1280, px / 32),
        (1280, 1280, px / 64),
    ];
    let cvb = VarBuilder::zeros(DType::F32, &dev);
    for (cin, cout, hw) in convs {
        let conv = candle_nn::conv2d(
            cin,
            cout,
            3,
            Conv2dConfig {
                padding: 1,
                ..Default::default()
            },
            cvb.pp(format!("c{cin}_{cout}_{hw}")),
        )?;
        let inp = Tensor::randn(0f32, 1.0, (1, cin, hw, hw), &dev)?;
        let flops = 2.0 * (cin * cout * 9 * hw * hw) as f64;
        // The convolution the VAE runs (ops::conv: tap-wise on the CPU).
        let ours = zturbo::ops::conv::Conv::new(conv, true);
        timer.time(&format!("vae.conv3x3.{cin}to{cout}@{hw}"), flops, || {
            ours.forward(&inp)
        })?;
    }
    let big = Tensor::randn(0f32, 1.0, (1, 64, px, px), &dev)?;
    let (gamma, beta) = (
        Tensor::ones(64, DType::F32, &dev)?,
        Tensor::zeros(64, DType::F32, &dev)?,
    );
    // The VAE's GroupNorm (ops::group_norm: statistics, then one affine sweep), without and with
    // the SiLU it fuses.
    timer.time(&format!("vae.group_norm.64@{px}"), 0.0, || {
        zturbo::ops::group_norm::group_norm(&big, &gamma, &beta, 32, 1e-6, false)
    })?;
    timer.time(&format!("vae.group_norm_silu.64@{px}"), 0.0, || {
        zturbo::ops::group_norm::group_norm(&big, &gamma, &beta, 32, 1e-6, true)
    })?;
    timer.time(&format!("vae.silu.64@{px}"), 0.0, || {
        candle_nn::ops::silu(&big)
    })?;
    let half = Tensor::randn(0f32, 1.0, (1, 128, px / 2, px / 2), &dev)?;
    timer.time(&format!("vae.upsample_nearest.128@{}", px / 2), 0.0, || {
        half.upsample_nearest2d(px, px)
    })?;
    Ok(())
}
