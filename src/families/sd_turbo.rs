//! SD-Turbo (`stabilityai/sd-turbo`, SD 2.1 distilled) and SDXL-Turbo (`stabilityai/sdxl-turbo`)
//! from a diffusers-layout folder: CLIP text encoder(s) (`clip.rs`), the UNet (`unet.rs`), the
//! shared AutoencoderKL decoder and the Euler discrete schedule — reproducing diffusers'
//! `StableDiffusionPipeline` / `StableDiffusionXLPipeline` step for step.

pub mod clip;
pub mod unet;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::memory::planner::{ActivationModel, ComponentBytes, UNetArch};

use self::clip::{ClipTextConfig, ClipTextModel, ClipTokenizer};
use self::unet::{TextTime, UNet, UNetConfig, UNetPlan, UNetPrecision};
use super::cpu_gemm::LoraMode;
use super::lora::{self, LinearLayers, LoraPart, LoraSet};
use super::scheduler::{EulerDiscreteConfig, NoiseKind, Prediction, Schedule};
use super::vae::{VaeConfig, VaeDecoder};
use super::vae_encoder::VaeEncoder;
use super::weights::{ModelDir, Weights};
use super::{
    cfg_combine, pipeline_class, Component, Conditioning, Defaults, DenoiserResidency, Embedding,
    Family, FamilyInfo, Img2ImgDefaults, ModelError, PrecisionPolicy, StepInput,
};

pub const SD_PIPELINE_CLASS: &str = "StableDiffusionPipeline";
pub const SDXL_PIPELINE_CLASS: &str = "StableDiffusionXLPipeline";

