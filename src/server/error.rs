//! One error shape for every surface: `{"error": {"field": …, "message": …}}` with a 4xx for the
//! user's mistakes and a 5xx for ours (the SSE `failed` event carries the same body). Also the
//! JSON body extractor that turns serde's complaints into that shape, naming the field.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::i18n::Translations;
use crate::queue::outputs::StorageProblem;
use crate::queue::{FailureKind, JobError};
use crate::request::FieldError;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorDetail {
    pub field: Option<String>,
    pub message: String,
    /// The message in the page's other languages (`{"zh-CN": …}`), where the server has it.
    #[serde(skip_serializing_if = "Translations::is_empty")]
    pub i18n: Translations,
}

/// The body of every error response and of the SSE `failed` event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

impl ErrorBody {
    pub fn new(field: Option<String>, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                field,
                message: message.into(),
                i18n: Translations::default(),
            },
        }
    }
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, field: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody::new(field.map(str::to_string), message),
            retry_after_s: None,
        }
    }

    pub fn field(field: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, Some(field), message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, None, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, None, message)
    }

    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after_s = Some(seconds);
        self
    }
}

/// The status of a disk error: 507 when the disk is full, 503 when the folder is unwritable.
pub fn storage_status(problem: StorageProblem) -> StatusCode {
    match problem {
        StorageProblem::Full => StatusCode::INSUFFICIENT_STORAGE,
        StorageProblem::Unwritable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// The status a failed job answers with where a surface waits for it (OpenAI, A1111): the user's
/// request when the engine could not run it as given, the device when it does not fit, the
/// outputs folder's problem, ours otherwise.
pub fn kind_status(kind: FailureKind) -> StatusCode {
    if let Some(problem) = kind.storage() {
        return storage_status(problem);
    }
    match kind {
        FailureKind::Invalid => StatusCode::UNPROCESSABLE_ENTITY,
        FailureKind::DoesNotFit => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<&JobError> for ApiError {
    fn from(e: &JobError) -> Self {
        Self::new(kind_status(e.kind), None, e.message.clone())
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        let mut err = Self::field(&e.field, e.message);
        err.body.error.i18n = e.i18n;
        err
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Logged once, here at the boundary.
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, "{}", self.body.error.message);
        } else {
            tracing::debug!(status = %self.status, field = ?self.body.error.field, "{}", self.body.error.message);
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

/// `Json<T>` with our error shape: wrong types, unknown and missing fields become 422 naming the
/// field; malformed JSON 400; a body over the limit 413; a non-JSON content type 415.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let JsonBody(bytes) = JsonBody::from_request(req, state).await?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// The raw bytes of a JSON body, after the checks every JSON endpoint shares: a JSON content
/// type, and the size limit (415 and 413 in our shape; other surfaces convert them).
pub struct JsonBody(pub Bytes);

impl<S> FromRequest<S> for JsonBody
where
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // A JSON content type is required: a browser sends a cross-site request without a
        // preflight only with a form type, text/plain or none at all, so refusing those leaves
        // more than the Origin check between a foreign page and the API.
        let essence = req.headers().get(header::CONTENT_TYPE).map(|ct| {
            let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
            ct.split(';').next().unwrap_or("").trim().to_string()
        });
        let json = essence
            .as_deref()
            .is_some_and(|e| e == "application/json" || e.ends_with("+json"));
        if !json {
            let got = match essence {
                Some(e) => format!("got `{e}`"),
                None => "the request has none".to_string(),
            };
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                None,
                format!("expected a JSON body (Content-Type: application/json); {got}"),
            ));
        }
        let too_large = || {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                None,
                format!(
                    "the request body is larger than {} MiB",
                    super::BODY_LIMIT_BYTES >> 20
                ),
            )
        };
        // Refuse an announced oversized body before reading any of it.
        let announced = req
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if announced.is_some_and(|n| n > super::BODY_LIMIT_BYTES as u64) {
            return Err(too_large());
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rej| {
            if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                too_large()
            } else {
                ApiError::new(rej.status(), None, rej.body_text())
            }
        })?;
        Ok(JsonBody(bytes))
    }
}

