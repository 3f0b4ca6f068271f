//! The worker: one OS thread that owns the Engine, so candle never runs on the async runtime. It
//! loads the model first and reports "loaded" (or the load error) before anything is served, then
//! runs one job at a time, writes its PNGs and reports progress and the outcome to the queue.
//! Between jobs it switches models: a job that recorded another model (or a switch the queue
//! asks for) unloads the current one and loads that one, reporting [`ModelEvent`]s.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::job::{image_name, FailureKind, JobError, JobId};
use crate::engine::output::{a1111_parameters, encode_png, record_text, write_atomic};
use crate::engine::{
    preview, CancelToken, Engine, EngineError, Generation, Notice, Observer, ResolvedParams,
    RunExtras, StepEvent, Timings,
};
use crate::families::LatentPreview;
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
    /// The model the job runs on (the worker switches to it first when another one is loaded).
    pub model: String,
}

/// What the queue hands the worker.
#[derive(Debug)]
pub enum Work {
    Job(WorkItem),
    /// Load this model now (the worker is idle; a switch asked for from the page or the API).
    Load(String),
}

/// Builds the engine for a model name (the names `/api/models` lists): resolves it, opens the
/// device, loads and warms the weights. Runs on the worker thread.
pub type Loader = Arc<dyn Fn(&str) -> Result<(Engine, ModelMeta), String> + Send + Sync>;

/// What the loader knows about a model besides its engine.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelMeta {
    /// The built-in random-weight demo.
    pub demo: bool,
    pub description: String,
    /// The model's folder (`None` for the embedded demo).
    pub path: Option<String>,
    /// Component files given instead of (or over) the folder's.
    pub files: crate::families::ComponentFiles,
}

/// A model switch, as the queue, the job's stream and `/api/events` report it.
#[derive(Debug, Clone)]
pub enum ModelEvent {
    /// Unloading the current model and loading `name` (for `job`, when a job asked for it).
    Loading { name: String, job: Option<JobId> },
    Loaded {
        loaded: Box<Loaded>,
        job: Option<JobId>,
        elapsed_ms: u64,
    },
    /// `error` names the file at fault; the previous model is loaded again when it can be.
    Failed {
        name: String,
        error: String,
        job: Option<JobId>,
    },
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
    /// Image file names (`<id>-<n>.png`): written to the outputs folder, or — for a worker with
    /// no outputs folder (a remote worker) — carried in `encoded`.
    pub images: Vec<String>,
    /// The PNG files themselves when they were not written here (same order as `images`).
    pub encoded: Vec<Vec<u8>>,
    /// Each image's own seed, in the same order.
    pub image_seeds: Vec<u64>,
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
    /// A remote worker took the job (or took it over from one that died).
    Started {
        id: JobId,
        worker: String,
    },
    /// The remote worker running the job stopped without finishing it: it waits again.
    Requeued {
        id: JobId,
    },
    /// The live preview after `step`: a `data:image/png` URL, at most 256 px on the long side.
    Preview {
        id: JobId,
        step: usize,
        image: String,
    },
    Finished {
        id: JobId,
        outcome: Result<Box<RunOutput>, RunError>,
    },
    Model(ModelEvent),
}

/// What the loaded engine can do; the server builds its limits and `/api/info` from it.
#[derive(Clone)]
pub struct Loaded {
    pub model: String,
    pub profile: Profile,
    /// `engine.max_batch()` at load time, clamped to 1..=the profile's `max_batch`.
    pub max_batch: u32,
    /// `cpu`, `cuda:0`, `metal`.
    pub device: String,
    pub probe: Arc<dyn MemoryProbe>,
    pub meta: ModelMeta,
    /// The layers a LoRA may update (the server checks named LoRA files against them).
    pub lora_layers: Arc<crate::families::lora::LinearLayers>,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("model", &self.model)
            .field("family", &self.profile.family)
            .field("max_batch", &self.max_batch)
            .field("device", &self.device)
            .finish()
    }
}

impl Loaded {
    fn of(engine: &Engine, meta: ModelMeta) -> Self {
        Loaded {
            model: engine.model_name().to_string(),
            profile: *engine.profile(),
            max_batch: engine.max_batch().clamp(1, engine.profile().max_batch),
            device: crate::settings::device_label(engine.device()),
            probe: engine.probe().clone(),
            meta,
            lora_layers: Arc::new(engine.lora_layers().clone()),
        }
    }
}

