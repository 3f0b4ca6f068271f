//! What is loaded and what could be: `/api/health`, `/api/info` (everything the form needs to
//! set itself up), `/api/models` (catalog, local folders and the demo, with their state), and
//! downloads the UI starts (`POST /api/models/{name}/pull`, progress over SSE).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::broadcast;

use super::error::ApiError;
use super::AppState;
use crate::families::catalog::{self, ModelState};
use crate::families::variants;
use crate::families::weights;
use crate::families::FamilyKind;
use crate::memory::planner::MemoryMode;
use crate::queue::{ModelEvent, SelectOutcome};
use crate::request::Limits;
use crate::request::{
    MAX_CFG, MAX_PROMPT_CHARS, MAX_SIDE, MAX_STEPS, MIN_CFG, MIN_SIDE, MIN_STEPS,
};

/// An f32 as the f64 with the same shortest decimal form, so 1.8f32 is sent as 1.8 rather than
/// 1.7999999523162842 (which the form would show and compare against).
pub fn json_f32(x: f32) -> f64 {
    crate::families::profile::shortest_f64(x)
}

/// `GET /api/health`: `ok`, or `degraded` with the `reason` when the outputs folder cannot be
/// written (read-only, full, or a recent write failed) — the server still answers, but new jobs
/// would fail.
pub async fn health(State(s): State<AppState>) -> Json<Value> {
    let outputs = s.queue.outputs_health();
    let mut problem = tokio::task::spawn_blocking(move || outputs.problem())
        .await
        .unwrap_or_else(|e| Some(format!("the outputs folder could not be checked: {e}")));
    if let Some(c) = &s.cluster {
        problem = problem.or_else(|| c.health().problem());
    }
    let mut body = json!({
        "status": if problem.is_some() { "degraded" } else { "ok" },
        "model": s.info().model,
        "device": s.info().device,
    });
    if let Some(reason) = problem {
        body["reason"] = json!(reason);
    }
    if let Some(c) = &s.cluster {
        body["workers"] = json!(c.workers().len());
    }
    Json(body)
}

/// A remote worker as `/api/workers` and `/api/info` list it.
fn worker_view(w: &crate::queue::broker::wire::WorkerInfo) -> Value {
    json!({
        "name": w.name,
        "model": w.model,
        "device": w.device,
        "device_name": w.device_name,
        "total_bytes": w.total_bytes,
        "state": if w.job.is_some() { "busy" } else { "idle" },
        "job": w.job,
        "step": w.step,
        "total_steps": w.total_steps,
        "seen_at": w.seen_at,
    })
}

/// `GET /api/workers`: the live remote workers (an empty list without `--broker`).
pub async fn workers(State(s): State<AppState>) -> Json<Value> {
    let workers: Vec<Value> = s
        .cluster
        .as_ref()
        .map(|c| c.workers().iter().map(worker_view).collect())
        .unwrap_or_default();
    Json(json!({ "broker": s.cluster.is_some(), "workers": workers }))
}

