//! The HTTP surface (axum): the browser UI's static files, the JSON API and its SSE streams. One
//! file per surface; [`app`] builds the router from an [`AppState`] so tests can drive it without
//! a socket. The server knows jobs, requests and memory samples — never tensors.

pub mod error;
pub mod images;
pub mod jobs;
pub mod memory;
pub mod models;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::Stream;
use tokio::sync::watch;

use crate::families::FamilyInfo;
use crate::memory::monitor::Monitor;
use crate::memory::planner::MemoryMode;
use crate::queue::worker::Loaded;
use crate::queue::QueueHandle;
use crate::request::Limits;
use error::ApiError;

/// Largest request body. High enough that an oversized prompt still parses and is refused by
/// validation with a 422 naming `prompt`; anything bigger is a 413.
pub const BODY_LIMIT_BYTES: usize = 16 << 20;
/// How many finished and waiting jobs `GET /api/jobs` lists.
pub const JOB_LIST_LIMIT: usize = 200;
const SSE_KEEP_ALIVE: Duration = Duration::from_secs(15);

/// What the server tells clients about itself; fixed at start-up.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub model: String,
    pub demo: bool,
    pub description: String,
    pub family: FamilyInfo,
    pub limits: Limits,
    /// `cpu`, `cuda:0`, `metal`.
    pub device: String,
    pub device_name: String,
    pub device_total_bytes: u64,
    pub queue_size: usize,
    pub models_dir: PathBuf,
    pub outputs: PathBuf,
}

