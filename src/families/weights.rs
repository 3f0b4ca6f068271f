//! Where a model's files come from (a folder on disk or bytes embedded in the binary) and how its
//! safetensors weights are opened: memory-mapped, single-file or sharded, with exact per-tensor sizes
//! read from the headers so the memory planner never guesses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

use super::ModelError;

/// A model folder in the diffusers layout, wherever its bytes live.
#[derive(Clone)]
pub struct ModelDir {
    store: Store,
}

#[derive(Clone)]
enum Store {
    Dir(PathBuf),
    /// (relative path, bytes) pairs compiled into the binary — the demo model.
    Embedded {
        label: &'static str,
        files: &'static [(&'static str, &'static [u8])],
    },
}

impl std::fmt::Debug for ModelDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl ModelDir {
    /// Opens a folder; it must exist and hold `model_index.json`.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, ModelError> {
        let path = path.into();
        if !path.is_dir() {
            return Err(ModelError::NotAModelFolder {
                path,
                reason: "no such folder".into(),
            });
        }
        if !path.join("model_index.json").is_file() {
            return Err(ModelError::NotAModelFolder {
                reason: "it has no model_index.json (expected the Hugging Face diffusers layout)"
                    .into(),
                path,
            });
        }
        Ok(Self {
            store: Store::Dir(path),
        })
    }

    pub fn embedded(label: &'static str, files: &'static [(&'static str, &'static [u8])]) -> Self {
        Self {
            store: Store::Embedded { label, files },
        }
    }

    /// The folder path, when the model lives on disk.
    pub fn path(&self) -> Option<&Path> {
        match &self.store {
            Store::Dir(p) => Some(p),
            Store::Embedded { .. } => None,
        }
    }

    pub fn describe(&self) -> String {
        match &self.store {
            Store::Dir(p) => p.display().to_string(),
            Store::Embedded { label, .. } => format!("<embedded {label}>"),
        }
    }

    /// A path for messages: folder-relative file shown with the folder.
    pub fn display_path(&self, rel: &str) -> PathBuf {
        match &self.store {
            Store::Dir(p) => p.join(rel),
            Store::Embedded { label, .. } => PathBuf::from(format!("<embedded {label}>/{rel}")),
        }
    }

    /// A config error in the folder's file `rel`.
    pub fn malformed(&self, rel: &str, message: String) -> ModelError {
        ModelError::Malformed {
            path: self.display_path(rel),
            message,
        }
    }

    pub fn exists(&self, rel: &str) -> bool {
        match &self.store {
            Store::Dir(p) => p.join(rel).is_file(),
            Store::Embedded { files, .. } => files.iter().any(|(n, _)| *n == rel),
        }
    }

    fn embedded_bytes(&self, rel: &str) -> Option<&'static [u8]> {
        match &self.store {
            Store::Dir(_) => None,
            Store::Embedded { files, .. } => files.iter().find(|(n, _)| *n == rel).map(|(_, b)| *b),
        }
    }

    pub fn read_string(&self, rel: &str) -> Result<String, ModelError> {
        match &self.store {
            Store::Dir(p) => {
                let path = p.join(rel);
                std::fs::read_to_string(&path).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        ModelError::MissingFile { path }
                    } else {
                        ModelError::Io { path, source: e }
                    }
                })
            }
            Store::Embedded { .. } => {
                let bytes = self
                    .embedded_bytes(rel)
                    .ok_or_else(|| ModelError::MissingFile {
                        path: self.display_path(rel),
                    })?;
                String::from_utf8(bytes.to_vec()).map_err(|e| ModelError::Malformed {
                    path: self.display_path(rel),
                    message: e.to_string(),
                })
            }
        }
    }

    /// Reads and deserialises a JSON file; the error names the file and the JSON problem.
    pub fn read_json<T: DeserializeOwned>(&self, rel: &str) -> Result<T, ModelError> {
        let text = self.read_string(rel)?;
        serde_json::from_str(&text).map_err(|e| ModelError::Malformed {
            path: self.display_path(rel),
            message: e.to_string(),
        })
    }

    /// The weight files of one component folder (e.g. `transformer`), relative to the model folder:
    /// the shards named by `*.safetensors.index.json` when present, else the one `.safetensors` file.
    pub fn weight_files(&self, component: &str) -> Result<Vec<String>, ModelError> {
        let entries = self.list(component);
        if entries.is_empty() {
            return Err(ModelError::MissingFile {
                path: self.display_path(component),
            });
        }
        let index = entries
            .iter()
            .filter(|n| n.ends_with(".safetensors.index.json"))
            .find(|n| !is_variant(n, ".safetensors.index.json"))
            .or_else(|| {
                entries
                    .iter()
                    .find(|n| n.ends_with(".safetensors.index.json"))
            });
        if let Some(index) = index {
            let rel = format!("{component}/{index}");
            let idx: ShardIndex = self.read_json(&rel)?;
            let mut shards: Vec<String> = idx.weight_map.into_values().collect();
            shards.sort();
            shards.dedup();
            let shards: Vec<String> = shards
                .into_iter()
                .map(|s| format!("{component}/{s}"))
                .collect();
            for s in &shards {
                if !self.exists(s) {
                    return Err(ModelError::MissingFile {
                        path: self.display_path(s),
                    });
                }
            }
            return Ok(shards);
        }
        // Prefer the full-precision file over variants such as `*.fp16.safetensors`.
        let mut singles: Vec<&String> = entries
            .iter()
            .filter(|n| n.ends_with(".safetensors"))
            .collect();
        singles.sort_by_key(|n| (is_variant(n, ".safetensors"), n.len()));
        match singles.first() {
            Some(name) => Ok(vec![format!("{component}/{name}")]),
            None => Err(ModelError::MissingFile {
                path: self
                    .display_path(&format!("{component}/diffusion_pytorch_model.safetensors")),
            }),
        }
    }

    /// File names directly inside a component folder.
    fn list(&self, component: &str) -> Vec<String> {
        match &self.store {
            Store::Dir(p) => std::fs::read_dir(p.join(component))
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .filter(|e| e.path().is_file())
                        .filter_map(|e| e.file_name().into_string().ok())
                        .collect()
                })
                .unwrap_or_default(),
            Store::Embedded { files, .. } => {
                let prefix = format!("{component}/");
                files
                    .iter()
                    .filter_map(|(n, _)| n.strip_prefix(&prefix))
                    .filter(|n| !n.contains('/'))
                    .map(str::to_string)
                    .collect()
            }
        }
    }

    /// Opens a component's weights (memory-mapped on disk, borrowed when embedded).
    pub fn open_weights(&self, component: &str) -> Result<Weights, ModelError> {
        let files = self.weight_files(component)?;
        let mut sources = Vec::with_capacity(files.len());
        for rel in &files {
            let shown = self.display_path(rel);
            let bytes = match &self.store {
                Store::Dir(p) => {
                    let path = p.join(rel);
                    let file = std::fs::File::open(&path).map_err(|e| ModelError::Io {
                        path: path.clone(),
                        source: e,
                    })?;
                    // SAFETY: read-only mapping; like every mmap user we rely on nobody truncating
                    // model files while the server runs.
                    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::Io {
                        path: path.clone(),
                        source: e,
                    })?;
                    Bytes::Mapped(map)
                }
                Store::Embedded { .. } => {
                    Bytes::Static(self.embedded_bytes(rel).ok_or_else(|| {
                        ModelError::MissingFile {
                            path: shown.clone(),
                        }
                    })?)
                }
            };
            sources.push((shown, bytes));
        }
        let mut tensors = BTreeMap::new();
        for (file_index, (path, bytes)) in sources.iter().enumerate() {
            let (header_len, meta) = safetensors::SafeTensors::read_metadata(bytes.as_slice())
                .map_err(|e| ModelError::Malformed {
                    path: path.clone(),
                    message: format!("not a readable safetensors file: {e}"),
                })?;
            let data_start = 8 + header_len;
            for (name, info) in meta.tensors() {
                let dtype = st_dtype(info.dtype).ok_or_else(|| ModelError::Malformed {
                    path: path.clone(),
                    message: format!("tensor `{name}` has unsupported dtype {:?}", info.dtype),
                })?;
                let (a, b) = info.data_offsets;
                let range = (data_start + a)..(data_start + b);
                let expected = info.shape.iter().product::<usize>() * dtype.size_in_bytes();
                if range.end > bytes.as_slice().len() || b - a != expected {
                    return Err(ModelError::Malformed {
                        path: path.clone(),
                        message: format!(
                            "tensor `{name}` points outside the file or has the wrong byte size"
                        ),
                    });
                }
                tensors.insert(
                    name,
                    TensorInfo {
                        dtype,
                        shape: info.shape.clone(),
                        bytes: (b - a) as u64,
                        file: file_index,
                        range,
                    },
                );
            }
        }
        Ok(Weights {
            inner: Arc::new(sources),
            component: component.to_string(),
            tensors: Arc::new(tensors),
        })
    }
}

