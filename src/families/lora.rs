//! LoRA: low-rank updates `W + s·B·A` of a model's linear layers, applied at run time.
//!
//! Files come in the formats people have, mapped to our module names as diffusers converts them
//! (`ZImageLoraLoaderMixin`, `StableDiffusionLoraLoaderMixin`):
//! - diffusers / PEFT: `transformer.` (or `unet.`, `text_encoder.`) + module + `.lora_A.weight` /
//!   `.lora_B.weight`, optional `.alpha`;
//! - ComfyUI / ai-toolkit: the same with a `diffusion_model.` prefix;
//! - kohya (sd-scripts): `lora_unet_` / `lora_te_` + the module path with `_` for `.`, then
//!   `.lora_down.weight` / `.lora_up.weight` / `.alpha`.
//!
//! An `.alpha` scales the update by `alpha / rank`, folded into the two factors the way diffusers
//! folds it. The job's weight multiplies the update as PEFT's adapter weight does:
//! `y = x·Wᵀ + Σ weight·(x·Aᵀ)·Bᵀ`, in the order the LoRAs are listed. Base weights are never
//! touched: a job's LoRAs are attached to the layers ([`super::cpu_gemm::Lin`]) and replaced by
//! the next job's, so switching costs no reload — and quantized base weights work the same way.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::ops::linear::{Lin, LoraMode, LowRank};

/// Which part of a model a LoRA module path belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraPart {
    /// The DiT or the UNet.
    Denoiser,
    /// The (first) text encoder.
    TextEncoder,
}

