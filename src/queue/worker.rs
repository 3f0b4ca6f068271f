//! The worker: one OS thread that owns the Engine, so candle never runs on the async runtime. It
//! loads the model first and reports "loaded" (or the load error) before anything is served, then
//! runs one job at a time, writes its PNGs and reports progress and the outcome to the queue.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::job::{image_name, FailureKind, JobError, JobId};
use crate::engine::output::{a1111_parameters, encode_png, record_text, write_atomic};
use crate::engine::{
    CancelToken, Engine, EngineError, Generation, Notice, Observer, ResolvedParams, RunExtras,
    StepEvent, Timings,
};
use crate::families::Profile;
use crate::inputs::InputStore;
use crate::memory::monitor::Tags;
use crate::memory::probe::MemoryProbe;
use crate::prompt::Enhanced;
use crate::request::ValidRequest;

/// Test hook: milliseconds the worker sleeps after every denoising step (cancellable), so tests
/// can hold a job "running" long enough to cancel it, fill the queue or kill the server.
pub const STEP_DELAY_ENV: &str = "ZTURBO_TEST_WORKER_DELAY_MS";

/// One job handed to the worker.
#[derive(Debug)]
pub struct WorkItem {
    pub id: JobId,
    pub request: ValidRequest,
    pub cancel: CancelToken,
    /// Time the job waited in the queue (recorded on the job's span).
    pub queue_ms: u64,
}