fn st_dtype(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F64 => DType::F64,
        S::U8 => DType::U8,
        S::U32 => DType::U32,
        S::I64 => DType::I64,
        _ => return None,
    })
}

enum Bytes {
    Mapped(memmap2::Mmap),
    Static(&'static [u8]),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Static(s) => s,
        }
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

fn is_variant(name: &str, suffix: &str) -> bool {
    // `diffusion_pytorch_model.fp16.safetensors` → stem has a dot-separated variant tag.
    name.strip_suffix(suffix)
        .map(|stem| stem.contains('.'))
        .unwrap_or(false)
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: u64,
    file: usize,
    range: std::ops::Range<usize>,
}

/// Opened weights of one component. Cheap to clone; every `var_builder` shares the same mapping, so
/// reloading a component in another precision (guard fallbacks, block streaming) costs no I/O setup.
#[derive(Clone)]
pub struct Weights {
    inner: Arc<Vec<(PathBuf, Bytes)>>,
    component: String,
    tensors: Arc<BTreeMap<String, TensorInfo>>,
}

impl Weights {
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// A builder that checks names and shapes against the headers and hands out zero-cost
    /// broadcast placeholders: building a model with it validates a folder without reading weights.
    pub fn shape_only(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(ShapeOnly(self.clone())), dtype, device.clone())
    }

