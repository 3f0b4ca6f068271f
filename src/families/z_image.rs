//! Z-Image-Turbo (Tongyi-MAI) from a diffusers-layout folder: Qwen3 text encoder (candle's, which
//! matches transformers' `hidden_states[-2]`), our DiT (`dit.rs`), the shared AutoencoderKL decoder
//! and the flow-matching schedule — reproducing diffusers' `ZImagePipeline` step for step.

pub mod dit;
pub mod profile;
pub mod synthetic;
pub mod text_encoder;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::z_image::text_encoder::TextEncoderConfig;
use tokenizers::Tokenizer;

use crate::memory::planner::{ActivationModel, ComponentBytes, ZImageArch};

use self::dit::{Dit, DitConfig, DitPrecision, KeptBlocks, ResidentBlocks, StreamedBlocks};
use self::text_encoder::TextEncoder;
use super::cpu_gemm;
use super::scheduler::{FlowMatchConfig, Schedule};
use super::vae::{VaeConfig, VaeDecoder};
use super::weights::{ModelDir, Role, Weights};
use super::{
    cfg_combine, pipeline_class, Component, ComponentFiles, Conditioning, DenoiserResidency,
    Embedding, Family, ModelError, PrecisionPolicy, Profile, StepInput,
};

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

/// A loaded Z-Image model folder. Components are built on the device on demand (`load`) so the
/// engine can keep, free or stream each one as the memory plan says.
pub struct ZImage {
    dir: ModelDir,
    profile: Profile,
    device: Device,
    policy: PrecisionPolicy,
    tokenizer: Tokenizer,
    scheduler: FlowMatchConfig,
    te_cfg: TextEncoderConfig,
    te_weights: Weights,
    text_encoder: Option<TextEncoder>,
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
    /// Pinned staging and a copy stream for streamed blocks (CUDA only; made on first use).
    stager: Option<super::weights::stage::SharedStager>,
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
        let te_weights = open(&files.text_encoder, "text_encoder", Role::TextEncoder)?;
        let dit_weights = open(&files.transformer, "transformer", Role::Transformer)?;
        let vae_weights = open(&files.vae, "vae", Role::Vae)?;

        let profile = Profile {
            latent_channels: vae_cfg.latent_channels,
            vae_scale_factor: vae_cfg.scale_factor(),
            size_multiple: (vae_cfg.scale_factor() * dit_cfg.patch()) as u32,
            ..profile::PROFILE
        };
        let model = Self {
            dir,
            profile,
            device: device.clone(),
            policy,
            tokenizer,
            scheduler,
            te_cfg,
            te_weights,
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
            stager: None,
        };
        model.validate_tensors()?;
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
    fn validate_tensors(&self) -> Result<(), ModelError> {
        let dev = Device::Cpu;
        TextEncoder::new(&self.te_cfg, self.te_weights.shape_loader(DType::F32))
            .map_err(|e| self.te_weights.context(e))?;
        let vb = self.dit_weights.shape_loader(DType::F32);
        let prec = DitPrecision {
            compute: DType::F32,
            residual: DType::F32,
        };
        Dit::new(self.dit_cfg.clone(), vb.clone(), prec)
            .map_err(|e| self.dit_weights.context(e))?;
        ResidentBlocks::load(&self.dit_cfg, &vb).map_err(|e| self.dit_weights.context(e))?;
        VaeDecoder::new(&self.vae_cfg, self.vae_weights.shape_only(DType::F32, &dev))
            .map_err(|e| self.vae_weights.context(e))?;
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
                    let vb = self.dit_weights.loader(self.policy.denoiser, &self.device);
                    let kept = KeptBlocks::load(&self.dit_cfg, &vb, want)
                        .map_err(|e| self.dit_weights.context(e))?;
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
                let vb = self.dit_weights.loader(self.policy.denoiser, &self.device);
                if self.stager.is_none() && self.device.is_cuda() {
                    let largest = self.largest_stored_block();
                    self.stager =
                        super::weights::stage::for_device(&self.device, largest as usize)?;
                }
                let mut streamed =
                    StreamedBlocks::new(&self.dit_cfg, vb).with_stager(self.stager.clone());
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
    fn profile(&self) -> &Profile {
        &self.profile
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
            denoiser_scratch: dit.largest_dequantized(d),
            text_encoder_scratch: self
                .te_weights
                .largest_dequantized(self.policy.text_encoder),
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

    fn load(&mut self, component: Component) -> Result<(), ModelError> {
        match component {
            Component::TextEncoder if self.text_encoder.is_none() => {
                let ld = self
                    .te_weights
                    .loader(self.policy.text_encoder, &self.device);
                let te =
                    TextEncoder::new(&self.te_cfg, ld).map_err(|e| self.te_weights.context(e))?;
                self.text_encoder = Some(te);
            }
            Component::Denoiser if self.dit.is_none() || self.needs_blocks() => {
                let vb = self.dit_weights.loader(self.policy.denoiser, &self.device);
                if self.dit.is_none() {
                    let prec = DitPrecision::for_weights(
                        self.policy.denoiser,
                        self.policy.residual,
                        &self.device,
                    );
                    let mut dit = Dit::new(self.dit_cfg.clone(), vb.clone(), prec)
                        .map_err(|e| self.dit_weights.context(e))?;
                    dit.set_execution(self.execution());
                    self.dit = Some(dit);
                }
                if self.needs_blocks() {
                    let blocks = ResidentBlocks::load(&self.dit_cfg, &vb)
                        .map_err(|e| self.dit_weights.context(e))?;
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
            Component::Vae => self.vae = None,
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

    /// The most bytes one block takes in the files (what a staging buffer must hold).
    fn largest_stored_block(&self) -> u64 {
        let c = &self.dit_cfg;
        (0..c.n_refiner_layers)
            .flat_map(|i| {
                [
                    format!("noise_refiner.{i}."),
                    format!("context_refiner.{i}."),
                ]
            })
            .chain((0..c.n_layers).map(|i| format!("layers.{i}.")))
            .map(|p| self.dit_weights.stored_bytes_under(&p))
            .max()
            .unwrap_or(0)
    }

    fn needs_blocks(&self) -> bool {
        self.residency == DenoiserResidency::Resident && self.blocks.is_none()
    }
}
