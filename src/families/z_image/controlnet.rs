//! ControlNet Union for Z-Image (alibaba-pai's Z-Image-Turbo-Fun-Controlnet-Union 1.0, 2.0 and 2.1;
//! diffusers' `ZImageControlNetModel`). The network holds only its own parts — control blocks, the
//! control patch embedder and (1.0, 2.1) a control noise refiner; the timestep embedder, the patch
//! and caption embedders, the refiners and the pad tokens are the DiT's, shared, never copied.
//! The DiT's forward (`dit.rs`) runs the control stages beside its own and adds each hint after
//! the layer it belongs to.
//!
//! The version comes from the tensors, as diffusers' single-file loader decides it:
//! * `control_noise_refiner` blocks with `before_proj`/`after_proj` and a non-zero `before_proj`:
//!   **2.1** (the control refiner's hints go into the noise refiner);
//! * a `before_proj` of zeros, or no `control_noise_refiner` at all: **2.0** (the control layers
//!   themselves run over the image tokens first);
//! * plain `control_noise_refiner` blocks (no projections): **1.0**.
//!
//! The layers with control blocks are the config's `control_layers_places` (a diffusers folder),
//! else evenly spread over the DiT's layers (`k · n_layers / n_control`: 1.0's six blocks at
//! 0, 5, …, 25 and 2.x's fifteen at 0, 2, …, 28 on the 30-layer model); `control_in_dim` is the
//! control embedder's input width over the patch area.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::config::DitConfig;
use super::dit::{run_block, Block, Execution, Rope};
use crate::families::weights::{Loader, Weights};
use crate::families::ModelError;
use crate::ops::linear::Lin;

/// The releases of Z-Image-Turbo-Fun-Controlnet-Union, as their tensors tell them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ControlVersion {
    #[serde(rename = "1.0")]
    V1_0,
    #[serde(rename = "2.0")]
    V2_0,
    #[serde(rename = "2.1")]
    V2_1,
}

impl ControlVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V1_0 => "1.0",
            Self::V2_0 => "2.0",
            Self::V2_1 => "2.1",
        }
    }
}

/// What a ControlNet file is: its version, where its hints go and its input width.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlConfig {
    pub version: ControlVersion,
    /// DiT layers after which a control hint is added (ascending, starting at 0).
    pub places: Vec<usize>,
    /// Noise-refiner layers after which a refiner hint is added (2.0, 2.1).
    pub refiner_places: Vec<usize>,
    /// Channels of the control input (latents, then mask and masked-image latents, zero-padded).
    pub control_in_dim: usize,
    /// Blocks of `control_noise_refiner` (1.0: plain blocks; 2.1: control blocks; 2.0: none).
    pub n_refiner: usize,
}

impl ControlConfig {
    /// Can this network take inpainting's mask and masked-image channels?
    pub fn inpaint_channels(&self, latent_channels: usize) -> bool {
        self.control_in_dim > latent_channels
    }
}

/// `config.json` of a diffusers ControlNet folder (unknown fields ignored).
#[derive(Debug, Clone, Deserialize)]
struct FolderConfig {
    #[serde(default)]
    control_layers_places: Option<Vec<usize>>,
    #[serde(default)]
    control_refiner_layers_places: Option<Vec<usize>>,
    #[serde(default)]
    control_in_dim: Option<usize>,
    #[serde(default)]
    add_control_noise_refiner: Option<String>,
}