    /// Copies one tensor out of the mapping onto `dev`, converted to `dtype`.
    pub fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some(info) = self.tensors.get(name) else {
            candle_core::bail!("missing tensor `{name}`")
        };
        let source = &self.inner[info.file].1;
        let bytes = &source.as_slice()[info.range.clone()];
        let t = Tensor::from_raw_buffer(bytes, info.dtype, &info.shape, dev)?;
        source.release(info.range.clone());
        t.to_dtype(dtype)
    }

    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Bytes the tensors would take in `dtype` (what the device will hold after conversion).
    pub fn bytes_in(&self, prefix: &str, dtype: DType) -> u64 {
        self.tensors
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, t)| t.shape.iter().product::<usize>() as u64 * dtype.size_in_bytes() as u64)
            .sum()
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
            message: e.to_string(),
        }
    }
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
        let Some(info) = self.tensors.get(name) else {
            candle_core::bail!("missing tensor `{name}`")
        };
        if info.shape.as_slice() != s.dims() {
            candle_core::bail!(
                "tensor `{name}` has shape {:?}, the config implies {:?}",
                info.shape,
                s.dims()
            )
        }
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
        let Some(info) = self.0.tensors.get(name) else {
            candle_core::bail!("missing tensor `{name}`")
        };
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
        let t = self.placeholder(name, dtype, dev)?;
        if t.dims() != s.dims() {
            candle_core::bail!(
                "tensor `{name}` has shape {:?}, the config implies {:?}",
                t.dims(),
                s.dims()
            )
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.placeholder(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.tensors.contains_key(name)
    }
}

/// Components whose weights `pull` downloads, per pipeline (`model_index.json` names them too).
const WEIGHT_COMPONENTS: &[&str] = &[
    "transformer",
    "unet",
    "text_encoder",
    "text_encoder_2",
    "vae",
];

/// The snapshot folder of `repo` in the Hugging Face cache, when `model_index.json` and every
/// weight file it needs are there.
pub fn hf_cache_snapshot(repo: &str) -> Option<PathBuf> {
    let cache = hf_hub::Cache::from_env();
    let index = cache.model(repo.to_string()).get("model_index.json")?;
    let dir = index.parent()?.to_path_buf();
    let model = ModelDir::open(&dir).ok()?;
    let complete = WEIGHT_COMPONENTS
        .iter()
        .filter(|c| dir.join(c).is_dir())
        .all(|c| model.weight_files(c).is_ok());
    complete.then_some(dir)
}

/// Reports download progress (a terminal bar, or SSE events to the UI).
pub trait DownloadProgress {
    fn file_started(&mut self, name: &str, size: u64, index: usize, count: usize);
    /// The file's size, once the hub has said it (before the first `advanced`); the bytes
    /// already on disk from an interrupted download are reported as advanced at once.
    fn file_size(&mut self, _total: u64) {}
    fn advanced(&mut self, bytes: u64);
    fn file_finished(&mut self, name: &str);
}

struct HubProgress<'a>(&'a mut dyn DownloadProgress);

impl hf_hub::api::Progress for HubProgress<'_> {
    fn init(&mut self, size: usize, _filename: &str) {
        self.0.file_size(size as u64);
    }
    fn update(&mut self, size: usize) {
        self.0.advanced(size as u64);
    }
    fn finish(&mut self) {}
}

