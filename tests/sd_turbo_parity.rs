//! Stage-by-stage parity of the SD-Turbo family with diffusers 0.42.1 `StableDiffusionPipeline` /
//! transformers 5.24 `CLIPTextModel`, on the tiny random-weight model in
//! `tests/fixtures/tiny-sd-turbo` (goldens made by `tests/fixtures/gen/gen_sd_turbo.py`, CPU,
//! float32). The random weights make latents large (|x| ≲ 50, VAE input ≲ 280), so those stages
//! are compared relative to the golden's largest magnitude, as the fixture README advises.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixture, ids, max_abs, max_abs_diff, Golden};
use zturbo::families::sd_turbo::{SdTurbo, Variant};
use zturbo::families::{self, Family, ModelDir, PrecisionPolicy, StepInput};

fn model() -> SdTurbo {
    let dir = ModelDir::open(fixture("tiny-sd-turbo")).unwrap();
    SdTurbo::open(dir, &Device::Cpu, PrecisionPolicy::F32).unwrap()
}

/// max|got − want| / max|want|, asserted against `tol`; prints both numbers.
#[track_caller]
fn assert_rel(what: &str, got: &Tensor, want: &Tensor, tol: f32) -> f32 {
    let d = max_abs_diff(got, want);
    let rel = d / max_abs(want);
    assert!(
        rel <= tol,
        "{what}: max |diff| = {d:e}, relative {rel:e} > {tol:e}"
    );
    eprintln!("{what}: max |diff| = {d:e} (relative {rel:e})");
    rel
}

#[test]
fn tokenizer_matches_transformers() {
    let m = model();
    let g = Golden::load("tiny-sd-turbo/golden/text_encoder.safetensors");
    let texts: Vec<String> = serde_json::from_value(g.json("texts")).unwrap();
    assert_eq!(texts.len(), 3);
    for (i, text) in texts.iter().enumerate() {
        let want = ids(g.get(&format!("{i}.input_ids")));
        assert_eq!(m.tokenize(text).unwrap(), want, "text {i}: {text:?}");
        let tokens: Vec<String> = serde_json::from_value(g.json(&format!("{i}.tokens"))).unwrap();
        let ours = m.tokenizer().tokens(text).unwrap();
        assert_eq!(ours, tokens[..ours.len()], "text {i} token strings");
    }
    let run = Golden::load("tiny-sd-turbo/golden/run_1step.safetensors");
    let want = ids(run.get("prompt.input_ids"));
    assert_eq!(
        &want[..12],
        &[800, 320, 655, 518, 77, 324, 752, 583, 537, 702, 801, 0]
    );
    assert_eq!(m.tokenize("a serene mountain lake at dawn").unwrap(), want);
}

/// Our tokenizer, built from vocab.json + merges.txt, agrees with the `tokenizers` pipeline
/// transformers itself built (`golden/clip_tokenizer.json`) on every line of the corpus the BPE
/// was learned from, plus edge cases: long input (truncated to 77), "!" in the text (the pad
/// token), unknown characters, case and whitespace.
#[test]
fn tokenizer_agrees_with_the_converted_fast_tokenizer() {
    let m = model();
    let reference =
        tokenizers::Tokenizer::from_file(fixture("tiny-sd-turbo/golden/clip_tokenizer.json"))
            .unwrap();
    let corpus = std::fs::read_to_string(fixture("gen/corpus.txt")).unwrap();
    let long = "a serene mountain lake at dawn ".repeat(20);
    let extra = [
        "",
        "!!!",
        "Hello, World!  Ünïcödé  ✨ 東京 🚀",
        "it's\tthe   LAKE's\nmorning",
        long.as_str(),
    ];
    for text in corpus.lines().chain(extra) {
        let want = reference.encode(text, true).unwrap().get_ids().to_vec();
        assert_eq!(m.tokenize(text).unwrap(), want, "{text:?}");
    }
}

