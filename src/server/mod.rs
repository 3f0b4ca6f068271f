//! The HTTP surface (axum): the browser UI's static files, the JSON API and its SSE streams. One
//! file per surface; [`app`] builds the router from an [`AppState`] so tests can drive it without
//! a socket. The server knows jobs, requests and memory samples — never tensors.

pub mod a1111;
pub mod controlnet;
pub mod error;
pub mod images;
pub mod jobs;
pub mod listen;
pub mod memory;
pub mod models;
pub mod openai;
pub mod openapi;
mod run;
pub mod security;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::handler::Handler;
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::Router;
use futures::Stream;
use tokio::sync::watch;

use crate::families::lora::LoraDir;
use crate::families::{ComponentFiles, Profile};
use crate::memory::monitor::Monitor;
use crate::memory::planner::MemoryMode;
use crate::queue::worker::Loaded;
use crate::queue::QueueHandle;
use crate::request::Limits;
use error::ApiError;
pub use run::{describe, run, shutdown_signal, ServeError};

/// Largest request body. High enough that an oversized prompt still parses and is refused by
/// validation with a 422 naming `prompt`; anything bigger is a 413.
pub const BODY_LIMIT_BYTES: usize = 16 << 20;
/// How many finished and waiting jobs `GET /api/jobs` lists.
pub const JOB_LIST_LIMIT: usize = 200;
/// Default of `--sync-timeout`: seconds a synchronous `/v1` or `/sdapi` call waits for its jobs.
pub const DEFAULT_SYNC_TIMEOUT_S: u64 = 600;
const SSE_KEEP_ALIVE: Duration = Duration::from_secs(15);

/// What the server tells clients about itself; fixed at start-up.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub model: String,
    pub demo: bool,
    pub description: String,
    /// The loaded model's profile (defaults as the model serves them).
    pub profile: Profile,
    pub limits: Limits,
    /// `cpu`, `cuda:0`, `metal`.
    pub device: String,
    pub device_name: String,
    pub device_total_bytes: u64,
    pub queue_size: usize,
    pub models_dir: PathBuf,
    pub outputs: PathBuf,
    /// The loaded model's folder (`None` for the embedded demo).
    pub model_path: Option<String>,
    /// Component weights loaded from single files (`--transformer` …).
    pub component_files: ComponentFiles,
    /// `--comfyui-dir`: a ComfyUI tree whose weight files the Models panel lists.
    pub comfyui_dir: Option<PathBuf>,
    /// Seconds since the Unix epoch when the server started (OpenAI's model `created`).
    pub started_at_s: u64,
    /// The layers a LoRA may update: named LoRA files are checked against them on submission.
    pub lora_layers: Arc<crate::families::lora::LinearLayers>,
    /// Job streams carry `preview` events (`zturbo serve --preview off` turns them off).
    pub preview: bool,
    /// How long a synchronous call (`/v1`, `/sdapi`) waits for its jobs (`None`: no limit).
    pub sync_timeout: Option<Duration>,
}

impl ServerInfo {
    /// A front door's facts: the model as its workers registered it, no local device.
    pub fn remote(
        record: &crate::queue::broker::wire::ModelRecord,
        queue_size: usize,
        models_dir: PathBuf,
        outputs: PathBuf,
    ) -> Self {
        let profile = record.profile();
        Self {
            model: record.model.clone(),
            demo: record.demo,
            description: record.description.clone(),
            profile,
            limits: Limits::new(&profile, record.max_batch, MemoryMode::Auto),
            device: "remote".into(),
            device_name: "remote workers".into(),
            device_total_bytes: 0,
            queue_size,
            models_dir,
            outputs,
            model_path: None,
            component_files: ComponentFiles::default(),
            comfyui_dir: None,
            started_at_s: crate::queue::job::now_ms() / 1000,
            lora_layers: Default::default(),
            // The workers' steps do not travel through the broker: no live previews here.
            preview: false,
            sync_timeout: Some(Duration::from_secs(DEFAULT_SYNC_TIMEOUT_S)),
        }
    }

    pub fn new(loaded: &Loaded, queue_size: usize, models_dir: PathBuf, outputs: PathBuf) -> Self {
        Self {
            lora_layers: loaded.lora_layers.clone(),
            model: loaded.model.clone(),
            demo: loaded.meta.demo,
            description: loaded.meta.description.clone(),
            profile: loaded.profile,
            limits: Limits::new(&loaded.profile, loaded.max_batch, MemoryMode::Auto),
            device: loaded.device.clone(),
            device_name: loaded.probe.name(),
            device_total_bytes: loaded.probe.total_bytes(),
            queue_size,
            models_dir,
            outputs,
            model_path: loaded.meta.path.clone(),
            component_files: loaded.meta.files.clone(),
            comfyui_dir: None,
            started_at_s: crate::queue::job::now_ms() / 1000,
            preview: true,
            sync_timeout: Some(Duration::from_secs(DEFAULT_SYNC_TIMEOUT_S)),
        }
    }

