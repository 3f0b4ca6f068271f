//! The job queue as an actor: one task owns every job (records, FIFO order, the running job and
//! its cancel token); HTTP handlers talk to it over `mpsc` + `oneshot` through [`QueueHandle`].
//! Admission is bounded and fails fast; accepted jobs are journaled before they are acknowledged;
//! one worker thread ([`worker`]) runs them one at a time.

pub mod job;
pub mod journal;
pub mod outputs;
pub mod worker;

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
use worker::{RunError, RunOutput, WorkItem, WorkerEvent};

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
    /// The loaded model's name (recorded with each job).
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
}

enum Command {
    Submit(
        ValidRequest,
        oneshot::Sender<Result<Submitted, SubmitError>>,
    ),
    Get(JobId, oneshot::Sender<Option<JobSnapshot>>),
    List(usize, oneshot::Sender<Vec<JobSnapshot>>),
    Cancel(JobId, oneshot::Sender<Result<CancelOutcome, CancelError>>),
    CancelQueued(JobId, oneshot::Sender<bool>),
    Subscribe(JobId, oneshot::Sender<Option<Subscription>>),
    Status(oneshot::Sender<QueueStatus>),
    Shutdown(oneshot::Sender<()>),
}

/// Talks to the queue actor; cheap to clone.
#[derive(Clone)]
pub struct QueueHandle {
    tx: mpsc::Sender<Command>,
    outputs: Arc<OutputsHealth>,
}

impl QueueHandle {
    /// Whether the outputs folder can be written (what `/api/health` reports).
    pub fn outputs_health(&self) -> Arc<OutputsHealth> {
        self.outputs.clone()
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.ok()?;
        rx.await.ok()
    }

    /// Accepts a job (journaled before this returns) or refuses it at once.
    pub async fn submit(&self, request: ValidRequest) -> Result<Submitted, SubmitError> {
        self.ask(|tx| Command::Submit(request, tx))
            .await
            .unwrap_or(Err(SubmitError::Stopped))
    }

    pub async fn get(&self, id: &str) -> Option<JobSnapshot> {
        self.ask(|tx| Command::Get(id.to_string(), tx))
            .await
            .flatten()
    }

    /// Up to `limit` jobs, newest first: queued and running ones too.
    pub async fn list(&self, limit: usize) -> Vec<JobSnapshot> {
        self.ask(|tx| Command::List(limit, tx))
            .await
            .unwrap_or_default()
    }

    pub async fn cancel(&self, id: &str) -> Result<CancelOutcome, CancelError> {
        self.ask(|tx| Command::Cancel(id.to_string(), tx))
            .await
            .unwrap_or(Err(CancelError::Stopped))
    }

    /// Cancels the job only if it has not started; whether it did.
    pub async fn cancel_if_queued(&self, id: &str) -> bool {
        self.ask(|tx| Command::CancelQueued(id.to_string(), tx))
            .await
            .unwrap_or(false)
    }

    /// The job's current state and, unless it has ended, a receiver of every event after it
    /// (taken atomically, so nothing falls between the two).
    pub async fn subscribe(&self, id: &str) -> Option<Subscription> {
        self.ask(|tx| Command::Subscribe(id.to_string(), tx))
            .await
            .flatten()
    }

    /// The running job and the number of queued ones, read atomically.
    pub async fn status(&self) -> QueueStatus {
        self.ask(Command::Status).await.unwrap_or(QueueStatus {
            running: None,
            queued: 0,
        })
    }

