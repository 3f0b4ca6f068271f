//! Load-time settings: which model, device and precision, how much memory the planner may use, and
//! for `serve` where to listen and who may call. Parsed and validated once at start-up (the CLI
//! fills them); request-time choices live in `request.rs`.

use std::path::PathBuf;
use std::time::Duration;

use candle_core::Device;

/// The user-facing precision choice (`--precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// The best the device supports: on a CPU f32 (candle converts half-precision matmuls to f32
    /// on CPU, so halves only cost time there), bf16 matrix operands where they are native (MKL
    /// build, AVX512-BF16/AMX), else `int8` projections where AVX512-VNNI is (see
    /// `PrecisionPolicy::resolve`); `mixed` on CUDA, bf16 on Metal.
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
    /// bf16 text encoder, f16 denoiser compute with a bf16 residual stream, VAE bf16 (f32 retry on
    /// overflow). f16's 65504 ceiling is what overflows in Z-Image's blocks; keeping the residual
    /// stream in bf16 (f32's exponent range) is the fix the seed calls "anti-black-image".
    Mixed,
    /// CPU only, on CPUs with AVX512-VNNI: the denoiser's linear layers multiply int8 × int8 with
    /// s32 sums (weights per-channel int8, quantized once at load; activations per token, per
    /// call); everything else — norms, softmax, attention, the residual stream — stays f32.
    Int8,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "fp16" | "float16" => Ok(Self::F16),
            "mixed" => Ok(Self::Mixed),
            "int8" | "i8" => Ok(Self::Int8),
            other => Err(format!(
                "unknown precision `{other}` (allowed: auto, f32, bf16, f16, mixed, int8)"
            )),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
            Self::Mixed => "mixed",
            Self::Int8 => "int8",
        })
    }
}

/// What to load, and on what: shared by `serve` and `generate`.
#[derive(Debug, Clone)]
pub struct ModelSettings {
    /// A diffusers folder, a name in `models_dir`, a catalog name found in the Hugging Face cache,
    /// or `demo`; `None`: `serve` picks z-image-turbo when it is found locally, else the demo.
    pub model: Option<String>,
    pub models_dir: PathBuf,
    pub device: DeviceSpec,
    pub precision: Precision,
    /// Cap on the memory the planner may use.
    pub memory_budget: Option<u64>,
    /// Single weight files replacing components of `model` (`--transformer`, `--text-encoder`,
    /// `--vae`): paths, or bare names looked for in `models_dir` and `comfyui_dir`.
    pub transformer: Option<PathBuf>,
    pub text_encoder: Option<PathBuf>,
    pub vae: Option<PathBuf>,
    /// A ComfyUI folder (or its `models/`): its weight files are listed and found by name.
    pub comfyui_dir: Option<PathBuf>,
    /// Which weights of a catalog model: `bf16` or a pulled variant (`q8_0` …); `None`: the
    /// planner chooses among those on disk.
    pub variant: Option<String>,
}

/// Everything `server::run` needs to serve.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    pub model: ModelSettings,
    /// Address to listen on; any address but loopback needs `api_key` (or `insecure_no_auth`).
    pub host: String,
    /// 0 picks a free port.
    pub port: u16,
    pub api_key: Option<String>,
    pub insecure_no_auth: bool,
    /// The one web origin allowed to call the API (CORS).
    pub cors_origin: Option<String>,
    /// Images, their JSON sidecars and the job journal.
    pub outputs: PathBuf,
    /// Jobs that may wait behind the running one.
    pub queue_size: usize,
    /// How long a connection has to send a complete request head.
    pub header_timeout: Duration,
    /// How long a kept-alive connection may idle, or a body or response make no progress.
    pub idle_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
    /// How long a synchronous generation call waits for its jobs (`None`: no limit).
    pub sync_timeout: Option<Duration>,
    /// Job streams carry live `preview` events (`--preview off`: never).
    pub preview: bool,
    /// `--broker`: serve as the front door of remote workers (no model is loaded here).
    pub broker: Option<BrokerSettings>,
}

/// `--broker` and `--broker-ca`: the Redis broker that joins a front door and its workers.
#[derive(Clone)]
pub struct BrokerSettings {
    /// `redis://[:PASSWORD@]HOST:PORT[/DB]` or `rediss://…` (TLS).
    pub url: String,
    /// PEM file of the CA that signed the broker's TLS certificate (default: the system's roots).
    pub ca: Option<PathBuf>,
}

impl std::fmt::Debug for BrokerSettings {
    // The password never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerSettings")
            .field("url", &crate::queue::broker::redact(&self.url))
            .field("ca", &self.ca)
            .finish()
    }
}

/// Everything `zturbo worker` needs: the model to load, the broker to serve, its name.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub model: ModelSettings,
    pub broker: BrokerSettings,
    /// Its name in the UI and in the job records; `None`: HOSTNAME-PID.
    pub name: Option<String>,
    /// The visibility timeout: a job whose worker has not extended it for this long is taken
    /// over by another worker.
    pub claim_after: Duration,
}

/// `--device`: `auto` (best available), `cpu`, `cuda[:N]`, `metal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
    Metal,
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "metal" | "mps" => Ok(Self::Metal),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map(Self::Cuda)
                    .map_err(|_| format!("`{other}`: the CUDA ordinal must be a number (cuda:0)")),
                None => Err(format!(
                    "unknown device `{other}` (allowed: auto, cpu, cuda, cuda:N, metal)"
                )),
            },
        }
    }
}

impl DeviceSpec {
    /// Opens the device; `auto` picks CUDA, then Metal, then the CPU, whichever this build has.
    pub fn open(self) -> Result<Device, String> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    return Err(
                        "this zturbo was built without CUDA (rebuild with `--features cuda`)"
                            .into(),
                    );
                }
                Device::new_cuda(n).map_err(|e| format!("cannot open CUDA device {n}: {e}"))
            }
            Self::Metal => {
                if !cfg!(feature = "metal") {
                    return Err(
                        "this zturbo was built without Metal (rebuild with `--features metal`)"
                            .into(),
                    );
                }
                Device::new_metal(0).map_err(|e| format!("cannot open the Metal device: {e}"))
            }
            Self::Auto => {
                if cfg!(feature = "cuda") {
                    if let Ok(d) = Device::new_cuda(0) {
                        return Ok(d);
                    }
                }
                if cfg!(feature = "metal") {
                    if let Ok(d) = Device::new_metal(0) {
                        return Ok(d);
                    }
                }
                Ok(Device::Cpu)
            }
        }
    }
}

/// A short name for logs and the API: `cpu`, `cuda:0`, `metal`.
pub fn device_label(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => match d.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            _ => "cuda".into(),
        },
        Device::Metal(_) => "metal".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!("CPU".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda:1".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(1)));
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert!("cuda:x"
            .parse::<DeviceSpec>()
            .unwrap_err()
            .contains("ordinal"));
        assert!("tpu".parse::<DeviceSpec>().unwrap_err().contains("allowed"));
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
    }
}