/// What went wrong reading or matching a LoRA file. Messages name the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}: key `{key}` matches no layer of this model{hint}")]
    NoLayer {
        path: PathBuf,
        key: String,
        hint: String,
    },
    #[error("{path}: key `{key}`: {message}")]
    Key {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// The linear layers of a model a LoRA may update: module path → `(out, in)`, per part.
#[derive(Debug, Clone, Default)]
pub struct LinearLayers {
    layers: BTreeMap<(LoraPart, String), (usize, usize)>,
    /// kohya spelling (`.` → `_`) → module path, per part.
    kohya: HashMap<(LoraPart, String), String>,
}

impl LinearLayers {
    pub fn insert(&mut self, part: LoraPart, path: &str, out: usize, inp: usize) {
        self.kohya
            .insert((part, path.replace('.', "_")), path.to_string());
        self.layers.insert((part, path.to_string()), (out, inp));
    }

    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    fn get(&self, part: LoraPart, path: &str) -> Option<(usize, usize)> {
        self.layers.get(&(part, path.to_string())).copied()
    }

    fn kohya_module(&self, part: LoraPart, name: &str) -> Option<&str> {
        self.kohya
            .get(&(part, name.to_string()))
            .map(String::as_str)
    }

    fn has_part(&self, part: LoraPart) -> bool {
        self.layers.keys().any(|(p, _)| *p == part)
    }
}

/// One parsed LoRA file: per layer its factors, `.alpha` already folded in.
#[derive(Debug, Clone)]
pub struct LoraFile {
    pub path: PathBuf,
    pub layers: Vec<LoraLayer>,
}

#[derive(Debug, Clone)]
pub struct LoraLayer {
    pub part: LoraPart,
    /// Our (diffusers') module path, e.g. `layers.0.attention.to_q`.
    pub module: String,
    /// `[rank, in]` and `[out, rank]`, f32 on the CPU.
    pub down: Tensor,
    pub up: Tensor,
}

/// The factor names of one key, and the module part in front of them.
enum Suffix {
    Down,
    Up,
    Alpha,
}

fn split_suffix(key: &str) -> Option<(&str, Suffix)> {
    for (s, kind) in [
        (".lora_A.weight", Suffix::Down),
        (".lora_B.weight", Suffix::Up),
        (".lora_down.weight", Suffix::Down),
        (".lora_up.weight", Suffix::Up),
        (".lora.down.weight", Suffix::Down),
        (".lora.up.weight", Suffix::Up),
        (".alpha", Suffix::Alpha),
    ] {
        if let Some(base) = key.strip_suffix(s) {
            return Some((base, kind));
        }
    }
    None
}

/// diffusers' `get_alpha_scales`: `alpha / rank` split between the factors (powers of two moved
/// to the down factor while it is under half the up one).
fn alpha_scales(alpha: Option<f64>, rank: usize) -> (f64, f64) {
    let Some(alpha) = alpha else {
        return (1.0, 1.0);
    };
    let scale = alpha / rank as f64;
    let (mut down, mut up) = (scale, 1.0);
    while down * 2.0 < up {
        down *= 2.0;
        up /= 2.0;
    }
    (down, up)
}

/// One layer's keys in a file, matched to our layer (shapes checked, data not yet read).
#[derive(Debug, Clone)]
struct Planned {
    part: LoraPart,
    module: String,
    down_key: String,
    up_key: String,
    alpha_key: Option<String>,
    rank: usize,
}

/// Matches a file's keys (names and shapes only) to `layers`: every key must be a LoRA factor of
/// a layer we have, with factors that fit it.
fn plan(
    path: &Path,
    entries: &BTreeMap<String, Vec<usize>>,
    layers: &LinearLayers,
) -> Result<Vec<Planned>, LoraError> {
    let key_err = |key: &str, message: String| LoraError::Key {
        path: path.to_path_buf(),
        key: key.to_string(),
        message,
    };
    if entries.is_empty() {
        return Err(LoraError::File {
            path: path.to_path_buf(),
            message: "holds no tensors".into(),
        });
    }
    let comfy = entries.keys().any(|k| k.starts_with("diffusion_model."));
    // The factors grouped by their key's module part (as written in the file).
    #[derive(Default)]
    struct Parts<'a> {
        down: Option<(&'a str, &'a [usize])>,
        up: Option<(&'a str, &'a [usize])>,
        alpha: Option<(&'a str, &'a [usize])>,
    }
    let mut groups: BTreeMap<&str, Parts<'_>> = BTreeMap::new();
    for (key, shape) in entries {
        // diffusers drops DoRA magnitudes (with a warning); so do we.
        if key.contains("dora_scale") {
            continue;
        }
        let Some((base, kind)) = split_suffix(key) else {
            return Err(key_err(
                key,
                "is not a LoRA factor (expected lora_A/lora_B, lora_down/lora_up or alpha)".into(),
            ));
        };
        let g = groups.entry(base).or_default();
        let v = Some((key.as_str(), shape.as_slice()));
        match kind {
            Suffix::Down => g.down = v,
            Suffix::Up => g.up = v,
            Suffix::Alpha => g.alpha = v,
        }
    }
    let mut out = Vec::with_capacity(groups.len());
    for (base, g) in groups {
        let Some((down_key, down)) = g.down else {
            let key = g.up.or(g.alpha).map(|(k, _)| k).unwrap_or(base);
            return Err(key_err(key, "has no matching down (lora_A) factor".into()));
        };
        let Some((up_key, up)) = g.up else {
            return Err(key_err(
                down_key,
                "has no matching up (lora_B) factor".into(),
            ));
        };
        if let Some((k, shape)) = g.alpha {
            if shape.iter().product::<usize>() != 1 {
                return Err(key_err(k, "alpha must be a single number".into()));
            }
        }
        let (part, module) = resolve(base, comfy, layers).ok_or_else(|| {
            let hint = if down.len() == 4 && down[2..] != [1, 1] {
                " (it updates a convolution, LoCon: not supported)".to_string()
            } else if !layers.has_part(LoraPart::TextEncoder)
                && (base.starts_with("lora_te") || base.starts_with("text_encoder"))
            {
                " (text-encoder LoRAs are not applied to this model family)".to_string()
            } else {
                String::new()
            };
            LoraError::NoLayer {
                path: path.to_path_buf(),
                key: down_key.to_string(),
                hint,
            }
        })?;
        // 1×1 convolution factors are linear ones with trailing unit dims.
        let flat = |s: &[usize]| -> Vec<usize> {
            match s {
                [a, b, 1, 1] => vec![*a, *b],
                other => other.to_vec(),
            }
        };
        let (d, u) = (flat(down), flat(up));
        let (want_out, want_in) = layers.get(part, &module).unwrap_or((0, 0));
        let fits =
            d.len() == 2 && u.len() == 2 && d[0] == u[1] && d[1] == want_in && u[0] == want_out;
        if !fits {
            return Err(key_err(
                down_key,
                format!(
                    "factors {down:?} and {up:?} do not fit layer `{module}` ({want_out}×{want_in})"
                ),
            ));
        }
        out.push(Planned {
            part,
            module,
            down_key: down_key.to_string(),
            up_key: up_key.to_string(),
            alpha_key: g.alpha.map(|(k, _)| k.to_string()),
            rank: d[0],
        });
    }
    Ok(out)
}

