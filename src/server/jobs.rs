//! The UI's job API: submit (`POST /api/jobs`), list and read jobs, cancel (`DELETE`), follow one
//! job over SSE, and preview the prompt enhancement (`POST /api/enhance`, no engine involved).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::broadcast;

use super::error::{kind_status, storage_status, ApiError, ApiJson, ErrorBody};
use super::{images, sse, AppState, JOB_LIST_LIMIT};
use crate::engine::{Notice, ResolvedParams};
use crate::families::lora::LoraDir;
use crate::inputs::InputStore;
use crate::prompt::{self, Enhanced, PromptContext};
use crate::queue::outputs::StorageProblem;
use crate::queue::{
    CancelError, CancelOutcome, DeleteError, HistoryQuery, JobEvent, JobSnapshot, JobState,
    JobTimings, QueueHandle, SubmitError, Submitted,
};
use crate::request::{
    check_excluded, GenerationRequest, ValidRequest, MAX_CFG, MAX_PROMPT_CHARS, MAX_STEPS, MIN_CFG,
    MIN_STEPS,
};

/// A job as the API shows it.
#[derive(Debug, Serialize)]
pub struct JobView {
    pub id: String,
    /// Acceptance order (the history's page cursor, `before`).
    pub seq: u64,
    pub state: JobState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<usize>,
    pub step: usize,
    pub total_steps: usize,
    /// Milliseconds since the Unix epoch.
    pub created_at: u64,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    pub params: ParamsView,
    /// What the enhancement added (`original_prompt`, `added`, `advice`); `null` until it ran.
    pub enhancement: Option<Enhanced>,
    pub images: Vec<String>,
    /// Each image's own seed, in the order of `images`.
    pub image_seeds: Vec<u64>,
    pub notices: Vec<Notice>,
    pub timings: Option<JobTimings>,
    pub peak_memory_bytes: Option<u64>,
    /// The memory plan the run used; `null` until it ran.
    pub plan: Option<crate::memory::planner::Plan>,
    pub error: Option<String>,
    /// What kind of failure `error` is (`model`, `does_not_fit`, `invalid`, …); `null` unless
    /// the job failed.
    pub error_kind: Option<crate::queue::FailureKind>,
    /// With `--broker`: the worker that ran it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
}

/// After the run: as resolved (final prompts, the seed, `cfg` = the CFG actually used,
/// `cfg_requested` = the one asked for). Before: the validated request.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum ParamsView {
    Resolved(ResolvedParams),
    Requested(RequestedParams),
}

/// A job that has not run yet: the validated request as it will run, flat.
#[derive(Debug, Serialize)]
pub struct RequestedParams {
    pub model: String,
    pub cfg_requested: f32,
    #[serde(flatten)]
    pub request: ValidRequest,
}

impl From<JobSnapshot> for JobView {
    fn from(s: JobSnapshot) -> Self {
        let r = s.record;
        let params = match r.params {
            Some(p) => ParamsView::Resolved(p),
            None => ParamsView::Requested(RequestedParams {
                model: r.model,
                cfg_requested: r.request.cfg,
                request: r.request,
            }),
        };
        Self {
            id: r.id,
            seq: r.seq,
            state: r.state,
            position: s.position,
            step: s.step,
            total_steps: s.total_steps,
            created_at: r.created_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            params,
            enhancement: r.enhancement,
            images: r.images.iter().map(|f| images::url(f)).collect(),
            image_seeds: r.image_seeds,
            notices: r.notices,
            timings: r.timings,
            peak_memory_bytes: r.peak_memory_bytes,
            plan: r.plan,
            error_kind: r.error.as_ref().map(|e| e.kind),
            error: r.error.map(|e| e.message),
            worker: r.worker,
        }
    }
}

