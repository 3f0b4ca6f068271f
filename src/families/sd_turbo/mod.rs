//! SD-Turbo (`stabilityai/sd-turbo`, SD 2.1 distilled) and SDXL-Turbo (`stabilityai/sdxl-turbo`)
//! from a diffusers-layout folder: CLIP text encoder(s) (`clip.rs`), the UNet (`unet.rs`), the
//! shared AutoencoderKL decoder and the Euler discrete schedule — reproducing diffusers'
//! `StableDiffusionPipeline` / `StableDiffusionXLPipeline` step for step.

pub mod activations;
pub mod clip;
pub mod config;
pub mod profile;
pub mod unet;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::memory::ActivationModel;

use self::activations::UNetArch;
use self::clip::{ClipTextConfig, ClipTextModel, ClipTokenizer};

use self::config::{UNetConfig, UNetPlan};
use self::unet::{TextTime, UNet, UNetPrecision};
use super::lora::{self, LinearLayers, LoraPart, LoraSet};
use super::slot::{Components, Module, Parts, VaeSource};
use super::weights::{ModelDir, Weights};
use super::{
    cfg_combine, pipeline_class, Conditioning, Embedding, Family, FamilyKind, ModelError,
    PrecisionPolicy, Profile, StepInput,
};
use crate::nn::scheduler::{EulerDiscreteConfig, Prediction, Schedule};
use crate::nn::vae::{VaeConfig, VaeDecoder};
use crate::ops::linear::{self, LoraMode};

pub const SD_PIPELINE_CLASS: &str = "StableDiffusionPipeline";
pub const SDXL_PIPELINE_CLASS: &str = "StableDiffusionXLPipeline";

pub use self::profile::{SAFE_CFG_MAX, SDXL_TURBO_DEFAULTS, SD_TURBO_DEFAULTS};
/// Schedulers whose sigma schedule we reproduce. The ancestral variant (sdxl-turbo's file) has
/// the same timesteps and sigmas; its per-step fresh noise is not injected, so runs of 2+ steps
/// are deterministic Euler (one step is identical: its last σ is 0).
const EULER_CLASSES: [&str; 2] = ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"];

/// Which pipeline the folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// `StableDiffusionPipeline`: one CLIP, `last_hidden_state` as context.
    Sd,
    /// `StableDiffusionXLPipeline`: two CLIPs, penultimate hidden states concatenated, pooled
    /// projection + size ids as the UNet's `text_time` embedding.
    Sdxl,
}

impl Variant {
    pub fn family(self) -> FamilyKind {
        match self {
            Variant::Sd => FamilyKind::SdTurbo,
            Variant::Sdxl => FamilyKind::SdxlTurbo,
        }
    }
}

#[derive(serde::Deserialize)]
struct SchedulerClass {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
}

#[derive(serde::Deserialize, Default)]
struct SdxlIndex {
    #[serde(default)]
    force_zeros_for_empty_prompt: Option<bool>,
}

/// One CLIP text encoder's source: its tokenizer, config and weights.
pub struct ClipSource {
    tokenizer: ClipTokenizer,
    cfg: ClipTextConfig,
    weights: Weights,
}

impl ClipSource {
    fn open(dir: &ModelDir, tok: &str, enc: &str) -> Result<Self, ModelError> {
        let cfg_rel = format!("{enc}/config.json");
        let cfg: ClipTextConfig = dir.read_json(&cfg_rel)?;
        cfg.validate().map_err(|m| dir.malformed(&cfg_rel, m))?;
        Ok(Self {
            tokenizer: ClipTokenizer::load(dir, tok)?,
            cfg,
            weights: dir.open_weights(enc)?,
        })
    }

    fn build(&self, dtype: DType, device: &Device) -> Result<ClipTextModel, ModelError> {
        let vb = self.weights.var_builder(dtype, device);
        ClipTextModel::new(&self.cfg, vb).map_err(|e| self.weights.context(e))
    }
}

/// The text side's sources: one CLIP (SD) or two (SDXL), and the current job's LoRAs for the
/// first one (kohya `lora_te_` keys).
pub struct TextSources {
    first: ClipSource,
    second: Option<ClipSource>,
    loras: Arc<LoraSet>,
    lora_mode: LoraMode,
}

/// The loaded text encoder(s).
pub struct TextEncoders {
    first: ClipTextModel,
    second: Option<ClipTextModel>,
}