/// SD-Turbo / SDXL-Turbo were distilled (adversarial diffusion distillation) to run without
/// guidance: the reference pipelines use `guidance_scale = 0`. CFG is still allowed for negative
/// prompts, but above 2 the distilled models oversaturate and burn within one or two steps, so
/// intercepted values (≥ 3) are clamped to 2.
pub const SAFE_CFG_MAX: f32 = 2.0;
/// The model cards' settings: 512², one step, no guidance.
pub const SD_TURBO_DEFAULTS: Defaults = Defaults {
    width: 512,
    height: 512,
    steps: 1,
    cfg: 1.0,
};
/// The model cards' image-to-image example: 2 steps at strength 0.5 (one step runs; the
/// pipeline runs `int(steps × strength)` steps, so their product must reach 1).
pub const IMG2IMG_DEFAULTS: Img2ImgDefaults = Img2ImgDefaults {
    steps: 2,
    strength: 0.5,
    noise: NoiseKind::VarianceExploding,
};
/// SDXL-Turbo was distilled at 512² as well (not SDXL's 1024²).
pub const SDXL_TURBO_DEFAULTS: Defaults = Defaults {
    width: 512,
    height: 512,
    steps: 1,
    cfg: 1.0,
};
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
    pub fn family(self) -> &'static str {
        match self {
            Variant::Sd => "sd-turbo",
            Variant::Sdxl => "sdxl-turbo",
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

/// One CLIP text encoder with its tokenizer and weights.
struct TextSide {
    tokenizer: ClipTokenizer,
    cfg: ClipTextConfig,
    weights: Weights,
    model: Option<ClipTextModel>,
}

impl TextSide {
    fn open(dir: &ModelDir, tok: &str, enc: &str) -> Result<Self, ModelError> {
        let cfg_rel = format!("{enc}/config.json");
        let cfg: ClipTextConfig = dir.read_json(&cfg_rel)?;
        cfg.validate().map_err(|m| ModelError::Malformed {
            path: dir.display_path(&cfg_rel),
            message: m,
        })?;
        Ok(Self {
            tokenizer: ClipTokenizer::load(dir, tok)?,
            cfg,
            weights: dir.open_weights(enc)?,
            model: None,
        })
    }

    fn load(&mut self, dtype: DType, device: &Device) -> Result<(), ModelError> {
        if self.model.is_none() {
            let vb = self.weights.var_builder(dtype, device);
            let m = ClipTextModel::new(&self.cfg, vb).map_err(|e| self.weights.context(e))?;
            self.model = Some(m);
        }
        Ok(())
    }

    fn encode(&self, text: &str, device: &Device) -> Result<clip::ClipOutput, ModelError> {
        let ids = self.tokenizer.encode(text)?;
        let model = self
            .model
            .as_ref()
            .ok_or_else(|| ModelError::Invalid("text encoder not loaded".into()))?;
        let n = ids.len();
        let input = Tensor::from_vec(ids, (1, n), device)?;
        Ok(model.forward(&input)?)
    }
}

/// A loaded SD-Turbo or SDXL-Turbo folder. Components are built on the device on demand.
pub struct SdTurbo {
    dir: ModelDir,
    variant: Variant,
    info: FamilyInfo,
    device: Device,
    policy: PrecisionPolicy,
    /// The residual dtype the policy started with (restored when the denoiser leaves f32).
    base_residual: DType,
    scheduler: EulerDiscreteConfig,
    prediction: Prediction,
    text: TextSide,
    text_2: Option<TextSide>,
    force_zeros_for_empty_prompt: bool,
    unet_cfg: UNetConfig,
    unet_plan: UNetPlan,
    unet_weights: Weights,
    unet: Option<UNet>,
    vae_cfg: VaeConfig,
    vae_weights: Weights,
    vae: Option<VaeDecoder>,
    vae_encoder: Option<VaeEncoder>,
    /// The UNet's and the first text encoder's linear layers: what a LoRA may update.
    lora_layers: LinearLayers,
    /// The current job's LoRAs, attached to the layers as they load.
    loras: Arc<LoraSet>,
    lora_mode: LoraMode,
}

fn malformed(dir: &ModelDir, rel: &str, message: String) -> ModelError {
    ModelError::Malformed {
        path: dir.display_path(rel),
        message,
    }
}

impl SdTurbo {
    /// Opens and validates a folder: every config parsed, every tensor name and shape checked
    /// against the headers (without reading weight data). Nothing is placed on the device yet.
    pub fn open(
        dir: ModelDir,
        device: &Device,
        policy: PrecisionPolicy,
    ) -> Result<Self, ModelError> {
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
            return Err(malformed(
                &dir,
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
        let prediction = scheduler.validate(&dir.display_path(sched_rel))?;

        let unet_cfg: UNetConfig = dir.read_json("unet/config.json")?;
        let unet_plan = unet_cfg
            .plan()
            .map_err(|m| malformed(&dir, "unet/config.json", m))?;
        let vae_cfg: VaeConfig = dir.read_json("vae/config.json")?;
        vae_cfg
            .validate()
            .map_err(|m| malformed(&dir, "vae/config.json", m))?;
        if vae_cfg.latent_channels != unet_cfg.in_channels
            || unet_cfg.out_channels != unet_cfg.in_channels
        {
            return Err(malformed(
                &dir,
                "unet/config.json",
                format!(
                    "in_channels {} / out_channels {} do not match the VAE's latent_channels {}",
                    unet_cfg.in_channels, unet_cfg.out_channels, vae_cfg.latent_channels
                ),
            ));
        }

        let text = TextSide::open(&dir, "tokenizer", "text_encoder")?;
        let (text_2, force_zeros) = match variant {
            Variant::Sd => (None, false),
            Variant::Sdxl => {
                let idx: SdxlIndex = dir.read_json("model_index.json")?;
                (
                    Some(TextSide::open(&dir, "tokenizer_2", "text_encoder_2")?),
                    idx.force_zeros_for_empty_prompt.unwrap_or(true),
                )
            }
        };
        // The UNet's cross-attention width must be what the text side produces.
        let context = text.cfg.hidden_size + text_2.as_ref().map_or(0, |t| t.cfg.hidden_size);
        if let Some(bad) = unet_plan.cross_dim.iter().find(|&&d| d != context) {
            return Err(malformed(
                &dir,
                "unet/config.json",
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
                    return Err(malformed(
                        &dir,
                        "unet/config.json",
                        format!(
                            "projection_class_embeddings_input_dim {input} != 6 time ids × {tdim} + text_encoder_2 projection_dim {proj}"
                        ),
                    ));
                }
            }
            (Variant::Sd, Some(_)) => return Err(malformed(
                &dir,
                "unet/config.json",
                "addition_embed_type text_time needs the SDXL pipeline (StableDiffusionXLPipeline)"
                    .into(),
            )),
            (Variant::Sdxl, None) => {
                return Err(malformed(
                    &dir,
                    "unet/config.json",
                    "an SDXL pipeline needs addition_embed_type text_time".into(),
                ))
            }
        }

        let unet_weights = dir.open_weights("unet")?;
        let vae_weights = dir.open_weights("vae")?;
        let info = FamilyInfo {
            family: variant.family(),
            latent_channels: vae_cfg.latent_channels,
            vae_scale_factor: vae_cfg.scale_factor(),
            size_multiple: vae_cfg.scale_factor() as u32,
            defaults: match variant {
                Variant::Sd => SD_TURBO_DEFAULTS,
                Variant::Sdxl => SDXL_TURBO_DEFAULTS,
            },
            safe_cfg_max: SAFE_CFG_MAX,
            sampler: "Euler",
            img2img: IMG2IMG_DEFAULTS,
        };
        let model = Self {
            dir,
            variant,
            info,
            device: device.clone(),
            policy,
            base_residual: policy.residual,
            scheduler,
            prediction,
            text,
            text_2,
            force_zeros_for_empty_prompt: force_zeros,
            unet_cfg,
            unet_plan,
            unet_weights,
            unet: None,
            vae_cfg,
            vae_weights,
            vae: None,
            vae_encoder: None,
            lora_layers: LinearLayers::default(),
            loras: Arc::default(),
            lora_mode: LoraMode::default(),
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
        &self.unet_cfg
    }

    pub fn vae_config(&self) -> &VaeConfig {
        &self.vae_cfg
    }

    pub fn scheduler_config(&self) -> &EulerDiscreteConfig {
        &self.scheduler
    }

    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.text.tokenizer
    }

    pub fn tokenizer_2(&self) -> Option<&ClipTokenizer> {
        self.text_2.as_ref().map(|t| &t.tokenizer)
    }

    /// bf16 weights on a bf16-ready CPU compute in f32 (bf16 matrix operands, f32 activations,
    /// norms and residual stream), as the Z-Image DiT does; elsewhere the policy's dtypes.
    fn unet_precision(&self) -> UNetPrecision {
        let compute = super::cpu_gemm::activation_dtype(self.policy.denoiser, &self.device);
        UNetPrecision {
            compute,
            residual: if compute == self.policy.denoiser {
                self.policy.residual
            } else {
                compute
            },
        }
    }

    /// Builds every module against the headers only: names and shapes must match the configs.
    /// Builds every module against the headers only; returns the layers LoRAs may update (the
    /// UNet's and the first text encoder's).
    fn validate_tensors(&self) -> Result<LinearLayers, ModelError> {
        let dev = Device::Cpu;
        let mut layers = LinearLayers::default();
        for (i, side) in std::iter::once(&self.text)
            .chain(self.text_2.as_ref())
            .enumerate()
        {
            let m = ClipTextModel::new(&side.cfg, side.weights.shape_only(DType::F32, &dev))
                .map_err(|e| side.weights.context(e))?;
            if i == 0 {
                lora::record(&m, LoraPart::TextEncoder, &mut layers);
            }
        }
        if let Some(t2) = &self.text_2 {
            if t2.cfg.projection_dim.is_none() || !t2.weights.contains("text_projection.weight") {
                return Err(malformed(
                    &self.dir,
                    "text_encoder_2/config.json",
                    "SDXL's second text encoder must be a CLIPTextModelWithProjection (projection_dim and text_projection.weight)".into(),
                ));
            }
        }
        let unet = UNet::new(
            &self.unet_cfg,
            self.unet_weights.shape_only(DType::F32, &dev),
            UNetPrecision {
                compute: DType::F32,
                residual: DType::F32,
            },
        )
        .map_err(|e| self.unet_weights.context(e))?;
        lora::record(&unet, LoraPart::Denoiser, &mut layers);
        VaeDecoder::new(&self.vae_cfg, self.vae_weights.shape_only(DType::F32, &dev))
            .map_err(|e| self.vae_weights.context(e))?;
        Ok(layers)
    }

    /// How LoRAs reach the layers (runtime updates by default; see [`LoraMode`]).
    pub fn set_lora_mode(&mut self, mode: LoraMode) -> Result<(), ModelError> {
        self.lora_mode = mode;
        let set = std::mem::take(&mut self.loras);
        self.attach_loras(set, true)
    }

    fn attach_loras(&mut self, set: Arc<LoraSet>, force: bool) -> Result<(), ModelError> {
        if !force && (Arc::ptr_eq(&set, &self.loras) || set.key == self.loras.key) {
            return Ok(());
        }
        if let Some(u) = self.unet.as_mut() {
            lora::apply(u, &set, LoraPart::Denoiser, self.lora_mode)?;
        }
        if let Some(t) = self.text.model.as_mut() {
            lora::apply(t, &set, LoraPart::TextEncoder, self.lora_mode)?;
        }
        self.loras = set;
        Ok(())
    }

    /// The ids the pipeline feeds the (first) text encoder: 77, padded with the pad token.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        self.text.tokenizer.encode(text)
    }

    /// The first text encoder's raw outputs for one text (for parity tests).
    pub fn text_encoder_forward(&mut self, text: &str) -> Result<clip::ClipOutput, ModelError> {
        self.load(Component::TextEncoder)?;
        self.text.encode(text, &self.device)
    }

    /// One prompt as the pipeline encodes it.
    fn encode_one(&mut self, text: &str) -> Result<Embedding, ModelError> {
        self.load(Component::TextEncoder)?;
        let dev = self.device.clone();
        match &self.text_2 {
            None => Ok(Embedding {
                hidden: self.text.encode(text, &dev)?.last_hidden,
                pooled: None,
            }),
            Some(t2) => {
                let a = self.text.encode(text, &dev)?;
                let b = t2.encode(text, &dev)?;
                Ok(Embedding {
                    hidden: Tensor::cat(&[&a.penultimate, &b.penultimate], 2)?,
                    pooled: Some(b.pooled),
                })
            }
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
        self.load(Component::Denoiser)?;
        let unet = self
            .unet
            .as_ref()
            .ok_or_else(|| ModelError::Invalid("denoiser not loaded".into()))?;
        Ok(unet.forward(sample, timesteps, context, text_time)?)
    }

    /// SDXL's `add_time_ids` for an image: original size, crop top-left (0, 0), target size.
    fn time_ids(&self, b: usize, latent_h: usize, latent_w: usize) -> Result<Tensor, ModelError> {
        let f = self.info.vae_scale_factor;
        let (h, w) = ((latent_h * f) as f32, (latent_w * f) as f32);
        let row = [h, w, 0.0, 0.0, h, w];
        let data: Vec<f32> = (0..b).flat_map(|_| row).collect();
        Ok(Tensor::from_vec(data, (b, 6), &self.device)?)
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
    fn info(&self) -> &FamilyInfo {
        &self.info
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn policy(&self) -> PrecisionPolicy {
        self.policy
    }

    fn component_bytes(&self) -> ComponentBytes {
        let te = self.policy.text_encoder;
        ComponentBytes {
            text_encoder: self.text.weights.bytes_in("", te)
                + self
                    .text_2
                    .as_ref()
                    .map_or(0, |t| t.weights.bytes_in("", te)),
            denoiser: self.unet_weights.bytes_in("", self.policy.denoiser),
            // The UNet is not block-streamed: low-memory plans load it whole for its phase.
            denoiser_largest_block: 0,
            denoiser_blocks: 0,
            vae_decoder: self.vae_weights.bytes_in("decoder.", self.policy.vae)
                + self
                    .vae_weights
                    .bytes_in("post_quant_conv.", self.policy.vae),
        }
    }

    fn activation_model(&self) -> ActivationModel {
        let elem = |d: DType| d.size_in_bytes() as u64;
        let unet = self.unet_precision();
        // Both CLIPs run one after the other: the wider one sets the text-encoding peak.
        let widest = std::iter::once(&self.text.cfg)
            .chain(self.text_2.as_ref().map(|t| &t.cfg))
            .max_by_key(|c| c.hidden_size)
            .unwrap_or(&self.text.cfg);
        let p = &self.unet_plan;
        ActivationModel::unet(&UNetArch {
            block_out_channels: p.channels.iter().map(|&c| c as u64).collect(),
            attention: p.down_attn.clone(),
            heads: p.heads.iter().map(|&h| h as u64).collect(),
            layers_per_block: p.layers.iter().map(|&l| l as u64).collect(),
            context_tokens: self.text.tokenizer.max_length() as u32,
            text_hidden: widest.hidden_size as u64,
            text_heads: widest.num_attention_heads as u64,
            text_ffn_hidden: widest.intermediate_size as u64,
            vae_block_out_channels: self
                .vae_cfg
                .block_out_channels
                .iter()
                .map(|&c| c as u32)
                .collect(),
            vae_scale: self.vae_cfg.scale_factor() as u32,
            elem_bytes: elem(unet.compute),
            residual_elem_bytes: elem(unet.residual),
            text_elem_bytes: elem(self.policy.text_encoder),
            vae_elem_bytes: elem(super::cpu_gemm::activation_dtype(
                self.policy.vae,
                &self.device,
            )),
        })
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

    fn vae_input(&self, latents: &Tensor) -> Result<Tensor, ModelError> {
        let z = div_scalar(
            &latents.to_dtype(DType::F32)?,
            self.vae_cfg.scaling_factor as f32,
        )?;
        Ok(match self.vae_cfg.shift_factor {
            Some(s) => (z + s)?,
            None => z,
        })
    }

    fn vae(&mut self) -> Result<&VaeDecoder, ModelError> {
        self.load(Component::Vae)?;
        self.vae
            .as_ref()
            .ok_or_else(|| ModelError::Invalid("VAE not loaded".into()))
    }

    fn lora_layers(&self) -> &LinearLayers {
        &self.lora_layers
    }

    fn set_loras(&mut self, set: Arc<LoraSet>) -> Result<(), ModelError> {
        self.attach_loras(set, false)
    }

    fn vae_encoder(&mut self) -> Result<&VaeEncoder, ModelError> {
        if self.vae_encoder.is_none() {
            let vb = self.vae_weights.var_builder(self.policy.vae, &self.device);
            let enc =
                VaeEncoder::new(&self.vae_cfg, vb).map_err(|e| self.vae_weights.context(e))?;
            self.vae_encoder = Some(enc);
        }
        self.vae_encoder
            .as_ref()
            .ok_or_else(|| ModelError::Invalid("VAE encoder not loaded".into()))
    }

    fn unload_vae_encoder(&mut self) {
        self.vae_encoder = None;
    }

    fn latents_from_vae(&self, z: &Tensor) -> Result<Tensor, ModelError> {
        let z = z.to_dtype(DType::F32)?;
        let z = match self.vae_cfg.shift_factor {
            Some(s) => (z - s)?,
            None => z,
        };
        Ok((z * self.vae_cfg.scaling_factor)?)
    }

    fn load(&mut self, component: Component) -> Result<(), ModelError> {
        match component {
            Component::TextEncoder => {
                let (dtype, dev) = (self.policy.text_encoder, self.device.clone());
                if self.text.model.is_none() {
                    self.text.load(dtype, &dev)?;
                    if let Some(t) = self.text.model.as_mut() {
                        lora::apply(t, &self.loras, LoraPart::TextEncoder, self.lora_mode)?;
                    }
                }
                if let Some(t2) = self.text_2.as_mut() {
                    t2.load(dtype, &dev)?;
                }
            }
            Component::Denoiser if self.unet.is_none() => {
                let vb = self
                    .unet_weights
                    .var_builder(self.policy.denoiser, &self.device);
                let mut unet = UNet::new(&self.unet_cfg, vb, self.unet_precision())
                    .map_err(|e| self.unet_weights.context(e))?;
                lora::apply(&mut unet, &self.loras, LoraPart::Denoiser, self.lora_mode)?;
                self.unet = Some(unet);
            }
            Component::Vae if self.vae.is_none() => {
                let vb = self.vae_weights.var_builder(self.policy.vae, &self.device);
                let vae =
                    VaeDecoder::new(&self.vae_cfg, vb).map_err(|e| self.vae_weights.context(e))?;
                self.vae = Some(vae);
            }
            _ => {}
        }
        Ok(())
    }

    fn unload(&mut self, component: Component) {
        match component {
            Component::TextEncoder => {
                self.text.model = None;
                if let Some(t2) = self.text_2.as_mut() {
                    t2.model = None;
                }
            }
            Component::Denoiser => self.unet = None,
            Component::Vae => {
                self.vae = None;
                self.vae_encoder = None;
            }
        }
    }

    fn is_loaded(&self, component: Component) -> bool {
        match component {
            Component::TextEncoder => {
                self.text.model.is_some() && self.text_2.as_ref().is_none_or(|t| t.model.is_some())
            }
            Component::Denoiser => self.unet.is_some(),
            Component::Vae => self.vae.is_some(),
        }
    }

    /// The UNet always runs resident (the planner never asks to stream it: it reports no blocks).
    fn set_denoiser_residency(&mut self, _residency: DenoiserResidency) {}

    fn set_dtype(&mut self, component: Component, dtype: DType) -> Result<(), ModelError> {
        let was_loaded = self.is_loaded(component);
        self.policy.set(component, dtype, self.base_residual);
        self.unload(component);
        if was_loaded {
            self.load(component)?;
        }
        Ok(())
    }

    fn dtype(&self, component: Component) -> DType {
        self.policy.of(component)
    }
}