/// Parses a JSON body, mapping serde errors to [`ApiError`]s that name the field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        json_error(&path, e.into_inner())
    })?;
    de.end().map_err(|e| json_error(".", e))?;
    Ok(value)
}

fn json_error(path: &str, e: serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    let full = e.to_string();
    // serde_json appends " at line L column C"; the field name says more to a user.
    let message = match full.rfind(" at line ") {
        Some(i) if e.line() > 0 => full[..i].to_string(),
        _ => full,
    };
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => ApiError::new(
            StatusCode::BAD_REQUEST,
            None,
            format!(
                "malformed JSON: {message} (line {}, column {})",
                e.line(),
                e.column()
            ),
        ),
        Category::Data => {
            let field = if path.is_empty() || path == "." {
                // Missing and unknown fields are reported at the parent: the name is in the text.
                backticked(&message)
            } else {
                Some(path.to_string())
            };
            let message = match &field {
                Some(f) if !message.contains(f.as_str()) => format!("{f}: {message}"),
                _ => message,
            };
            ApiError {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                body: ErrorBody::new(field, message),
                retry_after_s: None,
            }
        }
    }
}

/// The first `` `name` `` in a serde message (`missing field `prompt``, `unknown field `stepz``).
fn backticked(message: &str) -> Option<String> {
    let rest = &message[message.find('`')? + 1..];
    let name = &rest[..rest.find('`')?];
    (!name.is_empty()).then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_jobs_answer_with_the_status_of_their_kind() {
        use crate::queue::{FailureKind, JobError};
        let e = ApiError::from(&JobError::new(FailureKind::Invalid, "initial latents"));
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(e.body.error.message, "initial latents");
        let status = kind_status;
        assert_eq!(
            status(FailureKind::DoesNotFit),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            status(FailureKind::StorageFull),
            StatusCode::INSUFFICIENT_STORAGE
        );
        assert_eq!(
            status(FailureKind::StorageUnwritable),
            StatusCode::SERVICE_UNAVAILABLE
        );
        for k in [
            FailureKind::Model,
            FailureKind::BlankImage,
            FailureKind::Internal,
        ] {
            assert_eq!(status(k), StatusCode::INTERNAL_SERVER_ERROR);
        }
    }
    use crate::request::GenerationRequest;

    fn err(json: &str) -> ApiError {
        match parse_json::<GenerationRequest>(json.as_bytes()) {
            Ok(_) => panic!("{json} parsed"),
            Err(e) => e,
        }
    }

    #[test]
    fn type_errors_name_the_field() {
        let e = err(r#"{"prompt": 5}"#);
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(e.body.error.field.as_deref(), Some("prompt"));
        let e = err(r#"{"prompt": "x", "width": "wide"}"#);
        assert_eq!(e.body.error.field.as_deref(), Some("width"));
        assert!(!e.body.error.message.contains("line 1"), "{:?}", e.body);
        let e = err(r#"{"prompt": "x", "steps": -3}"#);
        assert_eq!(e.body.error.field.as_deref(), Some("steps"));
        let e = err(r#"{"prompt": "x", "memory_mode": "turbo"}"#);
        assert_eq!(e.body.error.field.as_deref(), Some("memory_mode"));
    }

    #[test]
    fn unknown_and_missing_fields_are_named() {
        let e = err(r#"{"prompt": "x", "stepz": 4}"#);
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(e.body.error.field.as_deref(), Some("stepz"));
        let e = err(r#"{"steps": 4}"#);
        assert_eq!(e.body.error.field.as_deref(), Some("prompt"));
    }

    #[test]
    fn malformed_json_is_400() {
        let e = err(r#"{"prompt": "x""#);
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = err(r#"{"prompt": "x"} trailing"#);
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }
}
