//! The anti-black-image guard, proven by fault injection on the tiny Z-Image model: NaN at a step
//! rolls back and lowers CFG (and the recovered latents equal a clean run with that CFG from that
//! step on), NaN on every attempt fails the job without an image, VAE NaN retries the decode in
//! f32, a blank image is regenerated from a new seed, CFG ≥ 3 is clamped.

mod common;

use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::{fixture, max_abs_diff};
use zturbo::engine::guard::FaultPlan;
use zturbo::engine::{CancelToken, Engine, EngineConfig, EngineError, NullObserver, RunExtras};
use zturbo::families::z_image::ZImage;
use zturbo::families::{Family, ModelDir, PrecisionPolicy, StepInput};
use zturbo::memory::planner::MemoryMode;
use zturbo::memory::probe::CpuProbe;
use zturbo::request::ValidRequest;

const PROMPT: &str = "a serene mountain lake at dawn";

fn family() -> ZImage {
    ZImage::open(
        ModelDir::open(fixture("tiny-z-image")).unwrap(),
        &Device::Cpu,
        PrecisionPolicy::F32,
    )
    .unwrap()
}

fn engine(faults: &str) -> Engine {
    Engine::new(
        Box::new(family()),
        "tiny",
        Arc::new(CpuProbe::new()),
        EngineConfig {
            memory_budget: None,
            faults: FaultPlan::parse(faults).unwrap(),
        },
    )
}

fn request(cfg: f32) -> ValidRequest {
    ValidRequest {
        prompt: PROMPT.into(),
        negative_prompt: Some("blurry".into()),
        width: 128,
        height: 128,
        steps: 8,
        cfg,
        seed: 42,
        batch: 1,
        enhance: false,
        memory_mode: MemoryMode::Performance,
        init: None,
        control: None,
        loras: Vec::new(),
        enhance_exclude: Vec::new(),
    }
}

/// The clean reference: the same loop with an explicit CFG per step.
fn reference(cfgs: &[f32], init: &Tensor) -> Tensor {
    let mut m = family();
    let cond = m.encode(PROMPT, Some("blurry")).unwrap();
    let s = m.schedule(8, 16, 16).unwrap();
    let mut x = init.clone();
    for (i, &cfg) in cfgs.iter().enumerate() {
        let d = m
            .predict(
                &x,
                &cond,
                StepInput {
                    index: i,
                    schedule: &s,
                    cfg,
                },
            )
            .unwrap();
        x = (&x + (d * (s.sigmas[i + 1] - s.sigmas[i]) as f64).unwrap()).unwrap();
    }
    x
}