/// The names and shapes in a safetensors file's header (the data is not read).
fn header(path: &Path) -> Result<BTreeMap<String, Vec<usize>>, LoraError> {
    use std::io::Read;
    let file_err = |message: String| LoraError::File {
        path: path.to_path_buf(),
        message,
    };
    let mut f = std::fs::File::open(path).map_err(|e| file_err(e.to_string()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| file_err("not a safetensors file: too short".into()))?;
    let n = u64::from_le_bytes(len);
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    if n > 100 << 20 || n + 8 > size {
        return Err(file_err(format!(
            "not a safetensors file: a header of {n} bytes in a file of {size}"
        )));
    }
    let mut json = vec![0u8; n as usize];
    f.read_exact(&mut json)
        .map_err(|e| file_err(e.to_string()))?;
    #[derive(serde::Deserialize)]
    struct Entry {
        shape: Vec<usize>,
    }
    let raw: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&json)
        .map_err(|e| file_err(format!("not a safetensors file: {e}")))?;
    raw.into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, v)| {
            let e: Entry = serde_json::from_value(v)
                .map_err(|e| file_err(format!("not a safetensors file: `{k}`: {e}")))?;
            Ok((k, e.shape))
        })
        .collect()
}

impl LoraFile {
    /// Checks a file against `layers` from its header alone (names and shapes): what a server does
    /// before it accepts a job naming the file.
    pub fn check(path: &Path, layers: &LinearLayers) -> Result<usize, LoraError> {
        Ok(plan(path, &header(path)?, layers)?.len())
    }