    /// Follows a job to its end and returns its final snapshot (`None` if it is unknown or the
    /// queue stopped). Dropping the future does not cancel the job.
    pub async fn wait(&self, id: &str) -> Option<JobSnapshot> {
        let (snap, rx) = self.subscribe(id).await?;
        if let Some(mut rx) = rx.filter(|_| !snap.record.state.is_terminal()) {
            loop {
                match rx.recv().await {
                    Ok(ev) if ev.is_terminal() => break,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        }
        // The record, not the event: it carries the images, params and error.
        let snap = self.get(id).await?;
        snap.record.state.is_terminal().then_some(snap)
    }

    /// Stops starting jobs and interrupts the running one (it stays journaled and restarts with
    /// the next server); returns once the worker is idle.
    pub async fn shutdown(&self) {
        let _ = self.ask(Command::Shutdown).await;
    }
}

/// Starts the actor on the current tokio runtime. `recovered` is the journal's content: finished
/// jobs become the history; queued and running ones are queued again in their original order
/// (a job that was running restarts from scratch).
pub fn start(
    config: QueueConfig,
    worker: std_mpsc::Sender<WorkItem>,
    worker_events: mpsc::UnboundedReceiver<WorkerEvent>,
    recovered: Vec<JobRecord>,
) -> QueueHandle {
    let (tx, rx) = mpsc::channel(64);
    let health = Arc::new(OutputsHealth::new(&config.outputs));
    let mut actor = Actor {
        jobs: HashMap::new(),
        pending: VecDeque::new(),
        running: None,
        history: VecDeque::new(),
        next_seq: recovered.iter().map(|r| r.seq + 1).max().unwrap_or(1),
        journal: Journal::new(&config.outputs),
        worker,
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
    running: Option<JobId>,
    /// Finished jobs, oldest first.
    history: VecDeque<JobId>,
    next_seq: u64,
    journal: Journal,
    worker: std_mpsc::Sender<WorkItem>,
    config: QueueConfig,
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
            Command::Submit(req, reply) => {
                let r = self.submit(req).await;
                let _ = reply.send(r);
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
                let running = self.running.as_ref().and_then(|id| self.snapshot(id));
                let _ = reply.send(QueueStatus {
                    running,
                    queued: self.pending.len(),
                });
            }
            Command::Shutdown(reply) => {
                self.shutting_down = true;
                match self.running.as_ref().and_then(|id| self.jobs.get_mut(id)) {
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
        })
    }

    fn retry_after_s(&self) -> u64 {
        // One slot frees when the running job ends: about one run from now.
        let running_for = self
            .running
            .as_ref()
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

    async fn submit(&mut self, request: ValidRequest) -> Result<Submitted, SubmitError> {
        if self.shutting_down {
            return Err(SubmitError::ShuttingDown);
        }
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
            model: self.config.model.clone(),
            created_at: job::now_ms(),
            started_at: None,
            finished_at: None,
            request,
            params: None,
            enhancement: None,
            images: Vec::new(),
            notices: Vec::new(),
            timings: None,
            peak_memory_bytes: None,
            plan: None,
            error: None,
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
                Ok(CancelOutcome::Stopping)
            }
            JobState::Queued => {
                self.pending.retain(|p| p != id);
                self.finish(id, JobState::Cancelled, None).await;
                self.announce_positions();
                Ok(CancelOutcome::Cancelled)
            }
            s => Err(CancelError::Finished(id.to_string(), s)),
        }
    }

    /// Starts the next job when the worker is free.
    async fn dispatch(&mut self) {
        if self.running.is_some() || self.shutting_down {
            return;
        }
        let Some(id) = self.pending.pop_front() else {
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
        let queue_ms = now.saturating_sub(job.record.created_at);
        let item = WorkItem {
            id: id.clone(),
            request: job.record.request.clone(),
            cancel,
            queue_ms,
        };
        job.emit(JobEvent::Started);
        let record = job.record.clone();
        self.running = Some(id.clone());
        if self.worker.send(item).is_err() {
            self.running = None;
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
            WorkerEvent::Notice { id, notice } => {
                if let Some(job) = self.jobs.get_mut(&id) {
                    job.record.notices.push(notice.clone());
                    job.emit(JobEvent::Notice(notice));
                }
            }
            WorkerEvent::Finished { id, outcome } => {
                if self.running.as_deref() == Some(id.as_str()) {
                    self.running = None;
                }
                self.finished(&id, outcome).await;
                if self.shutting_down && self.running.is_none() {
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
                } = *out;
                job.record.params = Some(params);
                job.record.enhancement = Some(enhancement);
                job.record.notices = notices;
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

    /// Journals a job's end (see [`Journal::write_end`]); an end that only got its marker is
    /// written in full later, after any journal write that succeeds.
    async fn write_journal_end(&mut self, record: JobRecord) {
        let journal = self.journal.clone();
        let rec = record.clone();
        let outcome = tokio::task::spawn_blocking(move || journal.write_end(&rec))
            .await
            .unwrap_or_else(|e| EndWrite::Failed(std::io::Error::other(e)));
        let id = record.id.clone();
        match outcome {
            EndWrite::Written => {
                self.health.note("the job journal", &Ok(()));
                self.unjournaled.retain(|r| r.id != id);
                self.retry_unjournaled().await;
            }
            EndWrite::Tombstoned(e) => {
                tracing::warn!(
                    job_id = %id,
                    "could not journal the job's end ({e}); marked it {} so it does not run again",
                    record.state
                );
                self.health.note("the job journal", &Err(e));
                self.remember_unjournaled(record);
            }
            EndWrite::Failed(e) => {
                tracing::error!(job_id = %id, "could not journal the job's end: {e}");
                self.health.note("the job journal", &Err(e));
                self.remember_unjournaled(record);
            }
        }
    }

    fn remember_unjournaled(&mut self, record: JobRecord) {
        self.unjournaled.retain(|r| r.id != record.id);
        self.unjournaled.push(record);
    }

    /// Tries again to journal the ends that could not be written.
    async fn retry_unjournaled(&mut self) {
        if self.unjournaled.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.unjournaled);
        let journal = self.journal.clone();
        let left = tokio::task::spawn_blocking(move || {
            pending
                .into_iter()
                .filter(|r| !matches!(journal.write_end(r), EndWrite::Written))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        self.unjournaled = left;
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
            .take()
            .into_iter()
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
    use crate::memory::planner::MemoryMode;

    fn record(seq: u64, state: JobState, batch: u32) -> JobRecord {
        JobRecord {
            id: job::new_job_id(),
            seq,
            state,
            model: "demo".into(),
            created_at: 1,
            started_at: None,
            finished_at: None,
            request: ValidRequest {
                prompt: "a lake".into(),
                negative_prompt: None,
                width: 64,
                height: 64,
                steps: 2,
                cfg: 1.0,
                seed: 7,
                batch,
                enhance: false,
                memory_mode: MemoryMode::Auto,
                init: None,
                loras: Vec::new(),
            },
            params: None,
            enhancement: None,
            images: vec![],
            notices: vec![],
            timings: None,
            peak_memory_bytes: None,
            plan: None,
            error: None,
        }
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
