//! Opened weights of one component, whatever the file format: safetensors (dense or fp8, sharded
//! or single), GGUF (any block type candle decodes, mixed per tensor), under diffusers,
//! transformers, ComfyUI, llama.cpp or ldm names — all presented under the names our models load.
//! Headers are read up front (exact per-tensor sizes for the planner, every error naming the file
//! and the tensor); data is copied out of the memory map only when a tensor is loaded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

mod loader;

use loader::*;
pub use loader::{Loader, Recording};

use super::gguf;
use super::layout::{self, Detected, Layout, Role};
use crate::families::ModelError;
use crate::ops::quantized::{
    self, BlockArithmetic, BlockMatrix, Fp8Format, Fp8Matrix, StoredMatrix,
};

/// The bytes of one weight file.
pub(crate) enum Bytes {
    Mapped(memmap2::Mmap),
    Static(&'static [u8]),
}

impl Bytes {
    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Static(s) => s,
        }
    }

    /// Maps a file read-only.
    pub(crate) fn map(path: &Path) -> Result<Self, ModelError> {
        let file = std::fs::File::open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ModelError::MissingFile {
                    path: path.to_path_buf(),
                }
            } else {
                ModelError::Io {
                    path: path.to_path_buf(),
                    source: e,
                }
            }
        })?;
        // SAFETY: read-only mapping; like every mmap user we rely on nobody truncating model
        // files while the server runs.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Ok(Bytes::Mapped(map))
    }

    /// Drops the whole pages inside `range` from this process's resident set once a tensor has
    /// been copied out (they stay in the page cache): RSS then counts each weight once, and a
    /// streamed block's file pages do not pile up.
    fn release(&self, range: std::ops::Range<usize>) {
        #[cfg(unix)]
        if let Bytes::Mapped(m) = self {
            const PAGE: usize = 4096;
            let start = range.start.div_ceil(PAGE) * PAGE;
            let end = range.end / PAGE * PAGE;
            if end > start {
                // SAFETY: private read-only mapping; DONTNEED only makes the next read fault the
                // page back in from the file, it cannot change the bytes we see.
                unsafe {
                    let _ = m.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start,
                        end - start,
                    );
                }
            }
        }
        #[cfg(not(unix))]
        let _ = range;
    }
}

/// How a tensor's bytes encode its values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Encoding {
    Dense(DType),
    /// fp8 codes times a per-tensor scale (1 when the file has none).
    Fp8 {
        format: Fp8Format,
        scale: f32,
    },
    /// GGUF blocks (F32/F16/BF16 included: GGUF stores those as "blocks" of one).
    Blocks(GgmlDType),
}

impl Encoding {
    /// A short name: `bf16`, `q4_k`, `float8_e4m3fn` …
    pub fn name(&self) -> String {
        match self {
            Self::Dense(d) => format!("{d:?}").to_lowercase(),
            Self::Fp8 { format, .. } => format.name().to_string(),
            Self::Blocks(t) => quantized::ggml_name(*t).to_string(),
        }
    }

    /// Quantized storage that a matrix keeps in memory (GGUF's float types are plain tensors).
    pub fn is_quantized(&self) -> bool {
        match self {
            Self::Dense(_) => false,
            Self::Fp8 { .. } => true,
            Self::Blocks(t) => !matches!(t, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16),
        }
    }
}

/// One tensor as our models name it, and where its bytes are.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub encoding: Encoding,
    pub shape: Vec<usize>,
    /// Bytes in the file.
    pub bytes: u64,
    /// Its name in the file (for messages).
    pub stored_name: String,
    file: usize,
    range: std::ops::Range<usize>,
}