    /// Reads a `.safetensors` LoRA and maps every key to a layer of `layers`; a key that
    /// matches none is an error naming it.
    pub fn read(path: &Path, layers: &LinearLayers) -> Result<Self, LoraError> {
        let file_err = |message: String| LoraError::File {
            path: path.to_path_buf(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| file_err(e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| file_err(format!("not a safetensors file: {e}")))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let t = candle_core::safetensors::Load::load(&view, &Device::Cpu)
                .and_then(|t| t.to_dtype(DType::F32))
                .map_err(|e| LoraError::Key {
                    path: path.to_path_buf(),
                    key: name.clone(),
                    message: e.to_string(),
                })?;
            tensors.insert(name, t);
        }
        Self::from_tensors(path, tensors, layers)
    }

    /// [`LoraFile::read`] on tensors already in memory.
    pub fn from_tensors(
        path: &Path,
        tensors: BTreeMap<String, Tensor>,
        layers: &LinearLayers,
    ) -> Result<Self, LoraError> {
        let entries: BTreeMap<String, Vec<usize>> = tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.dims().to_vec()))
            .collect();
        let planned = plan(path, &entries, layers)?;
        let key_err = |key: &str, message: String| LoraError::Key {
            path: path.to_path_buf(),
            key: key.to_string(),
            message,
        };
        let get = |k: &str| -> Result<Tensor, LoraError> {
            let t = tensors
                .get(k)
                .ok_or_else(|| key_err(k, "is missing".into()))?;
            match t.rank() {
                4 => t.squeeze(3).and_then(|t| t.squeeze(2)),
                _ => Ok(t.clone()),
            }
            .map_err(|e| key_err(k, e.to_string()))
        };
        let mut out = Vec::with_capacity(planned.len());
        for p in planned {
            let alpha = match &p.alpha_key {
                Some(k) => {
                    let v = get(k)?
                        .flatten_all()
                        .and_then(|f| f.to_vec1::<f32>())
                        .map_err(|e| key_err(k, e.to_string()))?;
                    Some(v[0] as f64)
                }
                None => None,
            };
            let (sd, su) = alpha_scales(alpha, p.rank);
            let scale = |t: Tensor, s: f64, k: &str| {
                if s == 1.0 {
                    Ok(t)
                } else {
                    (t * s).map_err(|e| key_err(k, e.to_string()))
                }
            };
            out.push(LoraLayer {
                part: p.part,
                down: scale(get(&p.down_key)?, sd, &p.down_key)?,
                up: scale(get(&p.up_key)?, su, &p.up_key)?,
                module: p.module,
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            layers: out,
        })
    }
}

/// A key's module part → our part and module path, or `None` when it names no layer.
fn resolve(base: &str, comfy: bool, layers: &LinearLayers) -> Option<(LoraPart, String)> {
    let base = base
        .strip_prefix("default.")
        .unwrap_or(base)
        .replace(".default.", ".");
    // kohya: `lora_unet_layers_0_attention_to_q`, `lora_te_text_model_encoder_layers_0_…`.
    for (prefix, part) in [
        ("lora_unet_", LoraPart::Denoiser),
        ("lora_te_", LoraPart::TextEncoder),
        ("lora_te1_", LoraPart::TextEncoder),
    ] {
        if let Some(rest) = base.strip_prefix(prefix) {
            return layers
                .kohya_module(part, rest)
                .map(|m| (part, m.to_string()));
        }
    }
    let (part, path) = if let Some(rest) = base.strip_prefix("diffusion_model.") {
        (LoraPart::Denoiser, rest)
    } else if let Some(rest) = base
        .strip_prefix("transformer.")
        .or_else(|| base.strip_prefix("unet."))
    {
        (LoraPart::Denoiser, rest)
    } else if let Some(rest) = base.strip_prefix("text_encoder.") {
        (LoraPart::TextEncoder, rest)
    } else if comfy {
        return None;
    } else {
        (LoraPart::Denoiser, base.as_str())
    };
    // Some trainers write `to_out` for `to_out.0` (diffusers' `normalize_out_key`).
    let fixed = if path.ends_with(".out") && !path.contains(".to_out") {
        format!("{}.to_out.0", &path[..path.len() - 4])
    } else {
        path.to_string()
    };
    for p in [path, fixed.as_str()] {
        if layers.get(part, p).is_some() {
            return Some((part, p.to_string()));
        }
    }
    None
}

/// The LoRAs of one job, resolved to per-layer updates (each scaled by its weight), in order.
#[derive(Debug, Clone, Default)]
pub struct LoraSet {
    layers: HashMap<(LoraPart, String), Vec<LowRank>>,
    /// What it was built from: (file, weight) in order — equal lists give equal sets.
    pub key: Vec<(PathBuf, u32)>,
}