impl Module for TextEncoders {
    type Source = TextSources;

    fn build(
        src: &TextSources,
        policy: &PrecisionPolicy,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let dtype = policy.text_encoder;
        let mut first = src.first.build(dtype, device)?;
        lora::apply(&mut first, &src.loras, LoraPart::TextEncoder, src.lora_mode)?;
        Ok(Self {
            first,
            second: match &src.second {
                Some(s) => Some(s.build(dtype, device)?),
                None => None,
            },
        })
    }

    fn bytes(src: &TextSources, policy: &PrecisionPolicy) -> u64 {
        let te = policy.text_encoder;
        src.first.weights.bytes_in("", te)
            + src
                .second
                .as_ref()
                .map_or(0, |t| t.weights.bytes_in("", te))
    }
}

/// One encoder's raw outputs for one text (the ids its own tokenizer gives).
fn clip_encode(
    src: &ClipSource,
    model: &ClipTextModel,
    text: &str,
    device: &Device,
) -> Result<clip::ClipOutput, ModelError> {
    let ids = src.tokenizer.encode(text)?;
    let n = ids.len();
    let input = Tensor::from_vec(ids, (1, n), device)?;
    Ok(model.forward(&input)?)
}

/// The UNet's source, and the current job's LoRAs.
pub struct UNetSource {
    cfg: UNetConfig,
    plan: UNetPlan,
    weights: Weights,
    loras: Arc<LoraSet>,
    lora_mode: LoraMode,
}

/// bf16 weights on a bf16-ready CPU compute in f32 (bf16 matrix operands, f32 activations, norms
/// and residual stream), as the Z-Image DiT does; elsewhere the policy's dtypes.
fn unet_precision(policy: &PrecisionPolicy, device: &Device) -> UNetPrecision {
    let compute = linear::activation_dtype(policy.denoiser, device);
    UNetPrecision {
        compute,
        residual: if compute == policy.denoiser {
            policy.residual
        } else {
            compute
        },
    }
}

/// The UNet always runs resident (the planner never asks to stream it: it reports no blocks).
impl Module for UNet {
    type Source = UNetSource;

    fn build(
        src: &UNetSource,
        policy: &PrecisionPolicy,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let vb = src.weights.var_builder(policy.denoiser, device);
        let mut unet = UNet::new(&src.cfg, vb, unet_precision(policy, device))
            .map_err(|e| src.weights.context(e))?;
        lora::apply(&mut unet, &src.loras, LoraPart::Denoiser, src.lora_mode)?;
        Ok(unet)
    }

    fn bytes(src: &UNetSource, policy: &PrecisionPolicy) -> u64 {
        src.weights.bytes_in("", policy.denoiser)
    }
}

/// A loaded SD-Turbo or SDXL-Turbo folder. Components are built on the device on demand.
pub struct SdTurbo {
    dir: ModelDir,
    variant: Variant,
    profile: Profile,
    scheduler: EulerDiscreteConfig,
    prediction: Prediction,
    force_zeros_for_empty_prompt: bool,
    parts: Parts<TextEncoders, UNet>,
    /// The UNet's and the first text encoder's linear layers: what a LoRA may update.
    lora_layers: LinearLayers,
}