/// The distinct block indices under `prefix` (`control_layers.` → 0, 1, …), sorted.
fn block_indices(w: &Weights, prefix: &str) -> Vec<usize> {
    let mut v: Vec<usize> = w
        .tensors()
        .keys()
        .filter_map(|n| n.strip_prefix(prefix)?.split('.').next()?.parse().ok())
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// The ControlNet's weight file(s): a single file, or a diffusers folder (its `config.json` and
/// `diffusion_pytorch_model.safetensors`).
pub fn open_weights(path: &Path) -> Result<(Weights, Option<PathBuf>), ModelError> {
    if path.is_dir() {
        let cfg = path.join("config.json");
        let file = ["diffusion_pytorch_model.safetensors", "model.safetensors"]
            .iter()
            .map(|f| path.join(f))
            .find(|p| p.is_file())
            .ok_or_else(|| ModelError::MissingFile {
                path: path.join("diffusion_pytorch_model.safetensors"),
            })?;
        let w = Weights::open_plain(&file, "controlnet")?;
        Ok((w, cfg.is_file().then_some(cfg)))
    } else if path.is_file() {
        Ok((Weights::open_plain(path, "controlnet")?, None))
    } else {
        Err(ModelError::MissingFile {
            path: path.to_path_buf(),
        })
    }
}

/// Infers the version, the control layers and `control_in_dim` from the tensors (and the folder's
/// config when there is one), checked against the DiT they will run beside.
pub fn infer_config(
    w: &Weights,
    folder_config: Option<&Path>,
    dit: &DitConfig,
) -> Result<ControlConfig, ModelError> {
    let file = w
        .files()
        .first()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let bad = |m: String| ModelError::Malformed {
        path: PathBuf::from(&file),
        message: m,
    };
    let folder: Option<FolderConfig> = match folder_config {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| ModelError::Io {
                path: p.to_path_buf(),
                source: e,
            })?;
            Some(
                serde_json::from_str(&text).map_err(|e| ModelError::Malformed {
                    path: p.to_path_buf(),
                    message: format!("not a ControlNet config: {e}"),
                })?,
            )
        }
        None => None,
    };
    let key = format!("{}-{}", dit.patch(), dit.f_patch());
    let emb = format!("control_all_x_embedder.{key}.weight");
    let Some(info) = w.tensors().get(&emb) else {
        let first = w.tensors().keys().next().cloned().unwrap_or_default();
        return Err(bad(format!(
            "not a Z-Image ControlNet: no tensor `{emb}` (the file starts with `{first}`)"
        )));
    };
    let shape = &info.shape;
    let area = dit.patch() * dit.patch() * dit.f_patch();
    if shape.len() != 2 || shape[0] != dit.dim || shape[1] % area != 0 {
        return Err(bad(format!(
            "tensor `{emb}` has shape {shape:?}; a ControlNet for this DiT (width {}) needs [{}, {area}·control_in_dim]",
            dit.dim, dit.dim
        )));
    }
    let control_in_dim = shape[1] / area;
    if control_in_dim < dit.in_channels {
        return Err(bad(format!(
            "tensor `{emb}`: control_in_dim {control_in_dim} is below the DiT's {} latent channels",
            dit.in_channels
        )));
    }
    if let Some(c) = folder.as_ref().and_then(|f| f.control_in_dim) {
        if c != control_in_dim {
            return Err(bad(format!(
                "config.json says control_in_dim {c}; tensor `{emb}` has {control_in_dim}"
            )));
        }
    }

    let layers = block_indices(w, "control_layers.");
    if layers.is_empty() || layers.iter().enumerate().any(|(i, &n)| i != n) {
        return Err(bad(format!(
            "the control layers must be `control_layers.0` … `control_layers.N` (found {layers:?})"
        )));
    }
    let n_ctrl = layers.len();
    let places = match folder
        .as_ref()
        .and_then(|f| f.control_layers_places.clone())
    {
        Some(p) => p,
        None => {
            if dit.n_layers % n_ctrl != 0 {
                return Err(bad(format!(
                    "{n_ctrl} control layers do not spread evenly over the DiT's {} layers; \
                     give the ControlNet as a diffusers folder with control_layers_places",
                    dit.n_layers
                )));
            }
            let stride = dit.n_layers / n_ctrl;
            (0..n_ctrl).map(|k| k * stride).collect()
        }
    };
    if places.len() != n_ctrl
        || places.first() != Some(&0)
        || places.windows(2).any(|p| p[0] >= p[1])
        || places.iter().any(|&p| p >= dit.n_layers)
    {
        return Err(bad(format!(
            "control_layers_places {places:?} must be {n_ctrl} ascending layers from 0, below the DiT's {}",
            dit.n_layers
        )));
    }

    let refiner = block_indices(w, "control_noise_refiner.");
    let before = "control_noise_refiner.0.before_proj.weight";
    let projected = w.contains("control_noise_refiner.0.after_proj.weight") || w.contains(before);
    let version = match folder
        .as_ref()
        .map(|f| f.add_control_noise_refiner.as_deref())
    {
        Some(Some("control_noise_refiner")) => ControlVersion::V2_1,
        Some(Some("control_layers")) => ControlVersion::V2_0,
        Some(Some(other)) => {
            return Err(bad(format!(
                "config.json: add_control_noise_refiner `{other}` is not known \
                 (control_noise_refiner, control_layers or null)"
            )))
        }
        Some(None) => ControlVersion::V1_0,
        None if refiner.is_empty() => ControlVersion::V2_0,
        None if !projected => ControlVersion::V1_0,
        None if !w.contains(before) => ControlVersion::V2_0,
        None => {
            let t = w
                .load(before, DType::F32, &Device::Cpu)
                .map_err(|e| w.context(e))?;
            let max = t
                .abs()
                .and_then(|a| a.max_all())
                .and_then(|m| m.to_scalar::<f32>())
                .map_err(|e| w.context(e))?;
            if max == 0.0 {
                ControlVersion::V2_0
            } else {
                ControlVersion::V2_1
            }
        }
    };
    let n_refiner = match version {
        ControlVersion::V2_0 => 0,
        _ => refiner.len(),
    };
    if version != ControlVersion::V2_0 && n_refiner != dit.n_refiner_layers {
        return Err(bad(format!(
            "control_noise_refiner has {n_refiner} blocks; this DiT has {} noise-refiner layers",
            dit.n_refiner_layers
        )));
    }
    let refiner_places = match version {
        ControlVersion::V1_0 => Vec::new(),
        _ => folder
            .as_ref()
            .and_then(|f| f.control_refiner_layers_places.clone())
            .unwrap_or_else(|| (0..dit.n_refiner_layers).collect()),
    };
    let hints = match version {
        ControlVersion::V2_0 => n_ctrl,
        _ => n_refiner,
    };
    if refiner_places.len() > hints || refiner_places.iter().any(|&p| p >= dit.n_refiner_layers) {
        return Err(bad(format!(
            "control_refiner_layers_places {refiner_places:?} needs {} hints below the DiT's {} \
             noise-refiner layers; this ControlNet makes {hints}",
            refiner_places.len(),
            dit.n_refiner_layers
        )));
    }
    Ok(ControlConfig {
        version,
        places,
        refiner_places,
        control_in_dim,
        n_refiner,
    })
}

