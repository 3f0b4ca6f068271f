//! Z-Image-Turbo (Tongyi-MAI) from a diffusers-layout folder, or with any component's weights
//! from a single file (ComfyUI, fp8, GGUF, ldm VAE; see `families::weights`): our Qwen3 text
//! encoder (`text_encoder.rs`, transformers' `hidden_states[-2]`, its linears possibly quantized),
//! our DiT (`dit.rs`), the shared AutoencoderKL decoder and the flow-matching schedule —
//! reproducing diffusers' `ZImagePipeline` step for step.

pub mod activations;
pub mod blocks;
pub mod config;
pub mod controlnet;
pub mod dit;
pub mod profile;
pub mod synthetic;
pub mod text_encoder;
pub mod variants;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::z_image::text_encoder::TextEncoderConfig;
use tokenizers::Tokenizer;

use crate::memory::ActivationModel;

use self::activations::ZImageArch;
use self::blocks::{KeptBlocks, ResidentBlocks, StreamLora, StreamedBlocks};
use self::config::DitConfig;
use self::controlnet::{ControlRun, ControlSlot};
use self::dit::{Dit, DitPrecision};
use self::text_encoder::TextEncoder;
use super::lora::{self, LinearLayers, LoraPart, LoraSet};
use super::slot::{Components, Module, Parts, VaeSource};
use super::weights::stage::SharedStager;
use super::weights::{ModelDir, Role, Weights};
use super::{
    cfg_combine, pipeline_class, Component, ComponentFiles, Conditioning, ControlInfo,
    ControlInput, DenoiserResidency, Embedding, Family, ModelError, PrecisionPolicy, Profile,
    StepInput,
};
use crate::nn::scheduler::{FlowMatchConfig, Schedule};
use crate::nn::vae::{VaeConfig, VaeDecoder};
use crate::ops::linear::LoraMode;

pub const PIPELINE_CLASS: &str = "ZImagePipeline";
/// The pipeline's `max_sequence_length`: prompts are cut at this many tokens.
pub const MAX_SEQUENCE_LENGTH: usize = 512;
pub use self::profile::{DEFAULTS, SAFE_CFG_MAX};

/// The Qwen3 chat template as `apply_chat_template(..., add_generation_prompt=True,
/// enable_thinking=True)` renders one user message: no system prompt and, with thinking enabled,
/// no `<think>` block.
pub fn chat_template(prompt: &str) -> String {
    format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
}

/// The Qwen3 text encoder's source: its config and weights (any naming: our loader presents
/// transformers' names, with or without the `model.` prefix, and llama.cpp's).
pub struct TextEncoderSource {
    cfg: TextEncoderConfig,
    weights: Weights,
}

impl Module for TextEncoder {
    type Source = TextEncoderSource;

    fn build(
        src: &TextEncoderSource,
        policy: &PrecisionPolicy,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let ld = src.weights.loader(policy.text_encoder, device);
        TextEncoder::new(&src.cfg, ld).map_err(|e| src.weights.context(e))
    }

    fn bytes(src: &TextEncoderSource, policy: &PrecisionPolicy) -> u64 {
        src.weights.bytes_in("", policy.text_encoder)
    }

    fn scratch_bytes(src: &TextEncoderSource, policy: &PrecisionPolicy) -> u64 {
        src.weights.largest_dequantized(policy.text_encoder)
    }
}

/// The DiT's source: config, weights, how its blocks are held ([`DenoiserResidency`]) and run,
/// and the current job's LoRAs (attached to every block as it is built).
pub struct DenoiserSource {
    cfg: DitConfig,
    weights: Weights,
    residency: DenoiserResidency,
    exec_override: Option<dit::Execution>,
    loras: Arc<LoraSet>,
    lora_mode: LoraMode,
    /// The job's ControlNet and its input.
    control: ControlSlot,
}

impl DenoiserSource {
    /// The current LoRAs for streamed blocks (`None` without any).
    fn stream_lora(&self) -> StreamLora {
        (!self.loras.is_empty()).then(|| (self.loras.clone(), self.lora_mode))
    }

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

    /// The most bytes one block takes in the files (what a staging buffer must hold).
    fn largest_stored_block(&self) -> u64 {
        let c = &self.cfg;
        (0..c.n_refiner_layers)
            .flat_map(|i| {
                [
                    format!("noise_refiner.{i}."),
                    format!("context_refiner.{i}."),
                ]
            })
            .chain((0..c.n_layers).map(|i| format!("layers.{i}.")))
            .map(|p| self.weights.stored_bytes_under(&p))
            .max()
            .unwrap_or(0)
    }
}