impl TensorInfo {
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether a model keeps this tensor in its stored form: quantized matrices do (they are
    /// dequantized per product); everything else is loaded as a plain tensor.
    pub fn stays_quantized(&self) -> bool {
        self.shape.len() == 2 && self.encoding.is_quantized()
    }

    /// Bytes it takes on the device once loaded with the model's dtype `dtype`.
    pub fn resident_bytes(&self, dtype: DType) -> u64 {
        if self.stays_quantized() {
            self.bytes
        } else {
            self.elem_count() as u64 * dtype.size_in_bytes() as u64
        }
    }
}

/// What a component's files are (for listings and logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatInfo {
    /// `diffusers transformer`, `ComfyUI transformer`, `llama.cpp Qwen3` … (`None`: no mapping).
    pub layout: Option<&'static str>,
    /// `safetensors` or `gguf`.
    pub container: &'static str,
    /// Tensor counts per encoding, e.g. `q8_0: 120, f32: 80`.
    pub encodings: BTreeMap<String, usize>,
    pub file_bytes: u64,
}

impl FormatInfo {
    /// The encoding most of the weight bytes are in (`q4_k`, `bf16` …).
    pub fn main_encoding(&self) -> String {
        self.encodings
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(e, _)| e.clone())
            .unwrap_or_default()
    }
}

/// Opened weights of one component. Cheap to clone; every loader shares the same mapping, so
/// reloading a component in another precision (guard fallbacks, block streaming) costs no I/O setup.
#[derive(Clone)]
pub struct Weights {
    inner: Arc<Vec<(PathBuf, Bytes)>>,
    component: String,
    tensors: Arc<BTreeMap<String, TensorInfo>>,
    naming: Option<(Layout, String, usize)>,
    container: &'static str,
    arithmetic: BlockArithmetic,
}

/// A tensor's raw header entry, before name mapping.
struct Stored {
    name: String,
    encoding: Encoding,
    shape: Vec<usize>,
    file: usize,
    range: std::ops::Range<usize>,
}

fn malformed(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Malformed {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn st_encoding(d: safetensors::Dtype) -> Option<Encoding> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F32 => Encoding::Dense(DType::F32),
        S::F16 => Encoding::Dense(DType::F16),
        S::BF16 => Encoding::Dense(DType::BF16),
        S::F64 => Encoding::Dense(DType::F64),
        S::U8 => Encoding::Dense(DType::U8),
        S::U32 => Encoding::Dense(DType::U32),
        S::I64 => Encoding::Dense(DType::I64),
        S::F8_E4M3 => Encoding::Fp8 {
            format: Fp8Format::E4M3Fn,
            scale: 1.0,
        },
        S::F8_E5M2 => Encoding::Fp8 {
            format: Fp8Format::E5M2,
            scale: 1.0,
        },
        _ => return None,
    })
}

fn encoded_bytes(enc: Encoding, elems: usize) -> usize {
    match enc {
        Encoding::Dense(d) => elems * d.size_in_bytes(),
        Encoding::Fp8 { .. } => elems,
        Encoding::Blocks(t) => elems / t.block_size() * t.type_size(),
    }
}

