//! The Turbo loop: plan memory, encode the prompt, denoise with the guard, decode right after the
//! last step, check the pixels. `Engine::generate` turns one validated request into images and
//! reports every step, phase and adaptation to an observer.

mod control;
pub mod decode;
pub mod denoise;
pub mod guard;
pub mod load;
mod observe;
pub mod output;
pub mod preview;

pub use observe::*;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::families::lora::{LoraFile, LoraSet};
use crate::families::{Component, DenoiserResidency, Family, ModelError, PrecisionPolicy, Profile};
use crate::inputs::InpaintFill;
use crate::memory::monitor::Tags;
use crate::memory::planner::{self, MemoryMode, Plan, PlanInput, Residency};
use crate::memory::probe::MemoryProbe;
use crate::nn::scheduler::NoiseKind;
use crate::nn::torch_rng::TorchGenerator;
use crate::nn::vae_encoder::Posterior;
use crate::prompt::{self, Enhanced, PromptContext};
use crate::request::{InitImage, ValidRequest};
use guard::{blank_image, Blank, FaultPlan};

/// Seeds of the black-image retry are offset by this (a large prime, so the retry's noise shares
/// nothing with any neighbouring seed the user might also try).
pub const BLACK_RETRY_SEED_OFFSET: u64 = 1_000_003;

/// Engine-wide settings (load-time; per-request choices live in the request).
#[derive(Debug, Clone, Default)]
pub struct EngineConfig {
    /// `--memory-budget`: caps the memory the planner may use.
    pub memory_budget: Option<u64>,
    pub faults: FaultPlan,
}

/// Per-run inputs that are not part of the user-facing request (CLI reproducibility).
#[derive(Debug, Clone, Default)]
pub struct RunExtras {
    /// Initial noise `[B, C, h, w]` used instead of the seeded noise (diffusers' `latents=`).
    pub init_latents: Option<Tensor>,
}

/// One decoded image, RGB8, row-major.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    pub width: u32,
    pub height: u32,
    pub seed: u64,
    pub rgb: Vec<u8>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Timings {
    pub encode_ms: u64,
    pub denoise_ms: u64,
    pub decode_ms: u64,
    pub total_ms: u64,
}

/// The parameters a job actually ran with: the request as it ran (serialised flat, with the
/// request's own field names) and what the engine chose.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResolvedParams {
    pub model: String,
    /// The request with its final values: the prompt as enhanced, the negative prompt given to
    /// the model (`None` when guidance was off: it is unused then), the CFG the last step ran
    /// with (after interception and any backoff), the memory mode the plan ran in.
    #[serde(flatten)]
    pub run: ValidRequest,
    pub cfg_requested: f32,
    pub precision: String,
    pub sampler: String,
    /// Image to image: the strength (`Denoising strength` in A1111's parameters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// Inpainting: σ of the paste-back blur (`Mask blur`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_blur: Option<u32>,
    /// The input image and mask (content hashes, see `inputs::InputStore`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_image: Option<String>,
    /// The LoRAs the run applied, by name, with their weights.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<LoraUse>,
}

/// One applied LoRA as the job's record shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoraUse {
    pub name: String,
    pub weight: f32,
}

pub struct Generation {
    pub images: Vec<GeneratedImage>,
    /// Final latents `[B, C, h, w]` (f32), before the VAE.
    pub latents: Tensor,
    pub params: ResolvedParams,
    pub enhancement: Enhanced,
    pub notices: Vec<Notice>,
    pub timings: Timings,
    pub peak_memory_bytes: u64,
    pub plan: Plan,
}

/// Mutable state of one run, shared by the denoise loop and the decoder.
pub(crate) struct RunState<'a> {
    pub faults: &'a FaultPlan,
    pub cancel: &'a CancelToken,
    observer: &'a mut dyn Observer,
    tags: Option<&'a Tags>,
    pub notices: Vec<Notice>,
    /// Decode attempts so far in this job (fault specs count them).
    pub vae_attempts: u32,
    /// Identifies the job to random fault injection (its seed).
    pub salt: u64,
}

impl<'a> RunState<'a> {
    pub fn new(
        faults: &'a FaultPlan,
        cancel: &'a CancelToken,
        observer: &'a mut dyn Observer,
        tags: Option<&'a Tags>,
    ) -> Self {
        Self {
            faults,
            cancel,
            observer,
            tags,
            notices: Vec::new(),
            vae_attempts: 0,
            salt: 0,
        }
    }

