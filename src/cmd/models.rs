//! `zturbo pull` and `zturbo models`: fetching models with a progress bar, and listing them.

use std::path::Path;

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
pub fn pull(name: &str) -> Result<()> {
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

/// `zturbo models`: the catalog and the local folders, with their state.
pub fn models(models_dir: &Path) -> Result<()> {
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
