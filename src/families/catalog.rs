//! Known models (hub repository, size, family) and how a `--model` value becomes a folder: the
//! embedded demo, an explicit path, `models/<name>/`, the Hugging Face cache, or — only through
//! `zturbo pull` — a download.

use std::path::{Path, PathBuf};

use super::weights::{self, FileSummary, ModelDir, Role};
use super::{sd_turbo, z_image, ComponentFiles, Defaults, FamilyKind, ModelError};

/// A model zturbo knows how to fetch.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct CatalogEntry {
    pub name: &'static str,
    pub repo: &'static str,
    pub family: FamilyKind,
    /// Download size of the files `pull` fetches (approximate, for the UI and the offline hint).
    pub download_bytes: u64,
    /// What the family reports once loaded (size, steps, CFG), known before the download.
    pub defaults: Defaults,
    pub description: &'static str,
}

pub const CATALOG: &[CatalogEntry] = &[
    CatalogEntry {
        name: "z-image-turbo",
        repo: "Tongyi-MAI/Z-Image-Turbo",
        family: FamilyKind::ZImage,
        download_bytes: 20_600_000_000,
        defaults: z_image::DEFAULTS,
        description: "Z-Image-Turbo (6B DiT, Qwen3-4B text encoder): 1024², 8 steps. Needs a GPU.",
    },
    CatalogEntry {
        name: "sd-turbo",
        repo: "stabilityai/sd-turbo",
        family: FamilyKind::SdTurbo,
        download_bytes: 5_200_000_000,
        defaults: sd_turbo::SD_TURBO_DEFAULTS,
        description:
            "SD-Turbo (SD 2.1 distilled, 866M UNet + OpenCLIP-H): 512², 1 step, no CFG. Runs on CPUs and 6–8 GB GPUs.",
    },
    CatalogEntry {
        name: "sdxl-turbo",
        repo: "stabilityai/sdxl-turbo",
        family: FamilyKind::SdxlTurbo,
        download_bytes: 13_900_000_000,
        defaults: sd_turbo::SDXL_TURBO_DEFAULTS,
        description: "SDXL-Turbo (2.6B UNet + two CLIP encoders): 512², 1 step, no CFG.",
    },
];

/// The model compiled into the binary: the tiny random-weight Z-Image test fixture.
pub const DEMO: &str = "demo";

/// The demo's defaults: Z-Image's 8 steps and CFG 1.8, but 512² — its images are noise anyway, and
/// on a CPU 512² takes seconds where 1024² takes most of a minute.
pub const DEMO_DEFAULTS: Defaults = Defaults {
    width: 512,
    height: 512,
    steps: 8,
    cfg: 1.8,
};

pub fn entry(name: &str) -> Option<&'static CatalogEntry> {
    CATALOG
        .iter()
        .find(|e| e.name.eq_ignore_ascii_case(name) || e.repo.eq_ignore_ascii_case(name))
}