    pub fn notice(&mut self, n: Notice) {
        tracing::info!(kind = %n.kind, "{}", n.message);
        self.observer.notice(&n);
        self.notices.push(n);
    }

    pub fn set_step(&mut self, phase: Phase, step: Option<usize>) {
        if let Some(t) = self.tags {
            t.set_phase(Some(phase.as_str()), step);
        }
    }

    fn phase(&mut self, phase: Phase) {
        self.set_step(phase, None);
        self.observer.phase(phase);
    }

    pub fn wants_preview(&self) -> bool {
        self.observer.wants_preview()
    }

    pub fn preview(&mut self, step: usize, total: usize, x0: &Tensor) {
        self.observer.preview(step, total, x0);
    }

    pub fn step(&mut self, ev: StepEvent) {
        tracing::debug!(
            step = ev.step,
            total = ev.total,
            sigma = ev.sigma,
            "step done"
        );
        self.observer.step(&ev);
    }
}

/// Gives memory freed during a step back: to the OS on CPU (glibc keeps freed arenas otherwise,
/// and the chart would never fall), and a stream sync on CUDA so async frees land between steps.
pub fn release_memory(device: &Device) {
    match device {
        Device::Cpu => {
            // SAFETY: malloc_trim only returns free heap pages to the kernel.
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            unsafe {
                libc::malloc_trim(0);
            }
        }
        other => {
            let _ = other.synchronize();
            #[cfg(feature = "cuda")]
            if let Device::Cuda(d) = other {
                crate::memory::probe::cuda::trim(d);
            }
        }
    }
}

/// The worker-owned engine: one model on one device.
pub struct Engine {
    family: Box<dyn Family>,
    model_name: String,
    probe: Arc<dyn MemoryProbe>,
    config: EngineConfig,
    base_policy: PrecisionPolicy,
    tags: Option<Arc<Tags>>,
    /// The family's facts, with the model's own defaults where they differ (the demo's size).
    profile: Profile,
    /// LoRA files read so far (parsed and matched to the model), kept so switching back to one
    /// costs no disk read.
    loras: LoraCache,
}

/// Parsed LoRA files by path, re-read when the file changes (size or modification time).
#[derive(Default)]
struct LoraCache {
    files: std::collections::HashMap<
        std::path::PathBuf,
        (u64, Option<std::time::SystemTime>, Arc<LoraFile>),
    >,
}

/// Most LoRA files kept parsed at once (the oldest is dropped first).
const LORA_CACHE_FILES: usize = 16;

impl LoraCache {
    fn get(
        &mut self,
        path: &std::path::Path,
        layers: &crate::families::lora::LinearLayers,
    ) -> Result<Arc<LoraFile>, EngineError> {
        let meta = std::fs::metadata(path)
            .map_err(|e| EngineError::Invalid(format!("LoRA {}: {e}", path.display())))?;
        let stamp = (meta.len(), meta.modified().ok());
        if let Some((len, mtime, f)) = self.files.get(path) {
            if (*len, *mtime) == stamp {
                return Ok(f.clone());
            }
        }
        let f = Arc::new(
            LoraFile::read(path, layers).map_err(|e| EngineError::Invalid(e.to_string()))?,
        );
        if self.files.len() >= LORA_CACHE_FILES {
            if let Some(k) = self.files.keys().next().cloned() {
                self.files.remove(&k);
            }
        }
        self.files
            .insert(path.to_path_buf(), (stamp.0, stamp.1, f.clone()));
        Ok(f)
    }
}

impl Engine {
    pub fn new(
        family: Box<dyn Family>,
        model_name: impl Into<String>,
        probe: Arc<dyn MemoryProbe>,
        config: EngineConfig,
    ) -> Self {
        if !config.faults.is_empty() {
            tracing::warn!(faults = ?config.faults.specs, "ZTURBO_FAULT is set: faults will be injected");
        }
        let base_policy = family.components().policy();
        let profile = *family.profile();
        Self {
            profile,
            family,
            model_name: model_name.into(),
            probe,
            config,
            base_policy,
            tags: None,
            loras: LoraCache::default(),
        }
    }

