//! From load-time settings to a ready engine: find the model (without loading anything), take
//! single component files (`--transformer`, `--text-encoder`, `--vae`) or a pulled variant into
//! account, let the planner choose among the weights on disk, open the device, pick the precision
//! policy, open the family, wrap it in an [`Engine`].

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Device;

use super::guard::FaultPlan;
use super::{Engine, EngineConfig};
use crate::families::catalog::{self, Resolved};
use crate::families::weights::Role;
use crate::families::{self, ComponentFiles, ModelError, PrecisionPolicy};
use crate::memory::planner::{self, MemoryMode, WeightOption};
use crate::memory::probe::{self, MemoryProbe};
use crate::settings::{device_label, ModelSettings};

/// Why no engine could be built.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("--model is required (or --transformer FILE)")]
    NoModel,
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A component file flag could not be resolved (`flag` names it).
    #[error("{flag}: {source}")]
    ComponentFile {
        flag: &'static str,
        source: ModelError,
    },
    /// `--variant` together with component files.
    #[error("--variant chooses a catalog model's weights; it does not combine with --transformer, --text-encoder or --vae")]
    VariantWithFiles,
    /// None of the candidate weights could be opened (each reason was logged).
    #[error("none of the model's weights could be opened")]
    NoWeights,
    /// The device could not be opened (the message says which and why).
    #[error("{0}")]
    Device(String),
    /// `--precision` asks for what this device cannot run (the message says why).
    #[error("{0}")]
    Precision(String),
    /// `ZTURBO_FAULT` could not be read.
    #[error("{0}")]
    Faults(String),
}

/// `--transformer`, `--text-encoder`, `--vae` as files on disk (bare names are looked for in the
/// models folder and the ComfyUI tree).
pub fn component_files(settings: &ModelSettings) -> Result<ComponentFiles, LoadError> {
    let find = |spec: &Option<PathBuf>, role: Role| -> Result<Option<PathBuf>, LoadError> {
        spec.as_ref()
            .map(|p| {
                catalog::find_component_file(
                    p,
                    role,
                    &settings.models_dir,
                    settings.comfyui_dir.as_deref(),
                )
                .map_err(|source| LoadError::ComponentFile {
                    flag: role.flag(),
                    source,
                })
            })
            .transpose()
    };
    Ok(ComponentFiles {
        transformer: find(&settings.transformer, Role::Transformer)?,
        text_encoder: find(&settings.text_encoder, Role::TextEncoder)?,
        vae: find(&settings.vae, Role::Vae)?,
    })
}

/// Finds the model (without loading anything); with `default_to_demo` and no `--model`, the
/// catalog's default (z-image-turbo when it is on disk, else the built-in demo). Component files
/// alone take the Z-Image-Turbo configs and tokenizer.
pub fn resolve(settings: &ModelSettings, default_to_demo: bool) -> Result<Resolved, LoadError> {
    let files = component_files(settings)?;
    if let Some(v) = &settings.variant {
        if !files.is_empty() {
            return Err(LoadError::VariantWithFiles);
        }
        let name = settings.model.as_deref().unwrap_or("z-image-turbo");
        return Ok(catalog::resolve_variant(name, v, &settings.models_dir)?);
    }
    Ok(match &settings.model {
        Some(m) => catalog::resolve_with(m, &settings.models_dir, &files)?,
        None if !files.is_empty() => {
            catalog::resolve_with("z-image-turbo", &settings.models_dir, &files)?
        }
        None if default_to_demo => catalog::default_model(&settings.models_dir),
        None => return Err(LoadError::NoModel),
    })
}

/// Opens the device and builds the engine for a resolved model (the demo with its own defaults).
pub fn open(settings: &ModelSettings, resolved: Resolved) -> Result<Engine, LoadError> {
    Ok(open_chosen(settings, resolved)?.0)
}

/// [`open`], also returning the weights it settled on: when the model has pulled variants (and
/// no `--variant` or component file pins the weights), the planner chooses among them for the
/// model's default job; the choice and its reasons are logged.
pub fn open_chosen(
    settings: &ModelSettings,
    resolved: Resolved,
) -> Result<(Engine, Resolved), LoadError> {
    let device = settings.device.open().map_err(LoadError::Device)?;
    PrecisionPolicy::check(settings.precision, &device).map_err(LoadError::Precision)?;
    let policy = PrecisionPolicy::resolve(settings.precision, &device);
    let candidates = if settings.variant.is_some() {
        vec![resolved]
    } else {
        catalog::weight_candidates(&resolved, &settings.models_dir)
    };
    let resolved = if candidates.len() > 1 {
        choose_weights(settings, candidates, &device, policy)?
    } else {
        candidates.into_iter().next().ok_or(LoadError::NoWeights)?
    };
    let shown = |f: &Option<PathBuf>| {
        f.as_ref().map_or_else(
            || "from the folder".to_string(),
            |p| p.display().to_string(),
        )
    };
    tracing::info!(
        model = %resolved.name,
        source = %resolved.dir.describe(),
        transformer = %shown(&resolved.files.transformer),
        text_encoder = %shown(&resolved.files.text_encoder),
        vae = %shown(&resolved.files.vae),
        device = %device_label(&device),
        precision = %policy.describe(),
        "loading model"
    );
    let family = families::open_with(resolved.dir.clone(), &resolved.files, &device, policy)?;
    let probe: Arc<dyn MemoryProbe> = probe::for_device(&device);
    let config = EngineConfig {
        memory_budget: settings.memory_budget,
        faults: FaultPlan::from_env().map_err(LoadError::Faults)?,
    };
    let engine = Engine::new(family, resolved.name.clone(), probe, config);
    let engine = if resolved.demo {
        engine.with_defaults(catalog::DEMO_DEFAULTS)
    } else {
        engine
    };
    Ok((engine, resolved))
}

/// The planner's pick among ways of holding the same model (headers only: nothing is loaded).
fn choose_weights(
    settings: &ModelSettings,
    candidates: Vec<Resolved>,
    device: &Device,
    policy: PrecisionPolicy,
) -> Result<Resolved, LoadError> {
    let mut options = Vec::with_capacity(candidates.len());
    let mut kept = Vec::with_capacity(candidates.len());
    for c in candidates {
        let family = match families::open_with(c.dir.clone(), &c.files, device, policy) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(weights = %c.name, "skipped: {e}");
                continue;
            }
        };
        let engine = Engine::new(
            family,
            c.name.clone(),
            probe::for_device(device),
            EngineConfig {
                memory_budget: settings.memory_budget,
                faults: FaultPlan::default(),
            },
        );
        let d = engine.profile().defaults;
        options.push(WeightOption {
            label: c.variant.clone().unwrap_or_else(|| "bf16".into()),
            quantized: c.variant.is_some(),
            input: engine.plan_input(d.width, d.height, 1, d.cfg > 1.0, MemoryMode::Auto),
        });
        kept.push(c);
    }
    let choice = planner::choose_weights(&options).ok_or(LoadError::NoWeights)?;
    for r in &choice.reasons {
        tracing::info!("{r}");
    }
    Ok(kept.swap_remove(choice.index))
}