/// Reads every tensor header of one file.
fn read_headers(
    file_index: usize,
    path: &Path,
    bytes: &[u8],
    orig_shapes: &mut BTreeMap<String, Vec<usize>>,
) -> Result<(Vec<Stored>, &'static str), ModelError> {
    if gguf::is_gguf(bytes) {
        let h = gguf::parse(bytes).map_err(|e| malformed(path, e.to_string()))?;
        // ComfyUI-GGUF records the shape of tensors it reshaped to store them.
        for (k, v) in &h.metadata {
            if let (Some(name), gguf::Value::Array(dims)) =
                (k.strip_prefix("comfy.gguf.orig_shape."), v)
            {
                let dims: Option<Vec<usize>> = dims
                    .iter()
                    .map(|d| d.as_u64().map(|d| d as usize))
                    .collect();
                if let Some(dims) = dims {
                    orig_shapes.insert(name.to_string(), dims);
                }
            }
        }
        let stored = h
            .tensors
            .into_iter()
            .map(|t| Stored {
                encoding: Encoding::Blocks(t.ty.candle().unwrap_or(GgmlDType::F32)),
                name: t.name,
                shape: t.dims,
                file: file_index,
                range: t.range,
            })
            .collect();
        return Ok((stored, "gguf"));
    }
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| {
        let why = match e {
            safetensors::SafeTensorError::HeaderTooSmall
            | safetensors::SafeTensorError::HeaderTooLarge
            | safetensors::SafeTensorError::InvalidHeaderLength => {
                "the file is truncated or not a weight file".to_string()
            }
            other => other.to_string(),
        };
        malformed(
            path,
            format!("not a readable safetensors or GGUF file ({why})"),
        )
    })?;
    let data_start = 8 + header_len;
    let mut out = Vec::new();
    for (name, info) in meta.tensors() {
        let encoding = st_encoding(info.dtype).ok_or_else(|| {
            malformed(
                path,
                format!(
                    "tensor `{name}` has dtype {:?}, which zturbo cannot read",
                    info.dtype
                ),
            )
        })?;
        let (a, b) = info.data_offsets;
        let range = (data_start + a)..(data_start + b);
        let elems = info.shape.iter().product::<usize>();
        if range.end > bytes.len() {
            return Err(malformed(
                path,
                format!(
                    "tensor `{name}` needs bytes {}..{} but the file has {}: the file is truncated",
                    range.start,
                    range.end,
                    bytes.len()
                ),
            ));
        }
        if b - a != encoded_bytes(encoding, elems) {
            return Err(malformed(
                path,
                format!(
                    "tensor `{name}` has {} bytes for its shape {:?}",
                    b - a,
                    info.shape
                ),
            ));
        }
        out.push(Stored {
            name,
            encoding,
            shape: info.shape.clone(),
            file: file_index,
            range,
        });
    }
    Ok((out, "safetensors"))
}

/// A scalar scale tensor's value (`scale_weight` is a 0-d or 1-element tensor, f32 or half).
fn scalar(s: &Stored, bytes: &[u8], path: &Path) -> Result<f32, ModelError> {
    let data = &bytes[s.range.clone()];
    let v = match (s.encoding, data.len()) {
        (Encoding::Dense(DType::F32), 4) => f32::from_le_bytes([data[0], data[1], data[2], data[3]]),
        (Encoding::Dense(DType::BF16), 2) => half::bf16::from_le_bytes([data[0], data[1]]).to_f32(),
        (Encoding::Dense(DType::F16), 2) => half::f16::from_le_bytes([data[0], data[1]]).to_f32(),
        _ => {
            return Err(malformed(
                path,
                format!(
                    "tensor `{}` is not a single scale (shape {:?}): per-channel fp8 scales are not supported",
                    s.name, s.shape
                ),
            ))
        }
    };
    if !v.is_finite() || v == 0.0 {
        return Err(malformed(
            path,
            format!("tensor `{}` holds the scale {v}", s.name),
        ));
    }
    Ok(v)
}

/// What a single weight file is, from its headers alone (for listings and `--model FILE`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct FileSummary {
    /// The component it holds, when it is one of ours.
    pub role: Option<Role>,
    /// `ComfyUI transformer`, `llama.cpp Qwen3` …, or what else it is (`a Flux transformer`).
    pub kind: String,
    /// `safetensors` or `gguf`.
    pub container: &'static str,
    /// The encoding that holds most of the bytes: `bf16`, `q4_k`, `float8_e4m3fn` …
    pub encoding: String,
    /// Tensor counts per encoding.
    pub encodings: BTreeMap<String, usize>,
    pub file_bytes: u64,
}

/// Reads a file's headers and tells what it is.
pub fn inspect(path: &Path) -> Result<FileSummary, ModelError> {
    let bytes = Bytes::map(path)?;
    let mut orig = BTreeMap::new();
    let (stored, container) = read_headers(0, path, bytes.as_slice(), &mut orig)?;
    let mut encodings = BTreeMap::new();
    let mut weight: BTreeMap<String, u64> = BTreeMap::new();
    for s in &stored {
        *encodings.entry(s.encoding.name()).or_insert(0) += 1;
        *weight.entry(s.encoding.name()).or_insert(0) += s.range.len() as u64;
    }
    let encoding = weight
        .iter()
        .max_by_key(|(_, b)| **b)
        .map(|(k, _)| k.clone())
        .unwrap_or_default();
    let (role, kind) = match layout::detect(stored.iter().map(|s| s.name.as_str())) {
        Detected::Known { layout, .. } => (Some(layout.role()), layout.label().to_string()),
        Detected::Foreign { what, .. } => (None, what.to_string()),
        Detected::Unknown => (None, "unknown weights".to_string()),
    };
    Ok(FileSummary {
        role,
        kind,
        container,
        encoding,
        encodings,
        file_bytes: bytes.as_slice().len() as u64,
    })
}