    /// The same server with `loaded` as its model (after a switch).
    pub fn with_model(&self, loaded: &Loaded) -> Self {
        Self {
            model: loaded.model.clone(),
            demo: loaded.meta.demo,
            description: loaded.meta.description.clone(),
            profile: loaded.profile,
            limits: Limits::new(&loaded.profile, loaded.max_batch, MemoryMode::Auto),
            model_path: loaded.meta.path.clone(),
            component_files: loaded.meta.files.clone(),
            lora_layers: loaded.lora_layers.clone(),
            ..self.clone()
        }
    }
}

/// The server's facts, replaced as a whole when the worker switches models; handlers read a
/// snapshot ([`AppState::info`]) and never hold the lock.
#[derive(Clone)]
pub struct SharedInfo(Arc<std::sync::RwLock<Arc<ServerInfo>>>);

impl SharedInfo {
    pub fn new(info: ServerInfo) -> Self {
        Self(Arc::new(std::sync::RwLock::new(Arc::new(info))))
    }

    pub fn get(&self) -> Arc<ServerInfo> {
        // A poisoned lock still holds a whole ServerInfo (it is replaced, never edited in place).
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, info: ServerInfo) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(info);
    }
}

impl ServerInfo {
    /// `<models-dir>/loras/`: the LoRAs requests may name, checked against the loaded model (a
    /// front door has no model here, so its workers check them when they attach them).
    pub fn lora_dir(&self) -> LoraDir {
        let dir = LoraDir::new(self.models_dir.join("loras"));
        if self.lora_layers.is_empty() {
            dir
        } else {
            dir.with_layers(self.lora_layers.clone())
        }
    }

    /// `<models-dir>/controlnet/` (and a ComfyUI tree's `models/controlnet/`): the ControlNets
    /// requests may name.
    pub fn control_dir(&self) -> crate::control::ControlDir {
        crate::control::ControlDir::for_models_dir(&self.models_dir)
    }
}

#[derive(Clone)]
pub struct AppState {
    pub queue: QueueHandle,
    pub monitor: Arc<Monitor>,
    pub info: SharedInfo,
    /// Turns `true` when the server shuts down: SSE streams end so connections can drain.
    pub shutdown: watch::Receiver<bool>,
    pub security: Arc<security::Security>,
    /// Model downloads started from the UI.
    pub downloads: models::Downloads,
    /// With `--broker`: the remote workers (their registry and memory samples).
    pub cluster: Option<crate::queue::broker::front::FrontHandle>,
}

impl AppState {
    /// The server's facts now (the loaded model's, after any switch).
    pub fn info(&self) -> Arc<ServerInfo> {
        self.info.get()
    }

    /// Follows the worker's model switches: `/api/info`, `/api/health`, validation limits and the
    /// A1111 options name the model that is loaded — updated before the switch is announced, so a
    /// client that hears "loaded" and reads `/api/info` sees the new model.
    pub async fn follow_model_switches(&self) {
        let info = self.info.clone();
        self.queue
            .on_model_loaded(move |loaded| info.set(info.get().with_model(loaded)))
            .await;
    }

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

/// A route's method; the router and the OpenAPI document's test both read [`routes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    Get,
    Post,
    Delete,
}

impl Verb {
    fn filter(self) -> MethodFilter {
        match self {
            Verb::Get => MethodFilter::GET,
            Verb::Post => MethodFilter::POST,
            Verb::Delete => MethodFilter::DELETE,
        }
    }

    pub fn method(self) -> Method {
        match self {
            Verb::Get => Method::GET,
            Verb::Post => Method::POST,
            Verb::Delete => Method::DELETE,
        }
    }

    /// The lower-case name OpenAPI uses for the operation.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::Post => "post",
            Verb::Delete => "delete",
        }
    }
}

/// One route: method, path (axum's and OpenAPI's `{param}` syntax are the same) and handler.
pub struct Route {
    pub verb: Verb,
    pub path: &'static str,
    handler: MethodRouter<AppState>,
}