    /// Memory-monitor tags this engine updates with the current phase and step.
    pub fn with_tags(mut self, tags: Arc<Tags>) -> Self {
        self.tags = Some(tags);
        self
    }

    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// Overrides the model's default size/steps/CFG (a model-level fact, e.g. the demo's).
    pub fn with_defaults(mut self, defaults: crate::families::Defaults) -> Self {
        self.profile.defaults = defaults;
        self
    }

    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    pub fn device(&self) -> &Device {
        self.family.components().device()
    }

    pub fn probe(&self) -> &Arc<dyn MemoryProbe> {
        &self.probe
    }

    /// The layers LoRAs may update.
    pub fn lora_layers(&self) -> &crate::families::lora::LinearLayers {
        self.family.lora_layers()
    }

    pub fn family_mut(&mut self) -> &mut dyn Family {
        self.family.as_mut()
    }

    /// The planner's input for a request shape, from live free memory (counting our own loaded
    /// weights as free, since the plan decides whether they stay).
    pub fn plan_input(
        &self,
        width: u32,
        height: u32,
        batch: u32,
        cfg_on: bool,
        mode: MemoryMode,
    ) -> PlanInput {
        let reading = self.probe.read();
        let bytes = self.family.components().bytes();
        let loaded: u64 = [
            (Component::TextEncoder, bytes.text_encoder),
            (Component::Denoiser, bytes.denoiser),
            (Component::Vae, bytes.vae_decoder),
        ]
        .iter()
        .filter(|(c, _)| self.family.components().is_loaded(*c))
        .map(|(_, b)| *b)
        .sum();
        PlanInput {
            device_total: reading.total_bytes,
            device_free: reading.free_bytes.saturating_add(loaded),
            budget: self.config.memory_budget,
            reserve: planner::default_reserve(reading.total_bytes),
            components: bytes,
            activations: self.family.activation_model(),
            width,
            height,
            batch,
            cfg_on,
            mode,
        }
    }

    /// The largest batch the default size fits (the server's start-up figure).
    pub fn max_batch(&self) -> u32 {
        let d = self.profile.defaults;
        planner::max_batch(&self.plan_input(d.width, d.height, 1, d.cfg > 1.0, MemoryMode::Auto))
    }

    /// Loads what the performance plan keeps resident, so the first job does not pay for it and a
    /// broken model folder fails at start-up rather than on the first request.
    pub fn warm_up(&mut self) -> Result<(), EngineError> {
        let d = self.profile.defaults;
        let plan =
            planner::plan(&self.plan_input(d.width, d.height, 1, d.cfg > 1.0, MemoryMode::Auto));
        for (c, r) in [
            (Component::TextEncoder, plan.text_encoder),
            (Component::Denoiser, plan.denoiser),
            (Component::Vae, plan.vae),
        ] {
            if r == Residency::Resident {
                self.family.components_mut().load(c)?;
            }
        }
        Ok(())
    }

    pub fn generate(
        &mut self,
        req: &ValidRequest,
        extras: &RunExtras,
        observer: &mut dyn Observer,
        cancel: &CancelToken,
    ) -> Result<Generation, EngineError> {
        let started = Instant::now();
        self.probe.reset_peak();
        let profile = self.profile;
        let faults = self.config.faults.clone();
        let tags = self.tags.clone();
        let mut run = RunState::new(&faults, cancel, observer, tags.as_deref());
        run.salt = req.seed;
        let result = {
            // Long kernels (the VAE's convolutions) stop mid-way once the job is cancelled.
            let _interruptible = crate::ops::interrupt::scope(cancel.flag());
            match self.generate_inner(req, extras, &profile, &mut run, started) {
                // Whatever stopped the run after a cancel (an interrupted kernel) is the cancel.
                Err(_) if cancel.is_cancelled() => Err(EngineError::Cancelled),
                other => other,
            }
        };
        // Guard fallbacks raise precision for this job only; the next job starts from the policy.
        self.restore_policy();
        let _ = self.family.set_control(None);
        if let Some(t) = &tags {
            t.set_phase(None, None);
        }
        release_memory(self.family.components().device());
        result
    }

