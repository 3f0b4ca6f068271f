//! Z-Image-Turbo (Tongyi-MAI) from a diffusers-layout folder: Qwen3 text encoder (candle's, which
//! matches transformers' `hidden_states[-2]`), our DiT (`dit.rs`), the shared AutoencoderKL decoder
//! and the flow-matching schedule — reproducing diffusers' `ZImagePipeline` step for step.

pub mod dit;
pub mod synthetic;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::z_image::text_encoder::{TextEncoderConfig, ZImageTextEncoder};
use tokenizers::Tokenizer;

use crate::memory::planner::{ActivationModel, ComponentBytes, ZImageArch};

use self::dit::{
    Dit, DitConfig, DitPrecision, KeptBlocks, ResidentBlocks, StreamLora, StreamedBlocks,
};
use super::cpu_gemm;
use super::cpu_gemm::LoraMode;
use super::lora::{self, LinearLayers, LoraPart, LoraSet};
use super::scheduler::{FlowMatchConfig, NoiseKind, Schedule};
use super::vae::{VaeConfig, VaeDecoder};
use super::vae_encoder::VaeEncoder;
use super::weights::{ModelDir, Weights};
use super::{
    cfg_combine, pipeline_class, Component, Conditioning, Defaults, DenoiserResidency, Embedding,
    Family, FamilyInfo, Img2ImgDefaults, ModelError, PrecisionPolicy, StepInput,
};

pub const PIPELINE_CLASS: &str = "ZImagePipeline";
/// The pipeline's `max_sequence_length`: prompts are cut at this many tokens.
pub const MAX_SEQUENCE_LENGTH: usize = 512;
/// The seed's forced-CFG example recovered at 2.4; above it Z-Image-Turbo overexposes and breaks.
pub const SAFE_CFG_MAX: f32 = 2.4;
pub const DEFAULTS: Defaults = Defaults {
    width: 1024,
    height: 1024,
    steps: 8,
    cfg: 1.8,
};

/// `ZImageImg2ImgPipeline`'s default strength, with the model's 8 steps (5 of them run).
pub const IMG2IMG_DEFAULTS: Img2ImgDefaults = Img2ImgDefaults {
    steps: DEFAULTS.steps,
    strength: 0.6,
    noise: NoiseKind::Flow,
};

/// The Qwen3 chat template as `apply_chat_template(..., add_generation_prompt=True,
/// enable_thinking=True)` renders one user message: no system prompt and, with thinking enabled,
/// no `<think>` block.
pub fn chat_template(prompt: &str) -> String {
    format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
}

/// A loaded Z-Image model folder. Components are built on the device on demand (`load`) so the
/// engine can keep, free or stream each one as the memory plan says.
pub struct ZImage {
    dir: ModelDir,
    info: FamilyInfo,
    device: Device,
    policy: PrecisionPolicy,
    tokenizer: Tokenizer,
    scheduler: FlowMatchConfig,
    te_cfg: TextEncoderConfig,
    te_weights: Weights,
    te_prefixed: bool,
    text_encoder: Option<ZImageTextEncoder>,
    dit_cfg: DitConfig,
    dit_weights: Weights,
    dit: Option<Dit>,
    blocks: Option<ResidentBlocks>,
    /// While streaming: the blocks that stay on the device (see `DenoiserResidency::Streamed`).
    kept: Option<KeptBlocks>,
    residency: DenoiserResidency,
    /// The residual dtype the policy asked for (restored after a guard fallback).
    base_residual: DType,
    exec_override: Option<dit::Execution>,
    vae_cfg: VaeConfig,
    vae_weights: Weights,
    vae: Option<VaeDecoder>,
    vae_encoder: Option<VaeEncoder>,
    /// The DiT's linear layers (module paths and shapes): what a LoRA may update.
    lora_layers: LinearLayers,
    /// The current job's LoRAs, attached to the DiT's layers as they load.
    loras: Arc<LoraSet>,
    lora_mode: LoraMode,
}

fn config_error(dir: &ModelDir, rel: &str, message: String) -> ModelError {
    ModelError::Malformed {
        path: dir.display_path(rel),
        message,
    }
}