pub struct WorkerConfig {
    /// Where the images are written; `None` keeps them in memory ([`RunOutput::encoded`]).
    pub outputs: Option<PathBuf>,
    pub tags: Arc<Tags>,
    /// See [`STEP_DELAY_ENV`].
    pub step_delay: Option<Duration>,
    /// Render a live preview after every denoising step ([`WorkerEvent::Preview`]).
    pub preview: bool,
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

/// The running worker thread: send it work.
pub struct Worker {
    pub jobs: std_mpsc::Sender<Work>,
    pub thread: std::thread::JoinHandle<()>,
}

/// Starts the worker thread, which loads `model` with `loader` (load + warm-up happen there),
/// and waits until it reports the model loaded — or returns the load error.
pub fn spawn(
    loader: Loader,
    model: String,
    config: WorkerConfig,
    events: UnboundedSender<WorkerEvent>,
) -> Result<(Worker, Loaded), WorkerError> {
    let (ready_tx, ready_rx) = std_mpsc::channel::<Result<Loaded, String>>();
    let (jobs_tx, jobs_rx) = std_mpsc::channel::<Work>();
    let thread = std::thread::Builder::new()
        .name("zturbo-worker".into())
        .spawn(move || {
            let (engine, meta) = match load(&loader, &model) {
                Ok(ok) => ok,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let engine = engine.with_tags(config.tags.clone());
            let loaded = Loaded::of(&engine, meta.clone());
            if ready_tx.send(Ok(loaded)).is_err() {
                return;
            }
            let worker = WorkerThread {
                engine: Some((engine, meta)),
                loader,
                config,
                events,
            };
            worker.run(jobs_rx);
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

/// `loader(name)`, with a panic turned into an error.
fn load(loader: &Loader, name: &str) -> Result<(Engine, ModelMeta), String> {
    match catch_unwind(AssertUnwindSafe(|| loader(name))) {
        Ok(r) => r,
        Err(p) => Err(format!("loading the model panicked: {}", panic_text(&*p))),
    }
}

/// The worker thread's state: the loaded engine (none after a failed switch whose fallback
/// failed too) and how to load another.
struct WorkerThread {
    engine: Option<(Engine, ModelMeta)>,
    loader: Loader,
    config: WorkerConfig,
    events: UnboundedSender<WorkerEvent>,
}

impl WorkerThread {
    fn loaded_name(&self) -> Option<&str> {
        self.engine.as_ref().map(|(e, _)| e.model_name())
    }

    /// Makes `name` the loaded model: unloads the current one first (two models rarely fit),
    /// reports the switch, and on failure loads the previous model again. `Err` names the file.
    fn ensure_model(&mut self, name: &str, job: Option<&JobId>) -> Result<(), String> {
        if self.loaded_name() == Some(name) {
            return Ok(());
        }
        let previous = self.loaded_name().map(str::to_string);
        let send = |ev: ModelEvent| {
            let _ = self.events.send(WorkerEvent::Model(ev));
        };
        send(ModelEvent::Loading {
            name: name.to_string(),
            job: job.cloned(),
        });
        tracing::info!(from = ?previous, to = name, "switching models");
        if let Some((old, _)) = self.engine.take() {
            let device = old.device().clone();
            drop(old);
            crate::engine::release_memory(&device);
        }
        let t = Instant::now();
        match load(&self.loader, name) {
            Ok((engine, meta)) => {
                let engine = engine.with_tags(self.config.tags.clone());
                let loaded = Loaded::of(&engine, meta.clone());
                self.engine = Some((engine, meta));
                let elapsed_ms = t.elapsed().as_millis() as u64;
                tracing::info!(model = name, elapsed_ms, "model loaded");
                send(ModelEvent::Loaded {
                    loaded: Box::new(loaded),
                    job: job.cloned(),
                    elapsed_ms,
                });
                Ok(())
            }
            Err(error) => {
                tracing::warn!(model = name, "the model did not load: {error}");
                send(ModelEvent::Failed {
                    name: name.to_string(),
                    error: error.clone(),
                    job: job.cloned(),
                });
                // Back to the model that worked, so the server keeps serving.
                if let Some(prev) = previous {
                    let t = Instant::now();
                    match load(&self.loader, &prev) {
                        Ok((engine, meta)) => {
                            let engine = engine.with_tags(self.config.tags.clone());
                            let loaded = Loaded::of(&engine, meta.clone());
                            self.engine = Some((engine, meta));
                            send(ModelEvent::Loaded {
                                loaded: Box::new(loaded),
                                job: None,
                                elapsed_ms: t.elapsed().as_millis() as u64,
                            });
                        }
                        Err(e) => {
                            tracing::error!(model = %prev, "the previous model did not load again either: {e}");
                            send(ModelEvent::Failed {
                                name: prev,
                                error: e,
                                job: None,
                            });
                        }
                    }
                }
                Err(format!("could not load the model `{name}`: {error}"))
            }
        }
    }

    /// The work loop; ends when the queue drops its sender.
    fn run(mut self, jobs: std_mpsc::Receiver<Work>) {
        let previews = if self.config.preview {
            match preview_thread(self.events.clone()) {
                Ok(tx) => Some(tx),
                Err(e) => {
                    tracing::warn!("live previews off: their thread did not start: {e}");
                    None
                }
            }
        } else {
            None
        };
        while let Ok(work) = jobs.recv() {
            let item = match work {
                Work::Load(name) => {
                    let _ = self.ensure_model(&name, None);
                    continue;
                }
                Work::Job(item) => item,
            };
            if let Err(e) = self.ensure_model(&item.model, Some(&item.id)) {
                let finished = WorkerEvent::Finished {
                    id: item.id.clone(),
                    outcome: Err(RunError::Failed(crate::queue::JobError::new(
                        crate::queue::FailureKind::Model,
                        e,
                    ))),
                };
                if self.events.send(finished).is_err() {
                    break;
                }
                continue;
            }
            let Some((engine, _)) = self.engine.as_mut() else {
                continue;
            };
            if !run_job(engine, &self.config, previews.as_ref(), &self.events, item) {
                break;
            }
        }
    }
}

/// Runs one job on `engine` and reports it; `false` when the queue is gone.
fn run_job(
    engine: &mut Engine,
    config: &WorkerConfig,
    previews: Option<&std_mpsc::SyncSender<PreviewWork>>,
    events: &UnboundedSender<WorkerEvent>,
    item: WorkItem,
) -> bool {
    {
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
            events,
            cancel: &item.cancel,
            step_delay: config.step_delay,
            preview: previews.map(|tx| (tx, engine.profile().preview)),
            preview_failed: false,
        };
        let request = with_inputs(config.outputs.as_deref(), &item.request);
        let result = catch_unwind(AssertUnwindSafe(|| {
            engine.generate(
                &request?,
                &RunExtras::default(),
                &mut observer,
                &item.cancel,
            )
        }));
        let outcome = match result {
            Ok(Ok(gen)) => {
                store_images(config.outputs.as_deref(), &item.id, &gen).map(|(images, encoded)| {
                    let image_seeds = gen.images.iter().map(|i| i.seed).collect();
                    Box::new(RunOutput {
                        params: gen.params,
                        enhancement: gen.enhancement,
                        notices: gen.notices,
                        timings: gen.timings,
                        peak_memory_bytes: gen.peak_memory_bytes,
                        plan: gen.plan,
                        images,
                        encoded,
                        image_seeds,
                    })
                })
            }
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
        events.send(finished).is_ok()
    }
}

/// One step's denoised estimate on its way to the preview thread.
struct PreviewWork {
    id: JobId,
    step: usize,
    dims: [usize; 3],
    data: Vec<f32>,
    projection: LatentPreview,
}

/// Projects and encodes previews off the engine thread: a step only pays for x̂₀ and its copy to
/// the host. One preview waits at most; a step that finds the thread busy skips its preview.
fn preview_thread(
    events: UnboundedSender<WorkerEvent>,
) -> std::io::Result<std_mpsc::SyncSender<PreviewWork>> {
    let (tx, rx) = std_mpsc::sync_channel::<PreviewWork>(1);
    std::thread::Builder::new()
        .name("zturbo-preview".into())
        .spawn(move || {
            while let Ok(w) = rx.recv() {
                match preview::project_raw(&w.data, w.dims, &w.projection)
                    .and_then(|img| img.data_url())
                {
                    Ok(image) => {
                        let ev = WorkerEvent::Preview {
                            id: w.id,
                            step: w.step,
                            image,
                        };
                        if events.send(ev).is_err() {
                            break;
                        }
                    }
                    Err(e) => tracing::warn!(job_id = %w.id, "no preview for step {}: {e}", w.step),
                }
            }
        })?;
    Ok(tx)
}

struct JobObserver<'a> {
    id: &'a JobId,
    events: &'a UnboundedSender<WorkerEvent>,
    cancel: &'a CancelToken,
    step_delay: Option<Duration>,
    /// The preview thread and the family's latent → RGB projection, when previews are on.
    preview: Option<(&'a std_mpsc::SyncSender<PreviewWork>, LatentPreview)>,
    /// A preview failed once in this job: say so once, then stop trying.
    preview_failed: bool,
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

    fn wants_preview(&self) -> bool {
        self.preview.is_some() && !self.preview_failed
    }

    fn preview(&mut self, step: usize, _total: usize, x0: &candle_core::Tensor) {
        let Some((tx, projection)) = self.preview else {
            return;
        };
        let work = match preview::to_host(x0) {
            Ok((dims, data)) => PreviewWork {
                id: self.id.clone(),
                step,
                dims,
                data,
                projection,
            },
            Err(e) => {
                tracing::warn!("live preview off for this job: {e}");
                self.preview_failed = true;
                return;
            }
        };
        match tx.try_send(work) {
            Ok(()) => {}
            Err(std_mpsc::TrySendError::Full(_)) => {
                tracing::debug!(step, "preview thread busy: this step's preview skipped")
            }
            Err(std_mpsc::TrySendError::Disconnected(_)) => self.preview_failed = true,
        }
    }
}

/// The request with its input image and mask read back from the store (a journaled job carries
/// only their hashes).
fn with_inputs(
    outputs: Option<&std::path::Path>,
    req: &ValidRequest,
) -> Result<ValidRequest, EngineError> {
    let mut req = req.clone();
    if let Some(c) = req.control.as_mut() {
        match outputs {
            Some(outputs) => InputStore::new(outputs)
                .load(&mut c.image, false)
                .map_err(|e| EngineError::Invalid(format!("control.image: {e}")))?,
            None if c.image.is_loaded() => {}
            None => {
                return Err(EngineError::Invalid(
                    "control.image: this worker has no outputs folder to read the job's control \
                     image from; ControlNet jobs are not yet carried through --broker"
                        .into(),
                ))
            }
        }
    }
    if let Some(init) = req.init.as_mut() {
        // A remote worker (`zturbo worker`) has no outputs folder, so no input store: the front
        // door keeps the inputs, and an image-to-image job cannot be read back here yet.
        let Some(outputs) = outputs else {
            let region_loaded = init
                .region
                .as_ref()
                .is_none_or(|r| r.image.is_loaded() && r.mask.is_loaded());
            if init.image.is_loaded()
                && init.mask.as_ref().is_none_or(|m| m.is_loaded())
                && region_loaded
            {
                return Ok(req);
            }
            return Err(EngineError::Invalid(
                "image: this worker has no outputs folder to read the job's input image from; \
                 image-to-image and inpainting jobs are not yet carried through --broker"
                    .into(),
            ));
        };
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

/// The run's images as `(names, PNG bytes)`: written to `outputs` (the bytes are then dropped),
/// or kept in memory when there is no outputs folder.
fn store_images(
    outputs: Option<&std::path::Path>,
    id: &str,
    gen: &Generation,
) -> Result<(Vec<String>, Vec<Vec<u8>>), RunError> {
    let Some(outputs) = outputs else {
        let files = encode_images(id, gen).map_err(|e| {
            RunError::Failed(JobError::new(
                FailureKind::Internal,
                format!("could not encode the images: {e}"),
            ))
        })?;
        return Ok(files.into_iter().unzip());
    };
    write_images(outputs, id, gen)
        .map(|names| (names, Vec::new()))
        .map_err(|e| {
            RunError::Failed(JobError::new(
                super::outputs::StorageProblem::of(&e).into(),
                format!("could not write the images to {}: {e}", outputs.display()),
            ))
        })
}

/// `<id>-<n>.png` for each image, with the A1111 `parameters` chunk and the `zturbo` record
/// (the same chunks `zturbo generate` writes).
pub fn encode_images(id: &str, gen: &Generation) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::with_capacity(gen.images.len());
    for (i, img) in gen.images.iter().enumerate() {
        let text = a1111_parameters(&gen.params, img.seed, &gen.notices);
        let rec = record_text(Some(id), gen, img.seed);
        let png = encode_png(img, &[("parameters", &text), ("zturbo", &rec)])
            .map_err(std::io::Error::other)?;
        files.push((image_name(id, i + 1), png));
    }
    Ok(files)
}

/// Writes the images ([`encode_images`]) to `outputs`, all or nothing ([`write_all`]).
pub fn write_images(
    outputs: &std::path::Path,
    id: &str,
    gen: &Generation,
) -> std::io::Result<Vec<String>> {
    let files = encode_images(id, gen)?;
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
