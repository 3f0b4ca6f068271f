//! Where a model's files come from (a folder on disk, single files people already have, or bytes
//! embedded in the binary) and how their weights are opened — every format in `store`, `gguf` and
//! `layout`: memory-mapped, with exact per-tensor sizes read from the headers so the memory planner
//! never guesses.

pub mod gguf;
pub mod layout;
pub mod quantize;
pub mod stage;
#[cfg(feature = "cuda")]
mod stage_cuda;
mod store;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use super::ModelError;
pub use layout::{Layout, Role};
use store::Bytes;
pub use store::{
    error_text, inspect, Encoding, FileSummary, FormatInfo, Loader, Recording, TensorInfo, Weights,
};

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

    /// Opens a component's weights (memory-mapped on disk, borrowed when embedded) under the
    /// names the files use.
    pub fn open_weights(&self, component: &str) -> Result<Weights, ModelError> {
        Weights::open(component, self.weight_sources(component)?, None)
    }

    /// Opens a component's weights as `role`: the layout is detected and mapped onto our names
    /// (a folder may hold transformers' Qwen3 without the `model.` prefix, say).
    pub fn open_weights_as(&self, component: &str, role: Role) -> Result<Weights, ModelError> {
        Weights::open(component, self.weight_sources(component)?, Some(role))
    }

    fn weight_sources(&self, component: &str) -> Result<Vec<(PathBuf, Bytes)>, ModelError> {
        let files = self.weight_files(component)?;
        let mut sources = Vec::with_capacity(files.len());
        for rel in &files {
            let shown = self.display_path(rel);
            let bytes = match &self.store {
                Store::Dir(p) => Bytes::map(&p.join(rel))?,
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
        Ok(sources)
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

/// The snapshot folder of `repo` in the Hugging Face cache when its configs and tokenizer are
/// there, weights or not (`zturbo pull NAME --configs-only`).
pub fn hf_cache_configs(repo: &str) -> Option<PathBuf> {
    let cache = hf_hub::Cache::from_env();
    let index = cache.model(repo.to_string()).get("model_index.json")?;
    let dir = index.parent()?.to_path_buf();
    ModelDir::open(&dir).ok()?;
    dir.join("tokenizer").is_dir().then_some(dir)
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

/// What `pull` fetches from a diffusers repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullSet {
    /// Configs, tokenizers and every component's weights.
    Pipeline,
    /// Configs, scheduler and tokenizers only (a few MB): enough to run single weight files.
    ConfigsOnly,
}

fn hub_offline(repo: &str, e: &dyn std::fmt::Display) -> ModelError {
    ModelError::Download(format!(
        "cannot reach the Hugging Face hub for `{repo}` ({e}). Are you offline? Download on a connected \
         machine (`zturbo pull {repo}`, then copy ~/.cache/huggingface) or pass a local diffusers folder with --model"
    ))
}

fn hub_repo(repo: &str) -> Result<hf_hub::api::sync::ApiRepo, ModelError> {
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .map_err(|e| hub_offline(repo, &e))?;
    Ok(api.model(repo.to_string()))
}

/// The file names of a hub repository.
pub fn repo_files(repo: &str) -> Result<Vec<String>, ModelError> {
    let info = hub_repo(repo)?.info().map_err(|e| hub_offline(repo, &e))?;
    Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
}

/// Downloads files of `repo` into the Hugging Face cache (resuming partial files); returns each
/// file's path.
pub fn pull_files(
    repo: &str,
    files: &[String],
    progress: &mut dyn DownloadProgress,
) -> Result<Vec<PathBuf>, ModelError> {
    let handle = hub_repo(repo)?;
    let count = files.len();
    let mut paths = Vec::with_capacity(count);
    for (i, f) in files.iter().enumerate() {
        progress.file_started(f, 0, i, count);
        let path = handle
            .download_with_progress(f, HubProgress(progress))
            .map_err(|e| ModelError::Download(format!("{repo}/{f}: {e}")))?;
        progress.file_finished(f);
        paths.push(path);
    }
    Ok(paths)
}

/// Downloads what a pipeline needs from `repo` into the Hugging Face cache (resuming partial
/// files) and returns the snapshot folder.
pub fn pull(repo: &str, progress: &mut dyn DownloadProgress) -> Result<PathBuf, ModelError> {
    pull_set(repo, PullSet::Pipeline, progress)
}

/// [`pull`] of the whole pipeline or of its configs and tokenizers only.
pub fn pull_set(
    repo: &str,
    set: PullSet,
    progress: &mut dyn DownloadProgress,
) -> Result<PathBuf, ModelError> {
    let names = repo_files(repo)?;
    if !names.iter().any(|n| n == "model_index.json") {
        return Err(ModelError::Download(format!(
            "`{repo}` has no model_index.json: not a diffusers pipeline repository"
        )));
    }
    let mut wanted = select_files(&names);
    if set == PullSet::ConfigsOnly {
        wanted.retain(|f| !f.ends_with(".safetensors") && !f.ends_with(".safetensors.index.json"));
    }
    let paths = pull_files(repo, &wanted, progress)?;
    wanted
        .iter()
        .zip(&paths)
        .find(|(f, _)| *f == "model_index.json")
        .and_then(|(_, p)| p.parent().map(Path::to_path_buf))
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
