//! The `zturbo` command: parses the command line and dispatches — `serve` the web UI
//! (`zturbo::server::run`), `generate` images from the terminal, `pull` a model from the Hugging
//! Face hub, list `models`, `quantize` weights, `soak` or `probe` a server, run a remote `worker`
//! behind a broker. The commands live in `cmd/`.

mod cmd;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

use cmd::{generate, hostile, models, quantize, soak, worker};
use zturbo::families::Precision;
use zturbo::memory::parse_bytes;
use zturbo::settings::{BrokerSettings, DeviceSpec, ModelSettings, ServeSettings};

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
pub struct ModelArgs {
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
    /// auto (on a CPU: f32, bf16 products or int8 projections, by its instructions; mixed on CUDA),
    /// f32, bf16, f16, mixed, int8 (CPU with AVX512-VNNI).
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
    Generate(Box<generate::GenerateArgs>),
    /// Run jobs for a front door (`zturbo serve --broker URL`) on this machine: loads the model,
    /// registers with the Redis broker and runs the jobs it is given. Listens on no port.
    Worker(Box<worker::WorkerArgs>),
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
    /// Probes a running server on loopback as a hostile client would (developer tool; bounded in
    /// time and requests) and prints a table of what held.
    Probe(hostile::ProbeArgs),
    /// Write a component's weights as GGUF (ComfyUI names for the transformer, what ComfyUI-GGUF
    /// and stable-diffusion.cpp load; llama.cpp `qwen3` names for the text encoder) or as
    /// ComfyUI's scaled fp8 safetensors.
    Quantize(quantize::QuantizeArgs),
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
    /// Live previews: each step's latents as a small image on the job's event stream (a page
    /// can also turn them off for itself with `?preview=0`).
    #[arg(long, env = "ZTURBO_PREVIEW", default_value = "on", value_parser = generate::parse_on_off,
          action = clap::ArgAction::Set)]
    preview: bool,
    #[command(flatten)]
    broker: BrokerArgs,
}

/// The Redis broker that joins a front door and its workers.
#[derive(clap::Args, Clone)]
pub struct BrokerArgs {
    /// redis://[:PASSWORD@]HOST:PORT[/DB], or rediss://… for TLS. With `serve`: run as the front
    /// door of remote workers (no model is loaded here; --model names the model they serve).
    #[arg(long, env = "ZTURBO_BROKER", hide_env_values = true)]
    broker: Option<String>,
    /// PEM file of the CA that signed the broker's TLS certificate (rediss:// only; default: the
    /// system's trusted roots).
    #[arg(long, env = "ZTURBO_BROKER_CA")]
    broker_ca: Option<PathBuf>,
}

impl BrokerArgs {
    fn settings(&self) -> Option<BrokerSettings> {
        self.broker.as_ref().map(|url| BrokerSettings {
            url: url.clone(),
            ca: self.broker_ca.clone(),
        })
    }
}

impl ModelArgs {
    fn settings(&self) -> ModelSettings {
        ModelSettings {
            model: self.model.clone(),
            models_dir: self.models_dir.clone(),
            device: self.device,
            precision: self.precision,
            memory_budget: self.memory_budget,
            transformer: self.transformer.clone(),
            text_encoder: self.text_encoder.clone(),
            vae: self.vae.clone(),
            comfyui_dir: self.comfyui_dir.clone(),
            variant: self.variant.clone(),
        }
    }
}

impl ServeArgs {
    fn settings(&self) -> ServeSettings {
        ServeSettings {
            model: self.model.settings(),
            host: self.host.clone(),
            port: self.port,
            api_key: self.api_key.clone(),
            insecure_no_auth: self.insecure_no_auth,
            cors_origin: self.cors_origin.clone(),
            outputs: self.outputs.clone(),
            queue_size: self.queue_size as usize,
            header_timeout: Duration::from_secs(self.header_timeout),
            idle_timeout: Duration::from_secs(self.idle_timeout),
            max_connections: self.max_connections as usize,
            sync_timeout: (self.sync_timeout > 0).then(|| Duration::from_secs(self.sync_timeout)),
            broker: self.broker.settings(),
            preview: self.preview,
        }
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
        Command::Serve(args) => zturbo::server::run(args.settings()).map_err(Into::into),
        Command::Generate(args) => generate::run(*args),
        Command::Worker(args) => worker::run(*args),
        Command::Pull {
            name,
            configs_only,
            variant,
        } => models::pull(&name, configs_only, variant.as_deref()),
        Command::Models {
            models_dir,
            comfyui_dir,
        } => models::models(&models_dir, comfyui_dir.as_deref()),
        Command::Quantize(args) => quantize::run(args),
        Command::Soak(args) => soak::run(args),
        Command::Probe(args) => hostile::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
