//! The `zturbo` command: `serve` the web UI, `generate` one image from the terminal, `pull` a
//! model from the Hugging Face hub, list `models`.

mod soak;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use zturbo::engine::guard::FaultPlan;
use zturbo::engine::output::{self, a1111_parameters, encode_png, write_atomic};
use zturbo::engine::{
    CancelToken, Engine, EngineConfig, Notice, Observer, Phase, RunExtras, StepEvent,
};
use zturbo::families::{self, catalog, Precision, PrecisionPolicy};
use zturbo::memory::planner::{parse_bytes, MemoryMode};
use zturbo::memory::probe::MemoryProbe;
use zturbo::request::{GenerationRequest, Limits};
use zturbo::settings::{device_label, DeviceSpec};

#[derive(Parser)]
#[command(
    name = "zturbo",
    version,
    about = "Local image generation with Turbo diffusion models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Load-time options shared by `serve` and `generate`.
#[derive(clap::Args, Clone)]
struct ModelArgs {
    /// Model: a diffusers folder, a name in --models-dir, a catalog name (z-image-turbo, sd-turbo,
    /// sdxl-turbo) found in the Hugging Face cache, or `demo`. `serve` defaults to z-image-turbo
    /// when it is found locally, else to the built-in demo (random weights: images are noise).
    #[arg(long, env = "ZTURBO_MODEL")]
    model: Option<String>,
    /// Folder of local model folders.
    #[arg(long, env = "ZTURBO_MODELS_DIR", default_value = "models")]
    models_dir: PathBuf,
    /// auto, cpu, cuda, cuda:N, metal.
    #[arg(long, env = "ZTURBO_DEVICE", default_value = "auto")]
    device: DeviceSpec,
    /// auto (f32 on CPU, mixed on CUDA), f32, bf16, f16, mixed.
    #[arg(long, env = "ZTURBO_PRECISION", default_value = "auto")]
    precision: Precision,
    /// Cap on the memory the planner may use, e.g. 8GiB.
    #[arg(long, env = "ZTURBO_MEMORY_BUDGET", value_parser = parse_budget)]
    memory_budget: Option<u64>,
    /// The transformer (DiT) from a single file: a diffusers or ComfyUI safetensors (bf16, fp8)
    /// or a GGUF (Q8_0 … Q2_K). A bare file name is also looked for in --models-dir and the
    /// ComfyUI folders. Configs and tokenizer still come from --model (default z-image-turbo).
    #[arg(long, env = "ZTURBO_TRANSFORMER")]
    transformer: Option<PathBuf>,
    /// The Qwen3 text encoder from a single file (transformers safetensors such as ComfyUI's
    /// qwen_3_4b.safetensors, fp8, or a llama.cpp GGUF).
    #[arg(long, env = "ZTURBO_TEXT_ENCODER")]
    text_encoder: Option<PathBuf>,
    /// The VAE from a single file (diffusers names, or the ldm/Flux names of ae.safetensors).
    #[arg(long, env = "ZTURBO_VAE")]
    vae: Option<PathBuf>,
    /// A ComfyUI folder (or its models/ folder): its diffusion_models, text_encoders, clip and
    /// vae files are listed in the Models panel and found by name.
    #[arg(long, env = "ZTURBO_COMFYUI_DIR")]
    comfyui_dir: Option<PathBuf>,
    /// Which weights of a catalog model to load: `bf16` (the release) or a variant pulled with
    /// `zturbo pull NAME --variant V`. Without it the planner chooses among those on disk for
    /// the default job, preferring quantized weights kept on the GPU to bf16 weights streamed.
    #[arg(long, env = "ZTURBO_VARIANT")]
    variant: Option<String>,
}

fn parse_budget(s: &str) -> Result<u64, String> {
    parse_bytes(s).map_err(|e| e.to_string())
}