/// Which repository files a diffusers text-to-image pipeline needs: configs, tokenizers, and for
/// each weight component the shard index + shards or the one full-precision `.safetensors`.
pub fn select_files(files: &[String]) -> Vec<String> {
    let mut out: Vec<String> = files
        .iter()
        .filter(|f| {
            f.as_str() == "model_index.json"
                || (f.matches('/').count() == 1
                    && (f.ends_with("config.json")
                        || f.starts_with("tokenizer")
                        || f.starts_with("scheduler/")))
        })
        .filter(|f| !f.ends_with(".safetensors") && !f.ends_with(".bin"))
        .cloned()
        .collect();
    for comp in WEIGHT_COMPONENTS {
        let prefix = format!("{comp}/");
        let in_comp: Vec<&String> = files
            .iter()
            .filter(|f| f.starts_with(&prefix) && f.matches('/').count() == 1)
            .collect();
        let name = |f: &&String| f[prefix.len()..].to_string();
        let index = in_comp.iter().find(|f| {
            f.ends_with(".safetensors.index.json")
                && !is_variant(&name(f), ".safetensors.index.json")
        });
        if let Some(index) = index {
            out.push((*index).clone());
            // Shards share the index's stem: `diffusion_pytorch_model-00001-of-00003.safetensors`.
            let stem = name(index)
                .trim_end_matches(".safetensors.index.json")
                .to_string();
            out.extend(
                in_comp
                    .iter()
                    .filter(|f| {
                        let n = name(f);
                        n.ends_with(".safetensors") && n.starts_with(&format!("{stem}-"))
                    })
                    .map(|f| (*f).clone()),
            );
            continue;
        }
        let mut singles: Vec<&&String> = in_comp
            .iter()
            .filter(|f| f.ends_with(".safetensors"))
            .collect();
        singles.sort_by_key(|f| (is_variant(&name(f), ".safetensors"), f.len()));
        if let Some(f) = singles.first() {
            out.push((**f).clone());
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Downloads what a pipeline needs from `repo` into the Hugging Face cache (resuming partial
/// files) and returns the snapshot folder.
pub fn pull(repo: &str, progress: &mut dyn DownloadProgress) -> Result<PathBuf, ModelError> {
    let offline = |e: &dyn std::fmt::Display| {
        ModelError::Download(format!(
            "cannot reach the Hugging Face hub for `{repo}` ({e}). Are you offline? Download on a connected \
             machine (`zturbo pull {repo}`, then copy ~/.cache/huggingface) or pass a local diffusers folder with --model"
        ))
    };
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .map_err(|e| offline(&e))?;
    let handle = api.model(repo.to_string());
    let info = handle.info().map_err(|e| offline(&e))?;
    let names: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    if !names.iter().any(|n| n == "model_index.json") {
        return Err(ModelError::Download(format!(
            "`{repo}` has no model_index.json: not a diffusers pipeline repository"
        )));
    }
    let wanted = select_files(&names);
    let count = wanted.len();
    let mut snapshot = None;
    for (i, f) in wanted.iter().enumerate() {
        progress.file_started(f, 0, i, count);
        let path = handle
            .download_with_progress(f, HubProgress(progress))
            .map_err(|e| ModelError::Download(format!("{repo}/{f}: {e}")))?;
        progress.file_finished(f);
        if f == "model_index.json" {
            snapshot = path.parent().map(Path::to_path_buf);
        }
    }
    snapshot
        .ok_or_else(|| ModelError::Download(format!("{repo}: model_index.json was not fetched")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects_pipeline_files_only() {
        let files: Vec<String> = [
            "model_index.json",
            "README.md",
            "scheduler/scheduler_config.json",
            "transformer/config.json",
            "transformer/diffusion_pytorch_model.safetensors.index.json",
            "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
            "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.bin",
            "unet/config.json",
            "vae/diffusion_pytorch_model.safetensors",
            "vae/config.json",
            "text_encoder/model.safetensors",
            "tokenizer/tokenizer.json",
            "tokenizer/vocab.json",
            "sd_turbo.safetensors",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let got = select_files(&files);
        assert!(got.contains(
            &"transformer/diffusion_pytorch_model-00002-of-00002.safetensors".to_string()
        ));
        assert!(got.contains(&"unet/diffusion_pytorch_model.safetensors".to_string()));
        assert!(!got
            .iter()
            .any(|f| f.contains("fp16") || f.ends_with(".bin") || f == "README.md"));
        assert!(!got.contains(&"sd_turbo.safetensors".to_string()));
        assert!(got.contains(&"tokenizer/vocab.json".to_string()));
    }
}