impl ZImage {
    /// Opens and validates a folder: every config parsed, every tensor name and shape checked
    /// against the headers (without reading weight data). Nothing is placed on the device yet.
    pub fn open(
        dir: ModelDir,
        device: &Device,
        policy: PrecisionPolicy,
    ) -> Result<Self, ModelError> {
        let class = pipeline_class(&dir)?;
        if class != PIPELINE_CLASS {
            return Err(ModelError::UnknownPipeline {
                path: dir.display_path("model_index.json"),
                class,
                supported: PIPELINE_CLASS.into(),
            });
        }
        let scheduler: FlowMatchConfig = dir.read_json("scheduler/scheduler_config.json")?;
        scheduler.validate(&dir.display_path("scheduler/scheduler_config.json"))?;

        let dit_cfg: DitConfig = dir.read_json("transformer/config.json")?;
        dit_cfg
            .validate()
            .map_err(|m| config_error(&dir, "transformer/config.json", m))?;
        let te_cfg: TextEncoderConfig = dir.read_json("text_encoder/config.json")?;
        if te_cfg.num_hidden_layers < 2 {
            return Err(config_error(
                &dir,
                "text_encoder/config.json",
                "num_hidden_layers must be at least 2 (the pipeline uses hidden_states[-2])".into(),
            ));
        }
        if te_cfg.hidden_size != dit_cfg.cap_feat_dim {
            return Err(config_error(
                &dir,
                "transformer/config.json",
                format!(
                    "cap_feat_dim {} does not match the text encoder's hidden_size {}",
                    dit_cfg.cap_feat_dim, te_cfg.hidden_size
                ),
            ));
        }
        let vae_cfg: VaeConfig = dir.read_json("vae/config.json")?;
        vae_cfg
            .validate()
            .map_err(|m| config_error(&dir, "vae/config.json", m))?;
        if vae_cfg.latent_channels != dit_cfg.in_channels {
            return Err(config_error(
                &dir,
                "transformer/config.json",
                format!(
                    "in_channels {} does not match the VAE's latent_channels {}",
                    dit_cfg.in_channels, vae_cfg.latent_channels
                ),
            ));
        }

        let tokenizer = load_tokenizer(&dir)?;
        let te_weights = dir.open_weights("text_encoder")?;
        let te_prefixed = te_weights.contains("model.embed_tokens.weight");
        let dit_weights = dir.open_weights("transformer")?;
        let vae_weights = dir.open_weights("vae")?;

        let info = FamilyInfo {
            family: "z-image",
            latent_channels: vae_cfg.latent_channels,
            vae_scale_factor: vae_cfg.scale_factor(),
            size_multiple: (vae_cfg.scale_factor() * dit_cfg.patch()) as u32,
            defaults: DEFAULTS,
            safe_cfg_max: SAFE_CFG_MAX,
            sampler: "Euler (flow)",
            img2img: IMG2IMG_DEFAULTS,
        };
        let model = Self {
            dir,
            info,
            device: device.clone(),
            policy,
            tokenizer,
            scheduler,
            te_cfg,
            te_weights,
            te_prefixed,
            text_encoder: None,
            dit_cfg,
            dit_weights,
            dit: None,
            blocks: None,
            kept: None,
            residency: DenoiserResidency::Resident,
            base_residual: policy.residual,
            exec_override: None,
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

    pub fn dir(&self) -> &ModelDir {
        &self.dir
    }

    pub fn dit_config(&self) -> &DitConfig {
        &self.dit_cfg
    }

    pub fn vae_config(&self) -> &VaeConfig {
        &self.vae_cfg
    }

    pub fn text_encoder_config(&self) -> &TextEncoderConfig {
        &self.te_cfg
    }

    pub fn weights(&self, component: Component) -> &Weights {
        match component {
            Component::TextEncoder => &self.te_weights,
            Component::Denoiser => &self.dit_weights,
            Component::Vae => &self.vae_weights,
        }
    }

    /// Builds every module against the headers only: names and shapes must match the configs.
    /// Returns the DiT's linear layers (for LoRAs).
    fn validate_tensors(&self) -> Result<LinearLayers, ModelError> {
        let dev = Device::Cpu;
        let te = self.te_vb(self.te_weights.shape_only(DType::F32, &dev));
        ZImageTextEncoder::new(&self.te_cfg, te).map_err(|e| self.te_weights.context(e))?;
        let vb = self.dit_weights.shape_only(DType::F32, &dev);
        let prec = DitPrecision {
            compute: DType::F32,
            residual: DType::F32,
        };
        let dit = Dit::new(self.dit_cfg.clone(), vb.clone(), prec)
            .map_err(|e| self.dit_weights.context(e))?;
        let blocks =
            ResidentBlocks::load(&self.dit_cfg, &vb).map_err(|e| self.dit_weights.context(e))?;
        VaeDecoder::new(&self.vae_cfg, self.vae_weights.shape_only(DType::F32, &dev))
            .map_err(|e| self.vae_weights.context(e))?;
        let mut layers = LinearLayers::default();
        lora::record(&dit.stem, LoraPart::Denoiser, &mut layers);
        lora::record(&blocks, LoraPart::Denoiser, &mut layers);
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
        let mode = self.lora_mode;
        if let Some(dit) = self.dit.as_mut() {
            lora::apply(&mut dit.stem, &set, LoraPart::Denoiser, mode)?;
        }
        if let Some(b) = self.blocks.as_mut() {
            lora::apply(b, &set, LoraPart::Denoiser, mode)?;
        }
        if let Some(k) = self.kept.as_mut() {
            lora::apply(k, &set, LoraPart::Denoiser, mode)?;
        }
        self.loras = set;
        Ok(())
    }

    /// The current LoRAs for streamed blocks (`None` without any).
    fn stream_lora(&self) -> StreamLora {
        (!self.loras.is_empty()).then(|| (self.loras.clone(), self.lora_mode))
    }

    fn te_vb(&self, vb: VarBuilder<'static>) -> VarBuilder<'static> {
        if self.te_prefixed {
            vb
        } else {
            // transformers 5 saves Qwen3Model without the `model.` prefix; candle expects it.
            vb.rename_f(|name: &str| name.strip_prefix("model.").unwrap_or(name).to_string())
        }
    }

    /// Token ids of the chat-templated prompt, as the pipeline feeds the text encoder (the valid,
    /// unpadded part; truncated at 512 tokens).
    pub fn tokenize(&self, prompt: &str) -> Result<Vec<u32>, ModelError> {
        let text = chat_template(prompt);
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| ModelError::Invalid(format!("tokenizer failed: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        ids.truncate(MAX_SEQUENCE_LENGTH);
        Ok(ids)
    }

    /// `hidden_states[-2]` of the text encoder for one prompt: `[L, hidden]` f32.
    pub fn encode_one(&mut self, prompt: &str) -> Result<Tensor, ModelError> {
        let ids = self.tokenize(prompt)?;
        self.load(Component::TextEncoder)?;
        let te = self
            .text_encoder
            .as_ref()
            .ok_or_else(|| ModelError::Invalid("text encoder not loaded".into()))?;
        let n = ids.len();
        let input = Tensor::from_vec(ids, (1, n), &self.device)?;
        let hidden = te.forward(&input)?;
        Ok(hidden.squeeze(0)?.to_dtype(DType::F32)?)
    }

    /// One DiT call on explicit inputs; returns the raw model output (f32, not negated).
    pub fn transformer_forward(
        &mut self,
        x: &Tensor,
        t: &Tensor,
        caps: &[&Tensor],
        trace: Option<&mut dit::Trace>,
    ) -> Result<Tensor, ModelError> {
        self.load(Component::Denoiser)?;
        if let DenoiserResidency::Streamed {
            resident_blocks, ..
        } = self.residency
        {
            let want = resident_blocks.min(self.dit_cfg.n_blocks());
            if self.kept.as_ref().map_or(0, KeptBlocks::len) != want {
                self.kept = None;
                if want > 0 {
                    let vb = self
                        .dit_weights
                        .var_builder(self.policy.denoiser, &self.device);
                    let mut kept = KeptBlocks::load(&self.dit_cfg, &vb, want)
                        .map_err(|e| self.dit_weights.context(e))?;
                    lora::apply(&mut kept, &self.loras, LoraPart::Denoiser, self.lora_mode)?;
                    self.kept = Some(kept);
                }
            }
        }
        let dit = self
            .dit
            .as_ref()
            .ok_or_else(|| ModelError::Invalid("denoiser not loaded".into()))?;
        let out = match (self.residency, self.blocks.as_mut()) {
            (DenoiserResidency::Resident, Some(blocks)) => {
                dit.forward(x, t, caps, blocks, trace)?
            }
            _ => {
                let vb = self
                    .dit_weights
                    .var_builder(self.policy.denoiser, &self.device);
                let mut streamed =
                    StreamedBlocks::new(&self.dit_cfg, vb).with_lora(self.stream_lora());
                if let Some(kept) = self.kept.as_ref() {
                    streamed = streamed.with_kept(kept);
                }
                dit.forward(x, t, caps, &mut streamed, trace)?
            }
        };
        Ok(out)
    }
}

fn load_tokenizer(dir: &ModelDir) -> Result<Tokenizer, ModelError> {
    let rel = "tokenizer/tokenizer.json";
    let text = dir.read_string(rel)?;
    Tokenizer::from_bytes(text.as_bytes()).map_err(|e| ModelError::Malformed {
        path: dir.display_path(rel),
        message: format!("not a tokenizers JSON file: {e}"),
    })
}

impl Family for ZImage {
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
        let dit = &self.dit_weights;
        let d = self.policy.denoiser;
        let blocks: Vec<u64> = (0..self.dit_cfg.n_refiner_layers)
            .flat_map(|i| {
                [
                    dit.bytes_in(&format!("noise_refiner.{i}."), d),
                    dit.bytes_in(&format!("context_refiner.{i}."), d),
                ]
            })
            .chain((0..self.dit_cfg.n_layers).map(|i| dit.bytes_in(&format!("layers.{i}."), d)))
            .collect();
        ComponentBytes {
            text_encoder: self.te_weights.bytes_in("", self.policy.text_encoder),
            denoiser: dit.bytes_in("", d),
            denoiser_largest_block: blocks.iter().copied().max().unwrap_or(0),
            denoiser_blocks: blocks.len(),
            vae_decoder: self.vae_weights.bytes_in("decoder.", self.policy.vae)
                + self
                    .vae_weights
                    .bytes_in("post_quant_conv.", self.policy.vae),
        }
    }

    fn activation_model(&self) -> ActivationModel {
        let elem = |d: DType| d.size_in_bytes() as u64;
        ActivationModel::z_image(&ZImageArch {
            dim: self.dit_cfg.dim as u64,
            heads: self.dit_cfg.n_heads as u64,
            ffn_hidden: self.dit_cfg.ffn_hidden() as u64,
            patch_size: self.dit_cfg.patch() as u32,
            cap_tokens: MAX_SEQUENCE_LENGTH as u32,
            text_hidden: self.te_cfg.hidden_size as u64,
            text_heads: self.te_cfg.num_attention_heads as u64,
            text_ffn_hidden: self.te_cfg.intermediate_size as u64,
            vae_block_out_channels: self
                .vae_cfg
                .block_out_channels
                .iter()
                .map(|&c| c as u32)
                .collect(),
            vae_scale: self.vae_cfg.scale_factor() as u32,
            elem_bytes: elem(cpu_gemm::activation_dtype(
                self.policy.denoiser,
                &self.device,
            )),
            vae_elem_bytes: elem(cpu_gemm::activation_dtype(self.policy.vae, &self.device)),
        })
    }

    fn schedule(
        &self,
        steps: usize,
        latent_h: usize,
        latent_w: usize,
    ) -> Result<Schedule, ModelError> {
        let p = self.dit_cfg.patch();
        Ok(self
            .scheduler
            .schedule(steps, (latent_h / p) * (latent_w / p)))
    }

    fn encode(&mut self, prompt: &str, negative: Option<&str>) -> Result<Conditioning, ModelError> {
        let positive = Embedding {
            hidden: self.encode_one(prompt)?,
            pooled: None,
        };
        let negative = match negative {
            Some(n) => Some(Embedding {
                hidden: self.encode_one(n)?,
                pooled: None,
            }),
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
        let b = x.dim(0)?;
        let timestep = step.schedule.timesteps[step.index];
        let t_model = (1000.0f32 - timestep) / 1000.0;
        let guided = step.cfg > 1.0 && cond.negative.is_some();
        let out = if let (true, Some(neg)) = (guided, cond.negative.as_ref()) {
            let xx = Tensor::cat(&[x, x], 0)?;
            let t = Tensor::full(t_model, 2 * b, &self.device)?;
            let mut caps: Vec<&Tensor> = vec![&cond.positive.hidden; b];
            caps.extend(std::iter::repeat_n(&neg.hidden, b));
            let out = self.transformer_forward(&xx, &t, &caps, None)?;
            let pos = out.narrow(0, 0, b)?;
            let neg = out.narrow(0, b, b)?;
            cfg_combine(&pos, &neg, step.cfg)?
        } else {
            let t = Tensor::full(t_model, b, &self.device)?;
            let caps: Vec<&Tensor> = vec![&cond.positive.hidden; b];
            self.transformer_forward(x, &t, &caps, None)?
        };
        // Z-Image predicts the flow toward the data; the sampler's derivative is its negation.
        Ok(out.neg()?)
    }

    fn vae_input(&self, latents: &Tensor) -> Result<Tensor, ModelError> {
        let z = (latents.to_dtype(DType::F32)? / self.vae_cfg.scaling_factor)?;
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
            Component::TextEncoder if self.text_encoder.is_none() => {
                let vb = self.te_vb(
                    self.te_weights
                        .var_builder(self.policy.text_encoder, &self.device),
                );
                let te = ZImageTextEncoder::new(&self.te_cfg, vb)
                    .map_err(|e| self.te_weights.context(e))?;
                self.text_encoder = Some(te);
            }
            Component::Denoiser if self.dit.is_none() || self.needs_blocks() => {
                let vb = self
                    .dit_weights
                    .var_builder(self.policy.denoiser, &self.device);
                if self.dit.is_none() {
                    let prec = DitPrecision::for_weights(
                        self.policy.denoiser,
                        self.policy.residual,
                        &self.device,
                    );
                    let mut dit = Dit::new(self.dit_cfg.clone(), vb.clone(), prec)
                        .map_err(|e| self.dit_weights.context(e))?;
                    dit.set_execution(self.execution());
                    lora::apply(
                        &mut dit.stem,
                        &self.loras,
                        LoraPart::Denoiser,
                        self.lora_mode,
                    )?;
                    self.dit = Some(dit);
                }
                if self.needs_blocks() {
                    let mut blocks = ResidentBlocks::load(&self.dit_cfg, &vb)
                        .map_err(|e| self.dit_weights.context(e))?;
                    lora::apply(&mut blocks, &self.loras, LoraPart::Denoiser, self.lora_mode)?;
                    self.blocks = Some(blocks);
                }
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
            Component::TextEncoder => self.text_encoder = None,
            Component::Denoiser => {
                self.dit = None;
                self.blocks = None;
                self.kept = None;
            }
            Component::Vae => {
                self.vae = None;
                self.vae_encoder = None;
            }
        }
    }

    fn is_loaded(&self, component: Component) -> bool {
        match component {
            Component::TextEncoder => self.text_encoder.is_some(),
            Component::Denoiser => self.dit.is_some() && !self.needs_blocks(),
            Component::Vae => self.vae.is_some(),
        }
    }

    fn set_denoiser_residency(&mut self, residency: DenoiserResidency) {
        self.residency = residency;
        match residency {
            DenoiserResidency::Streamed { .. } => self.blocks = None,
            DenoiserResidency::Resident => self.kept = None,
        }
        let exec = self.execution();
        if let Some(dit) = self.dit.as_mut() {
            dit.set_execution(exec);
        }
    }

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

impl ZImage {
    /// Streaming is the low-memory plan: it also runs the CFG pair one item at a time and keeps
    /// attention chunks small, so activations shrink with the weights.
    fn execution(&self) -> dit::Execution {
        self.exec_override.unwrap_or(match self.residency {
            DenoiserResidency::Resident => dit::Execution::default(),
            DenoiserResidency::Streamed {
                one_at_a_time: true,
                ..
            } => dit::Execution::LOW_MEMORY,
            DenoiserResidency::Streamed { .. } => dit::Execution {
                micro_batch: None,
                ..dit::Execution::LOW_MEMORY
            },
        })
    }

    /// Pins the denoiser's execution strategy regardless of residency (tests and benchmarks
    /// separate block streaming from micro-batching with it); `None` restores the default.
    pub fn set_execution(&mut self, exec: Option<dit::Execution>) {
        self.exec_override = exec;
        let exec = self.execution();
        if let Some(dit) = self.dit.as_mut() {
            dit.set_execution(exec);
        }
    }

    fn needs_blocks(&self) -> bool {
        self.residency == DenoiserResidency::Resident && self.blocks.is_none()
    }
}