// Parsed once per process: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Serve the web UI and its API (http://127.0.0.1:7860 by default).
    Serve(Box<ServeArgs>),
    /// Generate images from the terminal.
    Generate(Box<GenerateArgs>),
    /// Download a model into the Hugging Face cache (resumes interrupted downloads).
    Pull {
        /// Catalog name (z-image-turbo, sd-turbo, sdxl-turbo) or hub repository `owner/name`.
        name: String,
        /// Only the configs, scheduler and tokenizer (a few MB): enough to run single weight
        /// files given with --transformer, --text-encoder and --vae.
        #[arg(long, conflicts_with = "variant")]
        configs_only: bool,
        /// A quantized variant instead of the bf16 release (z-image-turbo: q8_0, q6_k, q5_k_m,
        /// q4_k_m, q3_k_m): the transformer and text encoder as GGUF from the repositories
        /// README names, configs, tokenizer and VAE from the model's own repository.
        #[arg(long)]
        variant: Option<String>,
    },
    /// Runs many random jobs through a real server with injected faults and audits the results.
    Soak(soak::SoakArgs),
    /// Write a component's weights as GGUF: ComfyUI names for the transformer (what
    /// ComfyUI-GGUF and stable-diffusion.cpp load), llama.cpp `qwen3` names for the text encoder.
    Quantize(QuantizeArgs),
    /// List known and local models.
    Models {
        #[arg(long, env = "ZTURBO_MODELS_DIR", default_value = "models")]
        models_dir: PathBuf,
        /// Also list the weight files of this ComfyUI folder (or its models/ folder).
        #[arg(long, env = "ZTURBO_COMFYUI_DIR")]
        comfyui_dir: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on. Any address but loopback needs --api-key (or --insecure-no-auth).
    #[arg(long, env = "ZTURBO_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Require this key on every /api, /v1, /sdapi and /images call (`Authorization: Bearer KEY`;
    /// the browser UI asks for it once and keeps a cookie).
    #[arg(long, env = "ZTURBO_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Allow listening on a non-loopback address without an API key (anyone who can reach the
    /// port can use the server).
    #[arg(long, env = "ZTURBO_INSECURE_NO_AUTH")]
    insecure_no_auth: bool,
    /// Let web pages from this one origin (e.g. https://app.example.com) call the API (CORS).
    #[arg(long, env = "ZTURBO_CORS_ORIGIN")]
    cors_origin: Option<String>,
    /// Port to listen on; 0 picks a free one. The bound address is printed on stdout as
    /// `listening on http://HOST:PORT` once the model has loaded.
    #[arg(long, env = "ZTURBO_PORT", default_value_t = 7860)]
    port: u16,
    /// Folder for the images (`<job>-<n>.png`), their JSON sidecars (`<job>.json`) and the job
    /// journal (`.jobs/`) that lets accepted jobs survive a restart.
    #[arg(long, env = "ZTURBO_OUTPUTS", default_value = "outputs")]
    outputs: PathBuf,
    /// Jobs that may wait behind the running one; beyond that a submission gets 429 with
    /// Retry-After.
    #[arg(long, env = "ZTURBO_QUEUE_SIZE", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    queue_size: u32,
}

#[derive(clap::Args)]
struct QuantizeArgs {
    /// The model whose component to quantize: a diffusers folder, a name in --models-dir, a
    /// catalog name found in the Hugging Face cache.
    #[arg(long)]
    model: String,
    #[arg(long, env = "ZTURBO_MODELS_DIR", default_value = "models")]
    models_dir: PathBuf,
    /// transformer or text-encoder.
    #[arg(long)]
    component: QuantComponent,
    /// q8_0, q6_k, q5_k, q4_k or q4_0 (GGUF), or fp8 (ComfyUI's scaled float8_e4m3fn
    /// safetensors).
    #[arg(long, value_parser = parse_quant_to)]
    to: QuantTo,
    /// The file to write (under a `.part` name, renamed when complete).
    #[arg(long, short)]
    output: PathBuf,
    /// Quantize this file instead of the model folder's transformer (e.g. a bf16 ComfyUI file).
    #[arg(long)]
    transformer: Option<PathBuf>,
    /// Quantize this file instead of the model folder's text encoder.
    #[arg(long)]
    text_encoder: Option<PathBuf>,
}

#[derive(Clone, Copy)]
enum QuantTo {
    Gguf(families::weights::quantize::Target),
    Fp8,
}

