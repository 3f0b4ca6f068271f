//! The `zturbo` command: `serve` the web UI, `generate` one image from the terminal, `pull` a
//! model from the Hugging Face hub, list `models`.

mod hostile;
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
    },
    /// Runs many random jobs through a real server with injected faults and audits the results.
    Soak(soak::SoakArgs),
    /// Probes a running server on loopback as a hostile client would (developer tool; bounded in
    /// time and requests) and prints a table of what held.
    Probe(hostile::ProbeArgs),
    /// List known and local models.
    Models {
        #[arg(long, env = "ZTURBO_MODELS_DIR", default_value = "models")]
        models_dir: PathBuf,
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
    /// Seconds a connection has to send a complete request head, from connecting (or from the
    /// first byte of a later request on a kept-alive connection); slower ones are closed.
    #[arg(long, env = "ZTURBO_HEADER_TIMEOUT",
          default_value_t = zturbo::server::listen::DEFAULT_HEADER_TIMEOUT_S,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    header_timeout: u64,
    /// Seconds a kept-alive connection may stay idle between requests; also how long a request
    /// body or a response (an SSE stream the client stopped reading) may make no progress.
    #[arg(long, env = "ZTURBO_IDLE_TIMEOUT",
          default_value_t = zturbo::server::listen::DEFAULT_IDLE_TIMEOUT_S,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    idle_timeout: u64,
    /// Most connections open at once, event streams included; more wait to be accepted. Lowered
    /// to what the open-file limit allows.
    #[arg(long, env = "ZTURBO_MAX_CONNECTIONS",
          default_value_t = zturbo::server::listen::DEFAULT_MAX_CONNECTIONS as u32,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_connections: u32,
    /// Seconds a synchronous generation call (`/v1/images/generations`, `/sdapi/v1/txt2img`)
    /// waits for its jobs before answering 504; 0 = no limit. A job that has not started by
    /// then is cancelled; a running one finishes and stays readable under /api/jobs.
    #[arg(long, env = "ZTURBO_SYNC_TIMEOUT",
          default_value_t = zturbo::server::DEFAULT_SYNC_TIMEOUT_S)]
    sync_timeout: u64,
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
    /// used exactly like diffusers' `latents=` argument (with --image: the loop's start latents,
    /// as `ZImageImg2ImgPipeline(latents=…)` takes them).
    #[arg(long)]
    init_latents: Option<PathBuf>,
    /// Write the final latents (before the VAE) as tensor `latents` to this safetensors file.
    #[arg(long)]
    save_latents: Option<PathBuf>,
    /// Take prompt, size, steps, CFG and seed from a PNG's parameters (flags still override).
    #[arg(long)]
    from_png: Option<PathBuf>,
    /// Image to image: start from this PNG, JPEG or WebP (its size is the default size).
    #[arg(long)]
    image: Option<PathBuf>,
    /// How much of --image is repainted, 0–1 (default: the model's, 1 with --mask).
    #[arg(long, requires = "image")]
    strength: Option<f64>,
    /// Inpainting: a mask the size of --image, white = repaint.
    #[arg(long, requires = "image")]
    mask: Option<PathBuf>,
    /// σ in pixels of the blur that blends the original back outside the mask (default 4).
    #[arg(long, requires = "mask")]
    mask_blur: Option<u32>,
    /// How --image and --mask are fitted to --width/--height: stretch, crop-and-resize,
    /// resize-and-fill.
    #[arg(long, value_parser = parse_resize_mode)]
    resize_mode: Option<zturbo::inputs::ResizeMode>,
    /// A LoRA file and its weight (default 1), e.g. `--lora style.safetensors:0.8`; repeat for
    /// several (applied in order). `<lora:name:weight>` in the prompt names files in
    /// <models-dir>/loras/.
    #[arg(long = "lora", value_name = "FILE[:WEIGHT]", value_parser = parse_lora)]
    loras: Vec<(PathBuf, f32)>,
    /// What the masked region starts from: original (default), fill (the surrounding colours),
    /// latent-noise, latent-nothing (A1111's inpainting fill).
    #[arg(long, requires = "mask", value_parser = parse_fill)]
    inpaint_fill: Option<zturbo::inputs::InpaintFill>,
    /// Repaint only the masked region: its crop (plus --inpaint-padding pixels) is generated at
    /// --width×--height and pasted back into the whole image (A1111's "only masked").
    #[arg(long, requires = "mask")]
    inpaint_full_res: bool,
    /// Pixels of context around the mask with --inpaint-full-res.
    #[arg(long, requires = "inpaint_full_res")]
    inpaint_padding: Option<u32>,
}

