//! ControlNet over HTTP: the A1111 ControlNet extension's request shape
//! (`alwayson_scripts.controlnet.args`, as webuiapi's `ControlNetUnit` and Krita AI send it), its
//! `GET /controlnet/model_list`, `GET /controlnet/module_list` and `POST /controlnet/detect` (the
//! preprocessor's map — also the UI's preview).

use axum::extract::State;
use axum::Json;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{ApiError, ApiJson};
use super::AppState;
use crate::control::{Preprocess, CANNY_HIGH, CANNY_LOW};
use crate::request::{ControlRequest, FieldError};

const ARGS: &str = "alwayson_scripts.controlnet.args";

/// A number A1111 clients send as an int or a float.
fn num(unit: &Value, key: &str) -> Result<Option<f64>, FieldError> {
    match unit.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| FieldError::new(&format!("{ARGS}.{key}"), "must be a number")),
    }
}

fn text<'a>(unit: &'a Value, key: &str) -> Result<Option<&'a str>, FieldError> {
    match unit.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(FieldError::new(
            &format!("{ARGS}.{key}"),
            "must be a string",
        )),
    }
}

/// The one enabled unit of `alwayson_scripts.controlnet.args` as our `control` (units that are
/// disabled, or name no model or image, are skipped; two enabled units are refused).
pub fn from_alwayson(scripts: Option<&Value>) -> Result<Option<ControlRequest>, FieldError> {
    let Some(args) = scripts
        .and_then(|s| s.get("controlnet"))
        .and_then(|c| c.get("args"))
    else {
        return Ok(None);
    };
    let Some(units) = args.as_array() else {
        return Err(FieldError::new(ARGS, "must be a list of ControlNet units"));
    };
    let mut found = None;
    for unit in units {
        if !unit.is_object() {
            return Err(FieldError::new(ARGS, "each unit must be an object"));
        }
        if unit.get("enabled").and_then(Value::as_bool) == Some(false) {
            continue;
        }
        let model = text(unit, "model")?.filter(|m| !m.is_empty() && *m != "None");
        // `image` (newer clients; a string, or `{image, mask}`) or `input_image` (older).
        let image = match unit.get("image").or_else(|| unit.get("input_image")) {
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(Value::Object(o)) => o.get("image").and_then(Value::as_str).map(String::from),
            _ => None,
        };
        let (Some(model), Some(image)) = (model, image) else {
            continue;
        };
        if found.is_some() {
            return Err(FieldError::new(
                ARGS,
                "more than one enabled ControlNet unit: one per job here",
            ));
        }
        let module = text(unit, "module")?.unwrap_or("none");
        let preprocess = Preprocess::parse(module).ok_or_else(|| {
            FieldError::new(
                &format!("{ARGS}.module"),
                format!(
                    "`{module}` is not a preprocessor here (available: none, canny); send depth \
                     or pose maps made elsewhere with module `none`"
                ),
            )
        })?;
        let threshold = |key: &str| -> Result<Option<u32>, FieldError> {
            match num(unit, key)? {
                Some(v) if v.is_finite() && (0.0..=1020.0).contains(&v) => Ok(Some(v as u32)),
                Some(v) => Err(FieldError::new(
                    &format!("{ARGS}.{key}"),
                    format!("must be between 0 and 1020 (got {v})"),
                )),
                None => Ok(None),
            }
        };
        let canny = preprocess == Preprocess::Canny;
        found = Some(ControlRequest {
            model: Some(model.to_string()),
            image,
            scale: num(unit, "weight")?,
            preprocess: Some(preprocess.as_str().to_string()),
            start: num(unit, "guidance_start")?,
            end: num(unit, "guidance_end")?,
            low_threshold: if canny {
                threshold("threshold_a")?
            } else {
                None
            },
            high_threshold: if canny {
                threshold("threshold_b")?
            } else {
                None
            },
        });
    }
    // Our validation names `control.*`; A1111 clients know the unit's names.
    Ok(found)
}

/// Our validation's `control.*` field names as the A1111 unit's.
pub fn a1111_field(e: FieldError) -> FieldError {
    let field = match e.field.as_str() {
        "control.model" => format!("{ARGS}.model"),
        "control.image" => format!("{ARGS}.image"),
        "control.scale" => format!("{ARGS}.weight"),
        "control.start" => format!("{ARGS}.guidance_start"),
        "control.end" => format!("{ARGS}.guidance_end"),
        "control.preprocess" => format!("{ARGS}.module"),
        "control.low_threshold" => format!("{ARGS}.threshold_a"),
        "control.high_threshold" => format!("{ARGS}.threshold_b"),
        _ => return e,
    };
    FieldError { field, ..e }
}