    fn restore_policy(&mut self) {
        let base = self.base_policy;
        for (c, d) in [
            (Component::TextEncoder, base.text_encoder),
            (Component::Denoiser, base.denoiser),
            (Component::Vae, base.vae),
        ] {
            if self.family.components().dtype(c) != d {
                if let Err(e) = self.family.components_mut().set_dtype(c, d) {
                    tracing::warn!("could not restore {c:?} to {d:?}: {e}");
                }
            }
        }
    }

    fn generate_inner(
        &mut self,
        req: &ValidRequest,
        extras: &RunExtras,
        profile: &Profile,
        run: &mut RunState<'_>,
        started: Instant,
    ) -> Result<Generation, EngineError> {
        // 1. CFG interception: the seed found CFG ≥ 3 breaks Turbo models.
        let cfg_requested = req.cfg;
        let mut cfg = req.cfg;
        if cfg >= profile.cfg.intercept_at && cfg > profile.safe_cfg_max {
            cfg = profile.safe_cfg_max;
            run.notice(Notice::cfg_clamped(cfg_requested, cfg));
        }
        let guided = cfg > 1.0;

        // 2. Prompts: enhancement (or verbatim), the negative only when guidance is on.
        let ctx = PromptContext {
            cfg,
            steps: req.steps,
            profile: *profile,
        };
        let enhancement = prompt::enhance_with(
            &req.prompt,
            req.negative_prompt.as_deref(),
            &ctx,
            req.enhance,
            &req.enhance_exclude,
        );
        let negative = guided.then(|| enhancement.negative_prompt.clone());

        // LoRAs first: a text-encoder LoRA changes the prompt's encoding. The ControlNet before
        // the plan: its bytes count with the denoiser's.
        self.attach_loras(req)?;
        self.attach_control(req)?;

        // 3. Memory plan.
        let plan = planner::plan(&self.plan_input(
            req.width,
            req.height,
            req.batch,
            guided,
            req.memory_mode,
        ));
        plan.log();
        run.observer.plan(&plan);
        if plan.stepped_down() {
            run.notice(Notice::memory_mode(plan.requested_mode, plan.mode));
        }
        if !plan.fits {
            tracing::warn!("the memory plan does not fit; trying anyway (lowest mode)");
        }

        // 4. Encode.
        let t_encode = Instant::now();
        run.phase(Phase::Encode);
        if plan.text_encoder != Residency::Resident {
            // Low-memory plans keep only one big component at a time.
            if plan.denoiser == Residency::BlockStreamed {
                self.family.components_mut().unload(Component::Denoiser);
            }
            if plan.vae != Residency::Resident {
                self.family.components_mut().unload(Component::Vae);
            }
        }
        let cond = self
            .family
            .encode(&enhancement.prompt, negative.as_deref())?;
        if plan.text_encoder != Residency::Resident {
            self.family.components_mut().unload(Component::TextEncoder);
            release_memory(self.family.components().device());
        }
        // The input image's posterior (image to image, inpainting), with the VAE encoder loaded
        // only for this in the low-memory plans.
        let init = match &req.init {
            Some(init) if !control::control_inpaint(req) => Some(self.prepare_init(init, req)?),
            _ => None,
        };
        self.prepare_control(req)?;
        if (req.init.is_some() || req.control.is_some()) && plan.vae != Residency::Resident {
            self.family.components_mut().unload_vae_encoder();
            release_memory(self.family.components().device());
        }
        let encode_ms = t_encode.elapsed().as_millis() as u64;

        // 5. Denoise.
        let t_denoise = Instant::now();
        run.phase(Phase::Denoise);
        self.family.components_mut().set_denoiser_residency(
            if plan.denoiser == Residency::BlockStreamed {
                DenoiserResidency::Streamed {
                    resident_blocks: plan.resident_blocks as usize,
                    one_at_a_time: plan.denoiser_one_at_a_time,
                }
            } else {
                DenoiserResidency::Resident
            },
        );
        let seeds: Vec<u64> = (0..req.batch as u64)
            .map(|i| req.seed.wrapping_add(i))
            .collect();
        let latents = self.denoise_seeds(
            &seeds,
            extras.init_latents.as_ref(),
            init.as_ref(),
            &cond,
            req,
            &mut cfg,
            run,
        )?;
        let denoise_ms = t_denoise.elapsed().as_millis() as u64;

        // 6. Decode straight after the last step.
        let t_decode = Instant::now();
        let tiling = plan.vae_tiling;
        if plan.denoiser != Residency::Resident {
            self.family.components_mut().unload(Component::Denoiser);
            release_memory(self.family.components().device());
        }
        run.phase(Phase::Decode);
        let mut images = Vec::with_capacity(seeds.len());
        for (i, &seed) in seeds.iter().enumerate() {
            if run.cancel.is_cancelled() {
                return Err(EngineError::Cancelled);
            }
            let z = latents.narrow(0, i, 1)?;
            let px = decode::decode(self.family.as_mut(), &z, tiling, run)?;
            match to_image(&px, seed)? {
                Ok(img) => images.push(paste_back(img, req)),
                Err(blank) => {
                    // 7. Black-image check: one retry from a fresh seed, then a clear failure.
                    let retry_seed = seed.wrapping_add(BLACK_RETRY_SEED_OFFSET);
                    run.notice(Notice::black_retry(
                        i + 1,
                        (describe_blank(blank), describe_blank_zh(blank)),
                        retry_seed,
                    ));
                    run.phase(Phase::Denoise);
                    let z = self.denoise_seeds(
                        &[retry_seed],
                        None,
                        init.as_ref(),
                        &cond,
                        req,
                        &mut cfg,
                        run,
                    )?;
                    if plan.denoiser != Residency::Resident {
                        self.family.components_mut().unload(Component::Denoiser);
                    }
                    run.phase(Phase::Decode);
                    let px = decode::decode(self.family.as_mut(), &z, tiling, run)?;
                    match to_image(&px, retry_seed)? {
                        Ok(img) => images.push(paste_back(img, req)),
                        Err(blank) => {
                            return Err(EngineError::BlankImage(format!(
                                "image {} was blank twice ({}), also with seed {retry_seed}",
                                i + 1,
                                describe_blank(blank)
                            )))
                        }
                    }
                }
            }
        }
        if plan.vae != Residency::Resident {
            self.family.components_mut().unload(Component::Vae);
        }
        let decode_ms = t_decode.elapsed().as_millis() as u64;

        let params = ResolvedParams {
            model: self.model_name.clone(),
            run: ValidRequest {
                prompt: enhancement.prompt.clone(),
                negative_prompt: negative,
                cfg,
                memory_mode: plan.mode,
                // Recorded below by content hash and name (`init_image`, `loras`): the record
                // carries no decoded pixels and no server paths.
                init: None,
                loras: Vec::new(),
                ..req.clone()
            },
            cfg_requested,
            precision: self.family.components().policy().describe(),
            sampler: profile.sampler.into(),
            strength: req.init.as_ref().map(|i| i.strength),
            mask_blur: req
                .init
                .as_ref()
                .and_then(|i| i.mask.as_ref().map(|_| i.mask_blur)),
            init_image: req.init.as_ref().map(|i| i.image.sha256.clone()),
            mask_image: req
                .init
                .as_ref()
                .and_then(|i| i.mask.as_ref().map(|m| m.sha256.clone())),
            loras: req
                .loras
                .iter()
                .map(|l| LoraUse {
                    name: l.name.clone(),
                    weight: l.weight,
                })
                .collect(),
        };
        Ok(Generation {
            images,
            latents,
            params,
            enhancement,
            notices: std::mem::take(&mut run.notices),
            timings: Timings {
                encode_ms,
                denoise_ms,
                decode_ms,
                total_ms: started.elapsed().as_millis() as u64,
            },
            peak_memory_bytes: self.probe.peak_bytes(),
            plan,
        })
    }

