//! The AUTOMATIC1111 web UI's API, enough for its common clients (the `webuiapi` package, Open WebUI,
//! editor plug-ins): `POST /sdapi/v1/txt2img` (synchronous; `n_iter` jobs of `batch_size` images
//! through the same queue as everything else), `GET /sdapi/v1/progress`, `POST /sdapi/v1/interrupt`,
//! `GET /sdapi/v1/sd-models`, `GET|POST /sdapi/v1/options`, and the lists clients probe
//! (`samplers`, `schedulers`, `scripts`).
//!
//! A1111 clients send many fields we have no use for (`sampler_name`, `scheduler`,
//! `override_settings`, `alwayson_scripts` other than `controlnet`, hires-fix settings, …): they
//! are ignored (`alwayson_scripts.controlnet.args` is read by `controlnet.rs`). Known fields
//! with the wrong type, and our own validation errors, are 422 in FastAPI's shape
//! (`{"detail": [{"loc": ["body", field], "msg", "type"}]}`); other errors are `{"detail": msg}`.
//! Prompts reach the model as given (no enhancement, no default negative prompt): A1111 users
//! write their own. `seed` -1 (any negative) picks a random seed; image `i` of the request has
//! seed + i, as in A1111.

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::error::{parse_json, ApiError, JsonBody};
use super::jobs::{failure_status, read_images, submit_valid, sync_deadline, wait_job};
use super::models::json_f32;
use super::AppState;
use crate::engine::output::png_text_chunks;
use crate::engine::ResolvedParams;
use crate::queue::{JobSnapshot, JobState};
use crate::request::{FieldError, GenerationRequest, ValidRequest};

/// Most `n_iter` one request may ask for (each iteration is one queued job).
pub const MAX_N_ITER: i64 = 16;

/// An error in one of FastAPI's shapes.
#[derive(Debug)]
pub struct A1111Error {
    status: StatusCode,
    body: Value,
    retry_after_s: Option<u64>,
}

/// `{"detail": message}` (FastAPI's `HTTPException`).
pub fn detail(status: StatusCode, message: impl Into<String>) -> Response {
    A1111Error {
        status,
        body: json!({ "detail": message.into() }),
        retry_after_s: None,
    }
    .into_response()
}

/// 422 `{"detail": [{"loc": ["body", field], "msg", "type"}]}`.
fn validation(field: Option<&str>, msg: impl Into<String>, kind: &str) -> A1111Error {
    let loc = match field {
        Some(f) => json!(["body", f]),
        None => json!(["body"]),
    };
    A1111Error {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        body: json!({ "detail": [{ "loc": loc, "msg": msg.into(), "type": kind }] }),
        retry_after_s: None,
    }
}

/// Our field names → A1111's.
fn a1111_field(field: &str) -> &str {
    match field {
        "cfg" => "cfg_scale",
        "batch" => "batch_size",
        "image" => "init_images",
        "strength" => "denoising_strength",
        "inpaint_fill" => "inpainting_fill",
        other => other,
    }
}

/// pydantic's error type for a wrongly typed field.
fn type_error(field: &str) -> &'static str {
    match field {
        "prompt" | "negative_prompt" => "type_error.str",
        "cfg_scale" => "type_error.float",
        // A checkpoint that is not on this machine: a value, not a type, is wrong.
        "sd_model_checkpoint" => "value_error",
        _ => "type_error.integer",
    }
}

impl From<ApiError> for A1111Error {
    fn from(e: ApiError) -> Self {
        let field = e.body.error.field.as_deref().map(a1111_field);
        match e.status {
            StatusCode::BAD_REQUEST => {
                validation(None, e.body.error.message, "value_error.jsondecode")
            }
            StatusCode::UNPROCESSABLE_ENTITY => {
                let kind = field.map(type_error).unwrap_or("value_error");
                validation(field, e.body.error.message, kind)
            }
            status => A1111Error {
                status,
                body: json!({ "detail": e.body.error.message }),
                retry_after_s: e.retry_after_s,
            },
        }
    }
}

