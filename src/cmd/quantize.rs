//! `zturbo quantize`: a component's weights written as GGUF (ComfyUI names for the transformer,
//! llama.cpp `qwen3` names for the text encoder) or as ComfyUI's scaled fp8 safetensors, one
//! tensor at a time, with a byte progress bar on a terminal.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};

use zturbo::families::{self, catalog};

#[derive(clap::Args)]
pub struct QuantizeArgs {
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
pub enum QuantTo {
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
pub enum QuantComponent {
    Transformer,
    TextEncoder,
}

/// `zturbo quantize`: one tensor at a time, with a byte progress bar on a terminal.
pub fn run(args: QuantizeArgs) -> Result<()> {
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