    /// Encodes the input image once (its posterior is shared by the batch; each image samples it
    /// with its own generator) and brings its mask to latent resolution.
    fn prepare_init(
        &mut self,
        init: &InitImage,
        req: &ValidRequest,
    ) -> Result<Prepared, EngineError> {
        let rgb = init.image.as_rgb().ok_or_else(|| {
            EngineError::Invalid("the input image's pixels are not loaded".into())
        })?;
        if (rgb.width(), rgb.height()) != (req.width, req.height) {
            return Err(EngineError::Invalid(format!(
                "the input image is {}×{}; this job is {}×{}",
                rgb.width(),
                rgb.height(),
                req.width,
                req.height
            )));
        }
        let device = self.family.components().device().clone();
        let filled = match (init.fill, init.mask.as_ref().and_then(|m| m.as_gray())) {
            (InpaintFill::Fill, Some(mask)) => Some(crate::inputs::fill_masked(rgb, mask)),
            _ => None,
        };
        let pixels = crate::inputs::pixels_tensor(filled.as_ref().unwrap_or(rgb), &device)?;
        let posterior = self
            .family
            .components_mut()
            .vae_encoder()?
            .encode(&pixels)?;
        let mask = match &init.mask {
            Some(m) => {
                let gray = m.as_gray().ok_or_else(|| {
                    EngineError::Invalid("the mask's pixels are not loaded".into())
                })?;
                let f = self.family.profile().vae_scale_factor;
                Some(crate::inputs::latent_mask(gray, f, &device)?)
            }
            None => None,
        };
        Ok(Prepared {
            posterior,
            mask,
            strength: init.strength,
            fill: init.fill,
        })
    }