fn init_latents() -> Tensor {
    zturbo::nn::rng::noise(42, &[16, 16, 16], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

fn run(faults: &str, cfg: f32) -> Result<zturbo::engine::Generation, EngineError> {
    let extras = RunExtras {
        init_latents: Some(init_latents()),
    };
    engine(faults).generate(
        &request(cfg),
        &extras,
        &mut NullObserver,
        &CancelToken::new(),
    )
}

#[test]
fn nan_steps_recover_with_lowered_cfg_exactly() {
    for step in [1usize, 3, 8] {
        for attempts in [1u32, 2, 3] {
            let g = run(
                &format!("denoiser-nan@step={step},attempts={attempts}"),
                2.8,
            )
            .unwrap_or_else(|e| panic!("step {step} attempts {attempts}: {e}"));
            // CFG falls by ×0.75 per failed attempt (floor 1.0) and stays lowered afterwards.
            let mut lowered = 2.8f32;
            for _ in 0..attempts {
                lowered = (lowered * 0.75).max(1.0);
            }
            let adjusted: Vec<_> = g
                .notices
                .iter()
                .filter(|n| n.kind == "cfg_adjusted")
                .collect();
            assert_eq!(adjusted.len(), attempts as usize, "{:?}", g.notices);
            assert!(adjusted.iter().all(|n| n.step == Some(step)));
            assert!((adjusted.last().unwrap().to.unwrap() - lowered).abs() < 1e-6);
            assert!((g.params.run.cfg - lowered).abs() < 1e-6);
            assert_eq!(g.params.cfg_requested, 2.8);

            let cfgs: Vec<f32> = (1..=8)
                .map(|s| if s < step { 2.8 } else { lowered })
                .collect();
            let want = reference(&cfgs, &init_latents());
            let d = max_abs_diff(&g.latents, &want);
            assert!(
                d < 1e-5,
                "step {step} attempts {attempts}: latents differ by {d}"
            );
            let img = &g.images[0];
            let (lo, hi) = img
                .rgb
                .iter()
                .fold((255u8, 0u8), |(a, b), &v| (a.min(v), b.max(v)));
            assert!(hi - lo > 4, "image is flat");
        }
    }
}

#[test]
fn unguided_nan_is_retried_at_the_same_cfg() {
    let g = run("denoiser-nan@step=2,attempts=1", 1.0).unwrap();
    assert!(g
        .notices
        .iter()
        .any(|n| n.kind == "step_retried" && n.step == Some(2)));
    let want = reference(&[1.0; 8], &init_latents());
    assert!(max_abs_diff(&g.latents, &want) < 1e-5);
}

#[test]
fn nan_on_every_attempt_fails_clearly() {
    match run("denoiser-nan@step=3,attempts=all", 2.8) {
        Err(EngineError::NonFinite { stage, detail }) => {
            assert!(stage.contains("step 3"), "{stage}");
            assert!(detail.contains("retries"), "{detail}");
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a permanently NaN step must fail the job"),
    }
}

#[test]
fn vae_nan_retries_in_f32_and_matches_a_clean_decode() {
    let clean = run("", 1.0).unwrap();
    let g = run("vae-nan", 1.0).unwrap();
    assert!(g
        .notices
        .iter()
        .any(|n| n.kind == "precision_raised" && n.component.as_deref() == Some("vae")));
    assert_eq!(g.images[0].rgb, clean.images[0].rgb);
    // Permanent VAE failure is an error, never an image.
    assert!(matches!(
        run("vae-nan@attempts=all", 1.0),
        Err(EngineError::NonFinite { .. })
    ));
}

#[test]
fn blank_image_is_regenerated_from_a_new_seed_then_fails() {
    let g = run("vae-black", 1.0).unwrap();
    let n = g
        .notices
        .iter()
        .find(|n| n.kind == "black_retry")
        .expect("notice");
    assert!(n.message.contains("1000045"), "{}", n.message); // 42 + 1_000_003
    assert_eq!(g.images[0].seed, 42 + 1_000_003);
    assert!(matches!(
        run("vae-black@attempts=all", 1.0),
        Err(EngineError::BlankImage(_))
    ));
}

#[test]
fn cfg_above_three_is_clamped_to_the_safe_maximum() {
    let g = run("", 3.2).unwrap();
    let n = g
        .notices
        .iter()
        .find(|n| n.kind == "cfg_clamped")
        .expect("notice");
    assert_eq!((n.from, n.to), (Some(3.2), Some(2.4)));
    assert_eq!(g.params.run.cfg, 2.4);
    assert_eq!(g.params.cfg_requested, 3.2);
    let want = reference(&[2.4; 8], &init_latents());
    assert!(max_abs_diff(&g.latents, &want) < 1e-5);
}

/// A family wrapper that records whether guidance ever reached the model.
struct Spy {
    inner: ZImage,
    guided_calls: Arc<std::sync::atomic::AtomicUsize>,
    negative_encoded: Arc<std::sync::atomic::AtomicBool>,
}

impl Family for Spy {
    fn profile(&self) -> &zturbo::families::Profile {
        self.inner.profile()
    }
    fn components(&self) -> &dyn zturbo::families::Components {
        self.inner.components()
    }
    fn components_mut(&mut self) -> &mut dyn zturbo::families::Components {
        self.inner.components_mut()
    }
    fn activation_model(&self) -> zturbo::memory::ActivationModel {
        self.inner.activation_model()
    }
    fn schedule(
        &self,
        s: usize,
        h: usize,
        w: usize,
    ) -> Result<zturbo::families::Schedule, zturbo::families::ModelError> {
        self.inner.schedule(s, h, w)
    }
    fn encode(
        &mut self,
        p: &str,
        n: Option<&str>,
    ) -> Result<zturbo::families::Conditioning, zturbo::families::ModelError> {
        if n.is_some() {
            self.negative_encoded
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        self.inner.encode(p, n)
    }
    fn predict(
        &mut self,
        x: &Tensor,
        c: &zturbo::families::Conditioning,
        s: StepInput<'_>,
    ) -> Result<Tensor, zturbo::families::ModelError> {
        if s.cfg > 1.0 && c.negative.is_some() {
            self.guided_calls
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.inner.predict(x, c, s)
    }
    fn vae_input(&self, l: &Tensor) -> Result<Tensor, zturbo::families::ModelError> {
        self.inner.vae_input(l)
    }
    fn lora_layers(&self) -> &zturbo::families::lora::LinearLayers {
        self.inner.lora_layers()
    }
    fn set_loras(
        &mut self,
        set: Arc<zturbo::families::lora::LoraSet>,
    ) -> Result<(), zturbo::families::ModelError> {
        self.inner.set_loras(set)
    }
}

#[test]
fn cfg_one_never_runs_the_unconditional_branch() {
    let guided = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let negative = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spy = Spy {
        inner: family(),
        guided_calls: guided.clone(),
        negative_encoded: negative.clone(),
    };
    let mut e = Engine::new(
        Box::new(spy),
        "tiny",
        Arc::new(CpuProbe::new()),
        EngineConfig::default(),
    );
    let mut req = request(1.0);
    req.enhance = true; // even with the default negative prompt available
    let g = e
        .generate(
            &req,
            &RunExtras::default(),
            &mut NullObserver,
            &CancelToken::new(),
        )
        .unwrap();
    assert_eq!(guided.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert!(!negative.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(g.params.run.negative_prompt, None);
    // And with guidance every step is guided.
    let g = e
        .generate(
            &request(1.8),
            &RunExtras::default(),
            &mut NullObserver,
            &CancelToken::new(),
        )
        .unwrap();
    assert_eq!(guided.load(std::sync::atomic::Ordering::SeqCst), 8);
    assert!(g.params.run.negative_prompt.is_some());
}