pub async fn submit(
    State(s): State<AppState>,
    ApiJson(mut req): ApiJson<GenerationRequest>,
) -> Result<Response, ApiError> {
    // The job runs on the model it names, else on the selected one: validate for that model.
    let named = req.model.take().map(|m| m.trim().to_string());
    let target = match &named {
        Some(name) => name.clone(),
        None => s.queue.status().await.selected,
    };
    let info = s.info();
    // LoRA files are checked against the loaded model's layers; another model's are not known
    // until it loads, so there only the names are checked (the worker reports a mismatch).
    let (limits, loras) = if target.is_empty() || target == info.model {
        (info.limits.clone(), info.lora_dir())
    } else {
        let listing = super::models::find_local(&s, &target, "model").await?;
        (
            super::models::limits_for(&s, &listing)?,
            LoraDir::new(info.models_dir.join("loras")),
        )
    };
    let valid = req.validate_with(&limits, Some(&loras), Some(&info.control_dir()))?;
    // A named model is recorded as asked; otherwise the queue records the selected one.
    let sub = submit_valid_on(&s, valid, named).await?;
    Ok((
        StatusCode::ACCEPTED,
        [(
            axum::http::header::LOCATION,
            format!("/api/jobs/{}", sub.id),
        )],
        Json(json!({ "id": sub.id, "position": sub.position })),
    )
        .into_response())
}

/// Queues a validated request; every surface (UI, OpenAI, A1111) comes through here. Its input
/// image and mask are stored first, so the journaled job finds them after a restart.
pub async fn submit_valid(s: &AppState, valid: ValidRequest) -> Result<Submitted, ApiError> {
    submit_valid_on(s, valid, None).await
}

/// [`submit_valid`] on a named model (checked by the caller) instead of the selected one.
pub async fn submit_valid_on(
    s: &AppState,
    valid: ValidRequest,
    model: Option<String>,
) -> Result<Submitted, ApiError> {
    if let Some(c) = &valid.control {
        let store = InputStore::new(&s.info().outputs);
        let image = c.image.clone();
        tokio::task::spawn_blocking(move || store.save(&image))
            .await
            .map_err(|e| ApiError::internal(format!("storing the control image: {e}")))?
            .map_err(|e| ApiError::internal(format!("storing the control image: {e}")))?;
    }
    if let Some(init) = &valid.init {
        let store = InputStore::new(&s.info().outputs);
        let init = init.clone();
        tokio::task::spawn_blocking(move || {
            store.save(&init.image)?;
            if let Some(m) = &init.mask {
                store.save(m)?;
            }
            if let Some(r) = &init.region {
                store.save(&r.image)?;
                store.save(&r.mask)?;
            }
            Ok::<(), crate::inputs::InputError>(())
        })
        .await
        .map_err(|e| ApiError::internal(format!("storing the input image: {e}")))?
        .map_err(|e| ApiError::internal(format!("storing the input image: {e}")))?;
    }
    match s.queue.submit_on(valid, model).await {
        Ok(sub) => Ok(sub),
        Err(SubmitError::Full { retry_after_s, .. }) => Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            None,
            format!(
                "the queue is full ({} jobs waiting); retry in {retry_after_s} s",
                s.info().queue_size
            ),
        )
        .with_retry_after(retry_after_s)),
        Err(SubmitError::ShuttingDown) | Err(SubmitError::Stopped) => Err(shutting_down()),
        Err(SubmitError::Unavailable(problem)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            format!("the job was not accepted: {problem}"),
        )
        .with_retry_after(5)),
        Err(SubmitError::Journal(e)) => Err(storage_error(
            StorageProblem::of(&e),
            format!(
                "the job was not accepted: its journal entry in the outputs folder {} could not \
                 be written ({e})",
                s.info().outputs.display()
            ),
        )),
    }
}

fn storage_error(problem: StorageProblem, message: String) -> ApiError {
    ApiError::new(storage_status(problem), None, message)
}

fn shutting_down() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        None,
        "the server is shutting down",
    )
}

/// When a synchronous call that starts now must have its answer (`--sync-timeout`).
pub fn sync_deadline(s: &AppState) -> Option<tokio::time::Instant> {
    s.info()
        .sync_timeout
        .map(|limit| tokio::time::Instant::now() + limit)
}