#[test]
fn text_encoder_matches_last_hidden_state_and_pooled() {
    let mut m = model();
    let g = Golden::load("tiny-sd-turbo/golden/text_encoder.safetensors");
    let texts: Vec<String> = serde_json::from_value(g.json("texts")).unwrap();
    for (i, text) in texts.iter().enumerate() {
        let out = m.text_encoder_forward(text).unwrap();
        assert_close(
            &format!("text {i} last_hidden_state"),
            &out.last_hidden,
            g.get(&format!("{i}.last_hidden_state")),
            1e-4,
        );
        assert_close(
            &format!("text {i} pooler_output"),
            &out.pooled,
            g.get(&format!("{i}.pooler_output")),
            1e-4,
        );
    }
}

#[test]
fn unet_forward_matches_both_cases() {
    let mut m = model();
    let g = Golden::load("tiny-sd-turbo/golden/unet_forward.safetensors");
    for case in ["a", "b"] {
        let sample = g.get(&format!("{case}.sample"));
        let t = g
            .get(&format!("{case}.timestep"))
            .to_scalar::<f32>()
            .unwrap();
        let ctx = g.get(&format!("{case}.encoder_hidden_states"));
        let b = sample.dim(0).unwrap();
        let out = m.unet_forward(sample, &vec![t; b], ctx, None).unwrap();
        let want = g.get(&format!("{case}.out"));
        assert_close(&format!("unet case {case}"), &out, want, 1e-4);
        assert_rel(&format!("unet case {case}"), &out, want, 1e-5);
    }
}

#[test]
fn scheduler_matches_diffusers() {
    let m = model();
    let g = Golden::load("tiny-sd-turbo/golden/scheduler.safetensors");
    let cfg = m.scheduler_config();
    let ac = Tensor::new(cfg.alphas_cumprod().as_slice(), &Device::Cpu).unwrap();
    let d = max_abs_diff(&ac, g.get("alphas_cumprod"));
    eprintln!("alphas_cumprod: max |diff| = {d:e}");
    assert_eq!(d, 0.0, "alphas_cumprod differ by {d:e}");
    for n in [1usize, 2, 4, 8] {
        let s = m.schedule(n, 16, 16).unwrap();
        let ts: Vec<f32> = g.get(&format!("n{n}.timesteps")).to_vec1::<f32>().unwrap();
        assert_eq!(s.timesteps, ts, "timesteps for N = {n}");
        let sig = Tensor::new(s.sigmas.as_slice(), &Device::Cpu).unwrap();
        assert_close(
            &format!("sigmas N = {n}"),
            &sig,
            g.get(&format!("n{n}.sigmas")),
            1e-6,
        );
        let init = g
            .get(&format!("n{n}.init_noise_sigma"))
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            (s.init_noise_sigma - init).abs() <= 1e-6,
            "init_noise_sigma N = {n}: {} vs {init}",
            s.init_noise_sigma
        );
    }
    assert!((m.schedule(1, 16, 16).unwrap().init_noise_sigma - 14.614647).abs() < 1e-5);
}

#[test]
fn vae_decode_matches() {
    let mut m = model();
    let g = Golden::load("tiny-sd-turbo/golden/vae.safetensors");
    // `decode` takes sampler latents and divides by the scaling factor itself.
    let z = g.get("decode.z");
    let latents = (z * m.vae_config().scaling_factor).unwrap();
    let out = m.decode(&latents).unwrap();
    assert_close("vae decode", &out, g.get("decode.out"), 1e-4);
}