/// Resident bytes of the denoiser's tensors under `prefix`: with `--precision int8`, the blocks'
/// attention and feed-forward matrices count as int8 (what `dit::Block` converts them to).
fn block_bytes_in(src: &DenoiserSource, prefix: &str, policy: &PrecisionPolicy) -> u64 {
    if !policy.denoiser_int8 {
        return src.weights.bytes_in(prefix, policy.denoiser);
    }
    let in_block = |n: &str| {
        ["layers.", "noise_refiner.", "context_refiner."]
            .iter()
            .any(|p| n.starts_with(p))
    };
    let projection = |n: &str| {
        in_block(n)
            && n.ends_with(".weight")
            && (n.contains(".attention.to_") || n.contains(".feed_forward.w"))
    };
    src.weights
        .bytes_in_int8(prefix, policy.denoiser, projection)
}

/// The loaded DiT: the stem and final layer, and its blocks as the residency asks — all resident,
/// or streamed from the host with the first few kept on the device.
pub struct Denoiser {
    dit: Dit,
    blocks: Option<ResidentBlocks>,
    /// While streaming: the blocks that stay on the device (see `DenoiserResidency::Streamed`).
    kept: Option<KeptBlocks>,
    /// Pinned staging and a copy stream for streamed blocks (CUDA only; made on first use).
    stager: Option<SharedStager>,
}

impl Module for Denoiser {
    type Source = DenoiserSource;

    fn build(
        src: &DenoiserSource,
        policy: &PrecisionPolicy,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let vb = src
            .weights
            .loader(policy.denoiser, device)
            .with_int8(policy.denoiser_int8);
        let prec = DitPrecision::for_weights(policy.denoiser, policy.residual, device);
        let mut dit = Dit::new(src.cfg.clone(), vb, prec).map_err(|e| src.weights.context(e))?;
        dit.set_execution(src.execution());
        lora::apply(&mut dit.stem, &src.loras, LoraPart::Denoiser, src.lora_mode)?;
        Ok(Self {
            dit,
            blocks: None,
            kept: None,
            stager: None,
        })
    }

    fn bytes(src: &DenoiserSource, policy: &PrecisionPolicy) -> u64 {
        block_bytes_in(src, "", policy) + src.control.bytes()
    }

    fn scratch_bytes(src: &DenoiserSource, policy: &PrecisionPolicy) -> u64 {
        src.weights.largest_dequantized(policy.denoiser)
    }

    fn block_bytes(src: &DenoiserSource, policy: &PrecisionPolicy) -> Vec<u64> {
        (0..src.cfg.n_refiner_layers)
            .flat_map(|i| {
                [
                    block_bytes_in(src, &format!("noise_refiner.{i}."), policy),
                    block_bytes_in(src, &format!("context_refiner.{i}."), policy),
                ]
            })
            .chain(
                (0..src.cfg.n_layers).map(|i| block_bytes_in(src, &format!("layers.{i}."), policy)),
            )
            .collect()
    }

    /// Resident, the blocks must be on the device too.
    fn complete(&self, src: &DenoiserSource) -> bool {
        src.residency != DenoiserResidency::Resident || self.blocks.is_some()
    }

    fn finish(
        &mut self,
        src: &DenoiserSource,
        policy: &PrecisionPolicy,
        device: &Device,
    ) -> Result<(), ModelError> {
        let vb = src
            .weights
            .loader(policy.denoiser, device)
            .with_int8(policy.denoiser_int8);
        let mut blocks = ResidentBlocks::load(&src.cfg, &vb).map_err(|e| src.weights.context(e))?;
        lora::apply(&mut blocks, &src.loras, LoraPart::Denoiser, src.lora_mode)?;
        self.blocks = Some(blocks);
        Ok(())
    }

    fn set_residency(
        src: &mut DenoiserSource,
        module: Option<&mut Self>,
        residency: DenoiserResidency,
    ) {
        src.residency = residency;
        if let Some(m) = module {
            match residency {
                DenoiserResidency::Streamed { .. } => m.blocks = None,
                DenoiserResidency::Resident => m.kept = None,
            }
            m.dit.set_execution(src.execution());
        }
    }
}

impl Denoiser {
    /// Attaches `set` to every loaded layer (the stem, resident and kept blocks).
    fn attach_loras(&mut self, set: &LoraSet, mode: LoraMode) -> candle_core::Result<()> {
        lora::apply(&mut self.dit.stem, set, LoraPart::Denoiser, mode)?;
        if let Some(b) = self.blocks.as_mut() {
            lora::apply(b, set, LoraPart::Denoiser, mode)?;
        }
        if let Some(k) = self.kept.as_mut() {
            lora::apply(k, set, LoraPart::Denoiser, mode)?;
        }
        Ok(())
    }

