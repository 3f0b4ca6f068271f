//! Memory readings behind one trait, so the monitor and the planner see CPU, CUDA and Metal alike.
//! The CPU probe lives here; device probes (behind cargo features) implement the same [`MemoryProbe`].

use serde::Serialize;

use super::alloc;

/// Where a reading comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cpu,
    Cuda,
    Metal,
}

/// One sample of a device's memory.
///
/// `used_bytes` is what this process holds on the device as precisely as the device can say (heap bytes
/// on the CPU, the driver's count on a GPU); `total_bytes` and `free_bytes` describe the whole device
/// (free includes what other processes could give back, e.g. the OS page cache for `MemAvailable`).
/// The `Option`s are CPU-side extras a device probe may fill for the host too, or leave `None`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryReading {
    pub device: DeviceKind,
    pub used_bytes: u64,
    pub total_bytes: u64,
    pub free_bytes: u64,
    /// Resident set of the process: heap + mapped weight files + code.
    pub rss_bytes: Option<u64>,
    /// Live bytes from [`alloc::CountingAlloc`]; `None` when it is not installed.
    pub heap_bytes: Option<u64>,
    /// Heap high-water mark since the last [`MemoryProbe::reset_peak`].
    pub heap_peak_bytes: Option<u64>,
}

/// A source of memory readings for one device.
///
/// Device probes keep their own handle (a CUDA context, a Metal device) inside the implementing struct,
/// so the trait needs no feature-gated types and callers can hold a `Box<dyn MemoryProbe>`.
pub trait MemoryProbe: Send + Sync {
    fn kind(&self) -> DeviceKind;
    fn read(&self) -> MemoryReading;
    /// Starts a new peak window (e.g. at the start of a job).
    fn reset_peak(&self);
    /// Peak of `used_bytes` since the last [`MemoryProbe::reset_peak`].
    fn peak_bytes(&self) -> u64;
    fn total_bytes(&self) -> u64;
    /// Human-readable device name for logs and the UI.
    fn name(&self) -> String;
}

/// Why a `/proc` text could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("{source_name}: field `{field}` is missing")]
    MissingField {
        source_name: &'static str,
        field: &'static str,
    },
    #[error("{source_name}: field `{field}` has an unreadable value `{value}`")]
    BadValue {
        source_name: &'static str,
        field: &'static str,
        value: String,
    },
}

/// Host memory totals from `/proc/meminfo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemInfo {
    pub total_bytes: u64,
    /// `MemAvailable`: what can be allocated without swapping (free + reclaimable cache).
    pub available_bytes: u64,
}

/// Reads the CPU side: the counting allocator when installed, else the process RSS.
#[derive(Debug, Clone)]
pub struct CpuProbe {
    name: String,
}

impl CpuProbe {
    pub fn new() -> Self {
        Self {
            name: cpu_name().unwrap_or_else(|| "cpu".to_owned()),
        }
    }
}

impl Default for CpuProbe {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryProbe for CpuProbe {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Cpu
    }

    fn read(&self) -> MemoryReading {
        let rss = rss_bytes();
        let heap = alloc::is_installed().then(alloc::live_bytes);
        let heap_peak = alloc::is_installed().then(alloc::peak_bytes);
        let (total, free) = match host_memory() {
            Some(info) => (info.total_bytes, info.available_bytes),
            None => {
                // Without a host-wide count, "free" is at least not more than what we do not use.
                let total = host_total_bytes().unwrap_or(0);
                (total, total.saturating_sub(rss.unwrap_or(0)))
            }
        };
        MemoryReading {
            device: DeviceKind::Cpu,
            used_bytes: heap.or(rss).unwrap_or(0),
            total_bytes: total,
            free_bytes: free,
            rss_bytes: rss,
            heap_bytes: heap,
            heap_peak_bytes: heap_peak,
        }
    }

    fn reset_peak(&self) {
        alloc::reset_peak();
        // Also restart VmHWM so peak_rss_bytes() describes the same window; harmless when refused.
        reset_peak_rss();
    }

    fn peak_bytes(&self) -> u64 {
        if alloc::is_installed() {
            alloc::peak_bytes()
        } else {
            peak_rss_bytes().unwrap_or(0)
        }
    }

    fn total_bytes(&self) -> u64 {
        host_memory()
            .map(|m| m.total_bytes)
            .or_else(host_total_bytes)
            .unwrap_or(0)
    }

