//! Stage-by-stage parity of the SDXL-Turbo family with diffusers 0.42.1
//! `StableDiffusionXLPipeline` / transformers `CLIPTextModel` + `CLIPTextModelWithProjection`, on
//! the tiny random-weight model in `tests/fixtures/tiny-sdxl-turbo` (goldens made by
//! `tests/fixtures/gen/gen_sdxl_turbo.py`, CPU, float32; the call of each run is in its
//! metadata). Every floating-point stage is compared relative to the golden's largest magnitude
//! (the random weights make latents large, as in the SD-Turbo fixture), at the bounds the
//! implementation meets today: a move of the UNet, the CLIP encoders or the VAE that changes the
//! arithmetic shows up here.

mod common;

use candle_core::{Device, Tensor};
use common::{fixture, ids, max_abs, max_abs_diff, Golden};
use zturbo::families::sd_turbo::unet::TextTime;
use zturbo::families::sd_turbo::{SdTurbo, Variant};
use zturbo::families::{Family, ModelDir, PrecisionPolicy, StepInput};

/// The bound the embeddings, latents and decoded pixels meet (relative to the golden's largest
/// magnitude; measured: at most 8.9e-7, the zeroed-negative run's final latents).
const REL: f32 = 9e-7;
/// The bound of a single UNet output (the noise prediction) and of the [0, 1] image: measured at
/// most 1.47e-6 (the zeroed-negative run's guided noise prediction) and 1.07e-6.
const UNET_REL: f32 = 2e-6;

