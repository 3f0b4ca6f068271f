//! The OpenAI Images API, so OpenAI SDKs and the tools built on them work unmodified:
//! `POST /v1/images/generations` (synchronous: it queues one job like every other surface and
//! answers when it ends) and `GET /v1/models`. Errors take OpenAI's shape,
//! `{"error": {"message", "type", "param", "code"}}`, with 400 for every invalid request.
//!
//! Mapping: `size` → width × height (`auto` = the model's default; any `WxH` the model accepts);
//! `n` → batch; `quality` → steps (`low` = half the model's steps, `standard`/`medium`/`auto` =
//! its default, `hd`/`high` = 1.5 × — at least one more, `xhigh`/`max` = 2 ×); `style` and
//! `user` are accepted and ignored; `model` is the loaded model's name or an OpenAI alias (`dall-e-2`, `dall-e-3`,
//! `gpt-image-*`), all served by the loaded model. Prompts are enhanced, and `revised_prompt` is
//! the enhanced prompt.

use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::error::{parse_json, ApiError, JsonBody};
use super::jobs::{failure_status, read_images, submit_valid, sync_deadline, wait_job};
use super::AppState;
use crate::queue::JobState;
use crate::request::GenerationRequest;

/// Model names accepted besides the loaded model's own; all of them run the loaded model.
pub const ALIASES: [&str; 3] = ["dall-e-2", "dall-e-3", "gpt-image-1"];

#[derive(Debug, Serialize)]
pub struct OpenAiErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct OpenAiErrorBody {
    pub error: OpenAiErrorDetail,
}

/// An error in OpenAI's shape.
#[derive(Debug)]
pub struct OpenAiError {
    pub status: StatusCode,
    pub body: OpenAiErrorBody,
    pub retry_after_s: Option<u64>,
}

/// An OpenAI-shaped error; the `type` follows from the status as OpenAI sets it.
pub fn error(
    status: StatusCode,
    param: Option<&str>,
    code: Option<&str>,
    message: impl Into<String>,
) -> OpenAiError {
    let kind = match status.as_u16() {
        401 => "invalid_request_error",
        403 => "permission_error",
        404 => "invalid_request_error",
        429 => "requests",
        s if s >= 500 => "server_error",
        _ => "invalid_request_error",
    };
    OpenAiError {
        status,
        body: OpenAiErrorBody {
            error: OpenAiErrorDetail {
                message: message.into(),
                kind,
                param: param.map(str::to_string),
                code: code.map(str::to_string),
            },
        },
        retry_after_s: None,
    }
}

fn invalid(param: &str, message: impl Into<String>) -> OpenAiError {
    error(StatusCode::BAD_REQUEST, Some(param), None, message)
}

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        // OpenAI answers every invalid request with 400 (never 422).
        let status = if e.status == StatusCode::UNPROCESSABLE_ENTITY {
            StatusCode::BAD_REQUEST
        } else {
            e.status
        };
        let code = match status.as_u16() {
            429 => Some("rate_limit_exceeded"),
            503 => Some("service_unavailable"),
            504 => Some("timeout"),
            507 => Some("insufficient_storage"),
            _ => None,
        };
        let mut out = error(
            status,
            e.body.error.field.as_deref(),
            code,
            e.body.error.message,
        );
        out.retry_after_s = e.retry_after_s;
        out
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, "{}", self.body.error.message);
        } else {
            tracing::debug!(status = %self.status, param = ?self.body.error.param, "{}", self.body.error.message);
        }
        let status = self.status;
        let mut res = (status, Json(self.body)).into_response();
        if let Some(s) = self.retry_after_s {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                res.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        // OpenAI's SDKs retry 409 and 5xx by themselves; where a retry would only queue the same
        // work again (a cancelled job, a job still running past the wait limit) they are told
        // not to.
        if matches!(status.as_u16(), 409 | 504) {
            res.headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("false"));
        }
        res
    }
}