    /// One DiT call; streams the blocks (keeping the first ones) when the residency says so.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        src: &DenoiserSource,
        policy: &PrecisionPolicy,
        device: &Device,
        x: &Tensor,
        t: &Tensor,
        caps: &[&Tensor],
        trace: Option<&mut dit::Trace>,
        control: Option<ControlRun<'_>>,
    ) -> Result<Tensor, ModelError> {
        if let DenoiserResidency::Streamed {
            resident_blocks, ..
        } = src.residency
        {
            let want = resident_blocks.min(src.cfg.n_blocks());
            if self.kept.as_ref().map_or(0, KeptBlocks::len) != want {
                self.kept = None;
                if want > 0 {
                    let vb = src
                        .weights
                        .loader(policy.denoiser, device)
                        .with_int8(policy.denoiser_int8);
                    let mut kept = KeptBlocks::load(&src.cfg, &vb, want)
                        .map_err(|e| src.weights.context(e))?;
                    lora::apply(&mut kept, &src.loras, LoraPart::Denoiser, src.lora_mode)?;
                    self.kept = Some(kept);
                }
            }
        }
        let out = match (src.residency, self.blocks.as_mut()) {
            (DenoiserResidency::Resident, Some(blocks)) => {
                self.dit.forward(x, t, caps, blocks, trace, control)?
            }
            _ => {
                let vb = src
                    .weights
                    .loader(policy.denoiser, device)
                    .with_int8(policy.denoiser_int8);
                if self.stager.is_none() && device.is_cuda() {
                    let largest = src.largest_stored_block();
                    self.stager = super::weights::stage::for_device(device, largest as usize)?;
                }
                let mut streamed = StreamedBlocks::new(&src.cfg, vb)
                    .with_stager(self.stager.clone())
                    .with_lora(src.stream_lora());
                if let Some(kept) = self.kept.as_ref() {
                    streamed = streamed.with_kept(kept);
                }
                self.dit
                    .forward(x, t, caps, &mut streamed, trace, control)?
            }
        };
        Ok(out)
    }
}

/// A loaded Z-Image model folder. Components are built on the device on demand so the engine can
/// keep, free or stream each one as the memory plan says.
pub struct ZImage {
    dir: ModelDir,
    profile: Profile,
    tokenizer: Tokenizer,
    scheduler: FlowMatchConfig,
    parts: Parts<TextEncoder, Denoiser>,
    /// The DiT's linear layers (module paths and shapes): what a LoRA may update.
    lora_layers: LinearLayers,
}

impl ZImage {
    /// Opens and validates a folder: every config parsed, every tensor name and shape checked
    /// against the headers (without reading weight data). Nothing is placed on the device yet.
    pub fn open(
        dir: ModelDir,
        device: &Device,
        policy: PrecisionPolicy,
    ) -> Result<Self, ModelError> {
        Self::open_with(dir, &ComponentFiles::default(), device, policy)
    }