impl Weights {
    /// Opens weight files as one component. With a `role`, the files' layout is detected from
    /// their tensor names and mapped onto our names; a file of another kind is refused with a
    /// sentence naming it and a tensor that shows what it is.
    pub(crate) fn open(
        component: &str,
        sources: Vec<(PathBuf, Bytes)>,
        role: Option<Role>,
    ) -> Result<Self, ModelError> {
        let mut stored = Vec::new();
        let mut orig_shapes = BTreeMap::new();
        let mut container = "safetensors";
        for (i, (path, bytes)) in sources.iter().enumerate() {
            let (s, c) = read_headers(i, path, bytes.as_slice(), &mut orig_shapes)?;
            container = c;
            stored.extend(s);
        }
        let shown = sources
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let first_path = sources
            .first()
            .map(|(p, _)| p.clone())
            .unwrap_or_else(|| PathBuf::from(component));
        if stored.is_empty() {
            return Err(malformed(&first_path, "the file holds no tensors"));
        }
        let naming = match role {
            None => None,
            Some(role) => {
                let names = stored.iter().map(|s| s.name.as_str());
                match layout::detect_as(role, names) {
                    Detected::Known { layout, prefix } if layout.role() == role => {
                        let up = if layout == Layout::LdmVae {
                            stored
                                .iter()
                                .filter_map(|s| {
                                    let n = s.name.strip_prefix(prefix.as_str())?;
                                    n.strip_prefix("decoder.up.")?
                                        .split('.')
                                        .next()?
                                        .parse::<usize>()
                                        .ok()
                                })
                                .max()
                                .map_or(0, |m| m + 1)
                        } else {
                            0
                        };
                        Some((layout, prefix, up))
                    }
                    Detected::Known { layout, prefix } => {
                        let example = stored
                            .iter()
                            .map(|s| s.name.as_str())
                            .filter(|n| n.starts_with(prefix.as_str()))
                            .min()
                            .unwrap_or("");
                        return Err(malformed(
                            &first_path,
                            format!(
                                "this file is {} ({}; tensor `{example}`), not {}",
                                layout.role().describe(),
                                layout.label(),
                                role.describe()
                            ),
                        ));
                    }
                    Detected::Foreign { what, tensor } => {
                        return Err(malformed(
                            &first_path,
                            format!(
                                "this file is {what} (tensor `{tensor}`), not {}",
                                role.describe()
                            ),
                        ))
                    }
                    Detected::Unknown => {
                        let mut some: Vec<&str> = stored.iter().map(|s| s.name.as_str()).collect();
                        some.sort_unstable();
                        some.truncate(3);
                        return Err(malformed(
                            &first_path,
                            format!(
                                "no tensor of {} found (the file starts with `{}`)",
                                role.describe(),
                                some.join("`, `")
                            ),
                        ));
                    }
                }
            }
        };
        // fp8 scales belong to the weight next to them.
        let mut scales: BTreeMap<String, f32> = BTreeMap::new();
        for s in &stored {
            for suffix in [".scale_weight", ".weight_scale"] {
                if let Some(base) = s.name.strip_suffix(suffix) {
                    let (path, bytes) = &sources[s.file];
                    scales.insert(format!("{base}.weight"), scalar(s, bytes.as_slice(), path)?);
                }
            }
        }
        let mut tensors: BTreeMap<String, TensorInfo> = BTreeMap::new();
        for s in stored {
            let path = &sources[s.file].0;
            let mut encoding = s.encoding;
            if let Encoding::Fp8 { format, .. } = encoding {
                encoding = Encoding::Fp8 {
                    format,
                    scale: scales.get(&s.name).copied().unwrap_or(1.0),
                };
            }
            let mut shape = s.shape.clone();
            if let Some(orig) = orig_shapes.get(&s.name) {
                if orig.iter().product::<usize>() == shape.iter().product::<usize>() {
                    shape = orig.clone();
                }
            }
            let mapped = match &naming {
                None => vec![layout::Mapped {
                    name: s.name.clone(),
                    rows: None,
                    squeeze_conv: false,
                }],
                Some((layout, prefix, up)) => {
                    let Some(inner) = s.name.strip_prefix(prefix.as_str()) else {
                        // Another component's tensor in a bundled checkpoint.
                        continue;
                    };
                    if layout::ignored(*layout, inner) {
                        continue;
                    }
                    layout::map_name(*layout, inner, *up)
                }
            };
            for m in mapped {
                let (shape, range) = match m.rows {
                    Some((part, parts)) => {
                        let rows = shape.first().copied().unwrap_or(0);
                        if shape.len() != 2 || rows % parts != 0 {
                            return Err(malformed(
                                path,
                                format!(
                                    "tensor `{}` has shape {shape:?}: a fused projection needs rows divisible by {parts}",
                                    s.name
                                ),
                            ));
                        }
                        let len = s.range.len() / parts;
                        let start = s.range.start + part * len;
                        (vec![rows / parts, shape[1]], start..start + len)
                    }
                    None if m.squeeze_conv
                        && shape.len() == 4
                        && shape[2] == 1
                        && shape[3] == 1 =>
                    {
                        (vec![shape[0], shape[1]], s.range.clone())
                    }
                    None => (shape.clone(), s.range.clone()),
                };
                let info = TensorInfo {
                    encoding,
                    bytes: range.len() as u64,
                    shape,
                    stored_name: s.name.clone(),
                    file: s.file,
                    range,
                };
                if let Some(prev) = tensors.insert(m.name.clone(), info) {
                    return Err(malformed(
                        path,
                        format!(
                            "tensors `{}` and `{}` both provide `{}`",
                            prev.stored_name, s.name, m.name
                        ),
                    ));
                }
            }
        }
        if tensors.is_empty() {
            return Err(ModelError::Weights {
                component: component.to_string(),
                files: shown,
                message: "no tensor of this component in the file".into(),
            });
        }
        // A DiT decodes its blocks as ComfyUI-GGUF and diffusers do (f16 arithmetic); a text
        // encoder as llama.cpp and transformers do (f32).
        let arithmetic = match role {
            Some(Role::Transformer) => BlockArithmetic::F16,
            _ => BlockArithmetic::F32,
        };
        Ok(Weights {
            inner: Arc::new(sources),
            component: component.to_string(),
            tensors: Arc::new(tensors),
            naming,
            container,
            arithmetic,
        })
    }