    fn name(&self) -> String {
        self.name.clone()
    }
}

/// Resident set size of this process (`/proc/self/statm` × page size on Linux; `None` elsewhere).
pub fn rss_bytes() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let text = std::fs::read_to_string("/proc/self/statm").ok()?;
        let pages = parse_statm_resident_pages(&text)?;
        Some(pages.saturating_mul(page_size()?))
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Peak resident set size: `VmHWM` on Linux (resettable, see [`reset_peak_rss`]); `ru_maxrss` on macOS
/// (since process start, never reset).
pub fn peak_rss_bytes() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let text = std::fs::read_to_string("/proc/self/status").ok()?;
        match parse_status_kib(&text, "VmHWM") {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::debug!(error = %e, "no peak RSS");
                None
            }
        }
    }
    #[cfg(target_os = "macos")]
    {
        // SAFETY: getrusage only writes into the zeroed struct we pass.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer to a live rusage.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
        // macOS reports ru_maxrss in bytes (Linux would say KiB).
        (rc == 0).then(|| u64::try_from(usage.ru_maxrss).unwrap_or(0))
    }
    #[cfg(not(any(target_os = "linux", target_os = "macos")))]
    {
        None
    }
}

/// Restarts the `VmHWM` window by writing `5` to `/proc/self/clear_refs` (Linux ≥ 4.0). Returns whether the
/// kernel accepted it; some sandboxes and older kernels refuse, and the peak then covers the whole run.
pub fn reset_peak_rss() -> bool {
    #[cfg(target_os = "linux")]
    {
        match std::fs::write("/proc/self/clear_refs", "5") {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, "cannot reset VmHWM; peak RSS covers the whole process");
                false
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// Host total and available memory (`/proc/meminfo`; `None` off Linux).
pub fn host_memory() -> Option<MemInfo> {
    #[cfg(target_os = "linux")]
    {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        match parse_meminfo(&text) {
            Ok(info) => Some(info),
            Err(e) => {
                tracing::debug!(error = %e, "cannot read host memory");
                None
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

fn host_total_bytes() -> Option<u64> {
    #[cfg(target_os = "macos")]
    {
        let mut value: u64 = 0;
        let mut len = std::mem::size_of::<u64>();
        // SAFETY: the name is NUL-terminated; value/len describe a live u64 that hw.memsize fits.
        let rc = unsafe {
            libc::sysctlbyname(
                c"hw.memsize".as_ptr(),
                (&mut value as *mut u64).cast(),
                &mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        (rc == 0).then_some(value)
    }
    #[cfg(not(target_os = "macos"))]
    {
        None
    }
}

#[cfg(target_os = "linux")]
fn page_size() -> Option<u64> {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0)
}

fn cpu_name() -> Option<String> {
    #[cfg(target_os = "linux")]
    {
        let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|rest| rest.split_once(':'))
            .map(|(_, name)| name.trim().to_owned())
            .filter(|n| !n.is_empty())
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Second field of `/proc/self/statm`: resident pages.
pub fn parse_statm_resident_pages(text: &str) -> Option<u64> {
    text.split_whitespace().nth(1)?.parse().ok()
}

/// `MemTotal` and `MemAvailable` of a `/proc/meminfo` text, in bytes.
pub fn parse_meminfo(text: &str) -> Result<MemInfo, ProbeError> {
    const SRC: &str = "/proc/meminfo";
    Ok(MemInfo {
        total_bytes: kib_field(text, SRC, "MemTotal")?,
        available_bytes: kib_field(text, SRC, "MemAvailable")?,
    })
}

/// A `kB` field (`VmHWM`, `VmRSS`, ...) of a `/proc/self/status` text, in bytes.
pub fn parse_status_kib(text: &str, field: &'static str) -> Result<u64, ProbeError> {
    kib_field(text, "/proc/self/status", field)
}

fn kib_field(
    text: &str,
    source_name: &'static str,
    field: &'static str,
) -> Result<u64, ProbeError> {
    let value = text
        .lines()
        .find_map(|line| {
            let (name, rest) = line.split_once(':')?;
            (name.trim() == field).then_some(rest.trim())
        })
        .ok_or(ProbeError::MissingField { source_name, field })?;
    let bad = || ProbeError::BadValue {
        source_name,
        field,
        value: value.to_owned(),
    };
    // The kernel prints these in KiB and labels them "kB".
    let number = value.strip_suffix("kB").unwrap_or(value).trim();
    let kib: u64 = number.parse().map_err(|_| bad())?;
    kib.checked_mul(1024).ok_or_else(bad)
}

/// The probe for a candle device: exact device readings where the build supports them.
pub fn for_device(device: &candle_core::Device) -> std::sync::Arc<dyn MemoryProbe> {
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(d) => std::sync::Arc::new(cuda::CudaProbe::new(d.clone())),
        _ => std::sync::Arc::new(CpuProbe::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Trimmed from a Linux 6.x /proc/meminfo.
    const MEMINFO: &str = "MemTotal:       32768000 kB\n\
                           MemFree:         1024000 kB\n\
                           MemAvailable:   20480000 kB\n\
                           Buffers:          123456 kB\n";

    #[test]
    fn meminfo_parses_total_and_available() {
        let info = parse_meminfo(MEMINFO).expect("fixture parses");
        assert_eq!(info.total_bytes, 32_768_000 * 1024);
        assert_eq!(info.available_bytes, 20_480_000 * 1024);
    }

    #[test]
    fn meminfo_errors_name_the_field() {
        let err = parse_meminfo("MemTotal: 100 kB\n").expect_err("MemAvailable missing");
        assert!(err.to_string().contains("MemAvailable"), "{err}");
        let err = parse_meminfo("MemTotal: lots kB\nMemAvailable: 1 kB\n").expect_err("bad value");
        assert!(err.to_string().contains("lots"), "{err}");
    }

    #[test]
    fn status_and_statm_parse() {
        let status = "Name:\tzturbo\nVmPeak:\t  900 kB\nVmHWM:\t    1964 kB\nVmRSS:\t 1500 kB\n";
        assert_eq!(parse_status_kib(status, "VmHWM"), Ok(1964 * 1024));
        assert_eq!(
            parse_statm_resident_pages("1000 250 100 5 0 80 0\n"),
            Some(250)
        );
        assert_eq!(parse_statm_resident_pages(""), None);
        assert_eq!(parse_statm_resident_pages("1 x"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn linux_readings_are_real() {
        let rss = rss_bytes().expect("statm readable");
        assert!(rss > 0);
        let hwm = peak_rss_bytes().expect("VmHWM readable");
        // VmHWM is sampled by the kernel and may lag the live RSS by a few pages.
        assert!(hwm > 0);
        let host = host_memory().expect("meminfo readable");
        assert!(host.total_bytes >= host.available_bytes);
        assert!(host.total_bytes > rss);
    }

    #[test]
    fn cpu_probe_reads_heap_when_the_allocator_is_installed() {
        let _guard = alloc::test_lock();
        let probe = CpuProbe::new();
        assert_eq!(probe.kind(), DeviceKind::Cpu);
        assert!(!probe.name().is_empty());
        let r = probe.read();
        // lib.rs installs CountingAlloc, so used = heap, not RSS.
        assert_eq!(r.heap_bytes.is_some(), alloc::is_installed());
        if let Some(heap) = r.heap_bytes {
            assert!(heap > 0);
            assert!(r.heap_peak_bytes.unwrap_or(0) >= heap.min(r.used_bytes));
        }
        #[cfg(target_os = "linux")]
        {
            assert!(r.total_bytes > 0);
            assert!(r.free_bytes <= r.total_bytes);
            assert_eq!(probe.total_bytes(), r.total_bytes);
        }
    }

    #[test]
    fn cpu_probe_peak_window() {
        let _guard = alloc::test_lock();
        let probe = CpuProbe::new();
        let big = vec![7u8; 40 << 20];
        let with_big = probe.peak_bytes();
        drop(big);
        assert!(probe.peak_bytes() >= with_big);
        probe.reset_peak();
        assert!(probe.peak_bytes() + (32 << 20) <= with_big);
    }

    #[test]
    fn reading_serialises_lowercase_device() {
        let r = MemoryReading {
            device: DeviceKind::Cuda,
            used_bytes: 1,
            total_bytes: 2,
            free_bytes: 1,
            rss_bytes: None,
            heap_bytes: Some(3),
            heap_peak_bytes: None,
        };
        let json = serde_json::to_value(&r).expect("serialises");
        assert_eq!(json["device"], "cuda");
        assert_eq!(json["heap_bytes"], 3);
        assert!(json["rss_bytes"].is_null());
    }
}