/// `GET /controlnet/model_list`: the ControlNets in `<models-dir>/controlnet/`.
pub async fn model_list(State(s): State<AppState>) -> Json<Value> {
    let dir = s.info().control_dir();
    let names = tokio::task::spawn_blocking(move || dir.names())
        .await
        .unwrap_or_default();
    Json(json!({ "model_list": names }))
}

/// `GET /controlnet/module_list`: the preprocessors built in.
pub async fn module_list() -> Json<Value> {
    Json(json!({
        "module_list": Preprocess::ALL.map(|p| p.as_str()),
        "module_detail": {
            "none": { "model_free": false, "sliders": [] },
            "canny": {
                "model_free": false,
                "sliders": [
                    { "name": "Low Threshold", "value": CANNY_LOW, "min": 1, "max": 255 },
                    { "name": "High Threshold", "value": CANNY_HIGH, "min": 1, "max": 255 },
                ],
            },
        },
    }))
}

/// `POST /controlnet/detect` (the A1111 extension's shape; the UI's preview too).
#[derive(Debug, Deserialize)]
pub struct DetectRequest {
    #[serde(default)]
    controlnet_module: Option<String>,
    /// Older clients (webuiapi) send `controlnet_images`.
    #[serde(default, alias = "controlnet_images")]
    controlnet_input_images: Vec<String>,
    #[serde(default)]
    controlnet_threshold_a: Option<f64>,
    #[serde(default)]
    controlnet_threshold_b: Option<f64>,
}

/// Most images one detect call may preprocess.
const MAX_DETECT_IMAGES: usize = 4;

pub async fn detect(ApiJson(req): ApiJson<DetectRequest>) -> Result<Json<Value>, ApiError> {
    let module = req.controlnet_module.unwrap_or_else(|| "none".into());
    let p = Preprocess::parse(&module).ok_or_else(|| {
        FieldError::new(
            "controlnet_module",
            format!("`{module}` is not a preprocessor here (available: none, canny)"),
        )
    })?;
    if req.controlnet_input_images.is_empty()
        || req.controlnet_input_images.len() > MAX_DETECT_IMAGES
    {
        return Err(FieldError::new(
            "controlnet_input_images",
            format!(
                "give 1 to {MAX_DETECT_IMAGES} images (got {})",
                req.controlnet_input_images.len()
            ),
        )
        .into());
    }
    let threshold = |field: &str, v: Option<f64>, d: u32| -> Result<u32, FieldError> {
        match v {
            None => Ok(d),
            Some(v) if v.is_finite() && (0.0..=1020.0).contains(&v) => Ok(v as u32),
            Some(v) => Err(FieldError::new(
                field,
                format!("must be between 0 and 1020 (got {v})"),
            )),
        }
    };
    let low = threshold(
        "controlnet_threshold_a",
        req.controlnet_threshold_a,
        CANNY_LOW,
    )?;
    let high = threshold(
        "controlnet_threshold_b",
        req.controlnet_threshold_b,
        CANNY_HIGH,
    )?;
    let images = req.controlnet_input_images;
    let out = tokio::task::spawn_blocking(move || {
        images
            .iter()
            .enumerate()
            .map(|(i, b64)| {
                let field = format!("controlnet_input_images.{i}");
                let bytes = crate::inputs::decode_base64(b64)
                    .map_err(|e| FieldError::new(&field, e.to_string()))?;
                let img = crate::inputs::decode_image(&bytes)
                    .map_err(|e| FieldError::new(&field, e.to_string()))?;
                let map = crate::control::preprocess(
                    &crate::inputs::to_rgb(&img),
                    p,
                    low.min(high),
                    high.max(low),
                );
                let png = crate::inputs::InputImage::rgb(map)
                    .png()
                    .map_err(|e| FieldError::new(&field, e.to_string()))?;
                Ok(base64::engine::general_purpose::STANDARD.encode(png))
            })
            .collect::<Result<Vec<_>, FieldError>>()
    })
    .await
    .map_err(|e| ApiError::internal(format!("preprocessing: {e}")))??;
    Ok(Json(json!({ "images": out, "info": "Success" })))
}