/// A finished run.
#[derive(Debug, Clone)]
pub struct RunOutput {
    pub params: ResolvedParams,
    pub enhancement: Enhanced,
    pub notices: Vec<Notice>,
    pub timings: Timings,
    pub peak_memory_bytes: u64,
    pub plan: crate::memory::planner::Plan,
    /// Image file names written to the outputs folder.
    pub images: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RunError {
    /// The cancel token stopped the run (between steps, after the last one, or in the decode).
    Cancelled,
    Failed(JobError),
}

/// What the worker tells the queue while it runs.
#[derive(Debug)]
pub enum WorkerEvent {
    Progress {
        id: JobId,
        step: usize,
        total: usize,
        elapsed_ms: u64,
    },
    Notice {
        id: JobId,
        notice: Notice,
    },
    Finished {
        id: JobId,
        outcome: Result<Box<RunOutput>, RunError>,
    },
}

/// What the loaded engine can do; the server builds its limits and `/api/info` from it.
#[derive(Clone)]
pub struct Loaded {
    pub model: String,
    pub profile: Profile,
    /// `engine.max_batch()` at start-up, clamped to 1..=the profile's `max_batch`.
    pub max_batch: u32,
    /// `cpu`, `cuda:0`, `metal`.
    pub device: String,
    pub probe: Arc<dyn MemoryProbe>,
    /// The layers a LoRA may update (the server checks named LoRA files against them).
    pub lora_layers: Arc<crate::families::lora::LinearLayers>,
}

pub struct WorkerConfig {
    pub outputs: PathBuf,
    pub tags: Arc<Tags>,
    /// See [`STEP_DELAY_ENV`].
    pub step_delay: Option<Duration>,
}

impl WorkerConfig {
    /// Reads [`STEP_DELAY_ENV`]; anything unparsable is ignored with a warning.
    pub fn step_delay_from_env() -> Option<Duration> {
        let raw = std::env::var(STEP_DELAY_ENV).ok()?;
        match raw.trim().parse::<u64>() {
            Ok(0) => None,
            Ok(ms) => {
                tracing::warn!("{STEP_DELAY_ENV}={ms}: every step is slowed down (test hook)");
                Some(Duration::from_millis(ms))
            }
            Err(_) => {
                tracing::warn!("{STEP_DELAY_ENV}=`{raw}` is not a number of milliseconds; ignored");
                None
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("{0}")]
    Load(String),
    #[error("the worker thread could not start: {0}")]
    Spawn(std::io::Error),
    #[error("the worker thread ended before reporting whether the model loaded")]
    Vanished,
}

/// The running worker thread: send it jobs.
pub struct Worker {
    pub jobs: std_mpsc::Sender<WorkItem>,
    pub thread: std::thread::JoinHandle<()>,
}

/// Starts the worker thread, which builds the engine with `build` (load + warm-up happen there),
/// and waits until it reports the model loaded — or returns the load error.
pub fn spawn<F>(
    build: F,
    config: WorkerConfig,
    events: UnboundedSender<WorkerEvent>,
) -> Result<(Worker, Loaded), WorkerError>
where
    F: FnOnce() -> Result<Engine, String> + Send + 'static,
{
    let (ready_tx, ready_rx) = std_mpsc::channel::<Result<Loaded, String>>();
    let (jobs_tx, jobs_rx) = std_mpsc::channel::<WorkItem>();
    let thread = std::thread::Builder::new()
        .name("zturbo-worker".into())
        .spawn(move || {
            let engine = match catch_unwind(AssertUnwindSafe(build)) {
                Ok(Ok(engine)) => engine,
                Ok(Err(e)) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
                Err(p) => {
                    let _ = ready_tx.send(Err(format!(
                        "loading the model panicked: {}",
                        panic_text(&*p)
                    )));
                    return;
                }
            };
            let engine = engine.with_tags(config.tags.clone());
            let loaded = Loaded {
                model: engine.model_name().to_string(),
                profile: *engine.profile(),
                max_batch: engine.max_batch().clamp(1, engine.profile().max_batch),
                device: crate::settings::device_label(engine.device()),
                probe: engine.probe().clone(),
                lora_layers: Arc::new(engine.lora_layers().clone()),
            };
            if ready_tx.send(Ok(loaded)).is_err() {
                return;
            }
            run(engine, config, jobs_rx, events);
        })
        .map_err(WorkerError::Spawn)?;
    match ready_rx.recv() {
        Ok(Ok(loaded)) => Ok((
            Worker {
                jobs: jobs_tx,
                thread,
            },
            loaded,
        )),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(WorkerError::Load(e))
        }
        Err(_) => {
            let _ = thread.join();
            Err(WorkerError::Vanished)
        }
    }
}

/// The job loop; ends when the queue drops its sender.
fn run(
    mut engine: Engine,
    config: WorkerConfig,
    jobs: std_mpsc::Receiver<WorkItem>,
    events: UnboundedSender<WorkerEvent>,
) {
    while let Ok(item) = jobs.recv() {
        let span = tracing::info_span!(
            "job",
            job_id = %item.id,
            queue_ms = item.queue_ms,
            inference_ms = tracing::field::Empty
        );
        let _entered = span.enter();
        config.tags.set_job(Some(item.id.clone()));
        let started = Instant::now();
        let mut observer = JobObserver {
            id: &item.id,
            events: &events,
            cancel: &item.cancel,
            step_delay: config.step_delay,
        };
        let request = with_inputs(&config.outputs, &item.request);
        let result = catch_unwind(AssertUnwindSafe(|| {
            engine.generate(
                &request?,
                &RunExtras::default(),
                &mut observer,
                &item.cancel,
            )
        }));
        let outcome = match result {
            Ok(Ok(gen)) => write_images(&config.outputs, &item.id, &gen)
                .map(|images| {
                    Box::new(RunOutput {
                        params: gen.params,
                        enhancement: gen.enhancement,
                        notices: gen.notices,
                        timings: gen.timings,
                        peak_memory_bytes: gen.peak_memory_bytes,
                        plan: gen.plan,
                        images,
                    })
                })
                .map_err(|e| {
                    RunError::Failed(JobError::new(
                        super::outputs::StorageProblem::of(&e).into(),
                        format!(
                            "could not write the images to {}: {e}",
                            config.outputs.display()
                        ),
                    ))
                }),
            Ok(Err(EngineError::Cancelled)) => Err(RunError::Cancelled),
            Ok(Err(e)) => Err(RunError::Failed(JobError::from(&e))),
            Err(p) => Err(RunError::Failed(JobError::new(
                FailureKind::Internal,
                format!("internal error: the engine panicked: {}", panic_text(&*p)),
            ))),
        };
        config.tags.set_job(None);
        let inference_ms = started.elapsed().as_millis() as u64;
        span.record("inference_ms", inference_ms);
        // The one log line per job.
        match &outcome {
            Ok(out) => tracing::info!(images = out.images.len(), "job done"),
            Err(RunError::Cancelled) => tracing::info!("job stopped (cancelled)"),
            Err(RunError::Failed(e)) => tracing::warn!("job failed: {e}"),
        }
        let finished = WorkerEvent::Finished {
            id: item.id.clone(),
            outcome,
        };
        if events.send(finished).is_err() {
            break;
        }
    }
}

struct JobObserver<'a> {
    id: &'a JobId,
    events: &'a UnboundedSender<WorkerEvent>,
    cancel: &'a CancelToken,
    step_delay: Option<Duration>,
}

impl Observer for JobObserver<'_> {
    fn step(&mut self, e: &StepEvent) {
        let _ = self.events.send(WorkerEvent::Progress {
            id: self.id.clone(),
            step: e.step,
            total: e.total,
            elapsed_ms: e.elapsed_ms,
        });
        if let Some(delay) = self.step_delay {
            // In slices, so a cancel is noticed promptly.
            let until = Instant::now() + delay;
            while !self.cancel.is_cancelled() {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                std::thread::sleep(left.min(Duration::from_millis(10)));
            }
        }
    }