fn route<H, T>(verb: Verb, path: &'static str, handler: H) -> Route
where
    H: Handler<T, AppState>,
    T: 'static,
{
    Route {
        verb,
        path,
        handler: on(verb.filter(), handler),
    }
}

/// Every route the server answers, in one table: [`app`] builds the router from it and the
/// OpenAPI test checks that `/openapi.json` documents exactly these.
pub fn routes() -> Vec<Route> {
    use Verb::{Delete, Get, Post};
    vec![
        route(Get, "/", index),
        route(Get, "/index.html", index),
        route(Get, "/app.js", app_js),
        route(Get, "/style.css", style_css),
        route(Get, "/openapi.json", openapi::document),
        route(Get, "/images/{file}", images::get),
        route(Get, "/api/health", models::health),
        route(Get, "/api/info", models::info),
        route(Get, "/api/auth", security::auth_status),
        route(Post, "/api/auth", security::auth),
        route(Get, "/api/models", models::list),
        route(Post, "/api/model", models::select),
        route(Get, "/api/events", models::events),
        route(Post, "/api/models/{name}/pull", models::pull),
        route(Get, "/api/models/{name}/pull/events", models::pull_events),
        route(Post, "/api/enhance", jobs::enhance),
        route(Get, "/api/jobs", jobs::list),
        route(Post, "/api/jobs", jobs::submit),
        route(Delete, "/api/jobs", jobs::cancel_all),
        route(Get, "/api/history", jobs::history),
        route(Delete, "/api/history/{id}", jobs::delete),
        route(Get, "/api/jobs/{id}", jobs::get),
        route(Delete, "/api/jobs/{id}", jobs::cancel),
        route(Get, "/api/jobs/{id}/events", jobs::events),
        route(Get, "/api/memory/stream", memory::stream),
        route(Get, "/api/workers", models::workers),
        route(Post, "/v1/images/generations", openai::generations),
        route(Post, "/v1/images/edits", openai::edits),
        route(Get, "/v1/models", openai::models),
        route(Get, "/v1/models/{model}", openai::model),
        route(Post, "/sdapi/v1/txt2img", a1111::txt2img),
        route(Post, "/sdapi/v1/img2img", a1111::img2img),
        route(Get, "/sdapi/v1/loras", a1111::loras),
        route(Post, "/sdapi/v1/refresh-loras", a1111::refresh_loras),
        route(Get, "/sdapi/v1/progress", a1111::progress),
        route(Post, "/sdapi/v1/interrupt", a1111::interrupt),
        route(Get, "/sdapi/v1/sd-models", a1111::sd_models),
        route(Get, "/sdapi/v1/options", a1111::options),
        route(Post, "/sdapi/v1/options", a1111::set_options),
        route(Get, "/sdapi/v1/samplers", a1111::samplers),
        route(Get, "/sdapi/v1/schedulers", a1111::schedulers),
        route(Get, "/sdapi/v1/scripts", a1111::scripts),
        route(Get, "/controlnet/model_list", controlnet::model_list),
        route(Get, "/controlnet/module_list", controlnet::module_list),
        route(Post, "/controlnet/detect", controlnet::detect),
    ]
}

pub fn app(state: AppState) -> Router {
    let mut router = Router::new();
    for r in routes() {
        router = router.route(r.path, r.handler);
    }
    let cors = state.security.cors_origin.as_deref().and_then(|o| {
        let origin = HeaderValue::from_str(o).ok()?;
        Some(
            tower_http::cors::CorsLayer::new()
                .allow_origin(origin)
                .allow_methods([Method::GET, Method::POST, Method::DELETE])
                .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION])
                .max_age(Duration::from_secs(600)),
        )
    });
    let router = router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            security::guard,
        ));
    // CORS outside the guard: a preflight carries no credentials and is answered here.
    let router = match cors {
        Some(c) => router.layer(c),
        None => router,
    };
    router
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

// The UI is compiled in (every file under `static/`, listed by build.rs), so the binary serves it
// from anywhere with no build step.
mod assets {
    include!(concat!(env!("OUT_DIR"), "/static_assets.rs"));
}

/// The file of the UI at `path` (`/app.js`, `/js/api.js`), if there is one.
pub fn static_asset(path: &str) -> Option<&'static [u8]> {
    assets::ASSETS
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, body)| *body)
}

/// The content type the browser needs for a UI file (ES modules must be JavaScript).
fn content_type(path: &str) -> &'static str {
    let ext = path.rsplit_once('.').map_or("", |(_, e)| e);
    match ext.to_ascii_lowercase().as_str() {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        _ => "application/octet-stream",
    }
}

/// UI development: `ZTURBO_UI_DIR=static` serves the UI's files from that folder instead of the
/// compiled-in copies (edit, reload, no rebuild). Only paths the binary has are served.
pub const UI_DIR_ENV: &str = "ZTURBO_UI_DIR";

/// Serves the UI file at `path`, or 404 in the UI's error shape.
fn asset(path: &str) -> Response {
    match static_asset(path) {
        Some(body) => {
            let body: std::borrow::Cow<'static, [u8]> = match std::env::var_os(UI_DIR_ENV) {
                Some(dir) => {
                    let file = std::path::Path::new(&dir).join(path.trim_start_matches('/'));
                    match std::fs::read(&file) {
                        Ok(bytes) => bytes.into(),
                        Err(e) => {
                            tracing::warn!(
                                "{UI_DIR_ENV}: cannot read {}: {e}; serving the built-in copy",
                                file.display()
                            );
                            body.into()
                        }
                    }
                }
                None => body.into(),
            };
            (
                [
                    (header::CONTENT_TYPE, content_type(path)),
                    // Revalidate every load: a new binary may bring a new UI.
                    (header::CACHE_CONTROL, "no-cache"),
                ],
                body,
            )
                .into_response()
        }
        None => surface_error(
            path,
            StatusCode::NOT_FOUND,
            format!("no such page or endpoint: {path}"),
        ),
    }
}