/// The request body of `POST /v1/images/generations`. Fields OpenAI added for other models
/// (`background`, `moderation`, `output_compression`, …) are ignored.
#[derive(Debug, Deserialize)]
pub struct ImagesRequest {
    pub prompt: String,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub size: Option<String>,
    #[serde(default)]
    pub response_format: Option<String>,
    #[serde(default)]
    pub quality: Option<String>,
    #[serde(default)]
    pub style: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub output_format: Option<String>,
    #[serde(default)]
    pub stream: Option<bool>,
}

/// `WxH` → (width, height); `auto` → the model's default (`None`).
pub fn parse_size(size: &str) -> Result<Option<(u32, u32)>, String> {
    let s = size.trim();
    if s.eq_ignore_ascii_case("auto") {
        return Ok(None);
    }
    let parsed = s
        .split_once(['x', 'X'])
        .and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)));
    match parsed {
        Some(wh) => Ok(Some(wh)),
        None => Err(format!(
            "`{size}` is not a size: use WIDTHxHEIGHT (256x256, 512x512, 1024x1024, 1792x1024, \
             1024x1792, …) or auto"
        )),
    }
}

/// `quality` → denoising steps, from the model's default.
pub fn quality_steps(quality: &str, default_steps: u32) -> Result<u32, String> {
    Ok(match quality.to_ascii_lowercase().as_str() {
        "auto" | "standard" | "medium" => default_steps,
        "low" => default_steps.div_ceil(2).max(1),
        "hd" | "high" => (default_steps + 1).max(default_steps * 3 / 2),
        "xhigh" | "max" => default_steps * 2,
        _ => {
            return Err(format!(
                "`{quality}` is not a quality: use standard, hd, low, medium, high, xhigh, max \
                 or auto"
            ))
        }
    })
}

fn model_ok(requested: &str, loaded: &str) -> bool {
    let r = requested.trim();
    r.eq_ignore_ascii_case(loaded)
        || ALIASES.iter().any(|a| r.eq_ignore_ascii_case(a))
        || r.to_ascii_lowercase().starts_with("gpt-image-")
}

/// `scheme://host` of this request, for absolute image URLs.
fn base_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("127.0.0.1");
    let proto = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .filter(|p| matches!(*p, "http" | "https"))
        .unwrap_or("http");
    format!("{proto}://{host}")
}

#[derive(Debug, Serialize)]
pub struct ImageData {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub b64_json: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    pub revised_prompt: String,
}

#[derive(Debug, Serialize)]
pub struct ImagesResponse {
    pub created: u64,
    pub data: Vec<ImageData>,
}

/// `POST /v1/images/generations`.
pub async fn generations(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Result<JsonBody, ApiError>,
) -> Result<Json<ImagesResponse>, OpenAiError> {
    let JsonBody(bytes) = body?;
    let req: ImagesRequest = parse_json(&bytes)?;
    let info = s.info();
    if let Some(m) = req.model.as_deref() {
        if !model_ok(m, &info.model) {
            return Err(error(
                StatusCode::BAD_REQUEST,
                Some("model"),
                Some("model_not_found"),
                format!(
                    "the model `{m}` does not exist here: this server runs `{}` (also answers to {})",
                    info.model,
                    ALIASES.join(", ")
                ),
            ));
        }
    }
    let size = match req.size.as_deref() {
        Some(sz) => parse_size(sz).map_err(|m| invalid("size", m))?,
        None => None,
    };
    let steps = match req.quality.as_deref() {
        Some(q) => {
            Some(quality_steps(q, info.limits.default_steps).map_err(|m| invalid("quality", m))?)
        }
        None => None,
    };
    let format = response_format(req.response_format.as_deref(), req.model.as_deref())?;
    if let Some(f) = req
        .output_format
        .as_deref()
        .filter(|f| !f.eq_ignore_ascii_case("png"))
    {
        return Err(invalid(
            "output_format",
            format!("`{f}` is not available: this server writes PNG"),
        ));
    }
    if req.stream == Some(true) {
        return Err(invalid("stream", "streaming is not supported"));
    }
    let _ = (&req.style, &req.user);

    let valid = GenerationRequest {
        prompt: req.prompt,
        width: size.map(|(w, _)| w),
        height: size.map(|(_, h)| h),
        steps,
        batch: Some(req.n.unwrap_or(1)),
        enhance: Some(true),
        ..Default::default()
    }
    .validate_in(&info.limits, Some(&info.lora_dir()))
    .map_err(|e| {
        let param = match e.field.as_str() {
            "width" | "height" => "size",
            "batch" => "n",
            "steps" => "quality",
            other => other,
        };
        invalid(param, format!("{}: {}", e.field, e.message))
    })?;

    let deadline = sync_deadline(&s);
    let sub = submit_valid(&s, valid).await?;
    respond(&s, &headers, &sub.id, format, deadline).await
}