    /// Opens one weight file on disk as `role`.
    pub fn open_file(path: &Path, component: &str, role: Role) -> Result<Self, ModelError> {
        let bytes = Bytes::map(path)?;
        Self::open(component, vec![(path.to_path_buf(), bytes)], Some(role))
    }

    /// Opens one weight file (safetensors dense or fp8, or GGUF) with its tensor names as they are,
    /// no layout detected or mapped: a ControlNet's own names. GGUF blocks decode with f16
    /// arithmetic, as a DiT's do.
    pub fn open_plain(path: &Path, component: &str) -> Result<Self, ModelError> {
        let bytes = Bytes::map(path)?;
        let mut w = Self::open(component, vec![(path.to_path_buf(), bytes)], None)?;
        w.arithmetic = BlockArithmetic::F16;
        Ok(w)
    }

    /// The files these weights come from.
    pub fn files(&self) -> Vec<PathBuf> {
        self.inner.iter().map(|(p, _)| p.clone()).collect()
    }

    /// What the files are: layout, container and the encodings of their tensors.
    pub fn format(&self) -> FormatInfo {
        let mut encodings = BTreeMap::new();
        for t in self.tensors.values() {
            *encodings.entry(t.encoding.name()).or_insert(0) += 1;
        }
        FormatInfo {
            layout: self.naming.as_ref().map(|(l, _, _)| l.label()),
            container: self.container,
            encodings,
            file_bytes: self
                .inner
                .iter()
                .map(|(_, b)| b.as_slice().len() as u64)
                .sum(),
        }
    }