impl SdTurbo {
    /// Opens and validates a folder: every config parsed, every tensor name and shape checked
    /// against the headers (without reading weight data). Nothing is placed on the device yet.
    pub fn open(
        dir: ModelDir,
        device: &Device,
        policy: PrecisionPolicy,
    ) -> Result<Self, ModelError> {
        // `--precision int8` covers the Z-Image DiT's projections only: the UNet runs f32, and the
        // policy (what logs, job records and the compare harness print) says so.
        let policy = PrecisionPolicy {
            denoiser_int8: false,
            ..policy
        };
        let class = pipeline_class(&dir)?;
        let variant = match class.as_str() {
            SD_PIPELINE_CLASS => Variant::Sd,
            SDXL_PIPELINE_CLASS => Variant::Sdxl,
            _ => {
                return Err(ModelError::UnknownPipeline {
                    path: dir.display_path("model_index.json"),
                    class,
                    supported: format!("{SD_PIPELINE_CLASS}, {SDXL_PIPELINE_CLASS}"),
                })
            }
        };
        let sched_rel = "scheduler/scheduler_config.json";
        let sched_class: SchedulerClass = dir.read_json(sched_rel)?;
        let sched_name = sched_class.class_name.unwrap_or_default();
        if !EULER_CLASSES.contains(&sched_name.as_str()) {
            return Err(dir.malformed(
                sched_rel,
                format!(
                    "scheduler `{sched_name}` is not supported ({})",
                    EULER_CLASSES.join(", ")
                ),
            ));
        }
        if sched_name == EULER_CLASSES[1] {
            tracing::info!(
                "{}: ancestral Euler is run as deterministic Euler on the same sigmas (identical for one step)",
                dir.display_path(sched_rel).display()
            );
        }
        let scheduler: EulerDiscreteConfig = dir.read_json(sched_rel)?;
        let prediction = scheduler
            .validate()
            .map_err(|m| dir.malformed(sched_rel, m))?;

        let unet_cfg: UNetConfig = dir.read_json("unet/config.json")?;
        let unet_plan = unet_cfg
            .plan()
            .map_err(|m| dir.malformed("unet/config.json", m))?;
        let vae_cfg: VaeConfig = dir.read_json("vae/config.json")?;
        vae_cfg
            .validate()
            .map_err(|m| dir.malformed("vae/config.json", m))?;
        if vae_cfg.latent_channels != unet_cfg.in_channels
            || unet_cfg.out_channels != unet_cfg.in_channels
        {
            return Err(dir.malformed(
                "unet/config.json",
                format!(
                    "in_channels {} / out_channels {} do not match the VAE's latent_channels {}",
                    unet_cfg.in_channels, unet_cfg.out_channels, vae_cfg.latent_channels
                ),
            ));
        }

        let text = ClipSource::open(&dir, "tokenizer", "text_encoder")?;
        let (text_2, force_zeros) = match variant {
            Variant::Sd => (None, false),
            Variant::Sdxl => {
                let idx: SdxlIndex = dir.read_json("model_index.json")?;
                (
                    Some(ClipSource::open(&dir, "tokenizer_2", "text_encoder_2")?),
                    idx.force_zeros_for_empty_prompt.unwrap_or(true),
                )
            }
        };
        // The UNet's cross-attention width must be what the text side produces.
        let context = text.cfg.hidden_size + text_2.as_ref().map_or(0, |t| t.cfg.hidden_size);
        if let Some(bad) = unet_plan.cross_dim.iter().find(|&&d| d != context) {
            return Err(dir.malformed("unet/config.json",
                format!(
                    "cross_attention_dim {bad} does not match the text encoder output width {context}"
                ),
            ));
        }
        match (variant, unet_plan.text_time) {
            (Variant::Sd, None) => {}
            (Variant::Sdxl, Some((tdim, input))) => {
                let t2 = text_2.as_ref().map(|t| &t.cfg);
                let proj = t2.and_then(|c| c.projection_dim).unwrap_or(0);
                if 6 * tdim + proj != input {
                    return Err(dir.malformed("unet/config.json",
                        format!(
                            "projection_class_embeddings_input_dim {input} != 6 time ids × {tdim} + text_encoder_2 projection_dim {proj}"
                        ),
                    ));
                }
            }
            (Variant::Sd, Some(_)) => return Err(dir.malformed(
                "unet/config.json",
                "addition_embed_type text_time needs the SDXL pipeline (StableDiffusionXLPipeline)"
                    .into(),
            )),
            (Variant::Sdxl, None) => {
                return Err(dir.malformed(
                    "unet/config.json",
                    "an SDXL pipeline needs addition_embed_type text_time".into(),
                ))
            }
        }

        let profile = Profile {
            latent_channels: vae_cfg.latent_channels,
            vae_scale_factor: vae_cfg.scale_factor(),
            size_multiple: vae_cfg.scale_factor() as u32,
            ..variant.family().profile()
        };
        let text = TextSources {
            first: text,
            second: text_2,
            loras: Arc::default(),
            lora_mode: LoraMode::default(),
        };
        let unet = UNetSource {
            weights: dir.open_weights("unet")?,
            cfg: unet_cfg,
            plan: unet_plan,
            loras: Arc::default(),
            lora_mode: LoraMode::default(),
        };
        let vae = VaeSource {
            weights: dir.open_weights("vae")?,
            cfg: vae_cfg,
        };
        let model = Self {
            dir,
            variant,
            profile,
            scheduler,
            prediction,
            force_zeros_for_empty_prompt: force_zeros,
            parts: Parts::new(device, policy, text, unet, vae),
            lora_layers: LinearLayers::default(),
        };
        let mut model = model;
        model.lora_layers = model.validate_tensors()?;
        Ok(model)
    }