fn model() -> SdTurbo {
    let dir = ModelDir::open(fixture("tiny-sdxl-turbo")).unwrap();
    let m = SdTurbo::open(dir, &Device::Cpu, PrecisionPolicy::F32).unwrap();
    assert_eq!(m.variant(), Variant::Sdxl);
    m
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
fn both_tokenizers_match_transformers() {
    let m = model();
    let g = Golden::load("tiny-sdxl-turbo/golden/text_encoder.safetensors");
    let texts: Vec<String> = serde_json::from_value(g.json("texts")).unwrap();
    assert_eq!(texts.len(), 3);
    let tok2 = m.tokenizer_2().unwrap();
    for (i, text) in texts.iter().enumerate() {
        let want = ids(g.get(&format!("{i}.te1.input_ids")));
        assert_eq!(m.tokenize(text).unwrap(), want, "text {i}: {text:?}");
        let want = ids(g.get(&format!("{i}.te2.input_ids")));
        assert_eq!(
            tok2.encode(text).unwrap(),
            want,
            "text {i} (tokenizer_2): {text:?}"
        );
        let tokens: Vec<String> =
            serde_json::from_value(g.json(&format!("{i}.te2.tokens"))).unwrap();
        let ours = tok2.tokens(text).unwrap();
        assert_eq!(
            ours,
            tokens[..ours.len()],
            "text {i} token strings (tokenizer_2)"
        );
    }
}

/// transformers' `hidden_states[-2]` of both encoders, the first one's `last_hidden_state` and the
/// second one's projected `text_embeds`.
#[test]
fn text_encoders_match_hidden_states_and_text_embeds() {
    let mut m = model();
    let g = Golden::load("tiny-sdxl-turbo/golden/text_encoder.safetensors");
    let texts: Vec<String> = serde_json::from_value(g.json("texts")).unwrap();
    for (i, text) in texts.iter().enumerate() {
        let a = m.text_encoder_forward(text).unwrap();
        let want = g.get(&format!("{i}.te1.hidden_states_minus_2"));
        assert_rel(
            &format!("text {i} te1 hidden_states[-2]"),
            &a.penultimate,
            want,
            REL,
        );
        let want = g.get(&format!("{i}.te1.last_hidden_state"));
        assert_rel(
            &format!("text {i} te1 last_hidden_state"),
            &a.last_hidden,
            want,
            REL,
        );
        let b = m.text_encoder_2_forward(text).unwrap();
        let want = g.get(&format!("{i}.te2.hidden_states_minus_2"));
        assert_rel(
            &format!("text {i} te2 hidden_states[-2]"),
            &b.penultimate,
            want,
            REL,
        );
        let want = g.get(&format!("{i}.te2.text_embeds"));
        assert_rel(&format!("text {i} te2 text_embeds"), &b.pooled, want, REL);
    }
}

/// Case a: the first UNet call of `run_1step`; case b: batch 2, a 12×20 latent, timestep 500,
/// random conditioning and two different size ids.
#[test]
fn unet_forward_matches_both_cases() {
    let mut m = model();
    let g = Golden::load("tiny-sdxl-turbo/golden/unet_forward.safetensors");
    for case in ["a", "b"] {
        let sample = g.get(&format!("{case}.sample"));
        let t = g
            .get(&format!("{case}.timestep"))
            .to_scalar::<f32>()
            .unwrap();
        let ctx = g.get(&format!("{case}.encoder_hidden_states"));
        let tt = TextTime {
            text_embeds: g.get(&format!("{case}.text_embeds")),
            time_ids: g.get(&format!("{case}.time_ids")),
        };
        let b = sample.dim(0).unwrap();
        let out = m.unet_forward(sample, &vec![t; b], ctx, Some(&tt)).unwrap();
        assert_rel(
            &format!("unet case {case}"),
            &out,
            g.get(&format!("{case}.out")),
            UNET_REL,
        );
    }
}

/// A golden pipeline run through the family API, as the engine drives it: `encode`, then per step
/// `predict` (diffusers' Euler derivative, CFG inside) and `x + (σ_next − σ)·d`, then the decode.
fn pipeline_run(golden: &str, steps: usize, cfg: f32, negative: Option<&str>) {
    let g = Golden::load(golden);
    let call = g.json("call");
    assert_eq!(call["num_inference_steps"], steps);
    let mut m = model();
    let prompt = g.meta["prompt"].clone();
    assert_eq!(m.tokenize(&prompt).unwrap(), ids(g.get("prompt.input_ids")));
    let tok2 = m.tokenizer_2().unwrap();
    assert_eq!(
        tok2.encode(&prompt).unwrap(),
        ids(g.get("prompt.input_ids_2"))
    );
    let cond = m.encode(&prompt, negative).unwrap();
    assert_rel(
        "prompt embeds",
        &cond.positive.hidden,
        g.get("prompt.embeds"),
        REL,
    );
    let pooled = cond.positive.pooled.as_ref().unwrap();
    assert_rel("pooled prompt embeds", pooled, g.get("prompt.pooled"), REL);
    if cfg > 1.0 {
        let neg = cond.negative.as_ref().unwrap();
        let want = g.get("negative.embeds");
        let neg_pooled = neg.pooled.as_ref().unwrap();
        if negative.is_some_and(|n| n.trim().is_empty()) {
            // `force_zeros_for_empty_prompt`: diffusers zeroes the whole negative conditioning.
            assert_eq!(max_abs(want), 0.0);
            assert_eq!(max_abs(g.get("negative.pooled")), 0.0);
            assert_eq!(max_abs(&neg.hidden), 0.0);
            assert_eq!(max_abs(neg_pooled), 0.0);
        } else {
            assert_rel("negative embeds", &neg.hidden, want, REL);
            assert_rel("negative pooled", neg_pooled, g.get("negative.pooled"), REL);
        }
    }

    let (_, _, lh, lw) = g.get("initial_noise").dims4().unwrap();
    let schedule = m.schedule(steps, lh, lw).unwrap();
    let want_ts: Vec<f32> = g.get("scheduler.timesteps").to_vec1().unwrap();
    assert_eq!(schedule.timesteps, want_ts);
    let sig = Tensor::new(schedule.sigmas.as_slice(), &Device::Cpu).unwrap();
    assert_rel("sigmas", &sig, g.get("scheduler.sigmas"), REL);
    let init = g.get("init_noise_sigma").to_scalar::<f32>().unwrap();
    assert_eq!(schedule.init_noise_sigma, init);

    let mut x = (g.get("initial_noise") * f64::from(schedule.init_noise_sigma)).unwrap();
    for i in 0..steps {
        let sigma = schedule.sigmas[i];
        let x_in = x
            .broadcast_div(&Tensor::new((sigma * sigma + 1.0).sqrt(), &Device::Cpu).unwrap())
            .unwrap();
        let want_in = g.get("step.unet_input").get(i).unwrap();
        assert_rel(&format!("step {i} unet input"), &x_in, &want_in, REL);
        let d = m
            .predict(
                &x,
                &cond,
                StepInput {
                    index: i,
                    schedule: &schedule,
                    cfg,
                },
            )
            .unwrap();
        // Epsilon prediction: d = (x − x0)/σ is the (guided) noise prediction itself.
        let want_eps = g.get("step.noise_pred").get(i).unwrap();
        assert_rel(&format!("step {i} noise_pred"), &d, &want_eps, UNET_REL);
        let x0 = (&x - (&d * f64::from(sigma)).unwrap()).unwrap();
        let want_x0 = g.get("step.pred_original_sample").get(i).unwrap();
        assert_rel(
            &format!("step {i} pred_original_sample"),
            &x0,
            &want_x0,
            REL,
        );
        let dt = schedule.sigmas[i + 1] - sigma;
        x = (&x + (d * f64::from(dt)).unwrap()).unwrap();
        let want_x = g.get("step.latents").get(i).unwrap();
        assert_rel(&format!("step {i} latents"), &x, &want_x, REL);
    }
    assert_rel("final latents", &x, g.get("final_latents"), REL);
    let vae_in = m.vae_input(&x).unwrap();
    assert_rel("vae input", &vae_in, g.get("vae.input"), REL);
    let decoded = m.decode(&x).unwrap();
    assert_rel("vae decoded", &decoded, g.get("vae.decoded"), REL);
    let img = ((decoded / 2.0).unwrap() + 0.5)
        .unwrap()
        .clamp(0f32, 1f32)
        .unwrap()
        .permute((0, 2, 3, 1))
        .unwrap();
    assert_rel("image", &img, g.get("image"), UNET_REL);
}

/// `guidance_scale=0.0`, one step: the model card's setting (our CFG 1.0, guidance off).
#[test]
fn one_step_run_matches_every_stage() {
    pipeline_run("tiny-sdxl-turbo/golden/run_1step.safetensors", 1, 1.0, None);
}

/// `guidance_scale=1.5`, `negative_prompt="blurry"`: two UNet passes, combined as diffusers does.
#[test]
fn guided_run_with_a_negative_prompt_matches_every_stage() {
    pipeline_run(
        "tiny-sdxl-turbo/golden/run_cfg1.5.safetensors",
        1,
        1.5,
        Some("blurry"),
    );
}

/// `guidance_scale=1.5` without a negative prompt: `force_zeros_for_empty_prompt` zeroes the
/// negative conditioning (our callers send an empty negative for that).
#[test]
fn guided_run_with_the_zeroed_negative_matches_every_stage() {
    pipeline_run(
        "tiny-sdxl-turbo/golden/run_cfg1.5_zero_negative.safetensors",
        1,
        1.5,
        Some(""),
    );
}

/// Two steps with `EulerDiscreteScheduler` (the generator swaps out the ancestral scheduler, whose
/// fresh noise we do not inject): our deterministic Euler on the fixture's own scheduler file.
#[test]
fn two_step_euler_run_matches_every_stage() {
    pipeline_run(
        "tiny-sdxl-turbo/golden/run_2step_euler.safetensors",
        2,
        1.0,
        None,
    );
}