/// Waits for a job to end (for the synchronous OpenAI and A1111 calls). A server shutdown ends
/// the wait with a 503 (the job stays journaled and runs after the restart); the caller going
/// away drops this future and leaves the job running. Past `deadline` the wait ends with a 504:
/// a job that has not started by then is cancelled (nobody would collect its images), a running
/// one finishes and stays readable at `/api/jobs/{id}`.
pub async fn wait_job(
    s: &AppState,
    id: &str,
    deadline: Option<tokio::time::Instant>,
) -> Result<JobSnapshot, ApiError> {
    let limit = async move {
        match deadline {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        snap = s.queue.wait(id) => snap.ok_or_else(shutting_down),
        _ = s.shutdown_signal() => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            format!("the server is shutting down; job {id} stays queued and runs after the restart"),
        )),
        _ = limit => Err(waited_too_long(s, id).await),
    }
}

async fn waited_too_long(s: &AppState, id: &str) -> ApiError {
    let limit = s.info().sync_timeout.map(|d| d.as_secs()).unwrap_or(0);
    let what = if s.queue.cancel_if_queued(id).await {
        format!("job {id} had not started (the queue is busy), so it was cancelled; retry later")
    } else {
        format!(
            "job {id} is still running; it will finish, and its images will be listed at \
             GET /api/jobs/{id}"
        )
    };
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        None,
        format!(
            "no answer within the {limit} s limit for synchronous calls (--sync-timeout): {what}"
        ),
    )
}

/// Why a job that ended without images failed, as an error of the synchronous surfaces: the
/// status of its failure's kind (the outputs folder's problem 507/503, a request the engine
/// could not run 422, …, the run's own failure 500).
pub fn failure_status(snap: &JobSnapshot) -> StatusCode {
    snap.record
        .error
        .as_ref()
        .map_or(StatusCode::INTERNAL_SERVER_ERROR, |e| kind_status(e.kind))
}

/// The PNG files of a finished job, read from the outputs folder.
pub async fn read_images(s: &AppState, snap: &JobSnapshot) -> Result<Vec<Vec<u8>>, ApiError> {
    let mut out = Vec::with_capacity(snap.record.images.len());
    for name in &snap.record.images {
        let path = s.info().outputs.join(name);
        let bytes = tokio::fs::read(&path)
            .await
            .map_err(|e| ApiError::internal(format!("could not read {}: {e}", path.display())))?;
        out.push(bytes);
    }
    Ok(out)
}

#[derive(Serialize)]
pub struct JobList {
    /// Newest first; queued and running jobs included.
    pub jobs: Vec<JobView>,
}

pub async fn list(State(s): State<AppState>) -> Json<JobList> {
    let jobs = s
        .queue
        .list(JOB_LIST_LIMIT)
        .await
        .into_iter()
        .map(JobView::from)
        .collect();
    Json(JobList { jobs })
}

fn no_job(id: &str) -> ApiError {
    ApiError::not_found(format!("no job `{id}`"))
}