fn parse_quant_to(s: &str) -> Result<QuantTo, String> {
    match s.to_ascii_lowercase().as_str() {
        "fp8" | "fp8_e4m3fn" | "float8_e4m3fn" => Ok(QuantTo::Fp8),
        other => other
            .parse()
            .map(QuantTo::Gguf)
            .map_err(|e: String| format!("{e}, or fp8")),
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum QuantComponent {
    Transformer,
    TextEncoder,
}

#[derive(clap::Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, required_unless_present = "from_png")]
    prompt: Option<String>,
    #[arg(long)]
    negative_prompt: Option<String>,
    #[arg(long)]
    width: Option<u32>,
    #[arg(long)]
    height: Option<u32>,
    #[arg(long)]
    steps: Option<u32>,
    /// Guidance scale, ComfyUI/A1111 convention: 1.0 = off.
    #[arg(long)]
    cfg: Option<f32>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    batch: Option<u32>,
    /// on: prompt enhancement and the default negative prompt; off: prompts go to the model untouched.
    #[arg(long, value_parser = parse_on_off)]
    enhance: Option<bool>,
    #[arg(long)]
    memory_mode: Option<MemoryMode>,
    /// Output PNG (with several images: name-1.png, name-2.png, …).
    #[arg(long, short)]
    output: PathBuf,
    /// Initial noise: a safetensors file with one tensor `latents` of shape (B, C, H/8, W/8),
    /// used exactly like diffusers' `latents=` argument.
    #[arg(long)]
    init_latents: Option<PathBuf>,
    /// Write the final latents (before the VAE) as tensor `latents` to this safetensors file.
    #[arg(long)]
    save_latents: Option<PathBuf>,
    /// Take prompt, size, steps, CFG and seed from a PNG's parameters (flags still override).
    #[arg(long)]
    from_png: Option<PathBuf>,
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("`{s}`: expected on or off")),
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ZTURBO_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,zturbo=info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Generate(args) => generate(*args),
        Command::Pull {
            name,
            configs_only,
            variant,
        } => pull(&name, configs_only, variant.as_deref()),
        Command::Models {
            models_dir,
            comfyui_dir,
        } => models(&models_dir, comfyui_dir.as_deref()),
        Command::Soak(args) => soak::run(args),
        Command::Quantize(args) => quantize(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Finds the model (without loading anything).
fn resolve_model(args: &ModelArgs, default_to_demo: bool) -> Result<catalog::Resolved> {
    let files = component_files(args)?;
    if let Some(v) = &args.variant {
        if !files.is_empty() {
            bail!("--variant chooses a catalog model's weights; it does not combine with --transformer, --text-encoder or --vae");
        }
        let name = args.model.as_deref().unwrap_or("z-image-turbo");
        return Ok(catalog::resolve_variant(name, v, &args.models_dir)?);
    }
    Ok(match &args.model {
        Some(m) => catalog::resolve_with(m, &args.models_dir, &files)?,
        // Component files alone: the Z-Image-Turbo configs and tokenizer.
        None if !files.is_empty() => {
            catalog::resolve_with("z-image-turbo", &args.models_dir, &files)?
        }
        None if default_to_demo => catalog::default_model(&args.models_dir),
        None => bail!("--model is required (or --transformer FILE)"),
    })
}

/// `--transformer`, `--text-encoder`, `--vae` as files on disk.
fn component_files(args: &ModelArgs) -> Result<families::ComponentFiles> {
    use families::weights::Role;
    let find = |spec: &Option<PathBuf>, role: Role| -> Result<Option<PathBuf>> {
        spec.as_ref()
            .map(|p| {
                catalog::find_component_file(p, role, &args.models_dir, args.comfyui_dir.as_deref())
                    .map_err(|e| anyhow!("{}: {e}", role.flag()))
            })
            .transpose()
    };
    Ok(families::ComponentFiles {
        transformer: find(&args.transformer, Role::Transformer)?,
        text_encoder: find(&args.text_encoder, Role::TextEncoder)?,
        vae: find(&args.vae, Role::Vae)?,
    })
}

/// Opens the device and builds the engine for a resolved model. When the model has pulled
/// variants (and no --variant or component file pins the weights), the planner chooses among
/// them for the model's default job; the choice and its reasons are logged.
fn open_engine(
    args: &ModelArgs,
    resolved: catalog::Resolved,
) -> Result<(Engine, catalog::Resolved)> {
    let device = args.device.open().map_err(|e| anyhow!(e))?;
    let policy = PrecisionPolicy::resolve(args.precision, &device);
    let candidates = if args.variant.is_some() {
        vec![resolved]
    } else {
        catalog::weight_candidates(&resolved, &args.models_dir)
    };
    let resolved = if candidates.len() > 1 {
        choose_weights(args, candidates, &device, policy)?
    } else {
        candidates
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("no weights to load"))?
    };
    let shown = |f: &Option<PathBuf>| {
        f.as_ref().map_or_else(
            || "from the folder".to_string(),
            |p| p.display().to_string(),
        )
    };
    tracing::info!(
        model = %resolved.name,
        source = %resolved.dir.describe(),
        transformer = %shown(&resolved.files.transformer),
        text_encoder = %shown(&resolved.files.text_encoder),
        vae = %shown(&resolved.files.vae),
        device = %device_label(&device),
        precision = %policy.describe(),
        "loading model"
    );
    let family = families::open_with(resolved.dir.clone(), &resolved.files, &device, policy)?;
    let probe: Arc<dyn MemoryProbe> = zturbo::memory::probe::for_device(&device);
    let faults = FaultPlan::from_env().map_err(|e| anyhow!(e))?;
    let config = EngineConfig {
        memory_budget: args.memory_budget,
        faults,
    };
    let engine = Engine::new(family, resolved.name.clone(), probe, config);
    let engine = if resolved.demo {
        engine.with_defaults(catalog::DEMO_DEFAULTS)
    } else {
        engine
    };
    Ok((engine, resolved))
}

/// The planner's pick among ways of holding the same model (headers only: nothing is loaded).
fn choose_weights(
    args: &ModelArgs,
    candidates: Vec<catalog::Resolved>,
    device: &candle_core::Device,
    policy: PrecisionPolicy,
) -> Result<catalog::Resolved> {
    use zturbo::memory::planner::{self, WeightOption};
    let mut options = Vec::with_capacity(candidates.len());
    let mut kept = Vec::with_capacity(candidates.len());
    for c in candidates {
        let family = match families::open_with(c.dir.clone(), &c.files, device, policy) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(weights = %c.name, "skipped: {e}");
                continue;
            }
        };
        let probe: Arc<dyn MemoryProbe> = zturbo::memory::probe::for_device(device);
        let engine = Engine::new(
            family,
            c.name.clone(),
            probe,
            EngineConfig {
                memory_budget: args.memory_budget,
                faults: FaultPlan::default(),
            },
        );
        let d = engine.profile().defaults;
        options.push(WeightOption {
            label: c.variant.clone().unwrap_or_else(|| "bf16".into()),
            quantized: c.variant.is_some(),
            input: engine.plan_input(d.width, d.height, 1, d.cfg > 1.0, MemoryMode::Auto),
        });
        kept.push(c);
    }
    let choice = planner::choose_weights(&options)
        .ok_or_else(|| anyhow!("none of the model's weights could be opened"))?;
    for r in &choice.reasons {
        tracing::info!("{r}");
    }
    Ok(kept.swap_remove(choice.index))
}