    /// [`ZImage::open`] with some components' weights taken from single files (ComfyUI, fp8,
    /// GGUF, ldm VAE …); configs and the tokenizer still come from the folder.
    pub fn open_with(
        dir: ModelDir,
        files: &ComponentFiles,
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
        let sched_rel = "scheduler/scheduler_config.json";
        let scheduler: FlowMatchConfig = dir.read_json(sched_rel)?;
        scheduler
            .validate()
            .map_err(|m| dir.malformed(sched_rel, m))?;

        let dit_cfg: DitConfig = dir.read_json("transformer/config.json")?;
        dit_cfg
            .validate()
            .map_err(|m| dir.malformed("transformer/config.json", m))?;
        let te_cfg: TextEncoderConfig = dir.read_json("text_encoder/config.json")?;
        if te_cfg.num_hidden_layers < 2 {
            return Err(dir.malformed(
                "text_encoder/config.json",
                "num_hidden_layers must be at least 2 (the pipeline uses hidden_states[-2])".into(),
            ));
        }
        if te_cfg.hidden_size != dit_cfg.cap_feat_dim {
            return Err(dir.malformed(
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
            .map_err(|m| dir.malformed("vae/config.json", m))?;
        if vae_cfg.latent_channels != dit_cfg.in_channels {
            return Err(dir.malformed(
                "transformer/config.json",
                format!(
                    "in_channels {} does not match the VAE's latent_channels {}",
                    dit_cfg.in_channels, vae_cfg.latent_channels
                ),
            ));
        }

        let tokenizer = load_tokenizer(&dir)?;
        let open = |file: &Option<std::path::PathBuf>, component: &str, role: Role| match file {
            Some(path) => Weights::open_file(path, component, role),
            None => dir.open_weights_as(component, role).map_err(|e| match e {
                // A configs-only folder (`zturbo pull … --configs-only`): say which flag helps.
                ModelError::MissingFile { .. } => ModelError::Invalid(format!(
                    "{} has no {component} weights: give them as a file with {} \
                     (or pull the whole model)",
                    dir.describe(),
                    role.flag()
                )),
                other => other,
            }),
        };
        let te = TextEncoderSource {
            cfg: te_cfg,
            weights: open(&files.text_encoder, "text_encoder", Role::TextEncoder)?,
        };
        let profile = Profile {
            latent_channels: vae_cfg.latent_channels,
            vae_scale_factor: vae_cfg.scale_factor(),
            size_multiple: (vae_cfg.scale_factor() * dit_cfg.patch()) as u32,
            ..profile::PROFILE
        };
        let den = DenoiserSource {
            weights: open(&files.transformer, "transformer", Role::Transformer)?,
            cfg: dit_cfg,
            residency: DenoiserResidency::Resident,
            exec_override: None,
            loras: Arc::default(),
            lora_mode: LoraMode::default(),
            control: ControlSlot::default(),
        };
        let vae = VaeSource {
            weights: open(&files.vae, "vae", Role::Vae)?,
            cfg: vae_cfg,
        };
        let model = Self {
            dir,
            profile,
            tokenizer,
            scheduler,
            parts: Parts::new(device, policy, te, den, vae),
            lora_layers: LinearLayers::default(),
        };
        let mut model = model;
        model.lora_layers = model.validate_tensors()?;
        Ok(model)
    }

    pub fn dir(&self) -> &ModelDir {
        &self.dir
    }

    pub fn dit_config(&self) -> &DitConfig {
        &self.parts.denoiser.source().cfg
    }

    pub fn vae_config(&self) -> &VaeConfig {
        &self.parts.vae.source().cfg
    }

    pub fn text_encoder_config(&self) -> &TextEncoderConfig {
        &self.parts.text_encoder.source().cfg
    }

    /// A component's opened weights (their files, format and encodings).
    pub fn weights(&self, component: Component) -> &Weights {
        match component {
            Component::TextEncoder => &self.parts.text_encoder.source().weights,
            Component::Denoiser => &self.parts.denoiser.source().weights,
            Component::Vae => &self.parts.vae.source().weights,
        }
    }

    /// Builds every module against the headers only: names and shapes must match the configs.
    /// Returns the DiT's linear layers (what LoRAs may update).
    fn validate_tensors(&self) -> Result<LinearLayers, ModelError> {
        let dev = Device::Cpu;
        let te = self.parts.text_encoder.source();
        TextEncoder::new(&te.cfg, te.weights.shape_loader(DType::F32))
            .map_err(|e| te.weights.context(e))?;
        let den = self.parts.denoiser.source();
        let vb = den.weights.shape_loader(DType::F32);
        let prec = DitPrecision {
            compute: DType::F32,
            residual: DType::F32,
        };
        let dit =
            Dit::new(den.cfg.clone(), vb.clone(), prec).map_err(|e| den.weights.context(e))?;
        let blocks = ResidentBlocks::load(&den.cfg, &vb).map_err(|e| den.weights.context(e))?;
        let vae = self.parts.vae.source();
        VaeDecoder::new(&vae.cfg, vae.weights.shape_only(DType::F32, &dev))
            .map_err(|e| vae.weights.context(e))?;
        let mut layers = LinearLayers::default();
        lora::record(&dit.stem, LoraPart::Denoiser, &mut layers);
        lora::record(&blocks, LoraPart::Denoiser, &mut layers);
        Ok(layers)
    }

    /// How LoRAs reach the layers (runtime updates by default; see [`LoraMode`]); re-attaches
    /// the current ones.
    pub fn set_lora_mode(&mut self, mode: LoraMode) -> Result<(), ModelError> {
        let (src, module) = self.parts.denoiser.split_mut();
        src.lora_mode = mode;
        if let Some(m) = module {
            m.attach_loras(&src.loras, mode)?;
        }
        Ok(())
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
        let device = self.parts.device().clone();
        let te = self.parts.text_encoder()?;
        let n = ids.len();
        let input = Tensor::from_vec(ids, (1, n), &device)?;
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
        let (device, policy) = (self.parts.device().clone(), self.parts.policy());
        let (src, den) = self.parts.denoiser()?;
        den.forward(src, &policy, &device, x, t, caps, trace, None)
    }

    /// One DiT call with the job's ControlNet when `step` is inside its range (its input
    /// repeated over the `x.dim(0)` items: the batch, and the CFG pair's copy).
    fn controlled_forward(
        &mut self,
        x: &Tensor,
        t: &Tensor,
        caps: &[&Tensor],
        step: &StepInput<'_>,
    ) -> Result<Tensor, ModelError> {
        let (device, policy) = (self.parts.device().clone(), self.parts.policy());
        {
            let (src, _) = self.parts.denoiser.split_mut();
            let cfg = src.cfg.clone();
            src.control.ensure_dtype(&cfg, policy.denoiser, &device)?;
        }
        let (src, den) = self.parts.denoiser()?;
        let n = x.dim(0)?;
        let active = src.control.for_step(step.index, step.schedule.steps());
        let context = match active {
            Some((_, one, _)) => Some(Tensor::cat(&vec![one; n], 0)?),
            None => None,
        };
        let run = match (active, context.as_ref()) {
            (Some((net, _, scale)), Some(context)) => Some(ControlRun {
                net,
                context,
                scale,
            }),
            _ => None,
        };
        den.forward(src, &policy, &device, x, t, caps, None, run)
    }

    /// Pins the denoiser's execution strategy regardless of residency (tests and benchmarks
    /// separate block streaming from micro-batching with it); `None` restores the default.
    pub fn set_execution(&mut self, exec: Option<dit::Execution>) {
        let (src, module) = self.parts.denoiser.split_mut();
        src.exec_override = exec;
        if let Some(m) = module {
            m.dit.set_execution(src.execution());
        }
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
        activations::model(&ZImageArch::of(
            self.dit_config(),
            self.text_encoder_config(),
            self.vae_config(),
            &self.parts.policy(),
            self.parts.device(),
        ))
    }

    fn schedule(
        &self,
        steps: usize,
        latent_h: usize,
        latent_w: usize,
    ) -> Result<Schedule, ModelError> {
        let p = self.dit_config().patch();
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
        let device = self.parts.device().clone();
        let timestep = step.schedule.timesteps[step.index];
        let t_model = (1000.0f32 - timestep) / 1000.0;
        let guided = step.cfg > 1.0 && cond.negative.is_some();
        let out = if let (true, Some(neg)) = (guided, cond.negative.as_ref()) {
            let xx = Tensor::cat(&[x, x], 0)?;
            let t = Tensor::full(t_model, 2 * b, &device)?;
            let mut caps: Vec<&Tensor> = vec![&cond.positive.hidden; b];
            caps.extend(std::iter::repeat_n(&neg.hidden, b));
            let out = self.controlled_forward(&xx, &t, &caps, &step)?;
            let pos = out.narrow(0, 0, b)?;
            let neg = out.narrow(0, b, b)?;
            cfg_combine(&pos, &neg, step.cfg)?
        } else {
            let t = Tensor::full(t_model, b, &device)?;
            let caps: Vec<&Tensor> = vec![&cond.positive.hidden; b];
            self.controlled_forward(x, &t, &caps, &step)?
        };
        // Z-Image predicts the flow toward the data; the sampler's derivative is its negation.
        Ok(out.neg()?)
    }

    fn lora_layers(&self) -> &LinearLayers {
        &self.lora_layers
    }

    fn set_loras(&mut self, set: Arc<LoraSet>) -> Result<(), ModelError> {
        let (src, module) = self.parts.denoiser.split_mut();
        if Arc::ptr_eq(&set, &src.loras) || set.key == src.loras.key {
            return Ok(());
        }
        if let Some(m) = module {
            m.attach_loras(&set, src.lora_mode)?;
        }
        src.loras = set;
        Ok(())
    }

    fn set_controlnet(
        &mut self,
        path: Option<&std::path::Path>,
    ) -> Result<Option<ControlInfo>, ModelError> {
        let device = self.parts.device().clone();
        let dtype = self.parts.policy().denoiser;
        let (src, _) = self.parts.denoiser.split_mut();
        let cfg = src.cfg.clone();
        src.control.attach(path, &cfg, dtype, &device)
    }

    fn set_control(&mut self, input: Option<ControlInput>) -> Result<(), ModelError> {
        self.parts.denoiser.split_mut().0.control.set_input(input)
    }

    fn vae_input(&self, latents: &Tensor) -> Result<Tensor, ModelError> {
        let cfg = self.vae_config();
        let z = (latents.to_dtype(DType::F32)? / cfg.scaling_factor)?;
        Ok(match cfg.shift_factor {
            Some(s) => (z + s)?,
            None => z,
        })
    }
}