impl ServerInfo {
    pub fn new(
        loaded: &Loaded,
        demo: bool,
        description: String,
        queue_size: usize,
        models_dir: PathBuf,
        outputs: PathBuf,
    ) -> Self {
        let d = loaded.info.defaults;
        Self {
            model: loaded.model.clone(),
            demo,
            description,
            family: loaded.info.clone(),
            limits: Limits {
                default_width: d.width,
                default_height: d.height,
                default_steps: d.steps,
                default_cfg: d.cfg,
                size_multiple: loaded.info.size_multiple,
                max_batch: loaded.max_batch,
                default_memory_mode: MemoryMode::Auto,
            },
            device: loaded.device.clone(),
            device_name: loaded.probe.name(),
            device_total_bytes: loaded.probe.total_bytes(),
            queue_size,
            models_dir,
            outputs,
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub queue: QueueHandle,
    pub monitor: Arc<Monitor>,
    pub info: Arc<ServerInfo>,
    /// Turns `true` when the server shuts down: SSE streams end so connections can drain.
    pub shutdown: watch::Receiver<bool>,
}

impl AppState {
    /// Resolves when the server starts shutting down (never, if nobody can signal it).
    pub fn shutdown_signal(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.shutdown.clone();
        async move {
            if rx.wait_for(|down| *down).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

pub fn app(state: AppState) -> Router {
    let api = Router::new()
        .route("/health", get(models::health))
        .route("/info", get(models::info))
        .route("/models", get(models::list))
        .route("/enhance", axum::routing::post(jobs::enhance))
        .route("/jobs", get(jobs::list).post(jobs::submit))
        .route("/jobs/{id}", get(jobs::get).delete(jobs::cancel))
        .route("/jobs/{id}/events", get(jobs::events))
        .route("/memory/stream", get(memory::stream));
    Router::new()
        .route("/", get(index))
        .route("/index.html", get(index))
        .route("/app.js", get(app_js))
        .route("/style.css", get(style_css))
        .route("/images/{file}", get(images::get))
        .nest("/api", api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT_BYTES))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

// The UI is compiled in, so the binary serves it from anywhere with no build step.
const INDEX_HTML: &str = include_str!("../../static/index.html");
const APP_JS: &str = include_str!("../../static/app.js");
const STYLE_CSS: &str = include_str!("../../static/style.css");

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // Revalidate every load: a new binary may bring a new UI.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn style_css() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no such page or endpoint: {}", uri.path()))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        None,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// An SSE response with keep-alive comments and proxy buffering off.
pub fn sse<S>(stream: S) -> Response
where
    S: Stream<Item = Result<Event, std::convert::Infallible>> + Send + 'static,
{
    let mut res = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(SSE_KEEP_ALIVE))
        .into_response();
    let h = res.headers_mut();
    h.insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}

/// An SSE event with a JSON payload.
pub fn json_event(name: &str, data: &impl serde::Serialize) -> Event {
    let data = serde_json::to_string(data).unwrap_or_else(|_| "{}".into());
    Event::default().event(name).data(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::{to_bytes, Body};
    use axum::http::Request;
    use tower::ServiceExt;

    use crate::families::Defaults;
    use crate::memory::monitor::Tags;
    use crate::memory::probe::CpuProbe;
    use crate::queue::worker::{WorkItem, WorkerEvent};
    use crate::queue::{self, QueueConfig};

    /// A server whose worker never runs anything: jobs handed to it stay "running".
    struct Fixture {
        app: Router,
        work: std::sync::mpsc::Receiver<WorkItem>,
        _events: tokio::sync::mpsc::UnboundedSender<WorkerEvent>,
        _shutdown: watch::Sender<bool>,
    }

    fn fixture(capacity: usize) -> Fixture {
        let outputs =
            std::env::temp_dir().join(format!("zturbo-router-{}", crate::queue::job::new_job_id()));
        let (work_tx, work) = std::sync::mpsc::channel();
        let (events, events_rx) = tokio::sync::mpsc::unbounded_channel();
        let queue = queue::start(
            QueueConfig {
                capacity,
                outputs: outputs.clone(),
                model: "demo".into(),
            },
            work_tx,
            events_rx,
            Vec::new(),
        );
        let family = FamilyInfo {
            family: "z-image",
            latent_channels: 16,
            vae_scale_factor: 8,
            size_multiple: 16,
            defaults: Defaults {
                width: 1024,
                height: 1024,
                steps: 8,
                cfg: 1.8,
            },
            safe_cfg_max: 2.4,
            sampler: "Euler (flow)",
        };
        let info = ServerInfo {
            model: "demo".into(),
            demo: true,
            description: "test".into(),
            limits: Limits {
                default_width: 1024,
                default_height: 1024,
                default_steps: 8,
                default_cfg: 1.8,
                size_multiple: 16,
                max_batch: 2,
                default_memory_mode: MemoryMode::Auto,
            },
            family,
            device: "cpu".into(),
            device_name: "test cpu".into(),
            device_total_bytes: 1 << 30,
            queue_size: capacity,
            models_dir: outputs.join("models"),
            outputs,
        };
        let (shutdown_tx, shutdown) = watch::channel(false);
        let monitor = Arc::new(Monitor::start(
            Arc::new(CpuProbe::new()),
            Arc::new(Tags::default()),
        ));
        Fixture {
            app: app(AppState {
                queue,
                monitor,
                info: Arc::new(info),
                shutdown,
            }),
            work,
            _events: events,
            _shutdown: shutdown_tx,
        }
    }

    async fn call(
        app: &Router,
        method: &str,
        uri: &str,
        body: Option<&str>,
    ) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(body.map(|b| Body::from(b.to_string())).unwrap_or_default())
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = to_bytes(res.into_body(), usize::MAX).await.unwrap();
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (status, headers, json)
    }

    #[tokio::test]
    async fn serves_the_page_and_info() {
        let f = fixture(4);
        let res = f
            .app
            .clone()
            .oneshot(Request::get("/").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let html = to_bytes(res.into_body(), usize::MAX).await.unwrap();
        assert!(String::from_utf8_lossy(&html).contains("<title>zturbo</title>"));
        let (st, _, info) = call(&f.app, "GET", "/api/info", None).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(info["model"]["defaults"]["cfg"], 1.8);
        assert_eq!(info["max_batch"], 2);
        let (st, _, err) = call(&f.app, "PUT", "/api/jobs", Some("{}")).await;
        assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED);
        assert!(err["error"]["message"].is_string());
    }

    #[tokio::test]
    async fn queue_admission_positions_and_cancel() {
        let f = fixture(1);
        let body = r#"{"prompt": "a lake", "width": 64, "height": 64}"#;
        let (st, _, a) = call(&f.app, "POST", "/api/jobs", Some(body)).await;
        assert_eq!(st, StatusCode::ACCEPTED, "{a}");
        assert_eq!(a["position"], 0);
        let item = f.work.try_recv().expect("handed to the worker");
        assert_eq!(item.id, a["id"].as_str().unwrap());
        assert_eq!(item.request.width, 64);
        let (st, _, b) = call(&f.app, "POST", "/api/jobs", Some(body)).await;
        assert_eq!(st, StatusCode::ACCEPTED);
        assert_eq!(b["position"], 0);
        let (st, headers, err) = call(&f.app, "POST", "/api/jobs", Some(body)).await;
        assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{err}");
        assert_eq!(headers["retry-after"], "5");
        let (st, _, _) = call(
            &f.app,
            "POST",
            "/api/jobs",
            Some(r#"{"prompt":"x","batch":3}"#),
        )
        .await;
        assert_eq!(
            st,
            StatusCode::UNPROCESSABLE_ENTITY,
            "max_batch comes from the engine"
        );

        let b_id = b["id"].as_str().unwrap();
        let (_, _, job) = call(&f.app, "GET", &format!("/api/jobs/{b_id}"), None).await;
        assert_eq!(
            (job["state"].as_str(), job["position"].as_u64()),
            (Some("queued"), Some(0))
        );
        assert_eq!(job["params"]["cfg"], 1.8);
        let (st, _, out) = call(&f.app, "DELETE", &format!("/api/jobs/{b_id}"), None).await;
        assert_eq!(
            (st, out["state"].as_str()),
            (StatusCode::OK, Some("cancelled"))
        );
        let a_id = a["id"].as_str().unwrap();
        let (st, _, out) = call(&f.app, "DELETE", &format!("/api/jobs/{a_id}"), None).await;
        assert_eq!(
            (st, out["state"].as_str()),
            (StatusCode::ACCEPTED, Some("cancelling"))
        );
        assert!(item.cancel.is_cancelled(), "the running job's token is set");
        let (_, _, list) = call(&f.app, "GET", "/api/jobs", None).await;
        let states: Vec<&str> = list["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["state"].as_str().unwrap())
            .collect();
        assert_eq!(states, vec!["cancelled", "running"]);
    }
}
