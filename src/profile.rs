//! Opt-in stage timing (`ZTURBO_PROFILE=1`): where a denoiser step's time goes, on any device.
//!
//! Each [`span`] synchronises the device before and after its closure (so GPU work is charged to
//! the stage that queued it) and adds the wall time to a process-wide table; the CLI prints the
//! table after a generation. Off by default: then a span is just the closure, with no
//! synchronisation.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use candle_core::Device;

/// True when `ZTURBO_PROFILE` is set to anything but `0`.
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("ZTURBO_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0"))
}

static TABLE: Mutex<Vec<(&'static str, Duration, u64)>> = Mutex::new(Vec::new());

/// Runs `f`, charging its wall time (device-synchronised) to `name` when profiling is on.
pub fn span<T>(
    name: &'static str,
    device: &Device,
    f: impl FnOnce() -> candle_core::Result<T>,
) -> candle_core::Result<T> {
    if !enabled() {
        return f();
    }
    device.synchronize()?;
    let t0 = Instant::now();
    let out = f()?;
    device.synchronize()?;
    record(name, t0.elapsed());
    Ok(out)
}

fn record(name: &'static str, dt: Duration) {
    let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    match table.iter_mut().find(|(n, _, _)| *n == name) {
        Some(row) => {
            row.1 += dt;
            row.2 += 1;
        }
        None => table.push((name, dt, 1)),
    }
}

/// The table so far as text (stage, calls, total, share of the listed total), and resets it.
pub fn take_report() -> String {
    let rows = std::mem::take(&mut *TABLE.lock().unwrap_or_else(|e| e.into_inner()));
    let total: Duration = rows.iter().map(|r| r.1).sum();
    let mut s = String::from("| stage | calls | total | share |\n|---|---|---|---|\n");
    for (name, dt, n) in &rows {
        let share = if total.is_zero() {
            0.0
        } else {
            100.0 * dt.as_secs_f64() / total.as_secs_f64()
        };
        s.push_str(&format!(
            "| {name} | {n} | {:.1} ms | {share:.1} % |\n",
            dt.as_secs_f64() * 1e3
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_resets() {
        record("test.a", Duration::from_millis(3));
        record("test.a", Duration::from_millis(1));
        let r = take_report();
        assert!(r.contains("| test.a | 2 | 4.0 ms |"), "{r}");
        assert!(!take_report().contains("test.a"));
    }
}
