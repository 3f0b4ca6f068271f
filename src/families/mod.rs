//! Model families behind one trait: encode a prompt, predict one sampler derivative, decode latents.
//! Each family is a folder: its model files, `profile.rs` (its facts: defaults, presets, bands) and
//! `activations.rs` (its memory formulas). Next to them: the catalog of known models, weight files,
//! the precision policy and the component slots. The engine stays family-agnostic and never sees
//! diffusers configs or tensor names.

pub mod catalog;
pub mod lora;
pub mod precision;
pub mod profile;
pub mod sd_turbo;
pub mod slot;
pub mod weights;
pub mod z_image;

/// The catalog's quantized variants (only Z-Image-Turbo has them; they live in its folder).
pub use z_image::variants;

use std::path::PathBuf;

use candle_core::{Device, Tensor};

use crate::memory::ActivationModel;

pub use crate::nn::scheduler::Schedule;
pub use precision::{Precision, PrecisionPolicy};
pub use profile::{Defaults, FamilyKind, LatentPreview, Profile};
pub use slot::Components;
pub use weights::ModelDir;

/// Everything that can go wrong loading or running a model. Messages name the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: not a model folder: {reason}")]
    NotAModelFolder { path: PathBuf, reason: String },
    #[error("missing file: {path}")]
    MissingFile { path: PathBuf },
    #[error("{path}: {message}")]
    Malformed { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: unsupported pipeline class `{class}` (supported: {supported})")]
    UnknownPipeline {
        path: PathBuf,
        class: String,
        supported: String,
    },
    #[error("{component} weights ({files}): {message}")]
    Weights {
        component: String,
        files: String,
        message: String,
    },
    #[error("model `{0}` not found: {1}")]
    NotFound(String, String),
    #[error("download failed: {0}")]
    Download(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{}", weights::error_text(.0))]
    Candle(#[from] candle_core::Error),
}

/// One encoded prompt.
#[derive(Debug, Clone)]
pub struct Embedding {
    /// Per-token features: Z-Image `[L, hidden]` (variable L), SD `[1, 77, hidden]`.
    pub hidden: Tensor,
    /// SDXL's pooled text embedding `[1, D]`.
    pub pooled: Option<Tensor>,
}

/// The prompt (and the negative prompt when guidance is on), encoded once per job.
#[derive(Debug, Clone)]
pub struct Conditioning {
    pub positive: Embedding,
    pub negative: Option<Embedding>,
}

/// A component a family may hold on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    TextEncoder,
    Denoiser,
    Vae,
}

/// How the denoiser's weights are held while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenoiserResidency {
    /// All blocks on the device.
    Resident,
    /// Blocks stay memory-mapped on the host and visit the device one at a time, except the first
    /// `resident_blocks` (in execution order), which stay on the device for the whole job. With
    /// `one_at_a_time`, each block runs the batch's items (the CFG pair included) one by one.
    Streamed {
        resident_blocks: usize,
        one_at_a_time: bool,
    },
}

/// What a job's ControlNet is, as the family found it in its tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlInfo {
    /// `1.0`, `2.0` or `2.1` for Z-Image's ControlNet Union.
    pub version: String,
    /// Channels of its input (latents, then inpainting's mask and masked-image latents).
    pub control_in_dim: usize,
}

/// A job's control input, as the engine encodes it (f32, one image; the family repeats it over
/// the batch and the CFG pair).
#[derive(Debug, Clone)]
pub struct ControlInput {
    /// The control image's latents: the VAE posterior's mode, shifted and scaled `[1, C, h, w]`.
    pub latents: Tensor,
    /// Inpainting: the region kept (`1 − mask` at latent size, `[1, 1, h, w]`) and the latents of
    /// the image with the masked pixels zeroed (`[1, C, h, w]`).
    pub inpaint: Option<(Tensor, Tensor)>,
    /// `controlnet_conditioning_scale`.
    pub scale: f64,
    /// The fraction of the steps where control starts and ends (`start ≤ i/steps ≤ end`).
    pub start: f64,
    pub end: f64,
}

/// What the family needs to run one sampler step.
#[derive(Debug, Clone, Copy)]
pub struct StepInput<'a> {
    pub index: usize,
    pub schedule: &'a Schedule,
    /// CFG scale in the ComfyUI/A1111 convention: ≤ 1.0 means one unguided call.
    pub cfg: f32,
}

/// A diffusion model family: its facts and its maths. Loading, unloading and the dtypes of its
/// components are [`Components`], written once for all families ([`slot::Parts`]); the memory
/// formulas live in each family's `activations.rs`. Implementations are driven by one worker
/// thread.
pub trait Family: Send {
    /// The family's facts, with this folder's latent channels, VAE factor and size multiple.
    fn profile(&self) -> &Profile;

    /// The components' placement and dtypes.
    fn components(&self) -> &dyn Components;
    fn components_mut(&mut self) -> &mut dyn Components;

    /// The activation model the planner uses for this architecture, in the current dtypes.
    fn activation_model(&self) -> ActivationModel;

    /// The sampler schedule for `steps` steps at this latent size.
    fn schedule(
        &self,
        steps: usize,
        latent_h: usize,
        latent_w: usize,
    ) -> Result<Schedule, ModelError>;

    /// Encodes the prompt and, when given, the negative prompt.
    fn encode(&mut self, prompt: &str, negative: Option<&str>) -> Result<Conditioning, ModelError>;