    /// True when some matrix stays quantized in memory.
    pub fn is_quantized(&self) -> bool {
        self.tensors.values().any(TensorInfo::stays_quantized)
    }

    /// A loader that hands out tensors in `dtype` on `device` (quantized matrices stay quantized).
    pub fn loader(&self, dtype: DType, device: &Device) -> Loader {
        Loader {
            source: Source::Weights(self.clone()),
            prefix: String::new(),
            dtype,
            device: device.clone(),
            int8: false,
        }
    }

    /// A loader that checks names and shapes against the headers and hands out zero-cost
    /// placeholders: building a model with it validates the files without reading weights.
    pub fn shape_loader(&self, dtype: DType) -> Loader {
        Loader {
            source: Source::ShapeOnly(self.clone()),
            prefix: String::new(),
            dtype,
            device: Device::Cpu,
            int8: false,
        }
    }

    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// A `VarBuilder` over placeholders (see [`Weights::shape_loader`]).
    pub fn shape_only(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(ShapeOnly(self.clone())), dtype, device.clone())
    }

    /// The name a canonical tensor has in the file (messages about missing tensors).
    fn stored_name_of(&self, name: &str) -> String {
        match &self.naming {
            Some((layout, prefix, up)) => layout::stored_name(*layout, prefix, name, *up),
            None => name.to_string(),
        }
    }

    fn info(&self, name: &str) -> candle_core::Result<&TensorInfo> {
        match self.tensors.get(name) {
            Some(i) => Ok(i),
            None => candle_core::bail!("missing tensor `{}`", self.stored_name_of(name)),
        }
    }

    /// A tensor's header entry and its stored bytes in the map (block streaming uploads them).
    pub fn raw_parts(&self, name: &str) -> candle_core::Result<(&TensorInfo, &[u8])> {
        let info = self.info(name)?;
        Ok((info, self.raw(info)))
    }

    /// How this component decodes GGUF blocks.
    pub fn arithmetic(&self) -> BlockArithmetic {
        self.arithmetic
    }

    /// Bytes the tensors under `prefix` take in the files.
    pub fn stored_bytes_under(&self, prefix: &str) -> u64 {
        self.tensors
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, t)| t.bytes)
            .sum()
    }

    /// The canonical names under `prefix` (a block's tensors: `layers.3.`).
    pub fn names_under(&self, prefix: &str) -> Vec<String> {
        self.tensors
            .keys()
            .filter(|n| n.starts_with(prefix))
            .cloned()
            .collect()
    }

    fn raw(&self, info: &TensorInfo) -> &[u8] {
        &self.inner[info.file].1.as_slice()[info.range.clone()]
    }

    fn release(&self, info: &TensorInfo) {
        self.inner[info.file].1.release(info.range.clone());
    }

    fn check_shape(&self, name: &str, want: &[usize]) -> candle_core::Result<&TensorInfo> {
        let info = self.info(name)?;
        if info.shape.as_slice() != want {
            candle_core::bail!(
                "tensor `{}` has shape {:?}, the config implies {:?}",
                info.stored_name,
                info.shape,
                want
            )
        }
        Ok(info)
    }

    /// Copies one tensor out of the mapping onto `dev` as a plain tensor in `dtype`
    /// (dequantizing quantized ones).
    pub fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let info = self.info(name)?;
        let bytes = self.raw(info);
        let t = match info.encoding {
            Encoding::Dense(d) => Tensor::from_raw_buffer(bytes, d, &info.shape, dev)?,
            Encoding::Fp8 { format, scale } => {
                let codes = Tensor::from_raw_buffer(bytes, DType::U8, &info.shape, &Device::Cpu)?;
                let m = Fp8Matrix {
                    codes,
                    format,
                    scale,
                };
                m.dequantize(dtype)?.to_device(dev)?
            }
            Encoding::Blocks(t) => {
                let q = quantized::blocks_from_bytes(bytes, t, &info.shape, &Device::Cpu)?;
                quantized::dequantize_blocks(&q, dtype, self.arithmetic)?.to_device(dev)?
            }
        };
        self.release(info);
        t.to_dtype(dtype)
    }

    /// A matrix `[rows, cols]` as the model keeps it: quantized ones stay quantized (blocks or fp8
    /// codes on `dev`), plain ones are loaded in `dtype`.
    pub fn load_matrix(
        &self,
        name: &str,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<StoredMatrix> {
        let info = self.info(name)?;
        if !info.stays_quantized() {
            return Ok(StoredMatrix::Dense(self.load(name, dtype, dev)?));
        }
        let bytes = self.raw(info);
        let m = match info.encoding {
            Encoding::Fp8 { format, scale } => StoredMatrix::Fp8(Fp8Matrix {
                codes: Tensor::from_raw_buffer(bytes, DType::U8, &info.shape, dev)?,
                format,
                scale,
            }),
            Encoding::Blocks(t) => StoredMatrix::Blocks(BlockMatrix {
                blocks: Arc::new(quantized::blocks_from_bytes(bytes, t, &info.shape, dev)?),
                arithmetic: self.arithmetic,
            }),
            Encoding::Dense(_) => unreachable_dense()?,
        };
        self.release(info);
        Ok(m)
    }

    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Bytes the tensors under `prefix` take on the device for a model loaded in `dtype`:
    /// quantized matrices at their stored size, everything else converted to `dtype`.
    pub fn bytes_in(&self, prefix: &str, dtype: DType) -> u64 {
        self.tensors
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, t)| t.resident_bytes(dtype))
            .sum()
    }

    /// [`Weights::bytes_in`] with the matrices `int8` selects (by name) counted as per-channel
    /// int8 — one byte per value plus a scale and a compensation term per row — as
    /// `Lin::quantize_int8` keeps them.
    pub fn bytes_in_int8(&self, prefix: &str, dtype: DType, int8: impl Fn(&str) -> bool) -> u64 {
        self.tensors
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(n, t)| match t.shape.as_slice() {
                [rows, cols] if int8(n) => (rows * cols + 8 * rows) as u64,
                _ => t.resident_bytes(dtype),
            })
            .sum()
    }

    /// The largest matrix kept quantized, in bytes once dequantized into `dtype` (the one dense
    /// copy that exists at a time while the model runs); 0 when nothing stays quantized.
    pub fn largest_dequantized(&self, dtype: DType) -> u64 {
        self.tensors
            .values()
            .filter(|t| t.stays_quantized())
            .map(|t| t.elem_count() as u64 * dtype.size_in_bytes() as u64)
            .max()
            .unwrap_or(0)
    }

    /// Turns a candle load error into one that names the component and its files.
    pub fn context(&self, e: candle_core::Error) -> ModelError {
        let files = self
            .inner
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        ModelError::Weights {
            component: self.component.clone(),
            files,
            message: error_text(&e),
        }
    }
}

/// A candle error's message without the backtrace candle attaches when `RUST_BACKTRACE` is set:
/// the user reads one sentence.
pub fn error_text(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => error_text(inner),
        candle_core::Error::Context { inner, context } => {
            format!("{context}: {}", error_text(inner))
        }
        other => other.to_string(),
    }
}

/// `load_matrix` only reaches its match for quantized encodings.
fn unreachable_dense() -> candle_core::Result<StoredMatrix> {
    candle_core::bail!("internal: a plain tensor took the quantized path")
}

impl SimpleBackend for Weights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.check_shape(name, s.dims())?;
        self.load(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

struct ShapeOnly(Weights);

impl ShapeOnly {
    fn placeholder(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let info = self.0.info(name)?;
        Tensor::zeros((), dtype, dev)?.broadcast_as(info.shape.as_slice())
    }
}

impl SimpleBackend for ShapeOnly {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.check_shape(name, s.dims())?;
        self.placeholder(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.placeholder(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.tensors.contains_key(name)
    }
}