/// The golden's step loop through the family API: `predict` returns diffusers' Euler derivative,
/// the engine's update `x + (σ_next − σ)·d` gives the golden latents after every step.
fn stepwise(golden: &str, steps: usize) {
    let g = Golden::load(golden);
    let mut m = model();
    let cond = m.encode("a serene mountain lake at dawn", None).unwrap();
    assert_close(
        "prompt embeds",
        &cond.positive.hidden,
        g.get("prompt.embeds"),
        1e-4,
    );
    let schedule = m.schedule(steps, 16, 16).unwrap();
    let want_ts: Vec<f32> = g.get("scheduler.timesteps").to_vec1().unwrap();
    assert_eq!(schedule.timesteps, want_ts);
    let sig = Tensor::new(schedule.sigmas.as_slice(), &Device::Cpu).unwrap();
    assert_close("sigmas", &sig, g.get("scheduler.sigmas"), 1e-6);
    let init = g.get("init_noise_sigma").to_scalar::<f32>().unwrap();
    assert_eq!(schedule.init_noise_sigma, init);

    let mut x = (g.get("initial_noise") * f64::from(schedule.init_noise_sigma)).unwrap();
    for i in 0..steps {
        let sigma = schedule.sigmas[i];
        // What the UNet saw and said, checked on their own before the derivative.
        let x_in = x
            .broadcast_div(&Tensor::new((sigma * sigma + 1.0).sqrt(), &Device::Cpu).unwrap())
            .unwrap();
        let want_in = g.get("step.unet_input").get(i).unwrap();
        assert_rel(&format!("step {i} unet input"), &x_in, &want_in, 1e-6);
        let eps = m
            .unet_forward(
                &want_in,
                &[schedule.timesteps[i]],
                &cond.positive.hidden,
                None,
            )
            .unwrap();
        let want_eps = g.get("step.noise_pred").get(i).unwrap();
        assert_close(&format!("step {i} noise_pred"), &eps, &want_eps, 1e-4);

        let d = m
            .predict(
                &x,
                &cond,
                StepInput {
                    index: i,
                    schedule: &schedule,
                    cfg: 1.0,
                },
            )
            .unwrap();
        let x0 = (&x - (&d * f64::from(sigma)).unwrap()).unwrap();
        let want_x0 = g.get("step.pred_original_sample").get(i).unwrap();
        assert_rel(
            &format!("step {i} pred_original_sample"),
            &x0,
            &want_x0,
            1e-5,
        );
        let dt = schedule.sigmas[i + 1] - sigma;
        x = (&x + (d * f64::from(dt)).unwrap()).unwrap();
        let want_x = g.get("step.latents").get(i).unwrap();
        assert_rel(&format!("step {i} latents"), &x, &want_x, 1e-5);
    }
    let want = g.get("final_latents");
    assert_rel("final latents", &x, want, 1e-5);
    let vae_in = (&x / 0.18215).unwrap();
    assert_rel("vae input", &vae_in, g.get("vae.input"), 1e-5);
    if let Some(want) = g.tensors.get("vae.decoded") {
        let decoded = m.decode(&x).unwrap();
        assert_close("vae decoded", &decoded, want, 1e-4);
        let img = ((decoded / 2.0).unwrap() + 0.5)
            .unwrap()
            .clamp(0f32, 1f32)
            .unwrap()
            .permute((0, 2, 3, 1))
            .unwrap();
        assert_close("image", &img, g.get("image"), 2e-4);
    }
}

#[test]
fn one_step_run_matches_every_stage() {
    stepwise("tiny-sd-turbo/golden/run_1step.safetensors", 1);
}

#[test]
fn four_step_run_matches_every_stage() {
    stepwise("tiny-sd-turbo/golden/run_4step.safetensors", 4);
}

/// Guidance follows the Z-Image convention (1.0 = off) and reduces to diffusers' SD formula
/// `uncond + cfg·(cond − uncond)` on the UNet output; at cfg 1 the negative is ignored.
#[test]
fn guidance_combines_the_two_predictions() {
    let mut m = model();
    let g = Golden::load("tiny-sd-turbo/golden/run_1step.safetensors");
    let cond = m
        .encode("a serene mountain lake at dawn", Some("blurry"))
        .unwrap();
    let schedule = m.schedule(1, 16, 16).unwrap();
    let x = (g.get("initial_noise") * f64::from(schedule.init_noise_sigma)).unwrap();
    let step = |cfg| StepInput {
        index: 0,
        schedule: &schedule,
        cfg,
    };
    let off = m.predict(&x, &cond, step(1.0)).unwrap();
    let plain = m
        .predict(
            &x,
            &zturbo::families::Conditioning {
                positive: cond.positive.clone(),
                negative: None,
            },
            step(1.0),
        )
        .unwrap();
    assert_eq!(max_abs_diff(&off, &plain), 0.0);

    let guided = m.predict(&x, &cond, step(1.5)).unwrap();
    let sigma = schedule.sigmas[0];
    let x_in = (&x / f64::from((sigma * sigma + 1.0).sqrt())).unwrap();
    let t = [schedule.timesteps[0]];
    let pos = m
        .unet_forward(&x_in, &t, &cond.positive.hidden, None)
        .unwrap();
    let neg_hidden = &cond.negative.as_ref().unwrap().hidden;
    let neg = m.unet_forward(&x_in, &t, neg_hidden, None).unwrap();
    let eps = (&neg + ((&pos - &neg).unwrap() * 1.5).unwrap()).unwrap();
    // d = (x − (x − σ·ε))/σ = ε up to rounding.
    assert_rel("guided derivative", &guided, &eps, 1e-5);
}

