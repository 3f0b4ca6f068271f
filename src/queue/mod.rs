//! The job queue as an actor: one task owns every job (records, FIFO order, the running job and
//! its cancel token); HTTP handlers talk to it over `mpsc` + `oneshot` through [`QueueHandle`].
//! Admission is bounded and fails fast; accepted jobs are journaled before they are acknowledged;
//! one worker thread ([`worker`]) runs them one at a time — or, with a broker, remote workers
//! run them ([`broker`]: the same journal and the same events, jobs carried by Redis Streams).

pub mod broker;
pub mod job;
pub mod journal;
pub mod outputs;
pub mod worker;

mod handle;
mod history;
mod journal_end;
mod remote;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{broadcast, mpsc, oneshot};

use crate::engine::CancelToken;
use crate::request::ValidRequest;
pub use job::{
    FailureKind, JobError, JobEvent, JobId, JobRecord, JobSnapshot, JobState, JobTimings,
};
use journal::{EndWrite, Journal};
use outputs::OutputsHealth;
pub use worker::{Loaded, ModelEvent};
use worker::{RunError, RunOutput, Work, WorkItem, WorkerEvent};

/// Finished jobs kept in memory for `GET /api/jobs` (older ones stay in the journal on disk).
pub const HISTORY_LIMIT: usize = 500;
/// Per-job event buffer; a subscriber that falls further behind re-reads the job's state.
const EVENT_BUFFER: usize = 256;
/// `Retry-After` before any job has finished.
const DEFAULT_RETRY_AFTER_S: u64 = 5;
const MAX_RETRY_AFTER_S: u64 = 600;

#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Jobs that may wait behind the running one.
    pub capacity: usize,
    pub outputs: PathBuf,
    /// The loaded model's name: new jobs run on it unless they name another (or a switch selects
    /// another).
    pub model: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Submitted {
    pub id: JobId,
    /// Jobs ahead of it (0 = next, or already started).
    pub position: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full ({capacity} jobs waiting); retry in {retry_after_s} s")]
    Full { capacity: usize, retry_after_s: u64 },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("could not journal the job: {0}")]
    Journal(std::io::Error),
    /// The broker cannot be reached: the job was not accepted.
    #[error("{0}")]
    Unavailable(String),
    #[error("the queue has stopped")]
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It was waiting: it is cancelled now.
    Cancelled,
    /// It is running: it stops between steps and then reports `cancelled`.
    Stopping,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CancelError {
    #[error("no job `{0}`")]
    NotFound(String),
    #[error("job `{0}` has already ended ({1})")]
    Finished(String, JobState),
    #[error("the queue has stopped")]
    Stopped,
}

type Subscription = (JobSnapshot, Option<broadcast::Receiver<JobEvent>>);

/// What the worker is doing now: the running job (if any) and how many wait behind it.
#[derive(Debug, Clone)]
pub struct QueueStatus {
    pub running: Option<JobSnapshot>,
    pub queued: usize,
    /// The model the worker has loaded.
    pub loaded: String,
    /// The model new jobs run on (the last switch asked for; usually `loaded`).
    pub selected: String,
    /// A switch in progress with no job behind it.
    pub switching: Option<String>,
}

/// Where a model switch stands when it is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SelectOutcome {
    /// It is already loaded.
    Loaded,
    /// The worker is loading it now.
    Switching,
    /// New jobs run on it; the worker loads it once the jobs queued before the switch are done.
    AfterQueued,
}

/// What [`QueueHandle::on_model_loaded`] registers.
pub type LoadedHook = Box<dyn Fn(&Loaded) + Send + Sync>;

