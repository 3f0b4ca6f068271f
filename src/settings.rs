//! Load-time settings shared by the CLI commands: which device, which precision, how much memory
//! the planner may use. Parsed and validated once at start-up; request-time choices live in
//! `request.rs`.

use candle_core::Device;

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