/// A block of the control branch: a DiT block whose input is `before_proj(c) + x` when it is the
/// first, and whose hint is `after_proj` of its output.
#[derive(Debug, Clone)]
pub struct ControlBlock {
    block: Block,
    before: Option<Lin>,
    after: Lin,
}

impl ControlBlock {
    fn new(cfg: &DitConfig, first: bool, vb: Loader) -> candle_core::Result<Self> {
        let dim = cfg.dim;
        Ok(Self {
            block: Block::new(cfg, true, vb.clone())?,
            before: if first {
                Some(Lin::load(dim, dim, true, vb.pp("before_proj"))?)
            } else {
                None
            },
            after: Lin::load(dim, dim, true, vb.pp("after_proj"))?,
        })
    }

    /// `(hint, c)`: `x` is the DiT's stream the first block adds to the control stream.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        c: &Tensor,
        x: Option<&Tensor>,
        rope: &Rope,
        bias: Option<&Tensor>,
        adaln: &Tensor,
        exec: &Execution,
        compute: DType,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let residual = c.dtype();
        let c = match (&self.before, x) {
            (Some(b), Some(x)) => {
                (c.to_dtype(compute)?.apply(b)?.to_dtype(residual)? + x.to_dtype(residual)?)?
            }
            (Some(_), None) => candle_core::bail!("the first control block needs the DiT's stream"),
            (None, _) => c.clone(),
        };
        let c = run_block(&self.block, &c, rope, bias, Some(adaln), exec)?;
        let hint = c
            .to_dtype(compute)?
            .apply(&self.after)?
            .to_dtype(residual)?;
        Ok((hint, c))
    }
}