impl LoraSet {
    pub fn new(files: &[(Arc<LoraFile>, f32)]) -> Self {
        let mut layers: HashMap<(LoraPart, String), Vec<LowRank>> = HashMap::new();
        for (f, w) in files {
            for l in &f.layers {
                layers
                    .entry((l.part, l.module.clone()))
                    .or_default()
                    .push(LowRank {
                        down: l.down.clone(),
                        up: l.up.clone(),
                        scale: *w as f64,
                    });
            }
        }
        Self {
            layers,
            key: files
                .iter()
                .map(|(f, w)| (f.path.clone(), w.to_bits()))
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// The updates of one layer (empty when the LoRAs leave it alone).
    pub fn get(&self, part: LoraPart, module: &str) -> &[LowRank] {
        self.layers
            .get(&(part, module.to_string()))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Whether any update targets `part`.
    pub fn touches(&self, part: LoraPart) -> bool {
        self.layers.keys().any(|(p, _)| *p == part)
    }
}

/// `<models-dir>/loras/`: the LoRA files the APIs may name (`name` = the file stem), and the
/// loaded model's layers to check them against before a job is accepted.
#[derive(Debug, Clone)]
pub struct LoraDir {
    dir: PathBuf,
    layers: Option<Arc<LinearLayers>>,
}

/// One file of a [`LoraDir`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoraEntry {
    pub name: String,
    pub path: PathBuf,
    pub size_bytes: u64,
}

impl LoraDir {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir, layers: None }
    }

    /// Checks named files against these layers (their headers) when a request is validated.
    pub fn with_layers(mut self, layers: Arc<LinearLayers>) -> Self {
        self.layers = Some(layers);
        self
    }