fn parse_fill(s: &str) -> Result<zturbo::inputs::InpaintFill, String> {
    use zturbo::inputs::InpaintFill;
    match s {
        "original" => Ok(InpaintFill::Original),
        "fill" => Ok(InpaintFill::Fill),
        "latent-noise" => Ok(InpaintFill::LatentNoise),
        "latent-nothing" => Ok(InpaintFill::LatentNothing),
        _ => Err(format!(
            "`{s}`: expected original, fill, latent-noise or latent-nothing"
        )),
    }
}

/// `FILE[:WEIGHT]`: the weight is what follows the last `:` when it is a number.
fn parse_lora(s: &str) -> Result<(PathBuf, f32), String> {
    if let Some((file, w)) = s.rsplit_once(':') {
        if let Ok(w) = w.parse::<f32>() {
            if !w.is_finite() {
                return Err(format!("`{s}`: the weight must be a finite number"));
            }
            return Ok((PathBuf::from(file), w));
        }
    }
    Ok((PathBuf::from(s), 1.0))
}

fn parse_resize_mode(s: &str) -> Result<zturbo::inputs::ResizeMode, String> {
    use zturbo::inputs::ResizeMode;
    match s {
        "stretch" => Ok(ResizeMode::Stretch),
        "crop-and-resize" => Ok(ResizeMode::CropAndResize),
        "resize-and-fill" => Ok(ResizeMode::ResizeAndFill),
        _ => Err(format!(
            "`{s}`: expected stretch, crop-and-resize or resize-and-fill"
        )),
    }
}