/// Shown with the demo model: what it is and how to get real weights.
pub fn demo_help() -> String {
    let size = catalog::entry("z-image-turbo")
        .map(|e| {
            // GiB, as the Models panel and the memory chart count.
            format!(
                " (about {:.1} GiB, needs a GPU)",
                e.download_bytes as f64 / (1u64 << 30) as f64
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

/// The optional features of this server: `img2img` always; `controlnet` when the loaded family
/// runs ControlNets and `<models-dir>/controlnet/` has one (a front door: when the folder has one).
fn features(i: &super::ServerInfo) -> Vec<&'static str> {
    let mut f = vec!["img2img"];
    if i.profile.family.has_controlnet() && !i.control_dir().list().is_empty() {
        f.push("controlnet");
    }
    f
}

pub async fn info(State(s): State<AppState>) -> Json<Value> {
    let i = s.info();
    let features = {
        let i = i.clone();
        tokio::task::spawn_blocking(move || features(&i))
            .await
            .unwrap_or_else(|_| vec!["img2img"])
    };
    let d = i.profile.defaults;
    let kind = i.device.split(':').next().unwrap_or("cpu");
    let modes: Vec<&str> = MemoryMode::ALL.iter().map(|m| m.as_str()).collect();
    let workers: Option<Vec<Value>> = s
        .cluster
        .as_ref()
        .map(|c| c.workers().iter().map(worker_view).collect());
    Json(json!({
        "workers": workers,
        "version": env!("CARGO_PKG_VERSION"),
        "model": {
            "name": i.model,
            "family": i.profile.family,
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
            "safe_cfg_max": json_f32(i.profile.safe_cfg_max),
            "size_multiple": i.profile.size_multiple,
            "files": {
                "transformer": i.component_files.transformer,
                "text_encoder": i.component_files.text_encoder,
                "vae": i.component_files.vae,
            },
            "profile": i.profile.view(),
        },
        "device": {
            "kind": kind,
            "name": i.device_name,
            "total_bytes": i.device_total_bytes,
        },
        "max_batch": i.limits.max_batch,
        "queue_size": i.queue_size,
        "preview": i.preview,
        "memory_modes": modes,
        // Optional features the UI shows controls for: image to image and inpainting (with
        // LoRAs) run on every family; ControlNet where the family has one and a file is there.
        "features": features,
        "demo_help": if i.demo { Some(demo_help()) } else { None },
        // What `zturbo pull z-image-turbo` downloads (the UI words the demo help in its language).
        "demo_download_bytes": if i.demo { catalog::entry("z-image-turbo").map(|e| e.download_bytes) } else { None },
    }))
}

pub async fn list(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    if let Some(c) = &s.cluster {
        return Ok(Json(json!({ "models": remote_models(c), "pull": null })));
    }
    let info = s.info().clone();
    // Looks at the disk (models folder, Hugging Face cache): not on the runtime's threads.
    let (models, files) = tokio::task::spawn_blocking(move || {
        let mut models = catalog::list(&info.models_dir, &info.model);
        if !models.iter().any(|m| m.state == ModelState::Loaded) {
            // Loaded from a folder outside the models folder: still list what runs.
            models.push(catalog::Listing {
                name: info.model.clone(),
                family: info.profile.family.to_string(),
                repo: None,
                state: ModelState::Loaded,
                size_bytes: None,
                demo: info.demo,
                path: None,
                defaults: Some(info.profile.defaults),
                description: info.description.clone(),
                variants: Vec::new(),
            });
        }
        let files = catalog::list_files(
            &info.models_dir,
            info.comfyui_dir.as_deref(),
            &info.component_files,
        );
        (models, files)
    })
    .await
    .map_err(|e| ApiError::internal(format!("listing models failed: {e}")))?;
    let pull = s
        .downloads
        .current()
        .map(|(name, progress)| json!({ "name": name, "progress": progress }));
    Ok(Json(
        json!({ "models": models, "files": files, "pull": pull }),
    ))
}

/// With a broker, the models are what the live workers serve (the front door has no weights).
fn remote_models(c: &crate::queue::broker::front::FrontHandle) -> Vec<Value> {
    let workers = c.workers();
    c.models()
        .into_iter()
        .map(|m| {
            let names: Vec<&str> = workers
                .iter()
                .filter(|w| w.model == m.model)
                .map(|w| w.name.as_str())
                .collect();
            json!({
                "name": m.model,
                "family": m.family,
                "repo": null,
                "state": if m.model == c.model() { "loaded" } else { "served" },
                "size_bytes": null,
                "demo": m.demo,
                "path": null,
                "defaults": m.defaults,
                "description": m.description,
                "workers": names,
            })
        })
        .collect()
}

/// With a broker, the one model the front door routes jobs to, as its workers registered it.
fn served_listing(s: &AppState) -> catalog::Listing {
    let info = s.info();
    catalog::Listing {
        name: info.model.clone(),
        family: info.profile.family.to_string(),
        repo: None,
        state: ModelState::Loaded,
        size_bytes: None,
        demo: info.demo,
        path: None,
        defaults: Some(info.profile.defaults),
        description: info.description.clone(),
        variants: Vec::new(),
    }
}

/// A download's events, as `GET /api/models/{name}/pull/events` sends them.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum PullEvent {
    /// `bytes` of file `index` (0-based) of `count` are on disk; `total_bytes` once known.
    Progress {
        file: String,
        index: usize,
        count: usize,
        bytes: u64,
        total_bytes: Option<u64>,
    },
    Done {
        path: String,
    },
    Failed {
        error: String,
    },
}

impl PullEvent {
    pub fn is_terminal(&self) -> bool {
        !matches!(self, PullEvent::Progress { .. })
    }

    fn name(&self) -> &'static str {
        match self {
            PullEvent::Progress { .. } => "progress",
            PullEvent::Done { .. } => "done",
            PullEvent::Failed { .. } => "failed",
        }
    }

    fn to_sse(&self) -> Result<axum::response::sse::Event, std::convert::Infallible> {
        let mut data = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Some(o) = data.as_object_mut() {
            o.remove("event");
        }
        Ok(super::json_event(self.name(), &data))
    }
}

/// UI-started downloads: one at a time, on a thread of their own (never on the async runtime),
/// each with a broadcast of its progress. The state sits behind a mutex that handlers hold only
/// to read or swap it.
#[derive(Clone, Default)]
pub struct Downloads {
    inner: Arc<Mutex<DownloadsInner>>,
}

#[derive(Default)]
struct DownloadsInner {
    current: Option<Running>,
    /// How each model's last download ended.
    last: HashMap<String, PullEvent>,
}

struct Running {
    name: String,
    latest: Option<PullEvent>,
    tx: broadcast::Sender<PullEvent>,
}

/// Answer to a pull request.
#[derive(Debug, PartialEq)]
pub enum PullStart {
    Started,
    AlreadyRunning,
    Busy(String),
}

impl Downloads {
    fn lock(&self) -> std::sync::MutexGuard<'_, DownloadsInner> {
        // A panic while holding the lock leaves plain data behind: keep using it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The running download's name and latest progress.
    pub fn current(&self) -> Option<(String, Option<PullEvent>)> {
        let g = self.lock();
        g.current
            .as_ref()
            .map(|r| (r.name.clone(), r.latest.clone()))
    }

    /// Starts downloading `repo` as `name` unless a download is running; `pull` runs on a new
    /// thread and reports through the progress it is given.
    pub fn start<F>(&self, name: &str, pull: F) -> std::io::Result<PullStart>
    where
        F: FnOnce(&mut dyn weights::DownloadProgress) -> Result<std::path::PathBuf, String>
            + Send
            + 'static,
    {
        let mut g = self.lock();
        if let Some(r) = &g.current {
            return Ok(if r.name == name {
                PullStart::AlreadyRunning
            } else {
                PullStart::Busy(r.name.clone())
            });
        }
        let (tx, _) = broadcast::channel(256);
        g.current = Some(Running {
            name: name.to_string(),
            latest: None,
            tx,
        });
        g.last.remove(name);
        drop(g);
        let this = self.clone();
        let owned = name.to_string();
        let spawned = std::thread::Builder::new()
            .name("zturbo-pull".into())
            .spawn(move || {
                let mut progress = Reporter {
                    downloads: this.clone(),
                    file: String::new(),
                    index: 0,
                    count: 0,
                    bytes: 0,
                    total: None,
                    sent: None,
                };
                let end = match pull(&mut progress) {
                    Ok(path) => PullEvent::Done {
                        path: path.display().to_string(),
                    },
                    Err(error) => PullEvent::Failed { error },
                };
                match &end {
                    PullEvent::Failed { error } => {
                        tracing::warn!(model = %owned, "download failed: {error}")
                    }
                    _ => tracing::info!(model = %owned, "download finished"),
                }
                this.finish(&owned, end);
            });
        if let Err(e) = spawned {
            self.lock().current = None;
            return Err(e);
        }
        Ok(PullStart::Started)
    }

    fn publish(&self, ev: PullEvent) {
        let mut g = self.lock();
        if let Some(r) = g.current.as_mut() {
            r.latest = Some(ev.clone());
            let _ = r.tx.send(ev);
        }
    }

    fn finish(&self, name: &str, end: PullEvent) {
        let mut g = self.lock();
        if let Some(r) = g.current.take() {
            let _ = r.tx.send(end.clone());
        }
        g.last.insert(name.to_string(), end);
    }

    /// What to replay to a new subscriber and, while the download runs, the live events.
    #[allow(clippy::type_complexity)]
    pub fn subscribe(
        &self,
        name: &str,
    ) -> Option<(Option<PullEvent>, Option<broadcast::Receiver<PullEvent>>)> {
        let g = self.lock();
        match &g.current {
            Some(r) if r.name == name => Some((r.latest.clone(), Some(r.tx.subscribe()))),
            _ => g.last.get(name).map(|end| (Some(end.clone()), None)),
        }
    }
}

/// Turns hf-hub's per-read callbacks into at most ~10 progress events a second.
struct Reporter {
    downloads: Downloads,
    file: String,
    index: usize,
    count: usize,
    bytes: u64,
    total: Option<u64>,
    sent: Option<std::time::Instant>,
}

impl Reporter {
    fn send(&mut self, force: bool) {
        let due = self
            .sent
            .is_none_or(|t| t.elapsed() >= std::time::Duration::from_millis(100));
        if !(force || due) {
            return;
        }
        self.sent = Some(std::time::Instant::now());
        self.downloads.publish(PullEvent::Progress {
            file: self.file.clone(),
            index: self.index,
            count: self.count,
            bytes: self.bytes,
            total_bytes: self.total,
        });
    }
}

impl weights::DownloadProgress for Reporter {
    fn file_started(&mut self, name: &str, _size: u64, index: usize, count: usize) {
        self.file = name.to_string();
        self.index = index;
        self.count = count;
        self.bytes = 0;
        self.total = None;
        self.send(true);
    }
    fn file_size(&mut self, total: u64) {
        self.total = Some(total);
    }
    fn advanced(&mut self, bytes: u64) {
        self.bytes += bytes;
        self.send(false);
    }
    fn file_finished(&mut self, _name: &str) {
        if let Some(t) = self.total {
            self.bytes = self.bytes.max(t);
        }
        self.send(true);
    }
}

/// `?variant=q8_0`: a quantized variant instead of the bf16 release.
#[derive(Debug, Default, serde::Deserialize)]
pub struct PullQuery {
    pub variant: Option<String>,
}

/// `POST /api/models/{name}/pull`: starts downloading a catalog model into the Hugging Face cache
/// (202; `GET /api/models/{name}/pull/events` follows it). One download at a time: 409 while
/// another runs. The served model does not change.
pub async fn pull(
    State(s): State<AppState>,
    Path(name): Path<String>,
    axum::extract::Query(query): axum::extract::Query<PullQuery>,
) -> Result<Response, ApiError> {
    if name.eq_ignore_ascii_case(catalog::DEMO) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            None,
            "the demo model is built into the binary: nothing to download",
        ));
    }
    let entry = catalog::entry(&name).ok_or_else(|| {
        ApiError::not_found(format!(
            "no model `{name}` in the catalog (known: {})",
            catalog::CATALOG
                .iter()
                .map(|e| e.name)
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    let repo = entry.repo.to_string();
    let variant =
        match query.variant.as_deref() {
            None | Some("bf16") => None,
            Some(v) => Some(variants::find(entry.name, v).map_err(|e| {
                ApiError::new(StatusCode::BAD_REQUEST, Some("variant"), e.to_string())
            })?),
        };
    let started = s
        .downloads
        .start(entry.name, move |progress| match variant {
            Some(v) => variants::pull(&repo, v, progress)
                .map(|p| p.configs)
                .map_err(|e| e.to_string()),
            None => weights::pull(&repo, progress).map_err(|e| e.to_string()),
        })
        .map_err(|e| ApiError::internal(format!("could not start the download: {e}")))?;
    let events = format!("/api/models/{}/pull/events", entry.name);
    match started {
        PullStart::Started | PullStart::AlreadyRunning => Ok((
            StatusCode::ACCEPTED,
            [(axum::http::header::LOCATION, events.clone())],
            Json(json!({
                "name": entry.name,
                "repo": entry.repo,
                "state": "downloading",
                "events": events,
            })),
        )
            .into_response()),
        PullStart::Busy(other) => Err(ApiError::new(
            StatusCode::CONFLICT,
            None,
            format!("`{other}` is downloading; one download at a time"),
        )),
    }
}

/// `GET /api/models/{name}/pull/events`: SSE `progress {file, index, count, bytes, total_bytes}`,
/// then `done {path}` or `failed {error}`; the stream ends after that. A finished download's
/// stream sends its last event at once.
pub async fn pull_events(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let name = catalog::entry(&name)
        .map(|e| e.name.to_string())
        .unwrap_or(name);
    let (first, rx) = s
        .downloads
        .subscribe(&name)
        .ok_or_else(|| ApiError::not_found(format!("no download of `{name}` has been started")))?;
    let head = stream::iter(first.iter().map(PullEvent::to_sse).collect::<Vec<_>>());
    let ended = first.as_ref().is_some_and(PullEvent::is_terminal);
    let Some(rx) = rx.filter(|_| !ended) else {
        return Ok(super::sse(head));
    };
    let tail = stream::unfold((rx, false), |(mut rx, done)| async move {
        if done {
            return None;
        }
        loop {
            match rx.recv().await {
                Ok(ev) => {
                    let end = ev.is_terminal();
                    return Some((ev.to_sse(), (rx, end)));
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Ok(super::sse(head.chain(tail).take_until(s.shutdown_signal())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_download_at_a_time_and_the_end_is_kept() {
        let d = Downloads::default();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let started = d
            .start("sd-turbo", move |p| {
                p.file_started("unet/x.safetensors", 0, 0, 1);
                p.file_size(10);
                p.advanced(4);
                wait.recv().map_err(|e| e.to_string())?;
                Err("hub unreachable".into())
            })
            .unwrap();
        assert_eq!(started, PullStart::Started);
        let noop = |_: &mut dyn weights::DownloadProgress| Ok(std::path::PathBuf::new());
        assert_eq!(
            d.start("sd-turbo", noop).unwrap(),
            PullStart::AlreadyRunning
        );
        assert_eq!(
            d.start("sdxl-turbo", noop).unwrap(),
            PullStart::Busy("sd-turbo".into())
        );
        let (_, rx) = d.subscribe("sd-turbo").unwrap();
        let mut rx = rx.expect("live while running");
        assert!(d.subscribe("sdxl-turbo").is_none());
        go.send(()).unwrap();
        let end = loop {
            match rx.blocking_recv() {
                Ok(ev) if ev.is_terminal() => break ev,
                Ok(_) => continue,
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(
            end,
            PullEvent::Failed {
                error: "hub unreachable".into()
            }
        );
        // Once ended: the last event is replayed, and another download may start.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while d.current().is_some() {
            assert!(std::time::Instant::now() < deadline);
            std::thread::yield_now();
        }
        let (first, rx) = d.subscribe("sd-turbo").unwrap();
        assert_eq!(first, Some(end));
        assert!(rx.is_none());
        assert_eq!(d.start("sdxl-turbo", noop).unwrap(), PullStart::Started);
    }
}

/// The models a switch or a job may name: those on this machine (loaded, a local folder, a
/// cached catalog model, the demo).
pub async fn local_models(s: &AppState) -> Result<Vec<catalog::Listing>, ApiError> {
    if s.cluster.is_some() {
        return Ok(vec![served_listing(s)]);
    }
    let info = s.info();
    tokio::task::spawn_blocking(move || {
        catalog::list(&info.models_dir, &info.model)
            .into_iter()
            .filter(|m| m.state != ModelState::NotDownloaded)
            .collect()
    })
    .await
    .map_err(|e| ApiError::internal(format!("listing models failed: {e}")))
}

/// The local model called `name`, or a 422 naming `field` with the names there are.
pub async fn find_local(
    s: &AppState,
    name: &str,
    field: &str,
) -> Result<catalog::Listing, ApiError> {
    let name = name.trim();
    // A front door switches nothing: each worker loads its model at start.
    if let Some(c) = &s.cluster {
        let served = served_listing(s);
        if served.name == name {
            return Ok(served);
        }
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            Some(field),
            format!(
                "this server is a front door (--broker): its workers serve the model `{}` and \
                     it cannot switch to `{name}`; start a `zturbo worker --model {name}` with its \
                     own front door to serve that one",
                c.model()
            ),
        ));
    }
    let models = local_models(s).await?;
    if let Some(m) = models.iter().find(|m| m.name == name) {
        return Ok(m.clone());
    }
    let known: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
    Err(ApiError::field(
        field,
        format!(
            "no local model `{name}` (on this machine: {}); download a catalog model first",
            known.join(", ")
        ),
    ))
}

/// What a request for `model` is validated against: the loaded model's limits, or those of its
/// family's profile (its own defaults when the listing knows them).
pub fn limits_for(s: &AppState, model: &catalog::Listing) -> Result<Limits, ApiError> {
    let info = s.info();
    if model.name == info.model {
        return Ok(info.limits.clone());
    }
    let family: FamilyKind = model
        .family
        .parse()
        .map_err(|e: crate::families::profile::UnknownFamily| ApiError::internal(e.to_string()))?;
    let mut profile = family.profile();
    if let Some(d) = model.defaults {
        profile.defaults = d;
    }
    let max_batch = info.limits.max_batch.min(profile.max_batch);
    Ok(Limits::new(&profile, max_batch, MemoryMode::Auto))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectRequest {
    pub name: String,
}

/// `POST /api/model {name}`: new jobs run on `name`; the worker loads it between jobs (at once
/// when idle) and reports the switch on `GET /api/events`. 200 when it is already loaded, else
/// 202 with `state: "switching"` (loading now) or `"after_queued"` (after the jobs already
/// queued).
pub async fn select(
    State(s): State<AppState>,
    super::error::ApiJson(req): super::error::ApiJson<SelectRequest>,
) -> Result<Response, ApiError> {
    let model = find_local(&s, &req.name, "name").await?;
    let outcome = s.queue.select_model(&model.name).await.ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            "the queue has stopped",
        )
    })?;
    let (status, state) = match outcome {
        SelectOutcome::Loaded => (StatusCode::OK, "loaded"),
        SelectOutcome::Switching => (StatusCode::ACCEPTED, "switching"),
        SelectOutcome::AfterQueued => (StatusCode::ACCEPTED, "after_queued"),
    };
    Ok((status, Json(json!({ "name": model.name, "state": state }))).into_response())
}

/// A switch as `GET /api/events` sends it.
fn model_event_json(ev: &ModelEvent) -> Value {
    match ev {
        ModelEvent::Loading { name, job } => {
            json!({ "state": "loading", "name": name, "job": job })
        }
        ModelEvent::Loaded {
            loaded,
            job,
            elapsed_ms,
        } => json!({
            "state": "loaded", "name": loaded.model, "family": loaded.profile.family,
            "job": job, "elapsed_ms": elapsed_ms,
        }),
        ModelEvent::Failed { name, error, job } => {
            json!({ "state": "failed", "name": name, "error": error, "job": job })
        }
    }
}

/// `GET /api/events`: server-wide events for the page — `model {state, name, …}`: the model
/// loaded now (or loading) first, then every switch (`loading`, then `loaded` or `failed` with
/// an error naming the file).
pub async fn events(State(s): State<AppState>) -> Result<Response, ApiError> {
    let rx = s.queue.model_events().await.ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            "the queue has stopped",
        )
    })?;
    let st = s.queue.status().await;
    let now = match &st.switching {
        Some(name) => json!({ "state": "loading", "name": name, "job": null }),
        None => json!({ "state": "loaded", "name": st.loaded, "job": null }),
    };
    let head = stream::iter([Ok(super::json_event("model", &now))]);
    let tail = stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(ev) => {
                    return Some((Ok(super::json_event("model", &model_event_json(&ev))), rx))
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Ok(super::sse(head.chain(tail).take_until(s.shutdown_signal())))
}