    pub fn variant(&self) -> Variant {
        self.variant
    }

    pub fn dir(&self) -> &ModelDir {
        &self.dir
    }

    pub fn unet_config(&self) -> &UNetConfig {
        &self.parts.denoiser.source().cfg
    }

    pub fn vae_config(&self) -> &VaeConfig {
        &self.parts.vae.source().cfg
    }

    pub fn scheduler_config(&self) -> &EulerDiscreteConfig {
        &self.scheduler
    }

    fn text(&self) -> &TextSources {
        self.parts.text_encoder.source()
    }

    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.text().first.tokenizer
    }

    pub fn tokenizer_2(&self) -> Option<&ClipTokenizer> {
        self.text().second.as_ref().map(|t| &t.tokenizer)
    }

    /// Builds every module against the headers only: names and shapes must match the configs.
    /// Returns the layers LoRAs may update (the UNet's and the first text encoder's).
    fn validate_tensors(&self) -> Result<LinearLayers, ModelError> {
        let dev = Device::Cpu;
        let text = self.text();
        let mut layers = LinearLayers::default();
        for (i, side) in std::iter::once(&text.first)
            .chain(text.second.as_ref())
            .enumerate()
        {
            let m = ClipTextModel::new(&side.cfg, side.weights.shape_only(DType::F32, &dev))
                .map_err(|e| side.weights.context(e))?;
            if i == 0 {
                lora::record(&m, LoraPart::TextEncoder, &mut layers);
            }
        }
        if let Some(t2) = &text.second {
            if t2.cfg.projection_dim.is_none() || !t2.weights.contains("text_projection.weight") {
                return Err(self.dir.malformed("text_encoder_2/config.json",
                    "SDXL's second text encoder must be a CLIPTextModelWithProjection (projection_dim and text_projection.weight)".into(),
                ));
            }
        }
        let unet = self.parts.denoiser.source();
        let model = UNet::new(
            &unet.cfg,
            unet.weights.shape_only(DType::F32, &dev),
            UNetPrecision {
                compute: DType::F32,
                residual: DType::F32,
            },
        )
        .map_err(|e| unet.weights.context(e))?;
        lora::record(&model, LoraPart::Denoiser, &mut layers);
        let vae = self.parts.vae.source();
        VaeDecoder::new(&vae.cfg, vae.weights.shape_only(DType::F32, &dev))
            .map_err(|e| vae.weights.context(e))?;
        Ok(layers)
    }

    /// How LoRAs reach the layers (runtime updates by default; see [`LoraMode`]); re-attaches
    /// the current ones.
    pub fn set_lora_mode(&mut self, mode: LoraMode) -> Result<(), ModelError> {
        let (src, module) = self.parts.denoiser.split_mut();
        src.lora_mode = mode;
        if let Some(u) = module {
            lora::apply(u, &src.loras, LoraPart::Denoiser, mode)?;
        }
        let (src, module) = self.parts.text_encoder.split_mut();
        src.lora_mode = mode;
        if let Some(t) = module {
            lora::apply(&mut t.first, &src.loras, LoraPart::TextEncoder, mode)?;
        }
        Ok(())
    }

    /// The ids the pipeline feeds the (first) text encoder: 77, padded with the pad token.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        self.tokenizer().encode(text)
    }

    /// The first text encoder's raw outputs for one text (for parity tests).
    pub fn text_encoder_forward(&mut self, text: &str) -> Result<clip::ClipOutput, ModelError> {
        let device = self.parts.device().clone();
        self.parts.text_encoder()?;
        let (src, te) = self.parts.text_encoder.split_mut();
        let te = te.ok_or_else(|| ModelError::Invalid("text encoder not loaded".into()))?;
        clip_encode(&src.first, &te.first, text, &device)
    }

    /// The second text encoder's raw outputs for one text (SDXL only; for parity tests).
    pub fn text_encoder_2_forward(&mut self, text: &str) -> Result<clip::ClipOutput, ModelError> {
        let device = self.parts.device().clone();
        self.parts.text_encoder()?;
        let (src, te) = self.parts.text_encoder.split_mut();
        match (&src.second, te.and_then(|t| t.second.as_ref())) {
            (Some(s), Some(m)) => clip_encode(s, m, text, &device),
            _ => Err(ModelError::Invalid(
                "this pipeline has no second text encoder".into(),
            )),
        }
    }

    /// One prompt as the pipeline encodes it.
    fn encode_one(&mut self, text: &str) -> Result<Embedding, ModelError> {
        let device = self.parts.device().clone();
        self.parts.text_encoder()?;
        let (src, te) = self.parts.text_encoder.split_mut();
        let te = te.ok_or_else(|| ModelError::Invalid("text encoder not loaded".into()))?;
        let a = clip_encode(&src.first, &te.first, text, &device)?;
        match (&src.second, &te.second) {
            (Some(s), Some(m)) => {
                let b = clip_encode(s, m, text, &device)?;
                Ok(Embedding {
                    hidden: Tensor::cat(&[&a.penultimate, &b.penultimate], 2)?,
                    pooled: Some(b.pooled),
                })
            }
            _ => Ok(Embedding {
                hidden: a.last_hidden,
                pooled: None,
            }),
        }
    }

    /// SDXL's zeroed negative conditioning (`force_zeros_for_empty_prompt`).
    fn zero_like(e: &Embedding) -> Result<Embedding, ModelError> {
        Ok(Embedding {
            hidden: e.hidden.zeros_like()?,
            pooled: match &e.pooled {
                Some(p) => Some(p.zeros_like()?),
                None => None,
            },
        })
    }

    /// One UNet call on explicit inputs (for parity tests and `predict`): f32 output.
    pub fn unet_forward(
        &mut self,
        sample: &Tensor,
        timesteps: &[f32],
        context: &Tensor,
        text_time: Option<&TextTime<'_>>,
    ) -> Result<Tensor, ModelError> {
        let (_, unet) = self.parts.denoiser()?;
        Ok(unet.forward(sample, timesteps, context, text_time)?)
    }

    /// SDXL's `add_time_ids` for an image: original size, crop top-left (0, 0), target size.
    fn time_ids(&self, b: usize, latent_h: usize, latent_w: usize) -> Result<Tensor, ModelError> {
        let f = self.profile.vae_scale_factor;
        let (h, w) = ((latent_h * f) as f32, (latent_w * f) as f32);
        let row = [h, w, 0.0, 0.0, h, w];
        let data: Vec<f32> = (0..b).flat_map(|_| row).collect();
        Ok(Tensor::from_vec(data, (b, 6), self.parts.device())?)
    }
}