/// The control noise refiner: 1.0's plain blocks, or 2.1's control blocks.
#[derive(Debug, Clone)]
enum Refiner {
    Plain(Vec<Block>),
    Control(Vec<ControlBlock>),
    None,
}

/// A loaded ControlNet (all resident).
#[derive(Debug, Clone)]
pub struct ControlNet {
    pub cfg: ControlConfig,
    embedder: Lin,
    refiner: Refiner,
    layers: Vec<ControlBlock>,
    patch: usize,
}

impl ControlNet {
    pub fn load(cfg: ControlConfig, dit: &DitConfig, vb: Loader) -> candle_core::Result<Self> {
        let (p, fp) = (dit.patch(), dit.f_patch());
        let key = format!("{p}-{fp}");
        let embedder = Lin::load(
            fp * p * p * cfg.control_in_dim,
            dit.dim,
            true,
            vb.pp("control_all_x_embedder").pp(&key),
        )?;
        let rvb = vb.pp("control_noise_refiner");
        let refiner = match cfg.version {
            ControlVersion::V1_0 => Refiner::Plain(
                (0..cfg.n_refiner)
                    .map(|i| Block::new(dit, true, rvb.pp(i)))
                    .collect::<candle_core::Result<_>>()?,
            ),
            ControlVersion::V2_1 => Refiner::Control(
                (0..cfg.n_refiner)
                    .map(|i| ControlBlock::new(dit, i == 0, rvb.pp(i)))
                    .collect::<candle_core::Result<_>>()?,
            ),
            ControlVersion::V2_0 => Refiner::None,
        };
        let layers = (0..cfg.places.len())
            .map(|k| ControlBlock::new(dit, cfg.places[k] == 0, vb.pp("control_layers").pp(k)))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            cfg,
            embedder,
            refiner,
            layers,
            patch: p,
        })
    }

    /// Control latents `[B, control_in_dim, h, w]` → tokens `[B, n_img, dim]` (compute dtype),
    /// patchified as the DiT patchifies its latents.
    pub fn embed(&self, context: &Tensor, compute: DType) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = context.dims4()?;
        if c != self.cfg.control_in_dim {
            candle_core::bail!(
                "the control input has {c} channels; this ControlNet takes {}",
                self.cfg.control_in_dim
            );
        }
        let p = self.patch;
        let (ht, wt) = (h / p, w / p);
        context
            .to_dtype(compute)?
            .reshape((b, c, ht, p, wt, p))?
            .permute((0, 2, 4, 3, 5, 1))?
            .reshape((b, ht * wt, p * p * c))?
            .apply(&self.embedder)
    }

    /// 2.0 and 2.1, before the noise refiner: the refiner blocks (2.1) or the control layers (2.0)
    /// over the image tokens, the first adding `x`. Returns the hints for the noise refiner's
    /// layers (`refiner_places` order, not yet scaled) and the control stream after them.
    pub fn refiner_hints(
        &self,
        c: Tensor,
        x: &Tensor,
        rope: &Rope,
        adaln: &Tensor,
        exec: &Execution,
        compute: DType,
    ) -> candle_core::Result<(Vec<Tensor>, Tensor)> {
        let blocks: &[ControlBlock] = match (&self.refiner, self.cfg.version) {
            (Refiner::Control(b), _) => b,
            (_, ControlVersion::V2_0) => &self.layers,
            _ => return Ok((Vec::new(), c)),
        };
        let mut hints = Vec::with_capacity(blocks.len());
        let mut c = c;
        for (i, blk) in blocks.iter().enumerate() {
            let (h, next) =
                blk.forward(&c, (i == 0).then_some(x), rope, None, adaln, exec, compute)?;
            hints.push(h);
            c = next;
        }
        hints.truncate(self.cfg.refiner_places.len());
        Ok((hints, c))
    }

    /// 1.0, after the noise refiner: the plain control noise refiner over the control stream.
    pub fn plain_refine(
        &self,
        c: Tensor,
        rope: &Rope,
        adaln: &Tensor,
        exec: &Execution,
    ) -> candle_core::Result<Tensor> {
        let mut c = c;
        if let Refiner::Plain(blocks) = &self.refiner {
            for blk in blocks {
                c = run_block(blk, &c, rope, None, Some(adaln), exec)?;
            }
        }
        Ok(c)
    }

    /// Control layer `k` (placed after DiT layer `places[k]`): `(hint, c)`.
    #[allow(clippy::too_many_arguments)]
    pub fn layer(
        &self,
        k: usize,
        c: &Tensor,
        x: Option<&Tensor>,
        rope: &Rope,
        bias: Option<&Tensor>,
        adaln: &Tensor,
        exec: &Execution,
        compute: DType,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        self.layers[k].forward(c, x, rope, bias, adaln, exec, compute)
    }

    /// Does this version run the plain refiner after the DiT's noise refiner (1.0)?
    pub fn has_plain_refiner(&self) -> bool {
        matches!(self.refiner, Refiner::Plain(_))
    }
}

