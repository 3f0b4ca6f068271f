//! Known models (hub repository, size, family) and how a `--model` value becomes a folder: the
//! embedded demo, an explicit path, `models/<name>/`, the Hugging Face cache, or — only through
//! `zturbo pull` — a download.

use std::path::{Path, PathBuf};

use super::weights::{self, ModelDir};
use super::{sd_turbo, z_image, Defaults, FamilyKind, ModelError};

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

/// A resolved `--model`: a display name and its folder.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub name: String,
    pub dir: ModelDir,
    pub demo: bool,
}

/// Finds a model without touching the network. Order: `demo`; an existing folder path;
/// `<models_dir>/<name>`; the Hugging Face cache (catalog name or `owner/repo`).
pub fn resolve(spec: &str, models_dir: &Path) -> Result<Resolved, ModelError> {
    let spec = spec.trim();
    if spec.eq_ignore_ascii_case(DEMO) {
        return Ok(Resolved {
            name: DEMO.into(),
            dir: demo(),
            demo: true,
        });
    }
    let as_path = Path::new(spec);
    if as_path.is_dir() {
        let name = as_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| spec.to_string());
        return Ok(Resolved {
            name,
            dir: ModelDir::open(as_path)?,
            demo: false,
        });
    }
    let local = models_dir.join(spec);
    if local.is_dir() {
        return Ok(Resolved {
            name: spec.to_string(),
            dir: ModelDir::open(local)?,
            demo: false,
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

/// The model `serve` starts with when none is given: Z-Image-Turbo if found locally, else demo.
pub fn default_model(models_dir: &Path) -> Resolved {
    resolve("z-image-turbo", models_dir).unwrap_or_else(|_| Resolved {
        name: DEMO.into(),
        dir: demo(),
        demo: true,
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
    }];
    for e in CATALOG {
        let found = resolve(e.name, models_dir).ok();
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