    /// The sampler derivative `d` for latents `x` (`[B, C, h, w]`, f32): the engine steps
    /// `x + (σ_next − σ)·d`. CFG is applied inside when `step.cfg > 1` and a negative is present.
    fn predict(
        &mut self,
        x: &Tensor,
        cond: &Conditioning,
        step: StepInput<'_>,
    ) -> Result<Tensor, ModelError>;

    /// The VAE decoder's input for these latents (the pipeline's unscaling, e.g.
    /// `latents / scaling + shift`): per element, so it works on any latent tile.
    fn vae_input(&self, latents: &Tensor) -> Result<Tensor, ModelError>;

    /// The linear layers a LoRA may update (module paths and shapes, per part).
    fn lora_layers(&self) -> &lora::LinearLayers;
    /// Attaches a job's LoRAs (an empty set removes them) to the loaded layers and to those that
    /// load later; the base weights stay as they are.
    fn set_loras(&mut self, set: std::sync::Arc<lora::LoraSet>) -> Result<(), ModelError>;

    /// Attaches the ControlNet a job names (a file or a diffusers folder; loaded once and kept
    /// while jobs name it), or detaches it (`None`). Its bytes count with the denoiser's.
    fn set_controlnet(
        &mut self,
        path: Option<&std::path::Path>,
    ) -> Result<Option<ControlInfo>, ModelError> {
        match path {
            None => Ok(None),
            Some(p) => Err(ModelError::Invalid(format!(
                "{}: ControlNet runs on Z-Image models only",
                p.display()
            ))),
        }
    }

    /// The job's control input for the attached ControlNet (`None` clears it).
    fn set_control(&mut self, input: Option<ControlInput>) -> Result<(), ModelError> {
        match input {
            None => Ok(()),
            Some(_) => Err(ModelError::Invalid(
                "ControlNet runs on Z-Image models only".into(),
            )),
        }
    }

    /// Latents (`[B, C, h, w]`, f32, as the sampler leaves them) → pixels in about [-1, 1]
    /// (`[B, 3, 8h, 8w]`, f32), in one piece.
    fn decode(&mut self, latents: &Tensor) -> Result<Tensor, ModelError> {
        let z = self.vae_input(latents)?;
        Ok(self.components_mut().vae()?.forward(&z)?)
    }
}

/// Classifier-free guidance combine in diffusers' Z-Image order, `pos + g·(pos − neg)`, with
/// g = cfg − 1 (ComfyUI/A1111 scale). For SD this equals `neg + cfg·(pos − neg)` up to rounding.
pub fn cfg_combine(pos: &Tensor, neg: &Tensor, cfg: f32) -> candle_core::Result<Tensor> {
    let g = (cfg - 1.0) as f64;
    pos + ((pos - neg)? * g)?
}

#[derive(serde::Deserialize)]
struct ModelIndex {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
}

/// Reads `model_index.json` and returns the pipeline class name.
pub fn pipeline_class(dir: &ModelDir) -> Result<String, ModelError> {
    let idx: ModelIndex = dir.read_json("model_index.json")?;
    idx.class_name.ok_or_else(|| ModelError::Malformed {
        path: dir.display_path("model_index.json"),
        message: "missing `_class_name`".into(),
    })
}

/// The family that runs a diffusers pipeline class, if we have one.
pub fn family_of_class(class: &str) -> Option<FamilyKind> {
    FamilyKind::of_pipeline_class(class)
}

/// Single weight files that replace a component's weights in a model folder (`--transformer`,
/// `--text-encoder`, `--vae`); the folder still provides configs and the tokenizer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ComponentFiles {
    pub transformer: Option<PathBuf>,
    pub text_encoder: Option<PathBuf>,
    pub vae: Option<PathBuf>,
}

impl ComponentFiles {
    pub fn is_empty(&self) -> bool {
        self.transformer.is_none() && self.text_encoder.is_none() && self.vae.is_none()
    }
}

/// Opens a model folder with the family its `model_index.json` names.
pub fn open(
    dir: ModelDir,
    device: &Device,
    policy: PrecisionPolicy,
) -> Result<Box<dyn Family>, ModelError> {
    open_with(dir, &ComponentFiles::default(), device, policy)
}

/// [`open`] with some components' weights taken from single files.
pub fn open_with(
    dir: ModelDir,
    files: &ComponentFiles,
    device: &Device,
    policy: PrecisionPolicy,
) -> Result<Box<dyn Family>, ModelError> {
    let class = pipeline_class(&dir)?;
    match family_of_class(&class) {
        Some(FamilyKind::ZImage) => Ok(Box::new(z_image::ZImage::open_with(
            dir, files, device, policy,
        )?)),
        Some(family @ (FamilyKind::SdTurbo | FamilyKind::SdxlTurbo)) => {
            if !files.is_empty() {
                return Err(ModelError::Invalid(format!(
                    "--transformer, --text-encoder and --vae files are read for Z-Image models; {} is {}",
                    dir.describe(),
                    family.as_str()
                )));
            }
            Ok(Box::new(sd_turbo::SdTurbo::open(dir, device, policy)?))
        }
        None => Err(ModelError::UnknownPipeline {
            path: dir.display_path("model_index.json"),
            class,
            supported: FamilyKind::ALL
                .iter()
                .map(|f| f.pipeline_class())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}