/// Waits for the job (until `deadline`) and answers with its images in `format` (`b64_json` or
/// `url`).
async fn respond(
    s: &AppState,
    headers: &HeaderMap,
    id: &str,
    format: &str,
    deadline: Option<tokio::time::Instant>,
) -> Result<Json<ImagesResponse>, OpenAiError> {
    let snap = wait_job(s, id, deadline).await?;
    match snap.record.state {
        JobState::Done => {}
        JobState::Cancelled => {
            // Someone else stopped it (DELETE /api/jobs/{id}, an A1111 interrupt): not a server
            // error, and not worth a retry.
            return Err(error(
                StatusCode::CONFLICT,
                None,
                Some("job_cancelled"),
                format!(
                    "job {id} was cancelled (DELETE /api/jobs/{id} or an A1111 interrupt) before \
                     it finished; no images were made"
                ),
            ));
        }
        _ => {
            let status = failure_status(&snap);
            let code = match status.as_u16() {
                507 => Some("insufficient_storage"),
                503 => Some("service_unavailable"),
                _ => None,
            };
            return Err(error(
                status,
                None,
                code,
                format!(
                    "image generation failed: {}",
                    snap.record
                        .error
                        .as_ref()
                        .map_or("unknown error", |e| e.message.as_str())
                ),
            ));
        }
    }
    let revised = snap
        .record
        .params
        .as_ref()
        .map(|p| p.run.prompt.clone())
        .unwrap_or_default();
    let created = snap.record.created_at / 1000;
    let data = if format == "b64_json" {
        read_images(s, &snap)
            .await?
            .into_iter()
            .map(|png| ImageData {
                b64_json: Some(base64::engine::general_purpose::STANDARD.encode(png)),
                url: None,
                revised_prompt: revised.clone(),
            })
            .collect()
    } else {
        let base = base_url(headers);
        snap.record
            .images
            .iter()
            .map(|f| ImageData {
                b64_json: None,
                url: Some(format!("{base}{}", s.security.image_path(f))),
                revised_prompt: revised.clone(),
            })
            .collect()
    };
    Ok(Json(ImagesResponse { created, data }))
}

/// `response_format`, with OpenAI's defaults (URLs for DALL·E, base64 for GPT image models).
fn response_format(
    requested: Option<&str>,
    model: Option<&str>,
) -> Result<&'static str, OpenAiError> {
    let gpt_image = model.is_some_and(|m| m.to_ascii_lowercase().starts_with("gpt-image-"));
    match requested {
        Some("b64_json") => Ok("b64_json"),
        Some("url") => Ok("url"),
        Some(f) => Err(invalid(
            "response_format",
            format!("`{f}` is not a response format: use b64_json or url"),
        )),
        None if gpt_image => Ok("b64_json"),
        None => Ok("url"),
    }
}

/// The parts of an edits request, as read from the multipart body.
#[derive(Debug, Default)]
struct EditForm {
    image: Option<Vec<u8>>,
    mask: Option<Vec<u8>>,
    text: std::collections::HashMap<String, String>,
}

