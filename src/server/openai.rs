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

use axum::extract::{Path, State};
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
    let gpt_image = req
        .model
        .as_deref()
        .is_some_and(|m| m.to_ascii_lowercase().starts_with("gpt-image-"));
    let format = match req.response_format.as_deref() {
        Some(f @ ("b64_json" | "url")) => f,
        Some(f) => {
            return Err(invalid(
                "response_format",
                format!("`{f}` is not a response format: use b64_json or url"),
            ))
        }
        // OpenAI's defaults: URLs for DALL·E, base64 for GPT image models.
        None if gpt_image => "b64_json",
        None => "url",
    };
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
    .validate(&info.limits)
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
    let snap = wait_job(&s, &sub.id, deadline).await?;
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
                    "job {} was cancelled (DELETE /api/jobs/{} or an A1111 interrupt) before it \
                     finished; no images were made",
                    sub.id, sub.id
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
        read_images(&s, &snap)
            .await?
            .into_iter()
            .map(|png| ImageData {
                b64_json: Some(base64::engine::general_purpose::STANDARD.encode(png)),
                url: None,
                revised_prompt: revised.clone(),
            })
            .collect()
    } else {
        let base = base_url(&headers);
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