    /// The file's keys against the model's layers (header only), when the layers are known.
    pub fn check(&self, path: &Path) -> Result<(), LoraError> {
        match &self.layers {
            Some(l) => LoraFile::check(path, l).map(drop),
            None => Ok(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The `.safetensors` files in the folder (not its subfolders), by name.
    pub fn list(&self) -> Vec<LoraEntry> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<LoraEntry> = rd
            .flatten()
            .filter_map(|e| {
                let path = e.path();
                let name = path.file_name()?.to_str()?;
                let stem = name.strip_suffix(".safetensors")?;
                let meta = e.metadata().ok()?;
                (meta.is_file() && !stem.is_empty() && !stem.starts_with('.')).then(|| LoraEntry {
                    name: stem.to_string(),
                    size_bytes: meta.len(),
                    path: path.clone(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    pub fn names(&self) -> Vec<String> {
        self.list().into_iter().map(|e| e.name).collect()
    }

    /// The file a name refers to (`name` or `name.safetensors`); never outside the folder.
    pub fn resolve(&self, name: &str) -> Option<PathBuf> {
        let stem = name.strip_suffix(".safetensors").unwrap_or(name);
        self.list()
            .into_iter()
            .find(|e| e.name == stem)
            .map(|e| e.path)
    }
}

/// A module made of linear layers LoRAs can update.
pub trait HasLins {
    /// Every [`Lin`] of the module.
    fn lins_mut(&mut self) -> Vec<&mut Lin>;
    fn lins(&self) -> Vec<&Lin>;
}

/// Attaches `set`'s updates of `part` to every layer of `module` (and clears the others').
pub fn apply(
    module: &mut dyn HasLins,
    set: &LoraSet,
    part: LoraPart,
    mode: LoraMode,
) -> candle_core::Result<()> {
    for lin in module.lins_mut() {
        let updates = set.get(part, lin.name());
        if !updates.is_empty() || lin.has_lora() {
            lin.set_lora(updates, mode)?;
        }
    }
    Ok(())
}

/// Records `module`'s linear layers under `part` (module path and shape).
pub fn record(module: &dyn HasLins, part: LoraPart, into: &mut LinearLayers) {
    for lin in module.lins() {
        if let (false, Ok((o, i))) = (lin.name().is_empty(), lin.dims()) {
            into.insert(part, lin.name(), o, i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers() -> LinearLayers {
        let mut l = LinearLayers::default();
        l.insert(LoraPart::Denoiser, "layers.0.attention.to_q", 8, 8);
        l.insert(LoraPart::Denoiser, "layers.0.attention.to_out.0", 8, 8);
        l.insert(LoraPart::Denoiser, "noise_refiner.0.feed_forward.w1", 16, 8);
        l
    }

    fn t(shape: &[usize], v: f32) -> Tensor {
        Tensor::full(v, shape, &Device::Cpu).unwrap()
    }

    fn read(tensors: &[(&str, Tensor)]) -> Result<LoraFile, LoraError> {
        LoraFile::from_tensors(
            Path::new("x.safetensors"),
            tensors
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            &layers(),
        )
    }

    #[test]
    fn three_formats_name_the_same_layers() {
        let peft = read(&[
            (
                "transformer.layers.0.attention.to_q.lora_A.weight",
                t(&[2, 8], 1.0),
            ),
            (
                "transformer.layers.0.attention.to_q.lora_B.weight",
                t(&[8, 2], 1.0),
            ),
        ])
        .unwrap();
        let comfy = read(&[
            (
                "diffusion_model.layers.0.attention.to_q.lora_A.weight",
                t(&[2, 8], 1.0),
            ),
            (
                "diffusion_model.layers.0.attention.to_q.lora_B.weight",
                t(&[8, 2], 1.0),
            ),
            ("diffusion_model.layers.0.attention.to_q.alpha", t(&[], 1.0)),
        ])
        .unwrap();
        let kohya = read(&[
            (
                "lora_unet_noise_refiner_0_feed_forward_w1.lora_down.weight",
                t(&[4, 8], 1.0),
            ),
            (
                "lora_unet_noise_refiner_0_feed_forward_w1.lora_up.weight",
                t(&[16, 4], 1.0),
            ),
            (
                "lora_unet_noise_refiner_0_feed_forward_w1.alpha",
                t(&[], 4.0),
            ),
        ])
        .unwrap();
        assert_eq!(peft.layers[0].module, "layers.0.attention.to_q");
        assert_eq!(comfy.layers[0].module, "layers.0.attention.to_q");
        assert_eq!(kohya.layers[0].module, "noise_refiner.0.feed_forward.w1");
        // alpha 1 on rank 2: scale 0.5, split as diffusers splits it (down 0.5, up 1).
        let d: f32 = comfy.layers[0]
            .down
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        assert_eq!(d, 0.5);
    }

    #[test]
    fn a_key_that_matches_no_layer_is_named() {
        let e = read(&[
            (
                "transformer.layers.9.attention.to_q.lora_A.weight",
                t(&[2, 8], 1.0),
            ),
            (
                "transformer.layers.9.attention.to_q.lora_B.weight",
                t(&[8, 2], 1.0),
            ),
        ])
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("`transformer.layers.9.attention.to_q.lora_A.weight` matches no layer"),
            "{e}"
        );
        let e = read(&[("something.weight", t(&[2], 1.0))]).unwrap_err();
        assert!(e.to_string().contains("something.weight"), "{e}");
        let e = read(&[
            (
                "transformer.layers.0.attention.to_q.lora_A.weight",
                t(&[2, 4], 1.0),
            ),
            (
                "transformer.layers.0.attention.to_q.lora_B.weight",
                t(&[8, 2], 1.0),
            ),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("do not fit"), "{e}");
    }

    #[test]
    fn alpha_split_follows_diffusers() {
        assert_eq!(alpha_scales(None, 4), (1.0, 1.0));
        assert_eq!(alpha_scales(Some(8.0), 4), (2.0, 1.0));
        assert_eq!(alpha_scales(Some(1.0), 4), (0.5, 0.5));
        let (d, u) = alpha_scales(Some(1.0), 64);
        assert!((d * u - 1.0 / 64.0).abs() < 1e-12 && d >= u / 2.0);
    }
}