enum Command {
    Submit(
        ValidRequest,
        Option<String>,
        oneshot::Sender<Result<Submitted, SubmitError>>,
    ),
    SelectModel(String, oneshot::Sender<SelectOutcome>),
    SubscribeModels(oneshot::Sender<broadcast::Receiver<ModelEvent>>),
    OnModelLoaded(LoadedHook, oneshot::Sender<()>),
    Get(JobId, oneshot::Sender<Option<JobSnapshot>>),
    List(usize, oneshot::Sender<Vec<JobSnapshot>>),
    Cancel(JobId, oneshot::Sender<Result<CancelOutcome, CancelError>>),
    CancelQueued(JobId, oneshot::Sender<bool>),
    Subscribe(JobId, oneshot::Sender<Option<Subscription>>),
    Status(oneshot::Sender<QueueStatus>),
    Shutdown(oneshot::Sender<()>),
    CancelAllQueued(oneshot::Sender<Vec<JobId>>),
    Delete(JobId, oneshot::Sender<Result<(), DeleteError>>),
    History(HistoryQuery, oneshot::Sender<HistoryPage>),
}

/// `GET /api/history`: finished jobs (done or failed), newest first.
#[derive(Debug, Clone, Default)]
pub struct HistoryQuery {
    /// Case-insensitive text the prompt (as typed or as enhanced) must contain.
    pub text: Option<String>,
    /// Only jobs accepted before this one (its `seq`): the next page.
    pub before: Option<u64>,
    pub limit: usize,
}

#[derive(Debug, Clone)]
pub struct HistoryPage {
    pub jobs: Vec<JobSnapshot>,
    /// `before` for the next page; `None` when this page is the last.
    pub next_before: Option<u64>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeleteError {
    #[error("no job `{0}`")]
    NotFound(String),
    #[error("job `{0}` is {1}: cancel it first, only finished jobs can be deleted")]
    NotFinished(String, JobState),
    #[error("could not delete the files of job `{0}`: {1}")]
    Io(String, String),
    #[error("the queue has stopped")]
    Stopped,
}

/// Talks to the queue actor; cheap to clone.
#[derive(Clone)]
pub struct QueueHandle {
    tx: mpsc::Sender<Command>,
    outputs: Arc<OutputsHealth>,
}

/// Where the actor's jobs run.
pub enum Backend {
    /// This process's worker thread, one job at a time.
    Local(std_mpsc::Sender<Work>),
    /// Remote workers behind a broker: every waiting job is handed to the broker at once, and
    /// the workers report back through the same [`WorkerEvent`]s.
    Broker(broker::front::FrontHandle),
}

/// Starts the actor with this process's worker thread ([`Backend::Local`]); see [`start_with`].
pub fn start(
    config: QueueConfig,
    worker: std_mpsc::Sender<Work>,
    worker_events: mpsc::UnboundedReceiver<WorkerEvent>,
    recovered: Vec<JobRecord>,
) -> QueueHandle {
    start_with(config, Backend::Local(worker), worker_events, recovered)
}

/// Starts the actor on the current tokio runtime. `recovered` is the journal's content: finished
/// jobs become the history; queued and running ones are queued again in their original order
/// (a job that was running restarts from scratch).
pub fn start_with(
    config: QueueConfig,
    backend: Backend,
    worker_events: mpsc::UnboundedReceiver<WorkerEvent>,
    recovered: Vec<JobRecord>,
) -> QueueHandle {
    let (tx, rx) = mpsc::channel(64);
    let model = config.model.clone();
    let health = Arc::new(OutputsHealth::new(&config.outputs));
    let mut actor = Actor {
        loaded: model.clone(),
        selected: model,
        switching: None,
        model_events: broadcast::channel(64).0,
        on_loaded: Vec::new(),
        jobs: HashMap::new(),
        pending: VecDeque::new(),
        running: Vec::new(),
        history: VecDeque::new(),
        next_seq: recovered.iter().map(|r| r.seq + 1).max().unwrap_or(1),
        journal: Journal::new(&config.outputs),
        backend,
        config,
        run_ms_avg: None,
        shutting_down: false,
        shutdown_waiters: Vec::new(),
        health: health.clone(),
        unjournaled: Vec::new(),
    };
    let mut requeued = 0usize;
    for mut record in recovered {
        if matches!(record.state, JobState::Failed | JobState::Cancelled) {
            // A failed or cancelled job has no images (a batch is all or nothing; older
            // versions could leave some behind).
            let batch = record.request.batch as usize;
            outputs::remove_images(&actor.config.outputs, &record.id, batch);
            record.images.clear();
        }
        if record.state.is_terminal() {
            actor.history.push_back(record.id.clone());
            actor.jobs.insert(record.id.clone(), Job::new(record));
        } else {
            if record.state == JobState::Running
                && !record
                    .notices
                    .iter()
                    .any(|n| n.kind == crate::engine::NoticeKind::Resumed)
            {
                // It restarts from step 1: say so, in the record and on its event stream.
                record.notices.push(crate::engine::Notice::resumed());
            }
            record.state = JobState::Queued;
            record.started_at = None;
            actor.pending.push_back(record.id.clone());
            actor.jobs.insert(record.id.clone(), Job::new(record));
            requeued += 1;
        }
    }
    actor.trim_history();
    if requeued > 0 {
        tracing::info!(jobs = requeued, "resuming journaled jobs");
    }
    tokio::spawn(actor.run(rx, worker_events));
    QueueHandle {
        tx,
        outputs: health,
    }
}

struct Job {
    record: JobRecord,
    cancel: Option<CancelToken>,
    /// The run is being stopped for a shutdown, not by the user: keep it journaled as running.
    interrupted: bool,
    step: usize,
    total: usize,
    elapsed_ms: Option<u64>,
    started: Option<Instant>,
    events: Option<broadcast::Sender<JobEvent>>,
    /// Handed to the broker (which keeps it until it is settled).
    published: bool,
    /// The latest live preview (a page that opens the stream mid-run starts from it).
    preview: Option<(usize, String)>,
}

impl Job {
    fn new(record: JobRecord) -> Self {
        let total = record.request.steps as usize;
        Self {
            record,
            cancel: None,
            interrupted: false,
            step: 0,
            total,
            elapsed_ms: None,
            started: None,
            events: None,
            published: false,
            preview: None,
        }
    }