#[test]
fn open_picks_the_family_of_each_fixture() {
    for (folder, family) in [("tiny-sd-turbo", "sd-turbo"), ("tiny-z-image", "z-image")] {
        let dir = ModelDir::open(fixture(folder)).unwrap();
        let f = families::open(dir, &Device::Cpu, PrecisionPolicy::F32).unwrap();
        assert_eq!(f.profile().family, family, "{folder}");
    }
    let m = model();
    assert_eq!(m.variant(), Variant::Sd);
    let info = m.profile();
    assert_eq!(
        (
            info.defaults.width,
            info.defaults.height,
            info.defaults.steps
        ),
        (512, 512, 1)
    );
    assert_eq!(info.defaults.cfg, 1.0);
    assert_eq!(info.latent_channels, 4);
    assert_eq!(info.vae_scale_factor, 8);
    assert_eq!(info.size_multiple, 8);
    assert_eq!(info.sampler, "Euler");
    assert_eq!(
        families::family_of_class("StableDiffusionXLPipeline").map(|f| f.as_str()),
        Some("sdxl-turbo")
    );
}

#[test]
fn component_sizes_come_from_the_headers() {
    let m = model();
    let b = m.components().bytes();
    // Parameter counts of the tiny fixture (README manifest), all f32.
    assert_eq!(b.text_encoder, 53_824 * 4);
    assert_eq!(b.denoiser, 217_772 * 4);
    assert_eq!(b.denoiser_blocks, 0);
    assert!(b.vae_decoder > 0 && b.vae_decoder < 85_675 * 4);
    let a = m.activation_model();
    assert_eq!(a.text_tokens, 77);
    assert_eq!(a.denoiser_pixels_per_token, 8);
}

/// The precision policy applies literally: f16 UNet weights with a bf16 residual stream, bf16
/// text encoder (the VAE in f16 here: candle's CPU conv2d has no bf16 kernel). On the CPU this
/// only checks the dtype plumbing (every cast in place, the result finite and near the f32
/// golden); the speed and overflow behaviour are the GPU's.
#[test]
fn mixed_precision_runs_close_to_f32() {
    let dir = ModelDir::open(fixture("tiny-sd-turbo")).unwrap();
    let policy = PrecisionPolicy {
        vae: DType::F16,
        ..PrecisionPolicy::MIXED
    };
    let mut m = SdTurbo::open(dir, &Device::Cpu, policy).unwrap();
    let g = Golden::load("tiny-sd-turbo/golden/run_1step.safetensors");
    let cond = m.encode("a serene mountain lake at dawn", None).unwrap();
    assert_eq!(cond.positive.hidden.dtype(), DType::F32);
    assert_rel(
        "bf16 prompt embeds",
        &cond.positive.hidden,
        g.get("prompt.embeds"),
        2e-2,
    );
    let schedule = m.schedule(1, 16, 16).unwrap();
    let x = (g.get("initial_noise") * f64::from(schedule.init_noise_sigma)).unwrap();
    let d = m
        .predict(
            &x,
            &cond,
            StepInput {
                index: 0,
                schedule: &schedule,
                cfg: 1.0,
            },
        )
        .unwrap();
    assert_eq!(d.dtype(), DType::F32);
    let x1 = (&x + (d * f64::from(-schedule.sigmas[0])).unwrap()).unwrap();
    assert_rel("mixed final latents", &x1, g.get("final_latents"), 2e-2);
    let px = m.decode(&x1).unwrap();
    assert_eq!(px.dtype(), DType::F32);
    assert_rel("f16 vae decode", &px, g.get("vae.decoded"), 5e-2);
}