impl From<FieldError> for A1111Error {
    fn from(e: FieldError) -> Self {
        let field = a1111_field(&e.field);
        validation(
            Some(field),
            format!("{field}: {}", e.message),
            "value_error",
        )
    }
}

impl IntoResponse for A1111Error {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, "{}", self.body);
        } else {
            tracing::debug!(status = %self.status, "{}", self.body);
        }
        let mut res = (self.status, Json(self.body)).into_response();
        if let Some(s) = self.retry_after_s {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                res.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        res
    }
}

/// A failed run, as A1111's exception handler reports it (`status`: 500, or 507/503 when the
/// outputs folder was to blame).
fn run_failed(status: StatusCode, message: String) -> A1111Error {
    A1111Error {
        status,
        body: json!({ "error": "RuntimeError", "detail": "", "body": "", "errors": message }),
        retry_after_s: None,
    }
}

/// An integer as pydantic accepts it: a JSON integer, or a float with no fractional part.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Int(pub i64);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Int;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an integer")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Int, E> {
                Ok(Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Int, E> {
                i64::try_from(v)
                    .map(Int)
                    .map_err(|_| E::custom(format!("{v} is too large")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Int, E> {
                if v.fract() == 0.0 && v.abs() < 9.0e15 {
                    Ok(Int(v as i64))
                } else {
                    Err(E::invalid_type(de::Unexpected::Float(v), &self))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// The fields of A1111's `StableDiffusionTxt2ImgProcessingAPI` that mean something here.
#[derive(Debug, Default, Deserialize)]
pub struct Txt2ImgRequest {
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub negative_prompt: Option<String>,
    #[serde(default)]
    pub width: Option<Int>,
    #[serde(default)]
    pub height: Option<Int>,
    #[serde(default)]
    pub steps: Option<Int>,
    #[serde(default)]
    pub cfg_scale: Option<f64>,
    #[serde(default)]
    pub seed: Option<Int>,
    #[serde(default)]
    pub batch_size: Option<Int>,
    #[serde(default)]
    pub n_iter: Option<Int>,
    /// Only `controlnet.args` is read (the ControlNet extension's units).
    #[serde(default)]
    pub alwayson_scripts: Option<Value>,
}

fn to_u32(field: &str, v: Option<Int>) -> Result<Option<u32>, FieldError> {
    match v {
        None => Ok(None),
        Some(Int(n)) => u32::try_from(n)
            .map(Some)
            .map_err(|_| FieldError::new(field, format!("must be a positive number (got {n})"))),
    }
}

impl Txt2ImgRequest {
    /// The request as our one request type, and the number of iterations.
    fn validate(&self, s: &AppState) -> Result<(ValidRequest, u32), FieldError> {
        let n_iter = self.n_iter.map(|i| i.0).unwrap_or(1);
        if !(1..=MAX_N_ITER).contains(&n_iter) {
            return Err(FieldError::new(
                "n_iter",
                format!("must be between 1 and {MAX_N_ITER} (got {n_iter})"),
            ));
        }
        let valid = GenerationRequest {
            prompt: self.prompt.clone().unwrap_or_default(),
            negative_prompt: self.negative_prompt.clone().filter(|n| !n.is_empty()),
            width: to_u32("width", self.width)?,
            height: to_u32("height", self.height)?,
            steps: to_u32("steps", self.steps)?,
            cfg: self.cfg_scale.map(|c| c as f32),
            seed: self.seed.and_then(|Int(v)| u64::try_from(v).ok()),
            batch: to_u32("batch_size", self.batch_size)?,
            enhance: Some(false),
            memory_mode: None,
            control: super::controlnet::from_alwayson(self.alwayson_scripts.as_ref())?,
            ..Default::default()
        }
        .validate_with(
            &s.info().limits,
            Some(&s.info().lora_dir()),
            Some(&s.info().control_dir()),
        )
        .map_err(super::controlnet::a1111_field)?;
        Ok((valid, n_iter as u32))
    }
}

/// A boolean as A1111 clients send it: `true`/`false`, or 0/1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Flag(pub bool);

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Flag;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a boolean or 0/1")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Flag, E> {
                Ok(Flag(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Flag, E> {
                match v {
                    0 => Ok(Flag(false)),
                    1 => Ok(Flag(true)),
                    _ => Err(E::invalid_value(de::Unexpected::Signed(v), &self)),
                }
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Flag, E> {
                self.visit_i64(v as i64)
            }
        }
        d.deserialize_any(V)
    }
}

/// The fields of A1111's `StableDiffusionImg2ImgProcessingAPI` that mean something here (the
/// txt2img ones and the image-to-image ones). A1111's own defaults apply to what is missing:
/// `denoising_strength` 0.75, `mask_blur` 4, `inpainting_fill` 0 (fill), `inpaint_full_res` true
/// (only the masked region), `inpaint_full_res_padding` 0, `resize_mode` 0 (just resize).
#[derive(Debug, Default, Deserialize)]
pub struct Img2ImgRequest {
    #[serde(flatten)]
    pub base: Txt2ImgRequest,
    #[serde(default)]
    pub init_images: Option<Vec<String>>,
    #[serde(default)]
    pub mask: Option<String>,
    #[serde(default)]
    pub denoising_strength: Option<f64>,
    #[serde(default)]
    pub mask_blur: Option<Int>,
    #[serde(default)]
    pub inpainting_mask_invert: Option<Int>,
    #[serde(default)]
    pub inpainting_fill: Option<Int>,
    #[serde(default)]
    pub inpaint_full_res: Option<Flag>,
    #[serde(default)]
    pub inpaint_full_res_padding: Option<Int>,
    #[serde(default)]
    pub resize_mode: Option<Int>,
    #[serde(default)]
    pub include_init_images: Option<bool>,
}

/// A1111's default `denoising_strength`.
const A1111_STRENGTH: f64 = 0.75;

fn int_in(field: &str, v: Option<Int>, lo: i64, hi: i64) -> Result<Option<i64>, FieldError> {
    match v {
        None => Ok(None),
        Some(Int(n)) if (lo..=hi).contains(&n) => Ok(Some(n)),
        Some(Int(n)) => Err(FieldError::new(
            field,
            format!("must be between {lo} and {hi} (got {n})"),
        )),
    }
}

/// The mask as our requests take it (white = repaint): decoded, inverted when asked, PNG again.
fn mask_png(b64: &str, invert: bool) -> Result<String, FieldError> {
    if !invert {
        return Ok(b64.to_string());
    }
    let err = |e: crate::inputs::InputError| FieldError::new("mask", e.to_string());
    let img = crate::inputs::decode_image(&crate::inputs::decode_base64(b64).map_err(err)?)
        .map_err(err)?;
    let mut gray = crate::inputs::to_luma_pil(&img);
    image::imageops::invert(&mut gray);
    let png = crate::inputs::InputImage::gray(gray).png().map_err(err)?;
    Ok(base64::engine::general_purpose::STANDARD.encode(png))
}

impl Img2ImgRequest {
    fn validate(&self, s: &AppState) -> Result<(ValidRequest, u32), FieldError> {
        let b = &self.base;
        let n_iter = b.n_iter.map(|i| i.0).unwrap_or(1);
        if !(1..=MAX_N_ITER).contains(&n_iter) {
            return Err(FieldError::new(
                "n_iter",
                format!("must be between 1 and {MAX_N_ITER} (got {n_iter})"),
            ));
        }
        let image = match self.init_images.as_deref() {
            Some([one]) => one.clone(),
            Some([]) | None => {
                return Err(FieldError::new(
                    "init_images",
                    "needs one base64 image (PNG, JPEG or WebP)",
                ))
            }
            Some(more) => {
                return Err(FieldError::new(
                    "init_images",
                    format!("takes one image (got {})", more.len()),
                ))
            }
        };
        let invert =
            int_in("inpainting_mask_invert", self.inpainting_mask_invert, 0, 1)? == Some(1);
        let fill = int_in("inpainting_fill", self.inpainting_fill, 0, 3)?
            .and_then(crate::inputs::InpaintFill::from_a1111)
            .unwrap_or(crate::inputs::InpaintFill::Fill);
        let resize = int_in("resize_mode", self.resize_mode, 0, 3)?
            .and_then(crate::inputs::ResizeMode::from_a1111);
        let mask_blur = int_in(
            "mask_blur",
            self.mask_blur,
            0,
            crate::request::MAX_MASK_BLUR as i64,
        )?;
        let padding = int_in(
            "inpaint_full_res_padding",
            self.inpaint_full_res_padding,
            0,
            crate::request::MAX_INPAINT_PADDING as i64,
        )?;
        let mask = match self.mask.as_deref().filter(|m| !m.is_empty()) {
            Some(m) => Some(mask_png(m, invert)?),
            None => None,
        };
        let inpaint = mask.is_some();
        let valid = GenerationRequest {
            prompt: b.prompt.clone().unwrap_or_default(),
            negative_prompt: b.negative_prompt.clone().filter(|n| !n.is_empty()),
            width: to_u32("width", b.width)?,
            height: to_u32("height", b.height)?,
            steps: to_u32("steps", b.steps)?,
            cfg: b.cfg_scale.map(|c| c as f32),
            seed: b.seed.and_then(|Int(v)| u64::try_from(v).ok()),
            batch: to_u32("batch_size", b.batch_size)?,
            enhance: Some(false),
            memory_mode: None,
            image: Some(image),
            mask,
            strength: Some(self.denoising_strength.unwrap_or(A1111_STRENGTH)),
            mask_blur: mask_blur.map(|v| v as u32).filter(|_| inpaint),
            resize_mode: resize,
            loras: None,
            inpaint_fill: inpaint.then_some(fill),
            inpaint_full_res: inpaint.then(|| self.inpaint_full_res.is_none_or(|f| f.0)),
            inpaint_full_res_padding: padding.map(|p| p as u32).filter(|_| inpaint),
            control: super::controlnet::from_alwayson(b.alwayson_scripts.as_ref())?,
            ..Default::default()
        }
        .validate_with(
            &s.info().limits,
            Some(&s.info().lora_dir()),
            Some(&s.info().control_dir()),
        )
        .map_err(super::controlnet::a1111_field)?;
        Ok((valid, n_iter as u32))
    }
}

/// `YYYYMMDDhhmmss` (UTC) of a Unix time in milliseconds, as A1111's `job_timestamp`.
pub fn job_timestamp(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// One finished image: its PNG and what its `parameters` chunk says.
struct Made {
    png: Vec<u8>,
    infotext: String,
    seed: Option<u64>,
}

async fn collect(s: &AppState, snap: &JobSnapshot) -> Result<Vec<Made>, ApiError> {
    let pngs = read_images(s, snap).await?;
    Ok(pngs
        .into_iter()
        .map(|png| {
            let infotext = png_text_chunks(&png)
                .ok()
                .and_then(|c| c.into_iter().find(|(k, _)| k == "parameters"))
                .map(|(_, v)| v)
                .unwrap_or_default();
            let seed = crate::engine::output::parse_parameters(&infotext).seed;
            Made {
                png,
                infotext,
                seed,
            }
        })
        .collect())
}

/// `POST /sdapi/v1/txt2img`.
pub async fn txt2img(
    State(s): State<AppState>,
    body: Result<JsonBody, ApiError>,
) -> Result<Json<Value>, A1111Error> {
    let JsonBody(bytes) = body?;
    let Value::Object(echo) = parse_json::<Value>(&bytes)? else {
        return Err(validation(
            None,
            "the body must be a JSON object",
            "type_error.dict",
        ));
    };
    let req: Txt2ImgRequest = parse_json(&bytes)?;
    let (valid, n_iter) = req.validate(&s)?;
    run_jobs(&s, echo, valid, n_iter).await
}

/// `POST /sdapi/v1/img2img`: image to image, and inpainting with `mask`; answers as txt2img.
pub async fn img2img(
    State(s): State<AppState>,
    body: Result<JsonBody, ApiError>,
) -> Result<Json<Value>, A1111Error> {
    let JsonBody(bytes) = body?;
    let Value::Object(mut echo) = parse_json::<Value>(&bytes)? else {
        return Err(validation(
            None,
            "the body must be a JSON object",
            "type_error.dict",
        ));
    };
    let req: Img2ImgRequest = parse_json(&bytes)?;
    let (valid, n_iter) = req.validate(&s)?;
    // A1111 leaves the (large) input images out of the echo unless asked.
    if req.include_init_images != Some(true) {
        echo.insert("init_images".into(), Value::Null);
        echo.insert("mask".into(), Value::Null);
    }
    run_jobs(&s, echo, valid, n_iter).await
}

/// Queues `n_iter` jobs of `valid` and answers A1111's way when they end.
async fn run_jobs(
    s: &AppState,
    echo: Map<String, Value>,
    valid: ValidRequest,
    n_iter: u32,
) -> Result<Json<Value>, A1111Error> {
    let s = s.clone();
    // n_iter jobs, queued back to back; seeds continue across them as in A1111.
    let deadline = sync_deadline(&s);
    let mut ids = Vec::with_capacity(n_iter as usize);
    for k in 0..n_iter {
        let mut job = valid.clone();
        job.seed = valid
            .seed
            .wrapping_add(u64::from(k) * u64::from(valid.batch));
        match submit_valid(&s, job).await {
            Ok(sub) => ids.push(sub.id),
            Err(e) => {
                for id in &ids {
                    let _ = s.queue.cancel(id).await;
                }
                return Err(e.into());
            }
        }
    }
    let mut made = Vec::new();
    let mut params: Option<ResolvedParams> = None;
    let mut interrupted = false;
    for (i, id) in ids.iter().enumerate() {
        let snap = match wait_job(&s, id, deadline).await {
            Ok(snap) => snap,
            Err(e) => {
                // Past the wait limit (or shutting down): the later iterations are not wanted.
                for rest in &ids[i + 1..] {
                    let _ = s.queue.cancel_if_queued(rest).await;
                }
                return Err(e.into());
            }
        };
        match snap.record.state {
            JobState::Done => {
                made.extend(collect(&s, &snap).await?);
                if params.is_none() {
                    params = snap.record.params.clone();
                }
            }
            state => {
                // Interrupted (or failed): the rest of the request is not wanted any more.
                for rest in &ids[i + 1..] {
                    let _ = s.queue.cancel(rest).await;
                }
                if state == JobState::Cancelled {
                    interrupted = true;
                    break;
                }
                return Err(run_failed(
                    failure_status(&snap),
                    snap.record
                        .error
                        .map_or_else(|| "the job failed".into(), |e| e.message),
                ));
            }
        }
    }
    if interrupted {
        tracing::info!(images = made.len(), "txt2img interrupted");
    }

    let info = info_json(&s, &valid, params.as_ref(), &made);
    let parameters = echo_parameters(echo, &valid, n_iter, &s);
    let images: Vec<String> = made
        .iter()
        .map(|m| base64::engine::general_purpose::STANDARD.encode(&m.png))
        .collect();
    Ok(Json(json!({
        "images": images,
        "parameters": parameters,
        "info": info.to_string(),
    })))
}

/// The request as received, with the values A1111 would have filled in for missing fields.
fn echo_parameters(
    mut echo: Map<String, Value>,
    v: &ValidRequest,
    n_iter: u32,
    s: &AppState,
) -> Value {
    let defaults = [
        ("prompt", json!(v.prompt)),
        (
            "negative_prompt",
            json!(v.negative_prompt.clone().unwrap_or_default()),
        ),
        ("width", json!(v.width)),
        ("height", json!(v.height)),
        ("steps", json!(v.steps)),
        ("cfg_scale", json!(json_f32(v.cfg))),
        ("seed", json!(-1)),
        ("batch_size", json!(v.batch)),
        ("n_iter", json!(n_iter)),
        ("sampler_name", json!(s.info().profile.sampler)),
    ];
    for (k, d) in defaults {
        let missing = echo.get(k).is_none_or(Value::is_null);
        if missing {
            echo.insert(k.to_string(), d);
        }
    }
    Value::Object(echo)
}

/// A1111's `info`: what ran, per image.
fn info_json(s: &AppState, v: &ValidRequest, p: Option<&ResolvedParams>, made: &[Made]) -> Value {
    let n = made.len().max(1);
    let prompt = p
        .map(|p| p.run.prompt.clone())
        .unwrap_or_else(|| v.prompt.clone());
    let negative = p
        .and_then(|p| p.run.negative_prompt.clone())
        .or_else(|| v.negative_prompt.clone())
        .unwrap_or_default();
    let all_seeds: Vec<u64> = if made.is_empty() {
        vec![v.seed]
    } else {
        made.iter()
            .enumerate()
            .map(|(i, m)| m.seed.unwrap_or(v.seed.wrapping_add(i as u64)))
            .collect()
    };
    json!({
        "prompt": prompt,
        "all_prompts": vec![prompt.clone(); n],
        "negative_prompt": negative,
        "all_negative_prompts": vec![negative.clone(); n],
        "seed": all_seeds[0],
        "all_seeds": all_seeds,
        "subseed": -1,
        "all_subseeds": vec![-1; n],
        "subseed_strength": 0,
        "width": p.map(|p| p.run.width).unwrap_or(v.width),
        "height": p.map(|p| p.run.height).unwrap_or(v.height),
        "sampler_name": p.map(|p| p.sampler.clone()).unwrap_or_else(|| s.info().profile.sampler.to_string()),
        "cfg_scale": json_f32(p.map(|p| p.run.cfg).unwrap_or(v.cfg)),
        "steps": p.map(|p| p.run.steps).unwrap_or(v.steps),
        "batch_size": v.batch,
        "restore_faces": false,
        "face_restoration_model": null,
        "sd_model_name": s.info().model,
        "sd_model_hash": null,
        "sd_vae_name": null,
        "sd_vae_hash": null,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": v.init.as_ref().map(|i| i.strength),
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": made.iter().map(|m| m.infotext.clone()).collect::<Vec<_>>(),
        "styles": [],
        "job_timestamp": job_timestamp(crate::queue::job::now_ms()),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": false,
        "version": format!("zturbo {}", env!("CARGO_PKG_VERSION")),
    })
}

/// `GET /sdapi/v1/progress`: the running job's progress (whoever submitted it).
pub async fn progress(State(s): State<AppState>) -> Json<Value> {
    let st = s.queue.status().await;
    let job_count = st.queued + usize::from(st.running.is_some());
    let (progress, eta, job, step, total, interrupted, stamp) = match &st.running {
        Some(r) => {
            let total = r.total_steps.max(1);
            let step = r.step.min(total);
            let eta = match r.elapsed_ms {
                Some(ms) if step > 0 => ms as f64 / step as f64 * (total - step) as f64 / 1000.0,
                _ => 0.0,
            };
            (
                step as f64 / total as f64,
                eta,
                r.record.id.clone(),
                step,
                total,
                r.cancelling,
                job_timestamp(r.record.started_at.unwrap_or(r.record.created_at)),
            )
        }
        None => (0.0, 0.0, String::new(), 0, 0, false, "0".into()),
    };
    Json(json!({
        "progress": progress,
        "eta_relative": eta,
        "state": {
            "skipped": false,
            "interrupted": interrupted,
            "stopping_generation": false,
            "job": job,
            "job_count": job_count,
            "job_timestamp": stamp,
            "job_no": 0,
            "sampling_step": step,
            "sampling_steps": total,
        },
        "current_image": null,
        "textinfo": null,
    }))
}

/// `POST /sdapi/v1/interrupt`: stops the running job between steps.
pub async fn interrupt(State(s): State<AppState>) -> Json<Value> {
    if let Some(r) = s.queue.status().await.running {
        match s.queue.cancel(&r.record.id).await {
            Ok(_) => tracing::info!(job_id = %r.record.id, "interrupted (A1111 API)"),
            Err(e) => tracing::debug!("interrupt: {e}"),
        }
    }
    Json(json!({}))
}

/// A1111 titles a checkpoint `name [hash]`; clients send the title back. Ours carry no hash.
fn checkpoint_name(title: &str) -> &str {
    let t = title.trim();
    match t.rfind(" [") {
        Some(i) if t.ends_with(']') => &t[..i],
        _ => t,
    }
}

/// `GET /sdapi/v1/sd-models`: every model on this machine (the picker of A1111 clients); `POST
/// /sdapi/v1/options {sd_model_checkpoint}` switches to one.
pub async fn sd_models(State(s): State<AppState>) -> Result<Json<Value>, A1111Error> {
    let models = super::models::local_models(&s).await?;
    Ok(Json(Value::Array(
        models
            .iter()
            .map(|m| {
                let filename = match &m.path {
                    Some(p) => p.display().to_string(),
                    None if m.demo => "<embedded demo>".to_string(),
                    None => m.name.clone(),
                };
                json!({
                    "title": m.name,
                    "model_name": m.name,
                    "hash": null,
                    "sha256": null,
                    "filename": filename,
                    "config": null,
                })
            })
            .collect(),
    )))
}

/// `GET /sdapi/v1/options`: the settings clients read; `sd_model_checkpoint` is the model new
/// jobs run on (after a switch, the one switched to).
pub async fn options(State(s): State<AppState>) -> Json<Value> {
    let selected = s.queue.status().await.selected;
    let info = s.info();
    Json(json!({
        "sd_model_checkpoint": if selected.is_empty() { info.model.clone() } else { selected },
        "sd_checkpoint_hash": null,
        "sd_vae": "Automatic",
        "CLIP_stop_at_last_layers": 1,
        "eta_noise_seed_delta": 0,
        "samples_format": "png",
        "samples_save": true,
        "outdir_samples": info.outputs.display().to_string(),
        "outdir_txt2img_samples": info.outputs.display().to_string(),
        "enable_pnginfo": true,
        "sd_checkpoints_limit": 1,
    }))
}

/// `POST /sdapi/v1/options`: `sd_model_checkpoint` switches models as A1111 does — the answer
/// comes once the model is loaded (after the jobs queued before the switch), or with a 422
/// naming `sd_model_checkpoint` and the file when it does not load. Other options are logged and ignored.
pub async fn set_options(
    State(s): State<AppState>,
    body: Result<JsonBody, ApiError>,
) -> Result<Json<Value>, A1111Error> {
    let JsonBody(bytes) = body?;
    let Value::Object(opts) = parse_json::<Value>(&bytes)? else {
        return Err(validation(
            None,
            "the body must be a JSON object",
            "type_error.dict",
        ));
    };
    if opts
        .get("sd_model_checkpoint")
        .is_some_and(|v| !v.is_string())
    {
        return Err(validation(
            Some("sd_model_checkpoint"),
            "str type expected",
            "type_error.str",
        ));
    }
    let ignored: Vec<&String> = opts
        .keys()
        .filter(|k| k.as_str() != "sd_model_checkpoint")
        .collect();
    if !ignored.is_empty() {
        tracing::info!(keys = ?ignored, "A1111 options ignored");
    }
    let Some(title) = opts.get("sd_model_checkpoint").and_then(Value::as_str) else {
        return Ok(Json(Value::Null));
    };
    let model =
        super::models::find_local(&s, checkpoint_name(title), "sd_model_checkpoint").await?;
    let stopped = || A1111Error {
        status: StatusCode::SERVICE_UNAVAILABLE,
        body: json!({ "detail": "the server is shutting down" }),
        retry_after_s: None,
    };
    // Subscribed before the switch is asked for, so its end cannot slip past.
    let mut rx = s.queue.model_events().await.ok_or_else(stopped)?;
    let outcome = s
        .queue
        .select_model(&model.name)
        .await
        .ok_or_else(stopped)?;
    if outcome == crate::queue::SelectOutcome::Loaded {
        return Ok(Json(Value::Null));
    }
    let wait = async {
        loop {
            match rx.recv().await {
                Ok(crate::queue::ModelEvent::Loaded { loaded, .. })
                    if loaded.model == model.name =>
                {
                    return Ok(());
                }
                Ok(crate::queue::ModelEvent::Failed { name, error, .. }) if name == model.name => {
                    // The checkpoint the client named does not load (a broken or unsupported
                    // file): a value the client sent, so a 422 naming the field and the file —
                    // the previous model is loaded again and keeps serving.
                    return Err(validation(
                        Some("sd_model_checkpoint"),
                        format!("sd_model_checkpoint: could not load `{name}`: {error}"),
                        "value_error",
                    ));
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return Err(stopped()),
            }
        }
    };
    tokio::select! {
        r = wait => r.map(|()| Json(Value::Null)),
        _ = s.shutdown_signal() => Err(stopped()),
    }
}

/// `GET /sdapi/v1/loras`: the LoRAs in `<models-dir>/loras/`, in A1111's shape (`name` is what
/// `<lora:name:weight>` in a prompt and `loras` in the job API take).
pub async fn loras(State(s): State<AppState>) -> Json<Value> {
    let dir = s.info().lora_dir();
    let list = tokio::task::spawn_blocking(move || dir.list())
        .await
        .unwrap_or_default();
    Json(Value::Array(
        list.into_iter()
            .map(|e| {
                json!({
                    "name": e.name,
                    "alias": e.name,
                    "path": e.path.display().to_string(),
                    "size_bytes": e.size_bytes,
                    "metadata": {},
                })
            })
            .collect(),
    ))
}

/// `POST /sdapi/v1/refresh-loras`: the folder is read on every request, so there is nothing to do.
pub async fn refresh_loras() -> Json<Value> {
    Json(Value::Null)
}

/// `GET /sdapi/v1/samplers`: the one sampler the loaded model runs.
pub async fn samplers(State(s): State<AppState>) -> Json<Value> {
    Json(json!([{ "name": s.info().profile.sampler, "aliases": [], "options": {} }]))
}

/// `GET /sdapi/v1/schedulers`.
pub async fn schedulers() -> Json<Value> {
    Json(json!([{
        "name": "automatic",
        "label": "Automatic",
        "aliases": null,
        "default_rho": -1,
        "need_inner_model": false,
    }]))
}

/// `GET /sdapi/v1/scripts`: no scripts (clients probe it for extensions).
pub async fn scripts() -> Json<Value> {
    Json(json!({ "txt2img": [], "img2img": [] }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_civil_time() {
        assert_eq!(job_timestamp(0), "19700101000000");
        // 2024-02-29T13:45:07Z
        assert_eq!(job_timestamp(1_709_214_307_000), "20240229134507");
    }

    #[test]
    fn integers_accept_integral_floats_only() {
        let r: Txt2ImgRequest =
            serde_json::from_str(r#"{"width": 512.0, "seed": -1, "steps": 4}"#).unwrap();
        assert_eq!(
            (r.width, r.seed, r.steps),
            (Some(Int(512)), Some(Int(-1)), Some(Int(4)))
        );
        assert!(serde_json::from_str::<Txt2ImgRequest>(r#"{"width": 512.5}"#).is_err());
        assert!(serde_json::from_str::<Txt2ImgRequest>(r#"{"steps": "4"}"#).is_err());
        // Unknown fields (A1111 clients send dozens) are ignored.
        assert!(serde_json::from_str::<Txt2ImgRequest>(
            r#"{"sampler_name": "Euler a", "override_settings": {}, "alwayson_scripts": {}}"#
        )
        .is_ok());
    }
}