async fn index() -> Response {
    asset("/index.html")
}

async fn app_js() -> Response {
    asset("/app.js")
}

async fn style_css() -> Response {
    asset("/style.css")
}

/// An error in the shape of the surface `path` belongs to.
fn surface_error(path: &str, status: StatusCode, message: String) -> Response {
    if path == "/v1" || path.starts_with("/v1/") {
        openai::error(status, None, None, message).into_response()
    } else if path.starts_with("/sdapi/") {
        a1111::detail(status, message)
    } else {
        ApiError::new(status, None, message).into_response()
    }
}

/// Anything not in the route table: a UI file (a GET of any path under `static/`, e.g. the UI's
/// ES modules), else 404 in the shape of the surface the path belongs to.
async fn not_found(method: Method, uri: axum::http::Uri) -> Response {
    let path = uri.path();
    if (method == Method::GET || method == Method::HEAD) && static_asset(path).is_some() {
        return asset(path);
    }
    surface_error(
        path,
        StatusCode::NOT_FOUND,
        format!("no such page or endpoint: {path}"),
    )
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let path = uri.path();
    surface_error(
        path,
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {path}"),
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

    use crate::families::{Defaults, FamilyKind};
    use crate::memory::monitor::Tags;
    use crate::memory::probe::CpuProbe;
    use crate::queue::worker::{Work, WorkerEvent};
    use crate::queue::{self, QueueConfig};

    /// A server whose worker never runs anything: jobs handed to it stay "running".
    struct Fixture {
        app: Router,
        work: std::sync::mpsc::Receiver<Work>,
        _events: tokio::sync::mpsc::UnboundedSender<WorkerEvent>,
        _shutdown: watch::Sender<bool>,
    }

    fn fixture(capacity: usize) -> Fixture {
        fixture_with(capacity, security::Security::default())
    }

    fn fixture_with(capacity: usize, security: security::Security) -> Fixture {
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
        let profile = Profile {
            defaults: Defaults {
                width: 1024,
                height: 1024,
                steps: 8,
                cfg: 1.8,
            },
            ..FamilyKind::ZImage.profile()
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
                img2img: crate::families::z_image::profile::IMG2IMG_DEFAULTS,
            },
            profile,
            device: "cpu".into(),
            device_name: "test cpu".into(),
            device_total_bytes: 1 << 30,
            queue_size: capacity,
            models_dir: outputs.join("models"),
            outputs,
            model_path: None,
            component_files: ComponentFiles::default(),
            comfyui_dir: None,
            started_at_s: 0,
            lora_layers: Default::default(),
            preview: true,
            sync_timeout: Some(Duration::from_secs(2)),
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
                info: SharedInfo::new(info),
                shutdown,
                security: Arc::new(security),
                downloads: models::Downloads::default(),
                cluster: None,
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
        call_with(app, method, uri, &[], body).await
    }

    async fn call_with(
        app: &Router,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
        call_from(app, None, method, uri, headers, body).await
    }

    /// [`call_with`] from a client address (as the accept loop records it).
    async fn call_from(
        app: &Router,
        client: Option<&str>,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(c) = client {
            let addr: std::net::SocketAddr = c.parse().unwrap();
            req = req.extension(axum::extract::ConnectInfo(addr));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if body.is_some()
            && !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
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
        // The family's profile, as the UI draws presets and hints from it.
        let profile = &info["model"]["profile"];
        assert_eq!(profile["family"], "z-image");
        assert_eq!(
            profile["steps"]["presets"],
            serde_json::json!([4, 6, 8, 12])
        );
        assert_eq!(profile["cfg"]["intercept_at"], 3.0);
        let bands = profile["cfg"]["bands"].as_array().unwrap();
        assert!(bands.last().unwrap()["max"].is_null());
        assert!(bands
            .iter()
            .all(|b| b["hint"].is_string() && b["advice"].is_string()));
        let (st, _, err) = call(&f.app, "PUT", "/api/jobs", Some("{}")).await;
        assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED);
        assert!(err["error"]["message"].is_string());
    }

    /// Every `src`/`href` of index.html and every module a module imports (`import … from
    /// './x.js'`, `export … from`, `import('./x.js')`), resolved like a browser would.
    fn referenced_assets() -> Vec<String> {
        fn quoted_after<'a>(text: &'a str, marker: &str) -> Vec<&'a str> {
            let mut out = Vec::new();
            let mut rest = text;
            while let Some(i) = rest.find(marker) {
                rest = &rest[i + marker.len()..];
                let trimmed = rest.trim_start_matches(['(', ' ']);
                if let Some(q) = trimmed.chars().next().filter(|c| matches!(c, '\'' | '"')) {
                    if let Some(end) = trimmed[1..].find(q) {
                        out.push(&trimmed[1..1 + end]);
                    }
                }
            }
            out
        }
        fn resolve(from: &str, spec: &str) -> String {
            let mut parts: Vec<&str> = from.split('/').collect();
            parts.pop();
            for seg in spec.split('/') {
                match seg {
                    "." => {}
                    ".." => {
                        parts.pop();
                    }
                    s => parts.push(s),
                }
            }
            parts.join("/")
        }
        let html = std::str::from_utf8(static_asset("/index.html").unwrap()).unwrap();
        let mut todo: Vec<String> = ["src=", "href="]
            .iter()
            .flat_map(|m| quoted_after(html, m))
            .filter(|u| !u.starts_with('#') && !u.starts_with("data:") && !u.contains("://"))
            .map(|u| resolve("index.html", u))
            .collect();
        let mut seen = Vec::new();
        while let Some(path) = todo.pop() {
            if seen.contains(&path) {
                continue;
            }
            if path.ends_with(".js") {
                if let Some(body) = static_asset(&format!("/{path}")) {
                    let js = std::str::from_utf8(body).unwrap();
                    for marker in [" from ", "import(", "import "] {
                        for spec in quoted_after(js, marker) {
                            if spec.starts_with("./") || spec.starts_with("../") {
                                todo.push(resolve(&path, spec));
                            }
                        }
                    }
                }
            }
            seen.push(path);
        }
        seen
    }

    #[tokio::test]
    async fn every_module_the_page_loads_is_served_as_javascript() {
        let f = fixture(1);
        let assets = referenced_assets();
        let modules: Vec<&String> = assets.iter().filter(|p| p.ends_with(".js")).collect();
        // app.js, and the modules it imports (directly or not).
        assert!(modules.len() >= 10, "{assets:?}");
        assert!(
            modules.iter().any(|m| m.as_str() == "js/i18n.zh-CN.js"),
            "{modules:?}"
        );
        for path in &assets {
            let res = f
                .app
                .clone()
                .oneshot(
                    Request::get(format!("/{path}"))
                        .body(Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::OK, "/{path}");
            let ct = res.headers()[header::CONTENT_TYPE].to_str().unwrap();
            let want = if path.ends_with(".js") {
                "text/javascript"
            } else if path.ends_with(".css") {
                "text/css"
            } else {
                "text/html"
            };
            assert!(ct.starts_with(want), "/{path}: {ct}");
        }
        // Every module under static/ is reachable from the page (none is dead weight), and a
        // name the UI does not have is a 404 in the API's error shape.
        for (path, _) in assets::ASSETS {
            if path.ends_with(".js") {
                let rel = path.trim_start_matches('/');
                assert!(assets.iter().any(|a| a == rel), "{path} is never imported");
            }
        }
        let (st, _, err) = call(&f.app, "GET", "/js/nope.js", None).await;
        assert_eq!(st, StatusCode::NOT_FOUND);
        assert!(err["error"]["message"].is_string());
        let (st, _, _) = call(&f.app, "GET", "/js/..%2Fapp.js", None).await;
        assert_eq!(st, StatusCode::NOT_FOUND);
    }

    /// Every file under `static/` is served at its path with a content type the browser accepts
    /// (ES modules need JavaScript's), whether or not the route table names it.
    #[tokio::test]
    async fn every_ui_file_is_served_with_its_content_type() {
        let f = fixture(1);
        assert!(static_asset("/index.html").is_some() && static_asset("/app.js").is_some());
        for (path, body) in assets::ASSETS {
            let res = f
                .app
                .clone()
                .oneshot(Request::get(*path).body(Body::empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::OK, "{path}");
            let ct = res.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .to_owned();
            if path.ends_with(".js") {
                assert_eq!(ct, "text/javascript; charset=utf-8", "{path}");
            }
            let got = to_bytes(res.into_body(), usize::MAX).await.unwrap();
            assert_eq!(&got[..], *body, "{path}");
        }
        let (st, _, err) = call(&f.app, "GET", "/js/no-such-module.js", None).await;
        assert_eq!(st, StatusCode::NOT_FOUND);
        assert!(err["error"]["message"].is_string());
        assert_eq!(content_type("/js/api.js"), "text/javascript; charset=utf-8");
        assert_eq!(content_type("/style.css"), "text/css; charset=utf-8");
    }

    #[tokio::test]
    async fn queue_admission_positions_and_cancel() {
        let f = fixture(1);
        let body = r#"{"prompt": "a lake", "width": 64, "height": 64}"#;
        let (st, _, a) = call(&f.app, "POST", "/api/jobs", Some(body)).await;
        assert_eq!(st, StatusCode::ACCEPTED, "{a}");
        assert_eq!(a["position"], 0);
        let Work::Job(item) = f.work.try_recv().expect("handed to the worker") else {
            panic!("a job, not a model switch");
        };
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

    fn guarded() -> Fixture {
        fixture_with(
            4,
            security::Security {
                api_key: Some("s3cret-key".into()),
                loopback: true,
                port: 7860,
                cors_origin: Some("https://app.example.com".into()),
                ..Default::default()
            },
        )
    }

    const HOST: (&str, &str) = ("host", "127.0.0.1:7860");
    const BEARER: (&str, &str) = ("authorization", "Bearer s3cret-key");

    #[tokio::test]
    async fn host_must_name_this_loopback_server() {
        let f = guarded();
        for host in [
            "evil.example:7860",
            "127.0.0.1:8080",
            "192.168.1.5:7860",
            "localhost",
        ] {
            let (st, _, err) = call_with(&f.app, "GET", "/", &[("host", host), BEARER], None).await;
            assert_eq!(st, StatusCode::FORBIDDEN, "{host}");
            assert!(err["error"]["message"]
                .as_str()
                .unwrap()
                .contains("loopback"));
        }
        for host in ["127.0.0.1:7860", "localhost:7860", "[::1]:7860"] {
            let (st, _, _) = call_with(
                &f.app,
                "GET",
                "/api/health",
                &[("host", host), BEARER],
                None,
            )
            .await;
            assert_eq!(st, StatusCode::OK, "{host}");
        }
    }

    #[tokio::test]
    async fn api_key_is_required_on_the_api_surfaces() {
        let f = guarded();
        let (st, h, err) = call_with(&f.app, "GET", "/api/health", &[HOST], None).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        assert!(h[header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .starts_with("Bearer"));
        assert!(err["error"]["message"].is_string());
        let (st, _, err) = call_with(&f.app, "GET", "/v1/models", &[HOST], None).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        assert_eq!(err["error"]["code"], "invalid_api_key");
        assert_eq!(err["error"]["type"], "invalid_request_error");
        let (st, _, err) = call_with(&f.app, "GET", "/sdapi/v1/options", &[HOST], None).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        assert!(err["detail"].is_string());
        let wrong = ("authorization", "Bearer nope");
        let (st, _, _) = call_with(&f.app, "GET", "/v1/models", &[HOST, wrong], None).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        // The page itself and the API description need no key.
        for path in ["/", "/app.js", "/openapi.json"] {
            let (st, _, _) = call_with(&f.app, "GET", path, &[HOST], None).await;
            assert_eq!(st, StatusCode::OK, "{path}");
        }
        // Bearer (OpenAI SDKs) and Basic with the key as password (A1111 clients).
        let (st, _, m) = call_with(&f.app, "GET", "/v1/models", &[HOST, BEARER], None).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(m["object"], "list");
        use base64::Engine as _;
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("user:s3cret-key")
        );
        let (st, _, _) = call_with(
            &f.app,
            "GET",
            "/sdapi/v1/sd-models",
            &[HOST, ("authorization", &basic)],
            None,
        )
        .await;
        assert_eq!(st, StatusCode::OK);
    }

    #[tokio::test]
    async fn the_ui_logs_in_with_a_cookie() {
        let f = guarded();
        let (_, _, st) = call_with(&f.app, "GET", "/api/auth", &[HOST], None).await;
        assert_eq!(
            st,
            serde_json::json!({"required": true, "authorized": false})
        );
        let (code, _, err) = call_with(
            &f.app,
            "POST",
            "/api/auth",
            &[HOST, ("content-type", "application/json")],
            Some(r#"{"key":"wrong"}"#),
        )
        .await;
        assert_eq!(code, StatusCode::UNAUTHORIZED);
        assert_eq!(err["error"]["field"], "key");
        let (code, headers, _) = call_with(
            &f.app,
            "POST",
            "/api/auth",
            &[HOST, ("content-type", "application/json")],
            Some(r#"{"key":"s3cret-key"}"#),
        )
        .await;
        assert_eq!(code, StatusCode::NO_CONTENT);
        let cookie = headers[header::SET_COOKIE].to_str().unwrap().to_string();
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
            "{cookie}"
        );
        assert!(
            !cookie.contains("s3cret-key"),
            "the cookie must not carry the key"
        );
        let pair = cookie.split(';').next().unwrap().to_string();
        let (code, _, _) =
            call_with(&f.app, "GET", "/api/info", &[HOST, ("cookie", &pair)], None).await;
        assert_eq!(code, StatusCode::OK);
        let (_, _, st) =
            call_with(&f.app, "GET", "/api/auth", &[HOST, ("cookie", &pair)], None).await;
        assert_eq!(st["authorized"], true);
    }

    #[tokio::test]
    async fn signed_image_urls_open_one_image() {
        let f = guarded();
        let sec = security::Security {
            api_key: Some("s3cret-key".into()),
            ..Default::default()
        };
        let file = "0123456789abcdef-1.png";
        let signed = sec.image_path(file);
        assert!(
            signed.starts_with("/images/0123456789abcdef-1.png?sig="),
            "{signed}"
        );
        // Authorized (the file does not exist: 404, not 401).
        let (st, _, _) = call_with(&f.app, "GET", &signed, &[HOST], None).await;
        assert_eq!(st, StatusCode::NOT_FOUND);
        let other = signed.replace("-1.png", "-2.png");
        let (st, _, _) = call_with(&f.app, "GET", &other, &[HOST], None).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn cross_origin_state_changes_are_refused() {
        let f = guarded();
        let json = ("content-type", "application/json");
        let body = Some(r#"{"prompt": "a lake", "width": 64, "height": 64}"#);
        for origin in ["https://evil.example", "null", "http://127.0.0.1:9999"] {
            let (st, _, err) = call_with(
                &f.app,
                "POST",
                "/api/jobs",
                &[HOST, BEARER, json, ("origin", origin)],
                body,
            )
            .await;
            assert_eq!(st, StatusCode::FORBIDDEN, "{origin}");
            assert!(err["error"]["message"]
                .as_str()
                .unwrap()
                .contains("cross-origin"));
        }
        // Fetch Metadata without Origin.
        let (st, _, _) = call_with(
            &f.app,
            "POST",
            "/api/jobs",
            &[HOST, BEARER, json, ("sec-fetch-site", "cross-site")],
            body,
        )
        .await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        // Our own origin (either loopback name), the configured one, and no Origin at all pass.
        for origin in [
            Some("http://127.0.0.1:7860"),
            Some("http://localhost:7860"),
            Some("https://app.example.com"),
            None,
        ] {
            let mut headers = vec![HOST, BEARER, json];
            if let Some(o) = origin {
                headers.push(("origin", o));
            }
            let (st, _, out) = call_with(&f.app, "POST", "/api/jobs", &headers, body).await;
            assert_eq!(st, StatusCode::ACCEPTED, "{origin:?}: {out}");
        }
        // A GET from another origin is not state-changing (and CORS keeps its answer unreadable).
        let (st, h, _) = call_with(
            &f.app,
            "GET",
            "/api/health",
            &[HOST, BEARER, ("origin", "https://evil.example")],
            None,
        )
        .await;
        assert_eq!(st, StatusCode::OK);
        assert!(h
            .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
            .is_none_or(|v| v == "https://app.example.com"));
    }

    #[tokio::test]
    async fn cors_allows_the_configured_origin_only() {
        let f = guarded();
        let preflight = |origin: &'static str| {
            Request::builder()
                .method("OPTIONS")
                .uri("/v1/images/generations")
                .header("host", "127.0.0.1:7860")
                .header("origin", origin)
                .header("access-control-request-method", "POST")
                .header(
                    "access-control-request-headers",
                    "authorization,content-type",
                )
                .body(Body::empty())
                .unwrap()
        };
        let res = f
            .app
            .clone()
            .oneshot(preflight("https://app.example.com"))
            .await
            .unwrap();
        assert!(res.status().is_success(), "{}", res.status());
        assert_eq!(
            res.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://app.example.com"
        );
        // The one allowed origin is named whoever asks: a browser on another origin sees no match.
        let res = f
            .app
            .clone()
            .oneshot(preflight("https://evil.example"))
            .await
            .unwrap();
        assert!(res
            .headers()
            .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
            .is_none_or(|v| v == "https://app.example.com"));
        // Off by default: no CORS headers at all.
        let plain = fixture(1);
        let res = plain
            .app
            .clone()
            .oneshot(preflight("https://app.example.com"))
            .await
            .unwrap();
        assert!(res
            .headers()
            .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
            .is_none());
    }

    #[tokio::test]
    async fn json_posts_need_a_json_content_type() {
        let f = fixture(4);
        let body = r#"{"prompt": "a lake", "width": 64, "height": 64}"#;
        for (uri, shape) in [
            ("/api/jobs", "/error/message"),
            ("/api/enhance", "/error/message"),
            ("/v1/images/generations", "/error/message"),
            ("/sdapi/v1/txt2img", "/detail"),
        ] {
            for ct in [
                None,
                Some("text/plain"),
                Some("application/x-www-form-urlencoded"),
            ] {
                let req = Request::builder().method("POST").uri(uri);
                let req = match ct {
                    Some(c) => req.header("content-type", c),
                    None => req,
                };
                let res = f
                    .app
                    .clone()
                    .oneshot(req.body(Body::from(body)).unwrap())
                    .await
                    .unwrap();
                assert_eq!(
                    res.status(),
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "{uri} {ct:?}"
                );
                let bytes = to_bytes(res.into_body(), usize::MAX).await.unwrap();
                let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                let msg = v.pointer(shape).and_then(|m| m.as_str()).unwrap_or("");
                assert!(msg.contains("application/json"), "{uri}: {v}");
            }
        }
        assert!(f.work.try_recv().is_err(), "nothing was queued");
    }

    #[tokio::test]
    async fn origin_scheme_and_host_port_spelling_are_checked() {
        let f = guarded();
        let json = ("content-type", "application/json");
        let body = Some(r#"{"prompt": "a lake", "width": 64, "height": 64}"#);
        // This server speaks plain http: an https page of the same host and port is another origin.
        let (st, _, err) = call_with(
            &f.app,
            "POST",
            "/api/jobs",
            &[HOST, BEARER, json, ("origin", "https://127.0.0.1:7860")],
            body,
        )
        .await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{err}");
        // One spelling of the port.
        for host in ["127.0.0.1:07860", "localhost:+7860", "[::1]:07860"] {
            let (st, _, _) = call_with(
                &f.app,
                "GET",
                "/api/health",
                &[("host", host), BEARER],
                None,
            )
            .await;
            assert_eq!(st, StatusCode::FORBIDDEN, "{host}");
        }
    }

    #[tokio::test]
    async fn rebinding_names_are_not_trusted_off_loopback_without_a_key() {
        let f = fixture_with(
            4,
            security::Security {
                loopback: false,
                port: 7860,
                cors_origin: Some("https://app.example.com".into()),
                ..Default::default()
            },
        );
        let json = ("content-type", "application/json");
        let body = Some(r#"{"prompt": "a lake", "width": 64, "height": 64}"#);
        let post = |host: &'static str, origin: &'static str| {
            let app = f.app.clone();
            async move {
                call_with(
                    &app,
                    "POST",
                    "/api/jobs",
                    &[("host", host), ("origin", origin), json],
                    body,
                )
                .await
                .0
            }
        };
        // A DNS-rebinding page: its own name in both Host and Origin.
        assert_eq!(
            post("evil.example:7860", "http://evil.example:7860").await,
            StatusCode::FORBIDDEN
        );
        // The page opened by address (or on the machine itself) still works.
        assert_eq!(
            post("192.168.1.5:7860", "http://192.168.1.5:7860").await,
            StatusCode::ACCEPTED
        );
        assert_eq!(
            post("localhost:7860", "http://127.0.0.1:7860").await,
            StatusCode::ACCEPTED
        );
        assert_eq!(
            post("192.168.1.5:7860", "http://192.168.1.6:7860").await,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            post("192.168.1.5:7860", "http://192.168.1.5:8080").await,
            StatusCode::FORBIDDEN
        );
        // A name the operator named.
        assert_eq!(
            post("evil.example:7860", "https://app.example.com").await,
            StatusCode::ACCEPTED
        );
    }

    #[tokio::test]
    async fn wrong_keys_are_rate_limited_per_client_address() {
        let f = guarded();
        let wrong = ("authorization", "Bearer guess");
        let a = Some("10.1.2.3:5555");
        for i in 0..security::KEY_FAILURE_BURST {
            let (st, _, _) = call_from(&f.app, a, "GET", "/api/jobs", &[HOST, wrong], None).await;
            assert_eq!(st, StatusCode::UNAUTHORIZED, "guess {i}");
        }
        let (st, h, err) = call_from(&f.app, a, "GET", "/v1/models", &[HOST, wrong], None).await;
        assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{err}");
        assert!(err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("wrong API keys"));
        let wait: u64 = h[header::RETRY_AFTER].to_str().unwrap().parse().unwrap();
        assert!((1..=security::KEY_FAILURE_REFILL.as_secs()).contains(&wait));
        // While locked, not even the right key is tried from there; /api/auth is limited too.
        let (st, _, _) = call_from(&f.app, a, "GET", "/api/jobs", &[HOST, BEARER], None).await;
        assert_eq!(st, StatusCode::TOO_MANY_REQUESTS);
        let (st, _, _) = call_from(
            &f.app,
            a,
            "POST",
            "/api/auth",
            &[HOST],
            Some(r#"{"key":"s3cret-key"}"#),
        )
        .await;
        assert_eq!(st, StatusCode::TOO_MANY_REQUESTS);
        // A request without any key is not a guess: still the plain 401.
        let (st, _, _) = call_from(&f.app, a, "GET", "/api/jobs", &[HOST], None).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        // Expired image URLs are not guesses: a page full of stale images does not lock its
        // address out.
        let signer = security::Security {
            api_key: Some("s3cret-key".into()),
            ..Default::default()
        };
        let file = "0123456789abcdef-1.png";
        let stale = format!(
            "/images/{file}?sig={}",
            signer.image_sig_until(file, 1_000).unwrap()
        );
        for _ in 0..2 * security::KEY_FAILURE_BURST {
            let (st, _, err) =
                call_from(&f.app, Some("10.1.2.5:5555"), "GET", &stale, &[HOST], None).await;
            assert_eq!(st, StatusCode::UNAUTHORIZED);
            assert!(
                err["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("expired"),
                "{err}"
            );
        }
        // Other addresses are unaffected.
        let (st, _, _) = call_from(
            &f.app,
            Some("10.1.2.4:5555"),
            "GET",
            "/api/jobs",
            &[HOST, BEARER],
            None,
        )
        .await;
        assert_eq!(st, StatusCode::OK);
    }
}