/// `t / s` as PyTorch divides by a 0-d tensor (true division, not multiplication by `1/s`).
fn div_scalar(t: &Tensor, s: f32) -> candle_core::Result<Tensor> {
    t.broadcast_div(&Tensor::new(s, t.device())?.to_dtype(t.dtype())?)
}

/// Repeats an embedding's rows so each of `b` latents has its own.
fn repeat_rows(t: &Tensor, b: usize) -> candle_core::Result<Tensor> {
    if b == 1 {
        return Ok(t.clone());
    }
    Tensor::cat(&vec![t; b], 0)
}

impl Family for SdTurbo {
    fn profile(&self) -> &Profile {
        &self.profile
    }

    fn components(&self) -> &dyn Components {
        &self.parts
    }

    fn components_mut(&mut self) -> &mut dyn Components {
        &mut self.parts
    }

    fn activation_model(&self) -> ActivationModel {
        let text = self.text();
        let (policy, device) = (self.parts.policy(), self.parts.device());
        activations::model(&UNetArch::of(
            &self.parts.denoiser.source().plan,
            std::iter::once(&text.first.cfg).chain(text.second.as_ref().map(|t| &t.cfg)),
            text.first.tokenizer.max_length(),
            self.vae_config(),
            unet_precision(&policy, device),
            &policy,
            device,
        ))
    }

    fn schedule(
        &self,
        steps: usize,
        _latent_h: usize,
        _latent_w: usize,
    ) -> Result<Schedule, ModelError> {
        Ok(self.scheduler.schedule(steps))
    }

    fn encode(&mut self, prompt: &str, negative: Option<&str>) -> Result<Conditioning, ModelError> {
        let positive = self.encode_one(prompt)?;
        let negative = match negative {
            // SDXL zeroes an absent negative prompt (an empty one is what our callers send).
            Some(n) if n.trim().is_empty() && self.force_zeros_for_empty_prompt => {
                Some(Self::zero_like(&positive)?)
            }
            Some(n) => Some(self.encode_one(n)?),
            None => None,
        };
        Ok(Conditioning { positive, negative })
    }