pub async fn get(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let snap = s.queue.get(&id).await.ok_or_else(|| no_job(&id))?;
    Ok(Json(snap.into()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelAllQuery {
    pub state: String,
}

/// `DELETE /api/jobs?state=queued`: cancels every queued job at once (the running one goes on;
/// Esc or `DELETE /api/jobs/{id}` stops it) → `{"cancelled": [ids]}`.
pub async fn cancel_all(
    State(s): State<AppState>,
    query: Result<axum::extract::Query<CancelAllQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let state = query.map(|q| q.0.state).unwrap_or_default();
    if state != "queued" {
        return Err(ApiError::field(
            "state",
            format!("must be `queued` (only queued jobs are cancelled all at once; got `{state}`)"),
        ));
    }
    let ids = s.queue.cancel_queued().await;
    Ok(Json(json!({ "cancelled": ids })))
}

/// Most finished jobs one `GET /api/history` page holds.
pub const HISTORY_PAGE_MAX: usize = 100;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryParams {
    #[serde(default)]
    pub q: Option<String>,
    #[serde(default)]
    pub before: Option<u64>,
    #[serde(default)]
    pub limit: Option<usize>,
}

#[derive(Serialize)]
pub struct HistoryView {
    /// Finished jobs (done or failed), newest first.
    pub jobs: Vec<JobView>,
    /// Pass as `before` for the next (older) page; `null` on the last page.
    pub next_before: Option<u64>,
}

/// `GET /api/history?q=&before=&limit=`: the gallery's pages of finished jobs, newest first,
/// optionally only those whose prompt contains `q`.
pub async fn history(
    State(s): State<AppState>,
    query: Result<axum::extract::Query<HistoryParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<HistoryView>, ApiError> {
    let q = query
        .map_err(|e| ApiError::field("query", e.body_text()))?
        .0;
    let limit = q.limit.unwrap_or(24);
    if !(1..=HISTORY_PAGE_MAX).contains(&limit) {
        return Err(ApiError::field(
            "limit",
            format!("must be between 1 and {HISTORY_PAGE_MAX} (got {limit})"),
        ));
    }
    if let Some(text) = &q.q {
        let n = text.chars().count();
        if n > MAX_PROMPT_CHARS {
            return Err(ApiError::field(
                "q",
                format!("must be at most {MAX_PROMPT_CHARS} characters (got {n})"),
            ));
        }
    }
    let page = s
        .queue
        .history(HistoryQuery {
            text: q.q,
            before: q.before,
            limit,
        })
        .await;
    Ok(Json(HistoryView {
        jobs: page.jobs.into_iter().map(JobView::from).collect(),
        next_before: page.next_before,
    }))
}

/// `DELETE /api/history/{id}`: deletes a finished job's images, sidecar and record (204).
pub async fn delete(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match s.queue.delete(&id).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT.into_response()),
        Err(DeleteError::NotFound(_)) => Err(no_job(&id)),
        Err(e @ DeleteError::NotFinished(..)) => {
            Err(ApiError::new(StatusCode::CONFLICT, None, e.to_string()))
        }
        Err(e @ DeleteError::Io(..)) => Err(ApiError::internal(e.to_string())),
        Err(DeleteError::Stopped) => Err(shutting_down()),
    }
}

pub async fn cancel(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match s.queue.cancel(&id).await {
        Ok(CancelOutcome::Cancelled) => {
            Ok(Json(json!({ "id": id, "state": "cancelled" })).into_response())
        }
        // Running: it stops between steps; its event stream reports `cancelled`.
        Ok(CancelOutcome::Stopping) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "id": id, "state": "cancelling" })),
        )
            .into_response()),
        Err(CancelError::NotFound(_)) => Err(no_job(&id)),
        Err(e @ CancelError::Finished(..)) => {
            Err(ApiError::new(StatusCode::CONFLICT, None, e.to_string()))
        }
        Err(CancelError::Stopped) => Err(shutting_down()),
    }
}

#[derive(Serialize)]
struct Images {
    images: Vec<String>,
    peak_memory_bytes: Option<u64>,
}

/// SSE name and JSON payload of a job event. Serialised from typed values (not through
/// `serde_json::Value`, which would widen f32 fields such as a notice's CFG to 2.4000000953…).
fn event_parts(ev: &JobEvent) -> (&'static str, String) {
    let text = |v: Result<String, serde_json::Error>| v.unwrap_or_else(|_| "{}".into());
    match ev {
        JobEvent::Queued { position } => ("queued", json!({ "position": position }).to_string()),
        JobEvent::Started => ("started", "{}".into()),
        JobEvent::Progress {
            step,
            total,
            elapsed_ms,
        } => (
            "progress",
            json!({ "step": step, "total": total, "elapsed_ms": elapsed_ms }).to_string(),
        ),
        JobEvent::Notice(n) => ("notice", text(serde_json::to_string(n))),
        JobEvent::Model {
            state,
            name,
            error,
            elapsed_ms,
        } => (
            "model",
            json!({ "state": state, "name": name, "error": error, "elapsed_ms": elapsed_ms })
                .to_string(),
        ),
        JobEvent::Preview { step, image } => (
            "preview",
            json!({ "step": step, "image": image }).to_string(),
        ),
        JobEvent::Done {
            images: files,
            peak_memory_bytes,
        } => (
            "done",
            text(serde_json::to_string(&Images {
                images: files.iter().map(|f| images::url(f)).collect(),
                peak_memory_bytes: *peak_memory_bytes,
            })),
        ),
        JobEvent::Failed { error } => (
            "failed",
            text(serde_json::to_string(&ErrorBody::new(
                None,
                error.message.clone(),
            ))),
        ),
        JobEvent::Cancelled => ("cancelled", "{}".into()),
    }
}

