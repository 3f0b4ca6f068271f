//! `server::run`: the wiring of a serving process. Refuses an unsafe configuration before anything
//! loads, locks the outputs folder, loads the model on the worker thread (nothing is served until
//! it reports back) — or, with `--broker`, becomes the front door of remote workers (no model here;
//! it waits until a worker has registered the model) — restores the journaled jobs, binds, prints the one stdout line
//! (`listening on http://HOST:PORT`) and serves under our own connection limits until Ctrl-C or
//! SIGTERM, then lets the running job stop and the journal settle.

use std::sync::Arc;
use std::time::Duration;

use super::security::{check_api_key, is_loopback_host, parse_cors_origin, Security};
use super::{app, listen, AppState, ServerInfo};
use crate::engine::load;
use crate::families::catalog;
use crate::memory::monitor::{Monitor, Tags};
use crate::memory::probe::{CpuProbe, MemoryProbe};
use crate::queue::broker::{front, Broker, BrokerError};
use crate::queue::{self, journal::Journal, outputs, worker, QueueConfig};
use crate::settings::ServeSettings;

/// How long a shutdown waits for the running job to stop at its next step.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Why the server did not start, or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The settings are refused as given (the message names the option).
    #[error("{0}")]
    Settings(String),
    #[error(transparent)]
    Load(#[from] load::LoadError),
    #[error("the model did not load: {0}")]
    Worker(#[from] worker::WorkerError),
    /// Another server holds the outputs folder, or it cannot be locked.
    #[error(transparent)]
    Outputs(#[from] outputs::LockError),
    /// The `--broker` URL, its CA file, or the broker itself.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let what = what.into();
    move |source| ServeError::Io { what, source }
}

/// What serves the jobs: the model loaded here, or remote workers behind a broker.
enum Backing {
    /// The model to load here, by name.
    Local(String),
    Front(Box<Broker>),
}

/// Serves until Ctrl-C or SIGTERM.
pub fn run(settings: ServeSettings) -> Result<(), ServeError> {
    // Checked before anything loads: a refused configuration fails at once.
    let api_key = settings
        .api_key
        .as_deref()
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_string);
    if let Some(k) = &api_key {
        check_api_key(k).map_err(|e| ServeError::Settings(format!("--api-key: {e}")))?;
    }
    let loopback = is_loopback_host(&settings.host);
    if !loopback && api_key.is_none() && !settings.insecure_no_auth {
        return Err(ServeError::Settings(format!(
            "refusing to listen on {} without an API key: anyone who can reach it could use this \
             server. Pass --api-key KEY (or set ZTURBO_API_KEY), or --insecure-no-auth if the \
             network is trusted; --host 127.0.0.1 keeps it local",
            settings.host
        )));
    }
    if !loopback && api_key.is_none() {
        tracing::warn!(host = %settings.host, "--insecure-no-auth: the API is open to anyone who can reach this address");
    }
    let cors_origin = match &settings.cors_origin {
        Some(o) => Some(
            parse_cors_origin(o)
                .map_err(|e| ServeError::Settings(format!("--cors-origin: {e}")))?,
        ),
        None => None,
    };

    // With a broker this process is a front door: it loads no model. Resolved here so a missing
    // model fails before anything starts.
    let backing = match &settings.broker {
        None => Backing::Local(load::resolve(&settings.model, true)?.name),
        Some(b) => Backing::Front(Box::new(Broker::open(b)?)),
    };
    std::fs::create_dir_all(&settings.outputs).map_err(io(format!(
        "creating the outputs folder {}",
        settings.outputs.display()
    )))?;
    // One server per outputs folder (two would both resume the same jobs); held until exit. A
    // front door holds it too: it owns the journal and writes the images.
    let _outputs_lock = outputs::lock(&settings.outputs)?;
    outputs::clean_stale_temps(&settings.outputs);
    let recovered = Journal::new(&settings.outputs).load();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(io("starting the async runtime"))?;

    let tags = Arc::new(Tags::default());
    let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
    let (backend, mut info, monitor) = match backing {
        Backing::Local(initial) => {
            // The engine loads on its own thread; nothing is served until it reports back. The
            // worker loads models by name: the one asked for now, and later those a switch names
            // (the names `/api/models` lists: local folders, cached catalog models, the demo).
            let model_settings = settings.model.clone();
            let first = initial.clone();
            let loader: worker::Loader = Arc::new(move |name: &str| -> Result<_, String> {
                let resolved = if name == first {
                    load::resolve(&model_settings, true).map_err(|e| e.to_string())?
                } else {
                    catalog::resolve(name, &model_settings.models_dir).map_err(|e| e.to_string())?
                };
                // The weights the engine settles on (the planner may pick a pulled variant).
                let (mut engine, resolved) =
                    load::open_chosen(&model_settings, resolved).map_err(|e| e.to_string())?;
                let meta = model_meta(&resolved);
                engine
                    .warm_up()
                    .map_err(|e| format!("loading the model's weights failed: {e}"))?;
                Ok((engine, meta))
            });
            let worker_config = worker::WorkerConfig {
                outputs: Some(settings.outputs.clone()),
                tags: tags.clone(),
                step_delay: worker::WorkerConfig::step_delay_from_env(),
                preview: settings.preview,
            };
            let (worker, loaded) = worker::spawn(loader, initial, worker_config, events_tx)?;
            tracing::info!(
                model = %loaded.model,
                device = %loaded.device,
                max_batch = loaded.max_batch,
                "model loaded"
            );
            let monitor = Arc::new(Monitor::start(loaded.probe.clone(), tags));
            let mut info = ServerInfo::new(
                &loaded,
                settings.queue_size,
                settings.model.models_dir.clone(),
                settings.outputs.clone(),
            );
            info.comfyui_dir = settings.model.comfyui_dir.clone();
            info.preview = settings.preview;
            (queue::Backend::Local(worker.jobs), info, monitor)
        }
        Backing::Front(broker) => {
            let record = runtime.block_on(front::wait_for_model(
                &broker,
                settings.model.model.as_deref(),
            ))?;
            tracing::info!(
                model = %record.model,
                broker = %broker.shown(),
                "front door: jobs run on the workers of the broker"
            );
            let info = ServerInfo::remote(
                &record,
                settings.queue_size,
                settings.model.models_dir.clone(),
                settings.outputs.clone(),
            );
            // The front door's own memory (its chart when no worker is chosen).
            let probe: Arc<dyn MemoryProbe> = Arc::new(CpuProbe::new());
            let monitor = Arc::new(Monitor::start(probe, tags));
            let front = {
                let _rt = runtime.enter();
                front::start(
                    *broker,
                    record.model.clone(),
                    settings.outputs.clone(),
                    &recovered,
                    events_tx,
                )
            };
            if let Err(e) = runtime.block_on(front.refresh()) {
                tracing::warn!("{e}");
            }
            (queue::Backend::Broker(front), info, monitor)
        }
    };
    info.sync_timeout = settings.sync_timeout;
    let cluster = match &backend {
        queue::Backend::Broker(f) => Some(f.clone()),
        queue::Backend::Local(_) => None,
    };
    let model = info.model.clone();

    runtime.block_on(async move {
        let queue = queue::start_with(
            QueueConfig {
                capacity: settings.queue_size,
                outputs: settings.outputs.clone(),
                model: model.clone(),
            },
            backend,
            events_rx,
            recovered,
        );
        let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
        let (host, port) = (settings.host.as_str(), settings.port);
        let listener = tokio::net::TcpListener::bind((host, port))
            .await
            .map_err(io(format!("cannot listen on {host}:{port}")))?;
        let addr = listener
            .local_addr()
            .map_err(io("reading the bound address"))?;
        let state = AppState {
            queue: queue.clone(),
            monitor,
            info: super::SharedInfo::new(info),
            shutdown: shutdown_rx,
            security: Arc::new(Security {
                api_key,
                // What was bound, not what was asked: `localhost` may resolve to either family.
                loopback: addr.ip().is_loopback(),
                port: addr.port(),
                cors_origin,
                key_attempts: Default::default(),
            }),
            downloads: Default::default(),
            cluster,
        };
        state.follow_model_switches().await;
        // The one line on stdout: scripts and tests read the bound address from it.
        println!("listening on http://{addr}");
        let _ = std::io::Write::flush(&mut std::io::stdout());
        tracing::info!("serving {model} on http://{addr}");
        let limits = listen::ConnLimits {
            header_timeout: settings.header_timeout,
            idle_timeout: settings.idle_timeout,
            max_connections: settings.max_connections,
        }
        .fit_to_fd_limit();
        listen::serve(listener, app(state), limits, async move {
            shutdown_signal().await;
            tracing::info!("shutting down: finishing writes; queued jobs stay journaled");
            let _ = shutdown_tx.send(true);
        })
        .await
        .map_err(io("serving"))?;
        if tokio::time::timeout(SHUTDOWN_GRACE, queue.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("the running job did not stop within 30 s; exiting anyway");
        }
        Ok(())
    })
}

/// What the server says about a model besides what its engine knows: the Models panel's
/// sentence for the loaded weights, its folder and component files.
fn model_meta(resolved: &catalog::Resolved) -> worker::ModelMeta {
    worker::ModelMeta {
        demo: resolved.demo,
        description: describe(resolved),
        path: resolved.dir.path().map(|p| p.display().to_string()),
        files: resolved.files.clone(),
    }
}

/// The Models panel's sentence for the loaded weights (also what a remote worker registers).
pub fn describe(resolved: &catalog::Resolved) -> String {
    if resolved.demo {
        return "Tiny random-weight Z-Image built into the binary: every stage runs, images are noise."
            .to_string();
    }
    let base_name = resolved.name.split(" (").next().unwrap_or(&resolved.name);
    let base = catalog::entry(base_name)
        .map(|e| e.description.to_string())
        .unwrap_or_else(|| format!("Local diffusers model ({})", resolved.dir.describe()));
    let files: Vec<String> = [
        ("transformer", &resolved.files.transformer),
        ("text encoder", &resolved.files.text_encoder),
        ("VAE", &resolved.files.vae),
    ]
    .iter()
    .filter_map(|(what, f)| f.as_ref().map(|p| format!("{what} {}", p.display())))
    .collect();
    let variant = resolved
        .variant
        .as_ref()
        .map(|v| format!(" Variant {v}."))
        .unwrap_or_default();
    if files.is_empty() {
        format!("{base}{variant}")
    } else {
        format!("{base}{variant} With {}.", files.join(", "))
    }
}

/// Ctrl-C, or SIGTERM on Unix.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