    fn predict(
        &mut self,
        x: &Tensor,
        cond: &Conditioning,
        step: StepInput<'_>,
    ) -> Result<Tensor, ModelError> {
        let (b, _, lh, lw) = x.dims4()?;
        let sigma = step.schedule.sigmas[step.index];
        let t = step.schedule.timesteps[step.index];
        // EulerDiscreteScheduler.scale_model_input: x / sqrt(σ² + 1), in f32.
        let s = (sigma * sigma + 1.0).sqrt();
        let x = x.to_dtype(DType::F32)?;
        let x_in = div_scalar(&x, s)?;
        let guided = step.cfg > 1.0 && cond.negative.is_some();
        let embeds: Vec<&Embedding> = match (&cond.negative, guided) {
            (Some(neg), true) => vec![&cond.positive, neg],
            _ => vec![&cond.positive],
        };
        let passes = embeds.len();
        let hidden = Tensor::cat(
            &embeds
                .iter()
                .map(|e| repeat_rows(&e.hidden, b))
                .collect::<candle_core::Result<Vec<_>>>()?,
            0,
        )?;
        let sample = if passes == 2 {
            Tensor::cat(&[&x_in, &x_in], 0)?
        } else {
            x_in
        };
        let timesteps = vec![t; b * passes];
        let pooled = match self.variant {
            Variant::Sd => None,
            Variant::Sdxl => {
                let rows = embeds
                    .iter()
                    .map(|e| {
                        e.pooled
                            .as_ref()
                            .ok_or_else(|| {
                                ModelError::Invalid(
                                    "SDXL conditioning without a pooled embedding".into(),
                                )
                            })
                            .and_then(|p| Ok(repeat_rows(p, b)?))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Some(Tensor::cat(&rows, 0)?)
            }
        };
        let time_ids = match self.variant {
            Variant::Sd => None,
            Variant::Sdxl => Some(self.time_ids(b * passes, lh, lw)?),
        };
        let text_time = match (&pooled, &time_ids) {
            (Some(p), Some(ids)) => Some(TextTime {
                text_embeds: p,
                time_ids: ids,
            }),
            _ => None,
        };
        let out = self.unet_forward(&sample, &timesteps, &hidden, text_time.as_ref())?;
        let out = if passes == 2 {
            cfg_combine(&out.narrow(0, 0, b)?, &out.narrow(0, b, b)?, step.cfg)?
        } else {
            out
        };
        // EulerDiscreteScheduler.step in f32: x0 from the model output, then d = (x − x0)/σ.
        let x0 = match self.prediction {
            Prediction::Epsilon => (&x - (out * f64::from(sigma))?)?,
            Prediction::VPrediction => {
                let c_out = -sigma / s;
                ((out * f64::from(c_out))? + div_scalar(&x, sigma * sigma + 1.0)?)?
            }
        };
        Ok(div_scalar(&(&x - x0)?, sigma)?)
    }

    fn lora_layers(&self) -> &LinearLayers {
        &self.lora_layers
    }

    fn set_loras(&mut self, set: Arc<LoraSet>) -> Result<(), ModelError> {
        let (src, module) = self.parts.denoiser.split_mut();
        if !(Arc::ptr_eq(&set, &src.loras) || set.key == src.loras.key) {
            if let Some(u) = module {
                lora::apply(u, &set, LoraPart::Denoiser, src.lora_mode)?;
            }
            src.loras = set.clone();
        }
        let (src, module) = self.parts.text_encoder.split_mut();
        if !(Arc::ptr_eq(&set, &src.loras) || set.key == src.loras.key) {
            if let Some(t) = module {
                lora::apply(&mut t.first, &set, LoraPart::TextEncoder, src.lora_mode)?;
            }
            src.loras = set;
        }
        Ok(())
    }

    fn vae_input(&self, latents: &Tensor) -> Result<Tensor, ModelError> {
        let cfg = self.vae_config();
        let z = div_scalar(&latents.to_dtype(DType::F32)?, cfg.scaling_factor as f32)?;
        Ok(match cfg.shift_factor {
            Some(s) => (z + s)?,
            None => z,
        })
    }
}