/// Opens the device, finds the model, builds the engine.
fn build_engine(args: &ModelArgs, default_to_demo: bool) -> Result<(Engine, bool)> {
    let resolved = resolve_model(args, default_to_demo)?;
    let demo = resolved.demo;
    Ok((open_engine(args, resolved)?.0, demo))
}

/// `zturbo serve`: load the model on the worker thread, then bind and serve until Ctrl-C/SIGTERM.
fn serve(args: ServeArgs) -> Result<()> {
    use zturbo::memory::monitor::{Monitor, Tags};
    use zturbo::queue::{self, journal::Journal, worker, QueueConfig};
    use zturbo::server::security::{check_api_key, is_loopback_host, parse_cors_origin, Security};
    use zturbo::server::{self, AppState, ServerInfo};

    // Checked before anything loads: a refused configuration fails at once.
    let api_key = args
        .api_key
        .as_deref()
        .map(str::trim)
        .filter(|k| !k.is_empty());
    if let Some(k) = api_key {
        check_api_key(k).map_err(|e| anyhow!("--api-key: {e}"))?;
    }
    let loopback = is_loopback_host(&args.host);
    if !loopback && api_key.is_none() && !args.insecure_no_auth {
        bail!(
            "refusing to listen on {} without an API key: anyone who can reach it could use this \
             server. Pass --api-key KEY (or set ZTURBO_API_KEY), or --insecure-no-auth if the \
             network is trusted; --host 127.0.0.1 keeps it local",
            args.host
        );
    }
    if !loopback && api_key.is_none() {
        tracing::warn!(host = %args.host, "--insecure-no-auth: the API is open to anyone who can reach this address");
    }
    let cors_origin = match &args.cors_origin {
        Some(o) => Some(parse_cors_origin(o).map_err(|e| anyhow!("--cors-origin: {e}"))?),
        None => None,
    };

    let resolved = resolve_model(&args.model, true)?;
    std::fs::create_dir_all(&args.outputs)
        .with_context(|| format!("creating the outputs folder {}", args.outputs.display()))?;

    // The engine loads on its own thread; nothing is served until it reports back.
    let tags = Arc::new(Tags::default());
    let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
    let model_args = args.model.clone();
    // The weights the engine settles on (the planner may pick a pulled variant).
    let chosen: Arc<std::sync::Mutex<Option<catalog::Resolved>>> = Default::default();
    let chosen_in = chosen.clone();
    let build = move || -> std::result::Result<Engine, String> {
        let (mut engine, resolved) =
            open_engine(&model_args, resolved).map_err(|e| format!("{e:#}"))?;
        if let Ok(mut c) = chosen_in.lock() {
            *c = Some(resolved);
        }
        engine
            .warm_up()
            .map_err(|e| format!("loading the model's weights failed: {e}"))?;
        Ok(engine)
    };
    let worker_config = worker::WorkerConfig {
        outputs: args.outputs.clone(),
        tags: tags.clone(),
        step_delay: worker::WorkerConfig::step_delay_from_env(),
    };
    let (worker, loaded) = worker::spawn(build, worker_config, events_tx)
        .map_err(|e| anyhow!("the model did not load: {e}"))?;
    tracing::info!(
        model = %loaded.model,
        device = %loaded.device,
        max_batch = loaded.max_batch,
        "model loaded"
    );
    let resolved = chosen
        .lock()
        .ok()
        .and_then(|mut c| c.take())
        .ok_or_else(|| anyhow!("the model loaded without saying which weights"))?;
    let model_path = resolved.dir.path().map(|p| p.display().to_string());
    let component_files = resolved.files.clone();
    let demo = resolved.demo;
    let description = describe(&resolved);
    let monitor = Arc::new(Monitor::start(loaded.probe.clone(), tags));
    let mut info = ServerInfo::new(
        &loaded,
        demo,
        description,
        args.queue_size as usize,
        args.model.models_dir.clone(),
        args.outputs.clone(),
    );
    info.model_path = model_path;
    info.component_files = component_files;
    info.comfyui_dir = args.model.comfyui_dir.clone();
    let api_key = api_key.map(str::to_string);
    let recovered = Journal::new(&args.outputs).load();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let queue = queue::start(
            QueueConfig {
                capacity: args.queue_size as usize,
                outputs: args.outputs.clone(),
                model: loaded.model.clone(),
            },
            worker.jobs,
            events_rx,
            recovered,
        );
        let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
        let addr = listener.local_addr()?;
        let state = AppState {
            queue: queue.clone(),
            monitor,
            info: Arc::new(info),
            shutdown: shutdown_rx,
            security: Arc::new(Security {
                api_key,
                // What was bound, not what was asked: `localhost` may resolve to either family.
                loopback: addr.ip().is_loopback(),
                port: addr.port(),
                cors_origin,
            }),
            downloads: Default::default(),
        };
        // The one line on stdout: scripts and tests read the bound address from it.
        println!("listening on http://{addr}");
        let _ = std::io::Write::flush(&mut std::io::stdout());
        tracing::info!("serving {} on http://{addr}", loaded.model);
        axum::serve(listener, server::app(state))
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                tracing::info!("shutting down: finishing writes; queued jobs stay journaled");
                let _ = shutdown_tx.send(true);
            })
            .await
            .context("serving")?;
        if tokio::time::timeout(std::time::Duration::from_secs(30), queue.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("the running job did not stop within 30 s; exiting anyway");
        }
        Ok::<(), anyhow::Error>(())
    })
}

