//! From load-time settings to a ready engine: find the model (without loading anything), open the
//! device, pick the precision policy, open the family, wrap it in an [`Engine`].

use std::sync::Arc;

use super::guard::FaultPlan;
use super::{Engine, EngineConfig};
use crate::families::catalog::{self, Resolved};
use crate::families::{self, ModelError, PrecisionPolicy};
use crate::memory::probe::{self, MemoryProbe};
use crate::settings::{device_label, ModelSettings};

/// Why no engine could be built.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("--model is required")]
    NoModel,
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The device could not be opened (the message says which and why).
    #[error("{0}")]
    Device(String),
    /// `ZTURBO_FAULT` could not be read.
    #[error("{0}")]
    Faults(String),
}

/// Finds the model (without loading anything); with `default_to_demo` and no `--model`, the
/// catalog's default (z-image-turbo when it is on disk, else the built-in demo).
pub fn resolve(settings: &ModelSettings, default_to_demo: bool) -> Result<Resolved, LoadError> {
    Ok(match &settings.model {
        Some(m) => catalog::resolve(m, &settings.models_dir)?,
        None if default_to_demo => catalog::default_model(&settings.models_dir),
        None => return Err(LoadError::NoModel),
    })
}

/// Opens the device and builds the engine for a resolved model (the demo with its own defaults).
pub fn open(settings: &ModelSettings, resolved: Resolved) -> Result<Engine, LoadError> {
    let device = settings.device.open().map_err(LoadError::Device)?;
    let policy = PrecisionPolicy::resolve(settings.precision, &device);
    tracing::info!(
        model = %resolved.name,
        source = %resolved.dir.describe(),
        device = %device_label(&device),
        precision = %policy.describe(),
        "loading model"
    );
    let family = families::open(resolved.dir.clone(), &device, policy)?;
    let probe: Arc<dyn MemoryProbe> = probe::for_device(&device);
    let config = EngineConfig {
        memory_budget: settings.memory_budget,
        faults: FaultPlan::from_env().map_err(LoadError::Faults)?,
    };
    let engine = Engine::new(family, resolved.name, probe, config);
    Ok(if resolved.demo {
        engine.with_defaults(catalog::DEMO_DEFAULTS)
    } else {
        engine
    })
}
