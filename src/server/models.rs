//! What is loaded and what could be: `/api/health`, `/api/info` (everything the form needs to
//! set itself up) and `/api/models` (catalog, local folders and the demo, with their state).

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::AppState;
use crate::families::catalog::{self, ModelState};
use crate::memory::planner::MemoryMode;
use crate::request::{
    MAX_CFG, MAX_PROMPT_CHARS, MAX_SIDE, MAX_STEPS, MIN_CFG, MIN_SIDE, MIN_STEPS,
};

/// An f32 as the f64 with the same shortest decimal form, so 1.8f32 is sent as 1.8 rather than
/// 1.7999999523162842 (which the form would show and compare against).
pub fn json_f32(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

pub async fn health(State(s): State<AppState>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "model": s.info.model,
        "device": s.info.device,
    }))
}

/// Shown with the demo model: what it is and how to get real weights.
pub fn demo_help() -> String {
    let size = catalog::entry("z-image-turbo")
        .map(|e| {
            format!(
                " (about {:.1} GB, needs a GPU)",
                e.download_bytes as f64 / 1e9
            )
        })
        .unwrap_or_default();
    format!(
        "No Z-Image-Turbo weights were found, so the server runs the built-in demo model: its \
         weights are random and its images are noise. To get real images, download \
         Z-Image-Turbo with `zturbo pull z-image-turbo`{size} and restart with `zturbo serve`, or \
         start with `zturbo serve --model /path/to/a/diffusers/folder`."
    )
}

pub async fn info(State(s): State<AppState>) -> Json<Value> {
    let i = &s.info;
    let d = i.family.defaults;
    let kind = i.device.split(':').next().unwrap_or("cpu");
    let modes: Vec<&str> = MemoryMode::ALL.iter().map(|m| m.as_str()).collect();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "model": {
            "name": i.model,
            "family": i.family.family,
            "demo": i.demo,
            "description": i.description,
            "defaults": { "width": d.width, "height": d.height, "steps": d.steps, "cfg": json_f32(d.cfg) },
            "limits": {
                "width": [MIN_SIDE, MAX_SIDE],
                "height": [MIN_SIDE, MAX_SIDE],
                "steps": [MIN_STEPS, MAX_STEPS],
                "cfg": [json_f32(MIN_CFG), json_f32(MAX_CFG)],
                "batch": [1, i.limits.max_batch],
                "prompt_chars": MAX_PROMPT_CHARS,
            },
            "safe_cfg_max": json_f32(i.family.safe_cfg_max),
            "size_multiple": i.family.size_multiple,
        },
        "device": {
            "kind": kind,
            "name": i.device_name,
            "total_bytes": i.device_total_bytes,
        },
        "max_batch": i.limits.max_batch,
        "queue_size": i.queue_size,
        "memory_modes": modes,
        "demo_help": if i.demo { Some(demo_help()) } else { None },
    }))
}

pub async fn list(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    let info = s.info.clone();
    // Looks at the disk (models folder, Hugging Face cache): not on the runtime's threads.
    let models = tokio::task::spawn_blocking(move || {
        let mut models = catalog::list(&info.models_dir, &info.model);
        if !models.iter().any(|m| m.state == ModelState::Loaded) {
            // Loaded from a folder outside the models folder: still list what runs.
            models.push(catalog::Listing {
                name: info.model.clone(),
                family: info.family.family.to_string(),
                repo: None,
                state: ModelState::Loaded,
                size_bytes: None,
                demo: info.demo,
                path: None,
                defaults: Some(info.family.defaults),
                description: info.description.clone(),
            });
        }
        models
    })
    .await
    .map_err(|e| ApiError::internal(format!("listing models failed: {e}")))?;
    Ok(Json(json!({ "models": models })))
}