macro_rules! demo_files {
    ($($rel:literal),* $(,)?) => {
        &[$(($rel, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-z-image/", $rel)) as &[u8])),*]
    };
}

static DEMO_FILES: &[(&str, &[u8])] = demo_files!(
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
);

/// The embedded demo model (random weights: its images are noise, but every stage runs for real).
pub fn demo() -> ModelDir {
    ModelDir::embedded("demo", DEMO_FILES)
}

/// A resolved `--model`: a display name, the folder of its configs (and of the weights no
/// component file replaces) and the component files.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub name: String,
    pub dir: ModelDir,
    pub demo: bool,
    pub files: ComponentFiles,
    /// The quantized variant (`q8_0` …) these weights are, when they are one.
    pub variant: Option<String>,
}

/// Finds a model without touching the network. Order: `demo`; an existing folder path; a weight
/// file (its family's catalog configs); `<models_dir>/<name>`; the Hugging Face cache (catalog
/// name or `owner/repo`).
pub fn resolve(spec: &str, models_dir: &Path) -> Result<Resolved, ModelError> {
    let spec = spec.trim();
    if spec.eq_ignore_ascii_case(DEMO) {
        return Ok(Resolved {
            name: DEMO.into(),
            dir: demo(),
            demo: true,
            files: ComponentFiles::default(),
            variant: None,
        });
    }
    let as_path = Path::new(spec);
    if as_path.is_file() {
        return resolve_file(as_path, models_dir);
    }
    if as_path.is_dir() {
        let name = as_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| spec.to_string());
        return Ok(Resolved {
            name,
            dir: ModelDir::open(as_path)?,
            demo: false,
            files: ComponentFiles::default(),
            variant: None,
        });
    }
    let local = models_dir.join(spec);
    if local.is_dir() {
        return Ok(Resolved {
            name: spec.to_string(),
            dir: ModelDir::open(local)?,
            demo: false,
            files: ComponentFiles::default(),
            variant: None,
        });
    }
    let (name, repo) = match entry(spec) {
        Some(e) => (e.name.to_string(), e.repo.to_string()),
        None if spec.contains('/') && !spec.contains("..") => (spec.to_string(), spec.to_string()),
        None => {
            return Err(ModelError::NotFound(
                spec.into(),
                format!(
                    "not a folder, not in {}, and not a known model (known: {})",
                    models_dir.display(),
                    CATALOG
                        .iter()
                        .map(|e| e.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ))
        }
    };
    match weights::hf_cache_snapshot(&repo) {
        Some(dir) => Ok(Resolved {
            name,
            dir: ModelDir::open(dir)?,
            demo: false,
            files: ComponentFiles::default(),
            variant: None,
        }),
        None => {
            let size = entry(&repo)
                .map(|e| format!(" (about {:.1} GB)", e.download_bytes as f64 / 1e9))
                .unwrap_or_default();
            Err(ModelError::NotFound(
                spec.into(),
                format!(
                    "not downloaded yet: run `zturbo pull {spec}`{size}, or pass a local diffusers folder with --model"
                ),
            ))
        }
    }
}

/// Like [`resolve`], for a model whose weights come (partly) from component files: a catalog
/// model's configs and tokenizer are enough then (`zturbo pull NAME --configs-only`).
pub fn resolve_with(
    spec: &str,
    models_dir: &Path,
    files: &ComponentFiles,
) -> Result<Resolved, ModelError> {
    let full = resolve(spec, models_dir);
    let mut r = match full {
        Ok(r) => r,
        Err(e) if !files.is_empty() => match entry(spec.trim()) {
            Some(entry) => configs_of(entry, models_dir).map_err(|_| e)?,
            None => return Err(e),
        },
        Err(e) => return Err(e),
    };
    for (have, given, flag) in [
        (
            &mut r.files.transformer,
            &files.transformer,
            "--transformer",
        ),
        (
            &mut r.files.text_encoder,
            &files.text_encoder,
            "--text-encoder",
        ),
        (&mut r.files.vae, &files.vae, "--vae"),
    ] {
        if let Some(g) = given {
            if let Some(h) = have.as_ref().filter(|h| *h != g) {
                return Err(ModelError::Invalid(format!(
                    "{flag} {} conflicts with --model {}, which already is that component",
                    g.display(),
                    h.display()
                )));
            }
            *have = Some(g.clone());
        }
    }
    if let Some(t) = &r.files.transformer {
        if !r.demo {
            r.name = file_stem(t);
        }
    }
    Ok(r)
}

fn file_stem(p: &Path) -> String {
    p.file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// A catalog model's configs and tokenizer: `<models_dir>/<name>` (a diffusers folder, weights
/// or not), else its Hugging Face cache snapshot (configs-only pulls included).
pub fn configs_of(entry: &CatalogEntry, models_dir: &Path) -> Result<Resolved, ModelError> {
    let local = models_dir.join(entry.name);
    let dir = if local.join("model_index.json").is_file() {
        ModelDir::open(local)?
    } else if let Some(dir) = weights::hf_cache_configs(entry.repo) {
        ModelDir::open(dir)?
    } else {
        return Err(ModelError::NotFound(
            entry.name.into(),
            format!(
                "its configs and tokenizer are not here: run `zturbo pull {} --configs-only` (a few MB), \
                 or put a diffusers folder at {}",
                entry.name,
                local.display()
            ),
        ));
    };
    Ok(Resolved {
        name: entry.name.into(),
        dir,
        demo: false,
        files: ComponentFiles::default(),
        variant: None,
    })
}

/// `--model FILE`: a transformer file runs with its family's catalog configs (and that model's
/// other components unless files are given for them).
fn resolve_file(path: &Path, models_dir: &Path) -> Result<Resolved, ModelError> {
    let summary = weights::inspect(path)?;
    match summary.role {
        Some(Role::Transformer) => {
            let entry = CATALOG
                .iter()
                .find(|e| e.family == FamilyKind::ZImage)
                .ok_or_else(|| ModelError::Invalid("no Z-Image entry in the catalog".into()))?;
            let mut r = configs_of(entry, models_dir).map_err(|e| {
                ModelError::Invalid(format!(
                    "{} is a Z-Image transformer ({}); {e}",
                    path.display(),
                    summary.kind
                ))
            })?;
            r.name = file_stem(path);
            r.files.transformer = Some(path.to_path_buf());
            Ok(r)
        }
        Some(role) => Err(ModelError::Invalid(format!(
            "{} is {} ({}), not a model to run: pass it with {} next to --model",
            path.display(),
            role.describe(),
            summary.kind,
            role.flag()
        ))),
        None => Err(ModelError::Invalid(format!(
            "{}: not a Z-Image transformer (it looks like {})",
            path.display(),
            summary.kind
        ))),
    }
}

/// Where ComfyUI keeps each component's files, under its `models/` folder.
pub const COMFYUI_FOLDERS: &[(&str, Role)] = &[
    ("diffusion_models", Role::Transformer),
    ("unet", Role::Transformer),
    ("text_encoders", Role::TextEncoder),
    ("clip", Role::TextEncoder),
    ("vae", Role::Vae),
];

/// The `models/` folder of a ComfyUI tree given as the ComfyUI folder or its `models/`.
pub fn comfyui_models(dir: &Path) -> PathBuf {
    let inner = dir.join("models");
    if inner.is_dir() {
        inner
    } else {
        dir.to_path_buf()
    }
}

/// A component file named on the command line: an existing path, or a file name found in
/// `<models_dir>` or the ComfyUI folders for `role`.
pub fn find_component_file(
    spec: &Path,
    role: Role,
    models_dir: &Path,
    comfyui: Option<&Path>,
) -> Result<PathBuf, ModelError> {
    if spec.is_file() {
        return Ok(spec.to_path_buf());
    }
    let mut tried = vec![spec.display().to_string()];
    if spec.components().count() == 1 {
        let mut dirs = vec![models_dir.to_path_buf()];
        if let Some(c) = comfyui {
            let models = comfyui_models(c);
            dirs.extend(
                COMFYUI_FOLDERS
                    .iter()
                    .filter(|(_, r)| *r == role)
                    .map(|(f, _)| models.join(f)),
            );
        }
        for d in dirs {
            let p = d.join(spec);
            if p.is_file() {
                return Ok(p);
            }
            tried.push(p.display().to_string());
        }
    }
    Err(ModelError::MissingFile {
        path: PathBuf::from(format!(
            "{} (looked for {})",
            spec.display(),
            tried.join(", ")
        )),
    })
}

/// A single weight file found on disk, for the Models panel.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FileListing {
    pub name: String,
    pub path: PathBuf,
    /// `models_dir` or `comfyui`.
    pub source: &'static str,
    pub role: Role,
    /// The family it belongs to (its names are Z-Image's or the ones Z-Image uses).
    pub family: String,
    #[serde(flatten)]
    pub summary: FileSummary,
    /// In use by the loaded model.
    pub loaded: bool,
    /// The flag that loads it.
    pub flag: &'static str,
}

/// Weight files for our components in `<models_dir>` (top level and the ComfyUI-style
/// subfolders) and in a ComfyUI `models/` tree. Only headers are read; files of other models
/// are left out.
pub fn list_files(
    models_dir: &Path,
    comfyui: Option<&Path>,
    loaded: &ComponentFiles,
) -> Vec<FileListing> {
    let mut dirs: Vec<(PathBuf, &'static str)> = vec![(models_dir.to_path_buf(), "models_dir")];
    dirs.extend(
        COMFYUI_FOLDERS
            .iter()
            .map(|(f, _)| (models_dir.join(f), "models_dir")),
    );
    if let Some(c) = comfyui {
        let models = comfyui_models(c);
        dirs.extend(
            COMFYUI_FOLDERS
                .iter()
                .map(|(f, _)| (models.join(f), "comfyui")),
        );
    }
    let in_use = |p: &Path| {
        [&loaded.transformer, &loaded.text_encoder, &loaded.vae]
            .iter()
            .filter_map(|f| f.as_ref())
            .any(|f| same_file(f, p))
    };
    let mut out: Vec<FileListing> = Vec::new();
    for (dir, source) in dirs {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut files: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && p.extension().is_some_and(|x| {
                        let x = x.to_string_lossy().to_ascii_lowercase();
                        x == "safetensors" || x == "gguf" || x == "sft"
                    })
            })
            .collect();
        files.sort();
        for p in files {
            if out.iter().any(|f| same_file(&f.path, &p)) {
                continue;
            }
            let Ok(summary) = cached_summary(&p) else {
                continue;
            };
            let Some(role) = summary.role else {
                continue;
            };
            out.push(FileListing {
                name: p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                source,
                role,
                family: FamilyKind::ZImage.to_string(),
                loaded: in_use(&p),
                flag: role.flag(),
                summary,
                path: p,
            });
        }
    }
    out
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// Header summaries by path, size and modification time: listing a ComfyUI folder of large
/// files reads each header once.
fn cached_summary(p: &Path) -> Result<FileSummary, ModelError> {
    type Key = (PathBuf, u64, Option<std::time::SystemTime>);
    static CACHE: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<Key, FileSummary>>,
    > = std::sync::OnceLock::new();
    let meta = std::fs::metadata(p).map_err(|e| ModelError::Io {
        path: p.to_path_buf(),
        source: e,
    })?;
    let key = (p.to_path_buf(), meta.len(), meta.modified().ok());
    let cache = CACHE.get_or_init(Default::default);
    if let Some(s) = cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
        return Ok(s);
    }
    let s = weights::inspect(p)?;
    if let Ok(mut c) = cache.lock() {
        c.insert(key, s.clone());
    }
    Ok(s)
}

/// Every way of holding `resolved`'s model that is on disk: the model itself and, for a catalog
/// model with quantized variants, each variant pulled (`zturbo pull NAME --variant V`). The
/// engine lets the planner choose among them ([`crate::memory::planner::choose_weights`]).
pub fn weight_candidates(resolved: &Resolved, models_dir: &Path) -> Vec<Resolved> {
    let mut out = vec![resolved.clone()];
    if !resolved.files.is_empty() || resolved.demo {
        return out;
    }
    let Some(entry) = entry(&resolved.name) else {
        return out;
    };
    let Ok(configs) = configs_of(entry, models_dir) else {
        return out;
    };
    for (v, files) in super::variants::local(entry.name) {
        out.push(Resolved {
            name: format!("{} ({})", entry.name, v.name),
            dir: configs.dir.clone(),
            demo: false,
            files,
            variant: Some(v.name.to_string()),
        });
    }
    out
}

/// A catalog model or one of its pulled variants, by name (`--variant`; `bf16` is the release).
pub fn resolve_variant(
    name: &str,
    variant: &str,
    models_dir: &Path,
) -> Result<Resolved, ModelError> {
    if variant.eq_ignore_ascii_case("bf16") {
        return resolve(name, models_dir);
    }
    let entry = entry(name).ok_or_else(|| {
        ModelError::Invalid(format!(
            "--variant applies to catalog models; `{name}` is not one"
        ))
    })?;
    let v = super::variants::find(entry.name, variant)?;
    let files = super::variants::local(entry.name)
        .into_iter()
        .find(|(l, _)| l.name == v.name)
        .map(|(_, f)| f)
        .ok_or_else(|| {
            ModelError::NotFound(
                format!("{} {}", entry.name, v.name),
                format!(
                    "not downloaded yet: run `zturbo pull {} --variant {}`",
                    entry.name, v.name
                ),
            )
        })?;
    let configs = configs_of(entry, models_dir)?;
    Ok(Resolved {
        name: format!("{} ({})", entry.name, v.name),
        dir: configs.dir,
        demo: false,
        files,
        variant: Some(v.name.to_string()),
    })
}

/// The model `serve` starts with when none is given: Z-Image-Turbo if found locally (the
/// release or a pulled variant), else demo.
pub fn default_model(models_dir: &Path) -> Resolved {
    let found = resolve("z-image-turbo", models_dir).ok().or_else(|| {
        super::variants::of("z-image-turbo")
            .iter()
            .find_map(|v| resolve_variant("z-image-turbo", v.name, models_dir).ok())
    });
    found.unwrap_or_else(|| Resolved {
        name: DEMO.into(),
        dir: demo(),
        demo: true,
        files: ComponentFiles::default(),
        variant: None,
    })
}

/// Where a listed model stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelState {
    Loaded,
    OnDisk,
    NotDownloaded,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Listing {
    pub name: String,
    pub family: String,
    pub repo: Option<String>,
    pub state: ModelState,
    pub size_bytes: Option<u64>,
    pub demo: bool,
    pub path: Option<PathBuf>,
    /// Known before loading for the demo and catalog models; `None` for other local folders.
    pub defaults: Option<Defaults>,
    pub description: String,
    /// The bf16 release and the quantized variants `zturbo pull NAME --variant V` fetches, with
    /// their sizes and the smallest GPU the planner fits each on (catalog models only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub variants: Vec<super::variants::VariantListing>,
}

/// Every model known: the demo, the catalog (found or not), and diffusers folders in `models_dir`.
pub fn list(models_dir: &Path, loaded: &str) -> Vec<Listing> {
    let state = |name: &str, found: bool| {
        if name == loaded {
            ModelState::Loaded
        } else if found {
            ModelState::OnDisk
        } else {
            ModelState::NotDownloaded
        }
    };
    let mut out = vec![Listing {
        name: DEMO.into(),
        family: "z-image".into(),
        repo: None,
        state: state(DEMO, true),
        size_bytes: Some(DEMO_FILES.iter().map(|(_, b)| b.len() as u64).sum()),
        demo: true,
        path: None,
        defaults: Some(DEMO_DEFAULTS),
        description:
            "Tiny random-weight Z-Image built into the binary: every stage runs, images are noise."
                .into(),
        variants: Vec::new(),
    }];
    for e in CATALOG {
        let found = resolve(e.name, models_dir).ok();
        let variants = super::variants::listings(e.name);
        out.push(Listing {
            name: e.name.into(),
            family: e.family.to_string(),
            repo: Some(e.repo.into()),
            state: state(e.name, found.is_some()),
            size_bytes: Some(
                found
                    .as_ref()
                    .and_then(|r| r.dir.path().map(folder_bytes))
                    .unwrap_or(e.download_bytes),
            ),
            demo: false,
            path: found.and_then(|r| r.dir.path().map(Path::to_path_buf)),
            defaults: Some(e.defaults),
            description: e.description.into(),
            variants,
        });
    }
    if let Ok(rd) = std::fs::read_dir(models_dir) {
        let mut local: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("model_index.json").is_file())
            .collect();
        local.sort();
        for p in local {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if out.iter().any(|l| l.name == name) {
                continue;
            }
            let family = ModelDir::open(&p)
                .ok()
                .and_then(|d| super::pipeline_class(&d).ok())
                .map(|c| {
                    super::family_of_class(&c)
                        .map_or("unknown", FamilyKind::as_str)
                        .to_string()
                })
                .unwrap_or_else(|| "unknown".into());
            out.push(Listing {
                state: state(&name, true),
                size_bytes: Some(folder_bytes(&p)),
                name,
                family,
                repo: None,
                demo: false,
                path: Some(p),
                defaults: None,
                description: "Local diffusers folder".into(),
                variants: Vec::new(),
            });
        }
    }
    out
}

fn folder_bytes(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let path = e.path();
            // Hub snapshots are symlinks into `blobs/`: follow them.
            match std::fs::metadata(&path) {
                Ok(m) if m.is_dir() => total += folder_bytes(&path),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_opens_and_names_itself() {
        let r = resolve("demo", Path::new("/nonexistent")).unwrap();
        assert!(r.demo);
        assert!(r.dir.exists("model_index.json"));
        assert!(r.dir.describe().contains("embedded"));
    }

    #[test]
    fn unknown_model_error_lists_known_ones() {
        let e = resolve("no-such-model", Path::new("/nonexistent"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("z-image-turbo") && e.contains("sd-turbo"), "{e}");
    }

    #[test]
    fn catalog_defaults_are_the_families_own() {
        let sd = entry("stabilityai/sd-turbo").unwrap();
        assert_eq!(sd.family, "sd-turbo");
        assert_eq!((sd.defaults.width, sd.defaults.steps), (512, 1));
        assert_eq!(sd.defaults.cfg, 1.0);
        assert_eq!(entry("sdxl-turbo").unwrap().defaults.steps, 1);
        assert_eq!(entry("z-image-turbo").unwrap().defaults.steps, 8);
    }

    #[test]
    fn catalog_model_not_downloaded_says_how_to_pull() {
        let e = resolve("sd-turbo", Path::new("/nonexistent"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("zturbo pull sd-turbo"), "{e}");
    }
}