fn to_sse(ev: &JobEvent) -> Result<axum::response::sse::Event, std::convert::Infallible> {
    let (name, data) = event_parts(ev);
    Ok(axum::response::sse::Event::default().event(name).data(data))
}

/// The events that describe where a job stands now (with its latest preview when `preview`). An
/// ended job's notices come before its end, as they did for a subscriber that was there: one that
/// comes late (a fast job) misses nothing.
fn current_state(snap: &JobSnapshot, preview: bool) -> Vec<JobEvent> {
    if let Some(end) = JobEvent::terminal_for(&snap.record) {
        let mut v: Vec<JobEvent> = snap
            .record
            .notices
            .iter()
            .cloned()
            .map(JobEvent::Notice)
            .collect();
        v.push(end);
        return v;
    }
    match snap.record.state {
        JobState::Queued => vec![JobEvent::Queued {
            position: snap.position.unwrap_or(0),
        }],
        _ => {
            // Notices so far (a CFG clamp happens before the first step), then the progress.
            let mut v = vec![JobEvent::Started];
            v.extend(snap.record.notices.iter().cloned().map(JobEvent::Notice));
            if snap.step > 0 {
                v.push(JobEvent::Progress {
                    step: snap.step,
                    total: snap.total_steps,
                    elapsed_ms: snap.elapsed_ms.unwrap_or(0),
                });
            }
            if let Some((step, image)) = snap.preview.clone().filter(|_| preview) {
                v.push(JobEvent::Preview { step, image });
            }
            v
        }
    }
}

/// `?preview=0` (or `false`, `off`): this stream leaves the live previews out.
fn wants_preview(uri: &axum::http::Uri) -> bool {
    !uri.query().unwrap_or("").split('&').any(|kv| {
        matches!(
            kv,
            "preview=0" | "preview=false" | "preview=off" | "preview=no"
        )
    })
}

struct Follow {
    id: String,
    rx: broadcast::Receiver<JobEvent>,
    queue: QueueHandle,
    ended: bool,
    /// Pass `preview` events on.
    preview: bool,
}