/// The Models panel's sentence for the loaded weights.
fn describe(resolved: &catalog::Resolved) -> String {
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
async fn shutdown_signal() {
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

/// Terminal progress: a bar over steps when stderr is a terminal, notices as `notice:` lines.
struct CliObserver {
    bar: Option<ProgressBar>,
}

impl Observer for CliObserver {
    fn phase(&mut self, phase: Phase) {
        if let Some(b) = &self.bar {
            b.set_message(phase.as_str());
        }
    }
    fn step(&mut self, e: &StepEvent) {
        if let Some(b) = &self.bar {
            b.set_length(e.total as u64);
            b.set_position(e.step as u64);
        }
    }
    fn notice(&mut self, n: &Notice) {
        let line = format!("notice: {}", notice_line(n));
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }
}

/// `cfg_adjusted 3.2 -> 2.4 at step 3`, or the kind and message.
fn notice_line(n: &Notice) -> String {
    let num = |v: f32| format!("{}", (v * 100.0).round() / 100.0);
    match (n.from, n.to) {
        (Some(a), Some(b)) => {
            let at = n.step.map(|s| format!(" at step {s}")).unwrap_or_default();
            format!("{} {} -> {}{at}", n.kind, num(a), num(b))
        }
        _ => format!("{} {}", n.kind, n.message),
    }
}

fn generate(args: GenerateArgs) -> Result<()> {
    let from_png = match &args.from_png {
        Some(p) => {
            let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            let chunks = output::png_text_chunks(&bytes)
                .with_context(|| format!("{}: not a readable PNG", p.display()))?;
            let text = chunks
                .into_iter()
                .find(|(k, _)| k == "parameters")
                .map(|(_, v)| v)
                .ok_or_else(|| anyhow!("{}: no `parameters` text chunk", p.display()))?;
            Some(output::parse_parameters(&text))
        }
        None => None,
    };
    let (mut engine, _) = build_engine(&args.model, false)?;
    let limits = Limits::new(engine.profile(), 64, MemoryMode::Auto);
    let fp = from_png.unwrap_or_default();
    let req = GenerationRequest {
        prompt: args.prompt.clone().unwrap_or(fp.prompt),
        negative_prompt: args.negative_prompt.clone().or(fp.negative_prompt),
        width: args.width.or(fp.width),
        height: args.height.or(fp.height),
        steps: args.steps.or(fp.steps),
        cfg: args.cfg.or(fp.cfg),
        seed: args.seed.or(fp.seed),
        batch: args.batch,
        enhance: args.enhance.or(args.from_png.as_ref().map(|_| false)),
        memory_mode: args.memory_mode,
    }
    .validate(&limits)
    .map_err(|e| anyhow!("--{}: {}", e.field.replace('_', "-"), e.message))?;

    let extras = RunExtras {
        init_latents: match &args.init_latents {
            Some(p) => Some(load_latents(p)?),
            None => None,
        },
    };
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = ProgressBar::new(req.steps as u64);
        b.set_style(
            ProgressStyle::with_template("{msg:>7} [{bar:30}] {pos}/{len} steps {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    });
    let mut observer = CliObserver { bar };
    let result = engine.generate(&req, &extras, &mut observer, &CancelToken::new());
    if let Some(b) = &observer.bar {
        b.finish_and_clear();
    }
    let gen = result.map_err(|e| anyhow!("generation failed: {e}"))?;

    if let Some(p) = &args.save_latents {
        let bytes = safetensors_bytes(&gen.latents)?;
        write_atomic(p, &bytes).with_context(|| format!("writing {}", p.display()))?;
    }
    let n = gen.images.len();
    for (i, img) in gen.images.iter().enumerate() {
        let path = if n == 1 {
            args.output.clone()
        } else {
            numbered(&args.output, i + 1)
        };
        let params_text = a1111_parameters(&gen.params, img.seed, &gen.notices);
        let rec = output::record_text(None, &gen, img.seed);
        let png = encode_png(img, &[("parameters", &params_text), ("zturbo", &rec)])?;
        write_atomic(&path, &png).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {} (seed {})", path.display(), img.seed);
    }
    eprintln!(
        "done in {:.2} s (encode {} ms, denoise {} ms, decode {} ms), peak memory {}",
        gen.timings.total_ms as f64 / 1000.0,
        gen.timings.encode_ms,
        gen.timings.denoise_ms,
        gen.timings.decode_ms,
        zturbo::memory::format_bytes(gen.peak_memory_bytes)
    );
    if zturbo::profile::enabled() {
        eprintln!(
            "profile (ZTURBO_PROFILE):\n{}",
            zturbo::profile::take_report()
        );
    }
    Ok(())
}

fn numbered(path: &Path, i: usize) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = path
        .extension()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "png".into());
    path.with_file_name(format!("{stem}-{i}.{ext}"))
}

fn load_latents(p: &Path) -> Result<candle_core::Tensor> {
    let tensors = candle_core::safetensors::load(p, &candle_core::Device::Cpu)
        .with_context(|| format!("{}: not a readable safetensors file", p.display()))?;
    tensors
        .get("latents")
        .cloned()
        .ok_or_else(|| anyhow!("{}: no tensor named `latents`", p.display()))
}

fn safetensors_bytes(t: &candle_core::Tensor) -> Result<Vec<u8>> {
    let t = t.to_device(&candle_core::Device::Cpu)?;
    let map = std::collections::HashMap::from([("latents".to_string(), t)]);
    let dir =
        std::env::temp_dir().join(format!("zturbo-latents-{}.safetensors", std::process::id()));
    candle_core::safetensors::save(&map, &dir)?;
    let bytes = std::fs::read(&dir)?;
    let _ = std::fs::remove_file(&dir);
    Ok(bytes)
}

/// One indicatif bar per file: a spinner until the hub says the size, then a bar.
struct BarProgress {
    bar: Option<ProgressBar>,
}

impl families::weights::DownloadProgress for BarProgress {
    fn file_started(&mut self, name: &str, _size: u64, index: usize, count: usize) {
        let b = ProgressBar::new_spinner();
        b.set_style(
            ProgressStyle::with_template("{msg} {bytes} ({bytes_per_sec})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        b.set_message(format!("[{}/{count}] {name}", index + 1));
        self.bar = Some(b);
    }
    fn file_size(&mut self, total: u64) {
        if let Some(b) = &self.bar {
            b.set_length(total);
            b.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
        }
    }
    fn advanced(&mut self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }
    fn file_finished(&mut self, _name: &str) {
        if let Some(b) = self.bar.take() {
            b.finish();
        }
    }
}

fn pull(name: &str, configs_only: bool, variant: Option<&str>) -> Result<()> {
    let repo = catalog::entry(name)
        .map(|e| e.repo.to_string())
        .unwrap_or_else(|| name.to_string());
    if !repo.contains('/') {
        bail!(
            "`{name}` is neither a known model ({}) nor a hub repository `owner/name`",
            catalog::CATALOG
                .iter()
                .map(|e| e.name)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut progress = BarProgress { bar: None };
    if let Some(v) = variant {
        let v = families::variants::find(name, v)?;
        let pulled = families::variants::pull(&repo, v, &mut progress)?;
        let shown = |f: &Option<PathBuf>| {
            f.as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        };
        eprintln!(
            "{name} {} is ready: configs in {}, transformer {}, text encoder {} \
             (`zturbo serve --model {name}` picks it when it suits the GPU, `--variant {}` forces it)",
            v.name,
            pulled.configs.display(),
            shown(&pulled.files.transformer),
            shown(&pulled.files.text_encoder),
            v.name
        );
        return Ok(());
    }
    let set = if configs_only {
        families::weights::PullSet::ConfigsOnly
    } else {
        families::weights::PullSet::Pipeline
    };
    let dir = families::weights::pull_set(&repo, set, &mut progress)?;
    eprintln!("{repo} is ready in {}", dir.display());
    Ok(())
}

/// `zturbo quantize`: one tensor at a time, with a byte progress bar on a terminal.
fn quantize(args: QuantizeArgs) -> Result<()> {
    use families::weights::{quantize as q, Role, Weights};
    let role = match args.component {
        QuantComponent::Transformer => Role::Transformer,
        QuantComponent::TextEncoder => Role::TextEncoder,
    };
    let files = families::ComponentFiles {
        transformer: args.transformer.clone(),
        text_encoder: args.text_encoder.clone(),
        vae: None,
    };
    let resolved = catalog::resolve_with(&args.model, &args.models_dir, &files)?;
    let (component, file) = match role {
        Role::Transformer => ("transformer", &resolved.files.transformer),
        _ => ("text_encoder", &resolved.files.text_encoder),
    };
    let weights = match file {
        Some(p) => Weights::open_file(p, component, role)?,
        None => resolved.dir.open_weights_as(component, role)?,
    };
    for src in weights.files() {
        if src.canonicalize().ok() == args.output.canonicalize().ok() {
            bail!(
                "--output {} is the file being quantized",
                args.output.display()
            );
        }
    }
    let te_cfg = match role {
        Role::TextEncoder => Some(
            resolved
                .dir
                .read_json::<candle_transformers::models::z_image::text_encoder::TextEncoderConfig>(
                    "text_encoder/config.json",
                )?,
        ),
        _ => None,
    };
    let target = match args.to {
        QuantTo::Gguf(t) => t,
        QuantTo::Fp8 => {
            let started = std::time::Instant::now();
            let bar = std::io::stderr().is_terminal().then(|| {
                let b = ProgressBar::new(0);
                b.set_style(
                    ProgressStyle::with_template(
                        "fp8 [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                b
            });
            let r = q::write_fp8(&weights, role, &args.output, &mut |done, total| {
                if let Some(b) = &bar {
                    b.set_length(total);
                    b.set_position(done);
                }
            });
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            r?;
            eprintln!(
                "wrote {} ({:.2} GB, float8_e4m3fn with per-tensor scale_weight) in {:.1} s",
                args.output.display(),
                std::fs::metadata(&args.output)
                    .map(|m| m.len())
                    .unwrap_or(0) as f64
                    / 1e9,
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
    };
    let planned = q::plan(&weights, role, target)?;
    let meta = q::metadata(role, target, te_cfg.as_ref(), &resolved.name);
    let total: u64 = planned
        .iter()
        .map(|p| {
            p.dims.iter().product::<usize>() as u64 / p.ty.block_size() as u64
                * p.ty.type_size() as u64
        })
        .sum();
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = ProgressBar::new(total);
        b.set_style(
            ProgressStyle::with_template(
                "quantizing [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    });
    let started = std::time::Instant::now();
    let result = q::write(&weights, &planned, &meta, &args.output, &mut |done, _| {
        if let Some(b) = &bar {
            b.set_position(done);
        }
    });
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    result?;
    let mut counts = std::collections::BTreeMap::new();
    for p in &planned {
        *counts
            .entry(zturbo::ops::quantized::ggml_name(p.ty))
            .or_insert(0usize) += 1;
    }
    let counts: Vec<String> = counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
    eprintln!(
        "wrote {} ({:.2} GB, {} tensors: {}) in {:.1} s",
        args.output.display(),
        total as f64 / 1e9,
        planned.len(),
        counts.join(", "),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn models(models_dir: &Path, comfyui_dir: Option<&Path>) -> Result<()> {
    println!(
        "{:<16} {:<11} {:<15} {:>10}  source",
        "name", "family", "state", "size"
    );
    for m in catalog::list(models_dir, "") {
        let state = serde_json::to_value(m.state)?
            .as_str()
            .unwrap_or("")
            .to_string();
        let size = m
            .size_bytes
            .map(|b| format!("{:.2} GB", b as f64 / 1e9))
            .unwrap_or_default();
        let source = m
            .path
            .map(|p| p.display().to_string())
            .or(m.repo)
            .unwrap_or_else(|| "built in".into());
        println!(
            "{:<16} {:<11} {:<15} {:>10}  {source}",
            m.name, m.family, state, size
        );
    }
    let files = catalog::list_files(models_dir, comfyui_dir, &Default::default());
    if !files.is_empty() {
        println!();
        println!(
            "{:<15} {:<14} {:>10}  {:<22} file",
            "flag", "encoding", "size", "names"
        );
        for f in files {
            println!(
                "{:<15} {:<14} {:>10}  {:<22} {}",
                f.flag,
                f.summary.encoding,
                format!("{:.2} GB", f.summary.file_bytes as f64 / 1e9),
                f.summary.kind,
                f.path.display()
            );
        }
    }
    Ok(())
}