    /// Start latents for each seed as the family's diffusers pipeline makes them, then the whole
    /// schedule (cut by strength for image to image), inpainting's blend after every step.
    #[allow(clippy::too_many_arguments)]
    fn denoise_seeds(
        &mut self,
        seeds: &[u64],
        init_latents: Option<&Tensor>,
        init: Option<&Prepared>,
        cond: &crate::families::Conditioning,
        req: &ValidRequest,
        cfg: &mut f32,
        run: &mut RunState<'_>,
    ) -> Result<Tensor, EngineError> {
        let (c, lh, lw) = self.latent_dims(req.width, req.height);
        let full = self.family.schedule(req.steps as usize, lh, lw)?;
        let given = match init_latents {
            Some(t) => Some(self.check_init_latents(t, seeds.len(), req)?),
            None => None,
        };
        let device = self.family.components().device().clone();
        let shape = [1, c, lh, lw];
        let Some(init) = init else {
            // Text to image: `randn(generator=manual_seed(seed + i)) · init_noise_sigma`.
            let noise = match given {
                Some(t) => t,
                None => self.seeded_noise(seeds, req.width, req.height)?,
            };
            let x = (noise * full.init_noise_sigma as f64)?;
            self.family.components_mut().load(Component::Denoiser)?;
            return denoise::denoise(self.family.as_mut(), x, cond, &full, cfg, run, None);
        };
        let skip = full.skipped_steps(init.strength);
        if skip >= full.steps() {
            return Err(EngineError::Invalid(format!(
                "strength {} with {} steps runs no denoising step",
                init.strength, req.steps
            )));
        }
        let schedule = full.from_step(skip);
        let sigma0 = schedule.sigmas[0];
        let flow = schedule.kind == NoiseKind::Flow;
        let inpaint = init.mask.is_some();
        let mut starts = Vec::with_capacity(seeds.len());
        let mut images = Vec::with_capacity(seeds.len());
        let mut noises = Vec::with_capacity(seeds.len());
        for (i, &seed) in seeds.iter().enumerate() {
            let mut gen = TorchGenerator::new(seed);
            let given_i = match &given {
                Some(t) => Some(t.narrow(0, i, 1)?),
                None => None,
            };
            // The draws, in each pipeline's order (one generator per image, batch 1).
            let (start, image, noise) = match (given_i, flow, inpaint) {
                // ZImageImg2ImgPipeline and our SD equivalent: `latents=` are the loop's start;
                // nothing is drawn.
                (Some(l), _, false) => (l, None, None),
                // ZImageInpaintPipeline with `latents=`: noise first, then the posterior.
                (Some(l), true, true) => {
                    let noise = gen.randn_tensor(&shape, &device)?;
                    let image = self.image_latents(init, &mut gen)?;
                    (l, Some(image), Some(noise))
                }
                // StableDiffusionInpaintPipeline with `latents=`: the posterior; the given
                // latents are also the blend's noise, and start scaled by init_noise_sigma.
                (Some(l), false, true) => {
                    let image = self.image_latents(init, &mut gen)?;
                    let start = (&l * schedule.init_noise_sigma as f64)?;
                    (start, Some(image), Some(l))
                }
                // Every pipeline without `latents=`: the posterior, then the noise.
                (None, _, _) => {
                    let image = self.image_latents(init, &mut gen)?;
                    let noise = gen.randn_tensor(&shape, &device)?;
                    // A1111's latent fills change what the masked region starts from (drawn
                    // after the noise); the blend keeps only the unmasked region of `image`.
                    let from = match (init.fill, init.mask.as_ref()) {
                        (InpaintFill::LatentNoise, Some(m)) => {
                            let fresh = gen.randn_tensor(&shape, &device)?;
                            (image.broadcast_mul(&(1.0 - m)?)? + fresh.broadcast_mul(m)?)?
                        }
                        (InpaintFill::LatentNothing, Some(m)) => {
                            image.broadcast_mul(&(1.0 - m)?)?
                        }
                        _ => image.clone(),
                    };
                    // StableDiffusionInpaintPipeline at strength 1 starts from pure noise.
                    let start = if !flow && inpaint && init.strength == 1.0 {
                        (&noise * schedule.init_noise_sigma as f64)?
                    } else {
                        schedule.add_noise(&from, &noise, sigma0)?
                    };
                    (start, Some(image), Some(noise))
                }
            };
            starts.push(start);
            if let (Some(im), Some(n)) = (image, noise) {
                images.push(im);
                noises.push(n);
            }
        }
        let x = Tensor::cat(&starts, 0)?;
        let blend = match &init.mask {
            Some(mask) => Some(denoise::Inpaint {
                mask: mask.clone(),
                image_latents: Tensor::cat(&images, 0)?,
                noise: Tensor::cat(&noises, 0)?,
            }),
            None => None,
        };
        self.family.components_mut().load(Component::Denoiser)?;
        denoise::denoise(
            self.family.as_mut(),
            x,
            cond,
            &schedule,
            cfg,
            run,
            blend.as_ref(),
        )
    }