/// One denoiser call's control: the network, its input for the whole batch and the scale.
#[derive(Clone, Copy)]
pub struct ControlRun<'a> {
    pub net: &'a ControlNet,
    /// `[B, control_in_dim, h, w]`, the batch's (CFG pairs included) control input.
    pub context: &'a Tensor,
    pub scale: f64,
}

/// A ControlNet loaded for the model, kept between jobs while they name the same file.
struct Loaded {
    path: PathBuf,
    stamp: (u64, Option<std::time::SystemTime>),
    dtype: DType,
    net: std::sync::Arc<ControlNet>,
    bytes: u64,
}

/// The job's control input: `[1, control_in_dim, h, w]`, its scale and step range.
struct JobInput {
    context: Tensor,
    scale: f64,
    start: f64,
    end: f64,
}

/// The denoiser's ControlNet: the network the current job attached (loaded once per file and
/// dtype; its bytes count with the denoiser's) and the job's input.
#[derive(Default)]
pub struct ControlSlot {
    loaded: Option<Loaded>,
    attached: bool,
    input: Option<JobInput>,
}

fn stamp(path: &Path) -> (u64, Option<std::time::SystemTime>) {
    let file = if path.is_dir() {
        path.join("diffusion_pytorch_model.safetensors")
    } else {
        path.to_path_buf()
    };
    match std::fs::metadata(&file) {
        Ok(m) => (m.len(), m.modified().ok()),
        Err(_) => (0, None),
    }
}