    fn notice(&mut self, n: &Notice) {
        let _ = self.events.send(WorkerEvent::Notice {
            id: self.id.clone(),
            notice: n.clone(),
        });
    }
}

/// The request with its input image and mask read back from the store (a journaled job carries
/// only their hashes).
fn with_inputs(outputs: &std::path::Path, req: &ValidRequest) -> Result<ValidRequest, EngineError> {
    let mut req = req.clone();
    if let Some(init) = req.init.as_mut() {
        let store = InputStore::new(outputs);
        store
            .load(&mut init.image, false)
            .map_err(|e| EngineError::Invalid(format!("input image: {e}")))?;
        if let Some(mask) = init.mask.as_mut() {
            store
                .load(mask, true)
                .map_err(|e| EngineError::Invalid(format!("mask: {e}")))?;
        }
        if let Some(r) = init.region.as_mut() {
            store
                .load(&mut r.image, false)
                .map_err(|e| EngineError::Invalid(format!("input image: {e}")))?;
            store
                .load(&mut r.mask, true)
                .map_err(|e| EngineError::Invalid(format!("mask: {e}")))?;
        }
    }
    Ok(req)
}

/// Writes `<id>-<n>.png` for each image, with the A1111 `parameters` chunk and the `zturbo`
/// record (the same chunks `zturbo generate` writes), all or nothing ([`write_all`]).
pub fn write_images(
    outputs: &std::path::Path,
    id: &str,
    gen: &Generation,
) -> std::io::Result<Vec<String>> {
    let mut files = Vec::with_capacity(gen.images.len());
    for (i, img) in gen.images.iter().enumerate() {
        let text = a1111_parameters(&gen.params, img.seed, &gen.notices);
        let rec = record_text(Some(id), gen, img.seed);
        let png = encode_png(img, &[("parameters", &text), ("zturbo", &rec)])
            .map_err(std::io::Error::other)?;
        files.push((image_name(id, i + 1), png));
    }
    write_all(outputs, &files)?;
    Ok(files.into_iter().map(|(name, _)| name).collect())
}

/// Writes every file or none: when one cannot be written (a full disk), those already written
/// are removed again, so a failed job leaves nothing behind to be served or to fill the disk.
pub fn write_all(outputs: &std::path::Path, files: &[(String, Vec<u8>)]) -> std::io::Result<()> {
    for (i, (name, bytes)) in files.iter().enumerate() {
        if let Err(e) = write_atomic(&outputs.join(name), bytes) {
            for (done, _) in &files[..i] {
                let _ = std::fs::remove_file(outputs.join(done));
            }
            let _ = crate::engine::output::sync_dir(outputs);
            return Err(e);
        }
    }
    Ok(())
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_written_whole_or_not_at_all() {
        let dir =
            std::env::temp_dir().join(format!("zturbo-batch-{}", super::super::job::new_job_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let id = "0123456789abcdef";
        let files: Vec<(String, Vec<u8>)> = (1..=3)
            .map(|n| (image_name(id, n), vec![n as u8; 100]))
            .collect();
        // The third cannot be written (a folder sits where its temporary goes): none is kept.
        let blocker = dir.join(format!(".{}.{}.tmp", files[2].0, std::process::id()));
        std::fs::create_dir(&blocker).unwrap();
        assert!(write_all(&dir, &files).is_err());
        for (name, _) in &files {
            assert!(!dir.join(name).exists(), "{name} was left behind");
        }
        std::fs::remove_dir(&blocker).unwrap();
        write_all(&dir, &files).unwrap();
        for (name, bytes) in &files {
            assert_eq!(&std::fs::read(dir.join(name)).unwrap(), bytes);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
