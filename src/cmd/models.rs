//! `zturbo pull` and `zturbo models`: fetching models (or a quantized variant, or only the
//! configs) with a progress bar, and listing them with the weight files found on disk.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};

use zturbo::families::{self, catalog};

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

/// `zturbo pull`: downloads a catalog model or a hub repository into the Hugging Face cache.
pub fn pull(name: &str, configs_only: bool, variant: Option<&str>) -> Result<()> {
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

/// `zturbo models`: the catalog and the local folders, with their state.
pub fn models(models_dir: &Path, comfyui_dir: Option<&Path>) -> Result<()> {
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
            .map(|b| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64))
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