impl ControlSlot {
    /// Attaches the ControlNet at `path` (loading it unless the same file is loaded in `dtype`),
    /// or detaches (`None`; the network stays loaded for a later job only while attached jobs
    /// name it — detaching frees it).
    pub fn attach(
        &mut self,
        path: Option<&Path>,
        dit: &DitConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<crate::families::ControlInfo>, ModelError> {
        self.input = None;
        let Some(path) = path else {
            self.attached = false;
            self.loaded = None;
            return Ok(None);
        };
        let st = stamp(path);
        let fresh = self
            .loaded
            .as_ref()
            .is_some_and(|l| l.path == path && l.stamp == st && l.dtype == dtype);
        if !fresh {
            self.loaded = None;
            let (w, config) = open_weights(path)?;
            let cfg = infer_config(&w, config.as_deref(), dit)?;
            let net =
                ControlNet::load(cfg, dit, w.loader(dtype, device)).map_err(|e| w.context(e))?;
            tracing::info!(
                path = %path.display(),
                version = net.cfg.version.as_str(),
                places = ?net.cfg.places,
                control_in_dim = net.cfg.control_in_dim,
                "ControlNet loaded"
            );
            self.loaded = Some(Loaded {
                path: path.to_path_buf(),
                stamp: st,
                dtype,
                bytes: w.bytes_in("", dtype),
                net: std::sync::Arc::new(net),
            });
        }
        self.attached = true;
        Ok(self.loaded.as_ref().map(|l| crate::families::ControlInfo {
            version: l.net.cfg.version.as_str().to_string(),
            control_in_dim: l.net.cfg.control_in_dim,
        }))
    }

    /// Reloads the attached network in `dtype` (after a guard raised the denoiser's precision).
    pub fn ensure_dtype(
        &mut self,
        dit: &DitConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<(), ModelError> {
        match &self.loaded {
            Some(l) if self.attached && l.dtype != dtype => {
                let path = l.path.clone();
                let input = self.input.take();
                self.attach(Some(&path), dit, dtype, device)?;
                self.input = input;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Bytes of the attached network in its dtype (0 without one).
    pub fn bytes(&self) -> u64 {
        match &self.loaded {
            Some(l) if self.attached => l.bytes,
            _ => 0,
        }
    }

    /// The job's input: control latents, then (inpainting) the kept-region mask and the masked
    /// image's latents, zero-padded to `control_in_dim` as the pipelines pad them.
    pub fn set_input(
        &mut self,
        input: Option<crate::families::ControlInput>,
    ) -> Result<(), ModelError> {
        let Some(input) = input else {
            self.input = None;
            return Ok(());
        };
        let net = match &self.loaded {
            Some(l) if self.attached => l.net.clone(),
            _ => return Err(ModelError::Invalid("no ControlNet is attached".into())),
        };
        let cin = net.cfg.control_in_dim;
        let (_, c, h, w) = input.latents.dims4()?;
        let mut parts = vec![input.latents.to_dtype(DType::F32)?];
        if let Some((keep, masked)) = input.inpaint {
            if cin < 2 * c + 1 {
                return Err(ModelError::Invalid(format!(
                    "this ControlNet ({}, {cin} control channels) has no inpainting channels: \
                     inpainting with control needs Z-Image-Turbo-Fun-Controlnet-Union 2.0 or 2.1",
                    net.cfg.version.as_str()
                )));
            }
            parts.push(keep.to_dtype(DType::F32)?);
            parts.push(masked.to_dtype(DType::F32)?);
        }
        let have: usize = parts
            .iter()
            .map(|p| p.dim(1))
            .collect::<candle_core::Result<Vec<_>>>()?
            .iter()
            .sum();
        if have > cin {
            return Err(ModelError::Invalid(format!(
                "the control input has {have} channels; this ControlNet takes {cin}"
            )));
        }
        if have < cin {
            parts.push(Tensor::zeros(
                (1, cin - have, h, w),
                DType::F32,
                input.latents.device(),
            )?);
        }
        self.input = Some(JobInput {
            context: Tensor::cat(&parts, 1)?,
            scale: input.scale,
            start: input.start,
            end: input.end,
        });
        Ok(())
    }

    /// The network, the one-item input and the scale when step `index` of `steps` is inside the
    /// job's control range (`start ≤ index/steps ≤ end`, A1111's guidance start/end).
    pub fn for_step(&self, index: usize, steps: usize) -> Option<(&ControlNet, &Tensor, f64)> {
        let l = self.loaded.as_ref().filter(|_| self.attached)?;
        let input = self.input.as_ref()?;
        let frac = index as f64 / steps.max(1) as f64;
        (frac >= input.start && frac <= input.end).then_some((&*l.net, &input.context, input.scale))
    }
}