    /// One posterior sample of the input image as the sampler's latents.
    fn image_latents(
        &self,
        init: &Prepared,
        gen: &mut TorchGenerator,
    ) -> Result<Tensor, EngineError> {
        let z = init.posterior.sample(gen)?;
        Ok(self
            .family
            .components()
            .vae_config()
            .latents_from_sample(&z)?)
    }

    /// Attaches the job's LoRAs to the model (or removes the previous job's): parsed files come
    /// from the cache; the base weights are never reloaded.
    fn attach_loras(&mut self, req: &ValidRequest) -> Result<(), EngineError> {
        let mut files = Vec::with_capacity(req.loras.len());
        for l in &req.loras {
            let f = self.loras.get(&l.path, self.family.lora_layers())?;
            files.push((f, l.weight));
        }
        let set = Arc::new(LoraSet::new(&files));
        self.family.set_loras(set)?;
        Ok(())
    }

    fn latent_dims(&self, width: u32, height: u32) -> (usize, usize, usize) {
        let p = self.family.profile();
        (
            p.latent_channels,
            height as usize / p.vae_scale_factor,
            width as usize / p.vae_scale_factor,
        )
    }

    /// One noise tensor per seed, stacked: image i of a batch is reproducible alone with seed + i.
    /// Each is `torch.randn((1, C, h, w), generator=torch.Generator("cpu").manual_seed(seed))`, the
    /// noise diffusers and ComfyUI draw for that seed.
    fn seeded_noise(&self, seeds: &[u64], width: u32, height: u32) -> Result<Tensor, EngineError> {
        let (c, h, w) = self.latent_dims(width, height);
        let per: Vec<Tensor> = seeds
            .iter()
            .map(|&s| {
                TorchGenerator::new(s)
                    .randn_tensor(&[1, c, h, w], self.family.components().device())
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Tensor::cat(&per, 0)?)
    }

    fn check_init_latents(
        &self,
        t: &Tensor,
        batch: usize,
        req: &ValidRequest,
    ) -> Result<Tensor, EngineError> {
        let (c, h, w) = self.latent_dims(req.width, req.height);
        let want = [batch, c, h, w];
        if t.dims() != want {
            return Err(EngineError::Invalid(format!(
                "initial latents have shape {:?}; this request needs {:?} (batch, channels, height/{f}, width/{f})",
                t.dims(),
                want,
                f = self.family.profile().vae_scale_factor
            )));
        }
        Ok(t.to_dtype(DType::F32)?
            .to_device(self.family.components().device())?)
    }
}

/// The input image encoded for a job: its posterior and (inpainting) the latent mask.
struct Prepared {
    posterior: Posterior,
    mask: Option<Tensor>,
    strength: f64,
    fill: InpaintFill,
}

/// Inpainting's PNG: the original pixels pasted back outside the blurred mask (A1111's overlay);
/// with "only masked", the result is first scaled back into its region of the whole image, which
/// is what the PNG shows. The latents (and `--save-latents`) stay as the sampler left them.
fn paste_back(mut img: GeneratedImage, req: &ValidRequest) -> GeneratedImage {
    let Some(init) = &req.init else {
        return img;
    };
    if let Some(r) = &init.region {
        let (Some(full), Some(mask)) = (r.image.as_rgb(), r.mask.as_gray()) else {
            return img;
        };
        let Some(generated) = image::RgbImage::from_raw(img.width, img.height, img.rgb.clone())
        else {
            return img;
        };
        let patch = image::imageops::resize(
            &generated,
            r.width,
            r.height,
            image::imageops::FilterType::Lanczos3,
        );
        let mut whole = full.clone();
        image::imageops::replace(&mut whole, &patch, r.x as i64, r.y as i64);
        let mut rgb = whole.into_raw();
        crate::inputs::paste_back(&mut rgb, full, mask, init.mask_blur);
        img.width = full.width();
        img.height = full.height();
        img.rgb = rgb;
        return img;
    }
    if let (Some(orig), Some(mask)) = (
        init.image.as_rgb(),
        init.mask.as_ref().and_then(|m| m.as_gray()),
    ) {
        if (orig.width(), orig.height()) == (img.width, img.height) {
            crate::inputs::paste_back(&mut img.rgb, orig, mask, init.mask_blur);
        }
    }
    img
}

fn describe_blank(b: Blank) -> String {
    match b {
        Blank::NonFinite => "non-finite pixels".into(),
        Blank::Flat(range) => format!("all pixels within {:.1}/255", range * 255.0),
    }
}

/// [`describe_blank`] in Simplified Chinese, for the notice's translation.
fn describe_blank_zh(b: Blank) -> String {
    match b {
        Blank::NonFinite => "像素含非有限值".into(),
        Blank::Flat(range) => format!("所有像素都在 {:.1}/255 以内", range * 255.0),
    }
}

/// Decoder output `[1, 3, H, W]` in about [-1, 1] → RGB8, exactly as diffusers post-processes
/// (`clamp(x/2 + 0.5, 0, 1)`, ×255, round half to even) — or why the image is blank.
fn to_image(px: &Tensor, seed: u64) -> Result<Result<GeneratedImage, Blank>, EngineError> {
    let img = ((px.squeeze(0)? / 2.0)? + 0.5)?;
    if !guard::all_finite(&img)? {
        return Ok(Err(Blank::NonFinite));
    }
    let img = img.clamp(0f32, 1f32)?;
    if let Some(b) = blank_image(&img)? {
        return Ok(Err(b));
    }
    let (_, h, w) = img.dims3()?;
    let hwc = img.permute((1, 2, 0))?.flatten_all()?.to_vec1::<f32>()?;
    let rgb = hwc
        .iter()
        .map(|v| (v * 255.0).round_ties_even() as u8)
        .collect();
    Ok(Ok(GeneratedImage {
        width: w as u32,
        height: h as u32,
        seed,
        rgb,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Notices keep the wire names records and PNGs were written with.
    #[test]
    fn notice_kinds_serialise_as_their_names() {
        for k in NoticeKind::ALL {
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
            let back: NoticeKind = serde_json::from_value(k.as_str().into()).unwrap();
            assert_eq!(back, k);
        }
        let n = Notice::new(NoticeKind::BlackRetry, "again".into(), "再来".into());
        assert!(n.kind == "black_retry");
        let json = serde_json::to_value(&n).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"kind": "black_retry", "message": "again", "i18n": {"zh-CN": "再来"}})
        );
        // The Chinese blank descriptions state the same figures.
        for b in [Blank::NonFinite, Blank::Flat(0.002)] {
            let (en, zh) = (describe_blank(b), describe_blank_zh(b));
            assert!(crate::i18n::has_cjk(&zh));
            assert_eq!(crate::i18n::number_set(&en), crate::i18n::number_set(&zh));
        }
    }
}
