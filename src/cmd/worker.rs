//! `zturbo worker`: the remote half of `serve --broker`. Checks the broker (a wrong password or
//! URL fails before the model loads), loads the model on the same worker thread `serve` uses,
//! registers, and runs the broker's jobs until Ctrl-C/SIGTERM (the job running then is left to
//! another worker). Listens on no port.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use zturbo::engine::load;
use zturbo::memory::monitor::{Monitor, Tags};
use zturbo::queue::broker::{remote, wire::ModelRecord, Broker};
use zturbo::queue::worker;
use zturbo::settings::{BrokerSettings, WorkerSettings};

use crate::ModelArgs;

#[derive(clap::Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// redis://[:PASSWORD@]HOST:PORT[/DB], or rediss://… for TLS: the broker of the front door
    /// (`zturbo serve --broker` with the same URL).
    #[arg(long, env = "ZTURBO_BROKER", hide_env_values = true)]
    broker: String,
    /// PEM file of the CA that signed the broker's TLS certificate (rediss:// only; default: the
    /// system's trusted roots).
    #[arg(long, env = "ZTURBO_BROKER_CA")]
    broker_ca: Option<std::path::PathBuf>,
    /// This worker's name in the UI and in the job records (letters, digits, `.`, `_`, `-`);
    /// default HOSTNAME-PID.
    #[arg(long, env = "ZTURBO_WORKER_NAME")]
    name: Option<String>,
    /// Visibility timeout in seconds: a job whose worker has not been heard from for this long is
    /// taken over by another worker. A live worker extends it every second while it runs a job.
    #[arg(long, env = "ZTURBO_CLAIM_AFTER",
          default_value_t = zturbo::queue::broker::DEFAULT_CLAIM_AFTER_S)]
    claim_after: f64,
}

impl WorkerArgs {
    fn settings(&self) -> Result<WorkerSettings> {
        if !(self.claim_after.is_finite() && (0.5..=86_400.0).contains(&self.claim_after)) {
            bail!(
                "--claim-after {}: must be between 0.5 and 86400 seconds",
                self.claim_after
            );
        }
        if let Some(name) = &self.name {
            check_name(name)?;
        }
        Ok(WorkerSettings {
            model: self.model.settings(),
            broker: BrokerSettings {
                url: self.broker.clone(),
                ca: self.broker_ca.clone(),
            },
            name: self.name.clone(),
            claim_after: Duration::from_secs_f64(self.claim_after),
        })
    }
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        bail!("--name `{name}`: 1 to 64 letters, digits, `.`, `_` or `-`");
    }
    Ok(())
}

pub fn run(args: WorkerArgs) -> Result<()> {
    let settings = args.settings()?;
    let broker = Broker::open(&settings.broker)?;
    let name = settings
        .name
        .clone()
        .unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // A wrong password or URL fails now, before the model loads.
    runtime.block_on(remote::check(&broker))?;

    let resolved = load::resolve(&settings.model, false)?;
    let initial = resolved.name.clone();
    let tags = Arc::new(Tags::default());
    let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
    let model_settings = settings.model.clone();
    // A remote worker serves the one model it started with (the front door never asks it to
    // switch), so the loader only ever sees that name; the weights are those the planner
    // settles on (it may pick a pulled variant), as with `serve`.
    let first = std::sync::Mutex::new(Some(resolved));
    let loader: worker::Loader = Arc::new(move |name: &str| -> std::result::Result<_, String> {
        let resolved = match first.lock().ok().and_then(|mut f| f.take()) {
            Some(r) => r,
            None => load::resolve(&model_settings, false).map_err(|e| e.to_string())?,
        };
        if resolved.name != name {
            return Err(format!(
                "this worker serves `{}`; it cannot load `{name}`",
                resolved.name
            ));
        }
        let (mut engine, resolved) =
            load::open_chosen(&model_settings, resolved).map_err(|e| e.to_string())?;
        let meta = worker::ModelMeta {
            demo: resolved.demo,
            description: zturbo::server::describe(&resolved),
            path: resolved.dir.path().map(|p| p.display().to_string()),
            files: resolved.files.clone(),
        };
        engine
            .warm_up()
            .map_err(|e| format!("loading the model's weights failed: {e}"))?;
        Ok((engine, meta))
    });
    let config = worker::WorkerConfig {
        outputs: None,
        tags: tags.clone(),
        step_delay: worker::WorkerConfig::step_delay_from_env(),
        // Live previews stay on the machine that serves the page: a remote worker's steps do
        // not travel through the broker.
        preview: false,
    };
    let (engine_thread, loaded) = worker::spawn(loader, initial, config, events_tx)
        .map_err(|e| anyhow!("the model did not load: {e}"))?;
    tracing::info!(model = %loaded.model, device = %loaded.device, worker = %name, "model loaded");
    let demo = loaded.meta.demo;
    let description = loaded.meta.description.clone();
    let monitor = Arc::new(Monitor::start(loaded.probe.clone(), tags));
    let remote_settings = remote::RemoteSettings {
        broker,
        name,
        claim_after: settings.claim_after,
        record: ModelRecord {
            model: loaded.model.clone(),
            family: loaded.profile.family,
            defaults: loaded.profile.defaults,
            max_batch: loaded.max_batch,
            demo,
            description,
        },
        device: loaded.device.clone(),
        device_name: loaded.probe.name(),
        total_bytes: loaded.probe.total_bytes(),
    };
    runtime.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            zturbo::server::shutdown_signal().await;
            tracing::info!("shutting down: the running job is left to another worker");
            let _ = stop_tx.send(true);
        });
        remote::run(
            remote_settings,
            engine_thread.jobs,
            events_rx,
            monitor,
            stop_rx,
        )
        .await
    })?;
    Ok(())
}

/// This machine's name (the default worker name's first half).
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer we own.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name = if r == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    let clean: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(48)
        .collect();
    if clean.is_empty() {
        "worker".into()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_names_are_checked() {
        for ok in ["gpu-box-1", "a", "w_2.local"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "has space", "semi;colon", &"x".repeat(65)] {
            let e = check_name(bad).unwrap_err().to_string();
            assert!(e.contains("--name"), "{e}");
        }
        let h = hostname();
        assert!(check_name(&h).is_ok(), "{h}");
    }
}