/// `GET /api/jobs/{id}/events`: the job's current state first, then every event up to and
/// including the terminal one. Leaving the stream does not cancel the job (only DELETE does).
pub async fn events(
    State(s): State<AppState>,
    Path(id): Path<String>,
    uri: axum::http::Uri,
) -> Result<Response, ApiError> {
    let preview = s.info().preview && wants_preview(&uri);
    let (snap, rx) = s.queue.subscribe(&id).await.ok_or_else(|| no_job(&id))?;
    let first = current_state(&snap, preview);
    let ended = first.iter().any(JobEvent::is_terminal);
    let head = stream::iter(first.iter().map(to_sse).collect::<Vec<_>>());
    let Some(rx) = rx.filter(|_| !ended) else {
        return Ok(sse(head));
    };
    let follow = Follow {
        id,
        rx,
        queue: s.queue.clone(),
        ended: false,
        preview,
    };
    let tail = stream::unfold(follow, |mut f| async move {
        if f.ended {
            return None;
        }
        loop {
            match f.rx.recv().await {
                Ok(JobEvent::Preview { .. }) if !f.preview => continue,
                Ok(ev) => {
                    f.ended = ev.is_terminal();
                    return Some((to_sse(&ev), f));
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!(job_id = %f.id, skipped = n, "job stream lagged");
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => {
                    // Normally the terminal event arrives before the close; if it was lost,
                    // read the outcome from the record.
                    let end = f
                        .queue
                        .get(&f.id)
                        .await
                        .and_then(|snap| JobEvent::terminal_for(&snap.record))?;
                    f.ended = true;
                    return Some((to_sse(&end), f));
                }
            }
        }
    });
    Ok(sse(head.chain(tail).take_until(s.shutdown_signal())))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnhanceRequest {
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: Option<String>,
    /// The form's CFG and steps, so the advice matches the form's own hints (model defaults
    /// when absent).
    #[serde(default)]
    pub cfg: Option<f32>,
    #[serde(default)]
    pub steps: Option<u32>,
    /// Phrases the user removed from the preview (as `enhance_exclude` of a job).
    #[serde(default)]
    pub exclude: Vec<String>,
}

/// `POST /api/enhance`: what the enhancement would add to this prompt at the model's defaults.
/// Pure table work on the request thread; the engine thread is not involved.
pub async fn enhance(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<EnhanceRequest>,
) -> Result<Json<Enhanced>, ApiError> {
    for (field, text) in [
        ("prompt", Some(&req.prompt)),
        ("negative_prompt", req.negative_prompt.as_ref()),
    ] {
        let n = text.map(|t| t.chars().count()).unwrap_or(0);
        if n > MAX_PROMPT_CHARS {
            return Err(ApiError::field(
                field,
                format!("must be at most {MAX_PROMPT_CHARS} characters (got {n})"),
            ));
        }
    }
    let profile = s.info().profile;
    let cfg = req.cfg.unwrap_or(profile.defaults.cfg);
    if !cfg.is_finite() || !(MIN_CFG..=MAX_CFG).contains(&cfg) {
        return Err(ApiError::field(
            "cfg",
            format!("must be between {MIN_CFG} and {MAX_CFG} (got {cfg})"),
        ));
    }
    let steps = req.steps.unwrap_or(profile.defaults.steps);
    if !(MIN_STEPS..=MAX_STEPS).contains(&steps) {
        return Err(ApiError::field(
            "steps",
            format!("must be between {MIN_STEPS} and {MAX_STEPS} (got {steps})"),
        ));
    }
    let exclude = check_excluded(req.exclude).map_err(|e| ApiError::field("exclude", e.message))?;
    // The CFG as the form shows it: the advice itself says when it will be intercepted.
    let ctx = PromptContext {
        cfg,
        steps,
        profile,
    };
    Ok(Json(prompt::enhance_with(
        &req.prompt,
        req.negative_prompt.as_deref(),
        &ctx,
        true,
        &exclude,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Notice;

    #[test]
    fn every_job_event_is_documented_with_its_payload() {
        let doc = super::super::openapi::spec(&super::super::openapi::Facts {
            model: "demo".into(),
            size_multiple: 16,
            max_batch: 2,
        });
        let events = [
            JobEvent::Queued { position: 2 },
            JobEvent::Started,
            JobEvent::Progress {
                step: 1,
                total: 8,
                elapsed_ms: 40,
            },
            JobEvent::Notice(Notice::cfg_clamped(3.2, 2.4)),
            JobEvent::Done {
                images: vec!["0123456789abcdef-1.png".into()],
                peak_memory_bytes: Some(1 << 20),
            },
            JobEvent::Failed {
                error: crate::queue::JobError::new(crate::queue::FailureKind::Internal, "no"),
            },
            JobEvent::Cancelled,
        ];
        for ev in &events {
            let (name, data) = event_parts(ev);
            let (_, payload) = super::super::openapi::JOB_EVENTS
                .iter()
                .find(|(n, _)| *n == name)
                .unwrap_or_else(|| panic!("`{name}` is not documented"));
            let value: serde_json::Value = serde_json::from_str(&data).unwrap();
            let schema = &doc["components"]["schemas"][payload];
            for key in schema["required"].as_array().into_iter().flatten() {
                assert!(
                    value.get(key.as_str().unwrap()).is_some(),
                    "{name}: {data} lacks {key}"
                );
            }
            if schema["additionalProperties"] == false {
                assert_eq!(value, json!({}), "{name}");
            }
        }
    }
}