async fn read_form(mut form: Multipart) -> Result<EditForm, OpenAiError> {
    let mut out = EditForm::default();
    loop {
        let field = form.next_field().await.map_err(|e| {
            error(
                e.status(),
                None,
                None,
                format!("the multipart body could not be read: {}", e.body_text()),
            )
        })?;
        let Some(field) = field else { break };
        let name = field.name().unwrap_or_default().to_string();
        let bytes = field.bytes().await.map_err(|e| {
            error(
                e.status(),
                Some(&name),
                None,
                format!("{name}: the upload could not be read: {}", e.body_text()),
            )
        })?;
        match name.as_str() {
            // gpt-image clients send `image[]` (one image here).
            "image" | "image[]" => {
                if out.image.is_some() {
                    return Err(invalid("image", "takes one image here"));
                }
                out.image = Some(bytes.to_vec());
            }
            "mask" => out.mask = Some(bytes.to_vec()),
            // Other parts are text fields; files the SDK may add for other models are ignored.
            _ => {
                if let Ok(text) = String::from_utf8(bytes.to_vec()) {
                    out.text.insert(name, text);
                }
            }
        }
    }
    Ok(out)
}

/// `POST /v1/images/edits` (multipart/form-data): `image` (PNG, JPEG or WebP), `mask` (a PNG of
/// the image's size whose fully transparent pixels mark what to edit; without one, an image with
/// transparent pixels is its own mask, as for DALL·E 2, and an opaque image is edited as a whole:
/// image to image), `prompt`, `n`, `size` (the image is fitted to it; default: its own size),
/// `response_format`, `model`, `quality`; `user`, `background`, `input_fidelity`,
/// `output_format` (png only) accepted.
pub async fn edits(
    State(s): State<AppState>,
    headers: HeaderMap,
    form: Result<Multipart, MultipartRejection>,
) -> Result<Json<ImagesResponse>, OpenAiError> {
    let form = form.map_err(|e| {
        invalid(
            "image",
            format!(
                "the body must be multipart/form-data with an image file: {}",
                e.body_text()
            ),
        )
    })?;
    let form = read_form(form).await?;
    let info = s.info();
    let text = |k: &str| form.text.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let prompt = text("prompt")
        .ok_or_else(|| invalid("prompt", "prompt: required"))?
        .to_string();
    let model = text("model");
    if let Some(m) = model {
        if !model_ok(m, &info.model) {
            return Err(error(
                StatusCode::BAD_REQUEST,
                Some("model"),
                Some("model_not_found"),
                format!(
                    "the model `{m}` does not exist here: this server runs `{}`",
                    info.model
                ),
            ));
        }
    }
    let format = response_format(text("response_format"), model)?;
    if let Some(f) = text("output_format").filter(|f| !f.eq_ignore_ascii_case("png")) {
        return Err(invalid(
            "output_format",
            format!("`{f}` is not available: this server writes PNG"),
        ));
    }
    if text("stream").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Err(invalid("stream", "streaming is not supported"));
    }
    let n = match text("n") {
        Some(v) => Some(
            v.parse::<u32>()
                .map_err(|_| invalid("n", format!("n: `{v}` is not a whole number")))?,
        ),
        None => None,
    };
    let size = match text("size") {
        Some(sz) => parse_size(sz).map_err(|m| invalid("size", m))?,
        None => None,
    };
    let steps = match text("quality") {
        Some(q) => {
            Some(quality_steps(q, info.limits.img2img.steps).map_err(|m| invalid("quality", m))?)
        }
        None => None,
    };
    let bytes = form
        .image
        .ok_or_else(|| invalid("image", "image: required (a PNG, JPEG or WebP file)"))?;
    let image =
        crate::inputs::decode_image(&bytes).map_err(|e| invalid("image", format!("image: {e}")))?;
    // OpenAI's masks: fully transparent = edit here.
    let mask = match form.mask {
        Some(m) => {
            let img = crate::inputs::decode_image(&m)
                .map_err(|e| invalid("mask", format!("mask: {e}")))?;
            if (img.width(), img.height()) != (image.width(), image.height()) {
                return Err(invalid(
                    "mask",
                    format!(
                        "mask: is {}×{} but the image is {}×{}: they must be the same size",
                        img.width(),
                        img.height(),
                        image.width(),
                        image.height()
                    ),
                ));
            }
            let gray = crate::inputs::mask_from_alpha(&img).ok_or_else(|| {
                invalid(
                    "mask",
                    "mask: has no transparency: its fully transparent pixels mark what to edit",
                )
            })?;
            if crate::inputs::mask_is_empty(&gray) {
                return Err(invalid(
                    "mask",
                    "mask: is empty: no pixel is fully transparent, so nothing would be edited",
                ));
            }
            Some(gray)
        }
        None => crate::inputs::mask_from_alpha(&image).filter(|m| !crate::inputs::mask_is_empty(m)),
    };
    let b64 = |png: Vec<u8>| base64::engine::general_purpose::STANDARD.encode(png);
    let mask = match mask {
        Some(m) => Some(b64(crate::inputs::InputImage::gray(m)
            .png()
            .map_err(|e| invalid("mask", format!("mask: {e}")))?)),
        None => None,
    };
    let valid = GenerationRequest {
        prompt,
        width: size.map(|(w, _)| w),
        height: size.map(|(_, h)| h),
        steps,
        batch: Some(n.unwrap_or(1)),
        enhance: Some(true),
        image: Some(b64(bytes)),
        mask,
        ..Default::default()
    }
    .validate_in(&info.limits, Some(&info.lora_dir()))
    .map_err(|e| {
        let param = match e.field.as_str() {
            "width" | "height" => "size",
            "batch" => "n",
            "steps" | "strength" => "quality",
            other => other,
        };
        invalid(param, format!("{}: {}", e.field, e.message))
    })?;
    let deadline = sync_deadline(&s);
    let sub = submit_valid(&s, valid).await?;
    respond(&s, &headers, &sub.id, format, deadline).await
}