/// A file's bytes as base64, for the request's image fields.
fn file_base64(flag: &str, p: &Path) -> Result<String> {
    use base64::Engine as _;
    let bytes = std::fs::read(p).with_context(|| format!("{flag} {}", p.display()))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
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
        Command::Pull { name } => pull(&name),
        Command::Models { models_dir } => models(&models_dir),
        Command::Soak(args) => soak::run(args),
        Command::Probe(args) => hostile::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Finds the model (without loading anything).
fn resolve_model(args: &ModelArgs, default_to_demo: bool) -> Result<catalog::Resolved> {
    Ok(match &args.model {
        Some(m) => catalog::resolve(m, &args.models_dir)?,
        None if default_to_demo => catalog::default_model(&args.models_dir),
        None => bail!("--model is required"),
    })
}

/// Opens the device and builds the engine for a resolved model.
fn open_engine(args: &ModelArgs, resolved: catalog::Resolved) -> Result<Engine> {
    let device = args.device.open().map_err(|e| anyhow!(e))?;
    let policy = PrecisionPolicy::resolve(args.precision, &device);
    tracing::info!(
        model = %resolved.name,
        source = %resolved.dir.describe(),
        device = %device_label(&device),
        precision = %policy.describe(),
        "loading model"
    );
    let family = families::open(resolved.dir.clone(), &device, policy)?;
    let probe: Arc<dyn MemoryProbe> = zturbo::memory::probe::for_device(&device);
    let faults = FaultPlan::from_env().map_err(|e| anyhow!(e))?;
    let config = EngineConfig {
        memory_budget: args.memory_budget,
        faults,
    };
    let engine = Engine::new(family, resolved.name, probe, config);
    Ok(if resolved.demo {
        engine.with_defaults(catalog::DEMO_DEFAULTS)
    } else {
        engine
    })
}

/// Opens the device, finds the model, builds the engine.
fn build_engine(args: &ModelArgs, default_to_demo: bool) -> Result<(Engine, bool)> {
    let resolved = resolve_model(args, default_to_demo)?;
    let demo = resolved.demo;
    Ok((open_engine(args, resolved)?, demo))
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
    let model_path = resolved.dir.path().map(|p| p.display().to_string());
    let demo = resolved.demo;
    let description = if demo {
        "Tiny random-weight Z-Image built into the binary: every stage runs, images are noise."
            .to_string()
    } else {
        catalog::entry(&resolved.name)
            .map(|e| e.description.to_string())
            .unwrap_or_else(|| format!("Local diffusers model ({})", resolved.dir.describe()))
    };
    std::fs::create_dir_all(&args.outputs)
        .with_context(|| format!("creating the outputs folder {}", args.outputs.display()))?;
    // One server per outputs folder (two would both resume the same jobs); held until exit.
    let _outputs_lock = zturbo::queue::outputs::lock(&args.outputs)?;
    zturbo::queue::outputs::clean_stale_temps(&args.outputs);

    // The engine loads on its own thread; nothing is served until it reports back.
    let tags = Arc::new(Tags::default());
    let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
    let model_args = args.model.clone();
    let build = move || -> std::result::Result<Engine, String> {
        let mut engine = open_engine(&model_args, resolved).map_err(|e| format!("{e:#}"))?;
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
    info.sync_timeout =
        (args.sync_timeout > 0).then(|| std::time::Duration::from_secs(args.sync_timeout));
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
                key_attempts: Default::default(),
            }),
            downloads: Default::default(),
        };
        // The one line on stdout: scripts and tests read the bound address from it.
        println!("listening on http://{addr}");
        let _ = std::io::Write::flush(&mut std::io::stdout());
        tracing::info!("serving {} on http://{addr}", loaded.model);
        let limits = server::listen::ConnLimits {
            header_timeout: std::time::Duration::from_secs(args.header_timeout),
            idle_timeout: std::time::Duration::from_secs(args.idle_timeout),
            max_connections: args.max_connections as usize,
        }
        .fit_to_fd_limit();
        server::listen::serve(listener, server::app(state), limits, async move {
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
    let lora_dir = zturbo::families::lora::LoraDir::new(args.model.models_dir.join("loras"));
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
        image: match &args.image {
            Some(p) => Some(file_base64("--image", p)?),
            None => None,
        },
        mask: match &args.mask {
            Some(p) => Some(file_base64("--mask", p)?),
            None => None,
        },
        strength: args.strength,
        mask_blur: args.mask_blur,
        resize_mode: args.resize_mode,
        loras: None,
        inpaint_fill: args.inpaint_fill,
        inpaint_full_res: args.inpaint_full_res.then_some(true),
        inpaint_full_res_padding: args.inpaint_padding,
    }
    .validate_in(&limits, Some(&lora_dir))
    .map_err(|e| {
        let flag = match e.field.as_str() {
            "inpaint_full_res_padding" => "inpaint-padding".to_string(),
            f => f.replace('_', "-"),
        };
        let file = match e.field.as_str() {
            "image" => args.image.as_ref(),
            "mask" => args.mask.as_ref(),
            _ => None,
        };
        match file {
            Some(p) => anyhow!("--{flag} {}: {}", p.display(), e.message),
            None => anyhow!("--{flag}: {}", e.message),
        }
    })?;

    let mut req = req;
    for (path, weight) in &args.loras {
        if !path.is_file() {
            bail!("--lora {}: no such file", path.display());
        }
        req.loras.push(zturbo::request::LoraRef {
            name: path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            weight: *weight,
            path: path.clone(),
        });
    }
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

fn pull(name: &str) -> Result<()> {
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
    let dir = families::weights::pull(&repo, &mut progress)?;
    eprintln!("{repo} is ready in {}", dir.display());
    Ok(())
}

fn models(models_dir: &Path) -> Result<()> {
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
    Ok(())
}