    fn emit(&mut self, ev: JobEvent) {
        let terminal = ev.is_terminal();
        if let Some(tx) = &self.events {
            // No receivers left is fine: the page may have gone away.
            let _ = tx.send(ev);
        }
        if terminal {
            // Receivers drain what was sent, then see the channel closed.
            self.events = None;
        }
    }
}

struct Actor {
    jobs: HashMap<JobId, Job>,
    pending: VecDeque<JobId>,
    /// Running jobs in the order they started (at most one without a broker).
    running: Vec<JobId>,
    /// Finished jobs, oldest first.
    history: VecDeque<JobId>,
    next_seq: u64,
    journal: Journal,
    backend: Backend,
    config: QueueConfig,
    /// The model the worker has loaded, the one new jobs run on, and a job-less switch in flight.
    loaded: String,
    selected: String,
    switching: Option<String>,
    model_events: broadcast::Sender<ModelEvent>,
    /// Called with each loaded model before anyone hears of the switch (see
    /// [`QueueHandle::on_model_loaded`]).
    on_loaded: Vec<LoadedHook>,
    /// Moving average of run times (ms), for `Retry-After`.
    run_ms_avg: Option<f64>,
    shutting_down: bool,
    shutdown_waiters: Vec<oneshot::Sender<()>>,
    health: Arc<OutputsHealth>,
    /// Finished jobs whose final record is not in the journal yet (retried on later writes).
    unjournaled: Vec<JobRecord>,
}

impl Actor {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut worker_events: mpsc::UnboundedReceiver<WorkerEvent>,
    ) {
        self.dispatch().await;
        loop {
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.command(cmd).await,
                    None => break,
                },
                ev = worker_events.recv() => match ev {
                    Some(ev) => self.worker_event(ev).await,
                    None => {
                        self.worker_gone().await;
                        // Keep answering commands: the history is still readable.
                        while let Some(cmd) = commands.recv().await {
                            self.command(cmd).await;
                        }
                        break;
                    }
                },
            }
        }
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(req, model, reply) => {
                let r = self.submit(req, model).await;
                let _ = reply.send(r);
            }
            Command::SelectModel(name, reply) => {
                self.selected = name.clone();
                let outcome = if self.loaded == name && self.switching.is_none() {
                    SelectOutcome::Loaded
                } else if self.switching.as_deref() == Some(name.as_str()) {
                    SelectOutcome::Switching
                } else if self.running.is_empty() && self.pending.is_empty() {
                    self.dispatch().await;
                    SelectOutcome::Switching
                } else {
                    SelectOutcome::AfterQueued
                };
                tracing::info!(model = %name, ?outcome, "model selected");
                let _ = reply.send(outcome);
            }
            Command::SubscribeModels(reply) => {
                let _ = reply.send(self.model_events.subscribe());
            }
            Command::OnModelLoaded(hook, reply) => {
                self.on_loaded.push(hook);
                let _ = reply.send(());
            }
            Command::Get(id, reply) => {
                let _ = reply.send(self.snapshot(&id));
            }
            Command::List(limit, reply) => {
                let mut all: Vec<&Job> = self.jobs.values().collect();
                all.sort_by_key(|j| std::cmp::Reverse(j.record.seq));
                let out = all
                    .into_iter()
                    .take(limit)
                    .filter_map(|j| self.snapshot(&j.record.id))
                    .collect();
                let _ = reply.send(out);
            }
            Command::Cancel(id, reply) => {
                let r = self.cancel(&id).await;
                let _ = reply.send(r);
            }
            Command::CancelQueued(id, reply) => {
                let queued = self
                    .jobs
                    .get(&id)
                    .is_some_and(|j| j.record.state == JobState::Queued);
                let done = queued && self.cancel(&id).await.is_ok();
                let _ = reply.send(done);
            }
            Command::Subscribe(id, reply) => {
                let snap = self.snapshot(&id);
                let out = snap.map(|snap| {
                    let rx = self.jobs.get_mut(&id).and_then(|job| {
                        if job.record.state.is_terminal() {
                            return None;
                        }
                        let tx = job
                            .events
                            .get_or_insert_with(|| broadcast::channel(EVENT_BUFFER).0);
                        Some(tx.subscribe())
                    });
                    (snap, rx)
                });
                let _ = reply.send(out);
            }
            Command::Status(reply) => {
                let running = self.running.first().and_then(|id| self.snapshot(id));
                let _ = reply.send(QueueStatus {
                    running,
                    queued: self.pending.len(),
                    loaded: self.loaded.clone(),
                    selected: self.selected.clone(),
                    switching: self.switching.clone(),
                });
            }
            Command::CancelAllQueued(reply) => {
                let ids: Vec<JobId> = self.pending.drain(..).collect();
                for id in &ids {
                    self.finish(id, JobState::Cancelled, None).await;
                }
                if !ids.is_empty() {
                    tracing::info!(jobs = ids.len(), "cancelled every queued job");
                }
                let _ = reply.send(ids);
            }
            Command::Delete(id, reply) => {
                let r = self.delete(&id).await;
                let _ = reply.send(r);
            }
            Command::History(q, reply) => {
                let _ = reply.send(self.history_page(&q));
            }
            Command::Shutdown(reply) => {
                self.shutting_down = true;
                // Remote workers keep running their jobs: the results wait in the broker.
                let local = matches!(self.backend, Backend::Local(_));
                match self
                    .running
                    .first()
                    .filter(|_| local)
                    .and_then(|id| self.jobs.get_mut(id))
                {
                    Some(job) => {
                        job.interrupted = true;
                        if let Some(c) = &job.cancel {
                            c.cancel();
                        }
                        self.shutdown_waiters.push(reply);
                    }
                    None => {
                        let _ = reply.send(());
                    }
                }
            }
        }
    }

    fn snapshot(&self, id: &str) -> Option<JobSnapshot> {
        let job = self.jobs.get(id)?;
        let position = (job.record.state == JobState::Queued)
            .then(|| self.pending.iter().position(|p| p == id))
            .flatten();
        Some(JobSnapshot {
            record: job.record.clone(),
            position,
            step: job.step,
            total_steps: job.total,
            elapsed_ms: job.elapsed_ms,
            cancelling: job.cancel.as_ref().is_some_and(|c| c.is_cancelled()),
            preview: job.preview.clone(),
        })
    }

    fn retry_after_s(&self) -> u64 {
        // One slot frees when the running job ends: about one run from now.
        let running_for = self
            .running
            .first()
            .and_then(|id| self.jobs.get(id))
            .and_then(|j| j.started)
            .map(|t| t.elapsed().as_millis() as f64)
            .unwrap_or(0.0);
        match self.run_ms_avg {
            Some(avg) => {
                (((avg - running_for).max(0.0) / 1000.0).ceil() as u64).clamp(1, MAX_RETRY_AFTER_S)
            }
            None => DEFAULT_RETRY_AFTER_S,
        }
    }

    async fn submit(
        &mut self,
        request: ValidRequest,
        model: Option<String>,
    ) -> Result<Submitted, SubmitError> {
        if self.shutting_down {
            return Err(SubmitError::ShuttingDown);
        }
        if let Backend::Broker(front) = &self.backend {
            if let Some(problem) = front.health().problem() {
                return Err(SubmitError::Unavailable(problem));
            }
        }
        // With a broker, `pending` is every job of the cluster that no worker has started.
        if self.pending.len() >= self.config.capacity {
            return Err(SubmitError::Full {
                capacity: self.config.capacity,
                retry_after_s: self.retry_after_s(),
            });
        }
        let mut id = job::new_job_id();
        while self.jobs.contains_key(&id) {
            id = job::new_job_id();
        }
        let record = JobRecord {
            id: id.clone(),
            seq: self.next_seq,
            state: JobState::Queued,
            model: model.unwrap_or_else(|| self.selected.clone()),
            created_at: job::now_ms(),
            started_at: None,
            finished_at: None,
            request,
            params: None,
            enhancement: None,
            images: Vec::new(),
            image_seeds: Vec::new(),
            notices: Vec::new(),
            timings: None,
            peak_memory_bytes: None,
            plan: None,
            error: None,
            worker: None,
        };
        // Journaled before it is acknowledged: an accepted job survives a crash.
        self.write_journal(&record)
            .await
            .map_err(SubmitError::Journal)?;
        self.next_seq += 1;
        self.jobs.insert(id.clone(), Job::new(record));
        self.pending.push_back(id.clone());
        let position = self.pending.len() - 1;
        self.dispatch().await;
        Ok(Submitted { id, position })
    }

    async fn cancel(&mut self, id: &str) -> Result<CancelOutcome, CancelError> {
        let Some(job) = self.jobs.get_mut(id) else {
            return Err(CancelError::NotFound(id.to_string()));
        };
        match job.record.state {
            JobState::Running => {
                if let Some(c) = &job.cancel {
                    c.cancel();
                }
                if let Backend::Broker(front) = &self.backend {
                    front.cancel(id);
                }
                Ok(CancelOutcome::Stopping)
            }
            JobState::Queued => {
                if let (Backend::Broker(front), true) = (&self.backend, job.published) {
                    // A worker may take it before the cancel is settled: it finds the mark.
                    front.cancel(id);
                }
                self.pending.retain(|p| p != id);
                self.finish(id, JobState::Cancelled, None).await;
                self.announce_positions();
                Ok(CancelOutcome::Cancelled)
            }
            s => Err(CancelError::Finished(id.to_string(), s)),
        }
    }

    /// Starts the next job when the worker is free; with nothing to run, has it load the selected
    /// model if another one is loaded. With a broker, hands every waiting job to it (the
    /// workers serve one model: there is nothing to switch).
    async fn dispatch(&mut self) {
        if let Backend::Broker(front) = &self.backend {
            if self.shutting_down {
                return;
            }
            for id in &self.pending {
                if let Some(job) = self.jobs.get_mut(id).filter(|j| !j.published) {
                    front.enqueue(&job.record);
                    job.published = true;
                }
            }
            return;
        }
        if !self.running.is_empty() || self.switching.is_some() || self.shutting_down {
            return;
        }
        let Some(id) = self.pending.pop_front() else {
            if self.selected != self.loaded {
                let name = self.selected.clone();
                if let Backend::Local(worker) = &self.backend {
                    if worker.send(Work::Load(name.clone())).is_ok() {
                        self.switching = Some(name);
                    }
                }
            }
            return;
        };
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let cancel = CancelToken::new();
        let now = job::now_ms();
        job.record.state = JobState::Running;
        job.record.started_at = Some(now);
        job.started = Some(Instant::now());
        job.cancel = Some(cancel.clone());
        job.step = 0;
        job.preview = None;
        let queue_ms = now.saturating_sub(job.record.created_at);
        let item = WorkItem {
            id: id.clone(),
            request: job.record.request.clone(),
            cancel,
            queue_ms,
            model: job.record.model.clone(),
        };
        job.emit(JobEvent::Started);
        let record = job.record.clone();
        self.running.push(id.clone());
        let sent = match &self.backend {
            Backend::Local(worker) => worker.send(Work::Job(item)).is_ok(),
            Backend::Broker(_) => false,
        };
        if !sent {
            self.running.clear();
            self.finish(
                &id,
                JobState::Failed,
                Some(JobError::new(
                    FailureKind::Internal,
                    "the worker thread has stopped",
                )),
            )
            .await;
            return;
        }
        self.announce_positions();
        if let Err(e) = self.write_journal(&record).await {
            tracing::warn!(job_id = %id, "could not journal the job's start: {e}");
        }
    }

    fn announce_positions(&mut self) {
        for (i, id) in self.pending.iter().enumerate() {
            if let Some(job) = self.jobs.get_mut(id) {
                job.emit(JobEvent::Queued { position: i });
            }
        }
    }

    async fn worker_event(&mut self, ev: WorkerEvent) {
        match ev {
            WorkerEvent::Progress {
                id,
                step,
                total,
                elapsed_ms,
            } => {
                if let Some(job) = self.jobs.get_mut(&id) {
                    job.step = step;
                    job.total = total;
                    job.elapsed_ms = Some(elapsed_ms);
                    job.emit(JobEvent::Progress {
                        step,
                        total,
                        elapsed_ms,
                    });
                }
            }
            WorkerEvent::Preview { id, step, image } => {
                if let Some(job) = self.jobs.get_mut(&id) {
                    if job.record.state == JobState::Running {
                        job.preview = Some((step, image.clone()));
                        job.emit(JobEvent::Preview { step, image });
                    }
                }
            }
            WorkerEvent::Model(ev) => self.model_event(ev).await,
            WorkerEvent::Notice { id, notice } => {
                if let Some(job) = self.jobs.get_mut(&id) {
                    job.record.notices.push(notice.clone());
                    job.emit(JobEvent::Notice(notice));
                }
            }
            WorkerEvent::Started { id, worker } => self.started_remotely(&id, worker).await,
            WorkerEvent::Requeued { id } => {
                let Some(job) = self.jobs.get_mut(&id) else {
                    return;
                };
                if job.record.state != JobState::Running {
                    return;
                }
                job.record.state = JobState::Queued;
                job.record.started_at = None;
                job.cancel = None;
                job.step = 0;
                job.preview = None;
                self.running.retain(|r| r != &id);
                self.pending.push_front(id);
                self.announce_positions();
            }
            WorkerEvent::Finished { id, outcome } => {
                self.running.retain(|r| r != &id);
                // A remote result may come for a job still waiting here (it ran while this
                // front door was down).
                let before = self.pending.len();
                self.pending.retain(|p| p != &id);
                if self.pending.len() != before {
                    self.announce_positions();
                }
                let ended = self
                    .jobs
                    .get(&id)
                    .is_none_or(|j| j.record.state.is_terminal());
                if ended {
                    // A remote result for a job that already ended here (cancelled while it
                    // ran, or already settled): drop its images and the broker's copy.
                    self.drop_remote_result(&id, outcome).await;
                } else {
                    self.finished(&id, outcome).await;
                }
                if self.shutting_down && self.running.is_empty() {
                    for w in self.shutdown_waiters.drain(..) {
                        let _ = w.send(());
                    }
                }
                self.dispatch().await;
            }
        }
    }

    async fn finished(&mut self, id: &str, mut outcome: Result<Box<RunOutput>, RunError>) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        // A cancel the user was told about wins, even when the run had just finished: its
        // images are removed again.
        let cancelled = job.cancel.as_ref().is_some_and(|c| c.is_cancelled()) && !job.interrupted;
        job.cancel = None;
        if cancelled {
            if let Ok(out) = &outcome {
                let (dir, files) = (self.config.outputs.clone(), out.images.clone());
                let _ = tokio::task::spawn_blocking(move || {
                    for f in files {
                        let _ = std::fs::remove_file(dir.join(f));
                    }
                })
                .await;
            }
            outcome = Err(RunError::Cancelled);
        }
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        if let Some(t) = job.started {
            let ms = t.elapsed().as_millis() as f64;
            if outcome.is_ok() {
                self.run_ms_avg = Some(match self.run_ms_avg {
                    Some(avg) => 0.7 * avg + 0.3 * ms,
                    None => ms,
                });
            }
        }
        match outcome {
            Ok(out) => {
                let queue_ms = job
                    .record
                    .started_at
                    .unwrap_or(job.record.created_at)
                    .saturating_sub(job.record.created_at);
                let RunOutput {
                    params,
                    enhancement,
                    notices,
                    timings,
                    peak_memory_bytes,
                    plan,
                    images,
                    encoded: _,
                    image_seeds,
                } = *out;
                job.record.params = Some(params);
                job.record.enhancement = Some(enhancement);
                // A resumed job keeps saying it was restarted.
                let mut kept: Vec<_> = job
                    .record
                    .notices
                    .drain(..)
                    .filter(|n| n.kind.is_queue_notice())
                    .collect();
                kept.extend(notices);
                job.record.notices = kept;
                job.record.image_seeds = image_seeds;
                job.record.timings = Some(JobTimings {
                    queue_ms,
                    encode_ms: timings.encode_ms,
                    denoise_ms: timings.denoise_ms,
                    decode_ms: timings.decode_ms,
                    total_ms: timings.total_ms,
                });
                job.record.peak_memory_bytes = Some(peak_memory_bytes);
                job.record.plan = Some(plan);
                job.record.images = images;
                job.step = job.total;
                self.finish(id, JobState::Done, None).await;
            }
            Err(RunError::Cancelled) if job.interrupted => {
                // Shutdown: the journal still says "running", so the next start re-queues it.
                job.record.state = JobState::Queued;
                job.record.started_at = None;
                job.step = 0;
                job.preview = None;
            }
            Err(RunError::Cancelled) => self.finish(id, JobState::Cancelled, None).await,
            Err(RunError::Failed(e)) => {
                if e.kind.storage().is_some() {
                    self.health
                        .note("the images", &Err(std::io::Error::other(e.message.clone())));
                }
                self.finish(id, JobState::Failed, Some(e)).await
            }
        }
    }

    /// Moves a job to a terminal state: record, sidecar, journal, subscribers, history.
    async fn finish(&mut self, id: &str, state: JobState, error: Option<JobError>) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        job.record.state = state;
        job.record.finished_at = Some(job::now_ms());
        job.preview = None;
        job.record.error = error;
        let record = job.record.clone();
        if let Some(ev) = JobEvent::terminal_for(&record) {
            job.emit(ev);
        }
        if state == JobState::Done {
            let sidecar = self.config.outputs.join(format!("{id}.json"));
            let rec = record.clone();
            let written = tokio::task::spawn_blocking(move || {
                let bytes = serde_json::to_vec_pretty(&rec).map_err(std::io::Error::other)?;
                crate::engine::output::write_atomic(&sidecar, &bytes)
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            if let Err(e) = written {
                tracing::warn!(job_id = %id, "could not write the JSON sidecar: {e}");
            }
        }
        self.write_journal_end(record).await;
        self.history.push_back(id.to_string());
        self.trim_history();
    }

    fn trim_history(&mut self) {
        while self.history.len() > HISTORY_LIMIT {
            if let Some(old) = self.history.pop_front() {
                self.jobs.remove(&old);
            }
        }
    }

    /// The worker thread died: nothing can run any more; fail what waits so no page hangs.
    async fn worker_gone(&mut self) {
        tracing::error!("the worker thread has stopped; queued jobs cannot run");
        let ids: Vec<JobId> = self
            .running
            .drain(..)
            .chain(self.pending.drain(..))
            .collect();
        for id in ids {
            self.finish(
                &id,
                JobState::Failed,
                Some(JobError::new(
                    FailureKind::Internal,
                    "the worker thread has stopped",
                )),
            )
            .await;
        }
        for w in self.shutdown_waiters.drain(..) {
            let _ = w.send(());
        }
    }

    async fn write_journal(&mut self, record: &JobRecord) -> std::io::Result<()> {
        let journal = self.journal.clone();
        let record = record.clone();
        // fsync belongs on a blocking thread, not on the runtime; awaiting it keeps the
        // journal's writes in the actor's order.
        let written = tokio::task::spawn_blocking(move || journal.write(&record))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        self.health.note("the job journal", &written);
        if written.is_ok() {
            self.retry_unjournaled().await;
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, state: JobState, batch: u32) -> JobRecord {
        job::test_record(seq, state, batch)
    }

    #[tokio::test]
    async fn failed_and_cancelled_jobs_keep_no_images_across_a_restart() {
        let dir = std::env::temp_dir().join(format!("zturbo-recover-{}", job::new_job_id()));
        std::fs::create_dir_all(&dir).unwrap();
        // What an older server could leave: a failed batch's first images, a cancelled job's.
        let failed = record(1, JobState::Failed, 3);
        let cancelled = record(2, JobState::Cancelled, 1);
        let mut done = record(3, JobState::Done, 1);
        done.images = vec![job::image_name(&done.id, 1)];
        for f in [
            job::image_name(&failed.id, 1),
            job::image_name(&failed.id, 2),
            job::image_name(&cancelled.id, 1),
            job::image_name(&done.id, 1),
        ] {
            std::fs::write(dir.join(f), b"png").unwrap();
        }
        let (work, _jobs) = std_mpsc::channel();
        let (_events, events_rx) = mpsc::unbounded_channel();
        let q = start(
            QueueConfig {
                capacity: 4,
                outputs: dir.clone(),
                model: "demo".into(),
            },
            work,
            events_rx,
            vec![failed.clone(), cancelled.clone(), done.clone()],
        );
        for (id, n) in [(&failed.id, 1), (&failed.id, 2), (&cancelled.id, 1)] {
            assert!(!dir.join(job::image_name(id, n)).exists(), "{id}-{n}");
        }
        assert!(dir.join(job::image_name(&done.id, 1)).exists());
        let snap = q.get(&done.id).await.unwrap();
        assert_eq!(snap.record.images.len(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