fn model_object(id: &str, created: u64) -> serde_json::Value {
    json!({ "id": id, "object": "model", "created": created, "owned_by": "zturbo" })
}

fn model_ids(s: &AppState) -> Vec<String> {
    std::iter::once(s.info().model.clone())
        .chain(ALIASES.iter().map(|a| a.to_string()))
        .collect()
}

/// `GET /v1/models`: the loaded model and the aliases that reach it.
pub async fn models(State(s): State<AppState>) -> Json<serde_json::Value> {
    let created = s.info().started_at_s;
    let data: Vec<_> = model_ids(&s)
        .iter()
        .map(|id| model_object(id, created))
        .collect();
    Json(json!({ "object": "list", "data": data }))
}

/// `GET /v1/models/{model}`.
pub async fn model(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, OpenAiError> {
    if model_ids(&s).iter().any(|m| m.eq_ignore_ascii_case(&id)) {
        return Ok(Json(model_object(&id, s.info().started_at_s)));
    }
    Err(error(
        StatusCode::NOT_FOUND,
        Some("model"),
        Some("model_not_found"),
        format!("the model `{id}` does not exist here"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024x1792"), Ok(Some((1024, 1792))));
        assert_eq!(parse_size("auto"), Ok(None));
        for bad in ["big", "1024", "x512", "1024x", "-1x5", "1024*1024"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn quality_maps_to_steps() {
        assert_eq!(quality_steps("standard", 8), Ok(8));
        assert_eq!(quality_steps("HD", 8), Ok(12));
        assert_eq!(quality_steps("high", 1), Ok(2));
        assert_eq!(quality_steps("low", 8), Ok(4));
        assert_eq!(quality_steps("low", 1), Ok(1));
        assert_eq!(quality_steps("max", 8), Ok(16));
        assert!(quality_steps("ultra", 8).is_err());
    }

    #[test]
    fn models_and_aliases() {
        assert!(model_ok("demo", "demo") && model_ok("DALL-E-3", "demo"));
        assert!(model_ok("gpt-image-1-mini", "demo"));
        assert!(!model_ok("stable-diffusion-xl", "demo"));
    }
}
