//! `cargo bench --bench controlnet`: what a ControlNet costs per denoising step, on the memory
//! bench's random-weight Z-Image of real proportions (`bench` shape: dim 768, 12 + 1 + 1 blocks,
//! written once to `target/bench-models/`) with a random ControlNet Union in the 2.1 layout for
//! it (control layers on every other DiT layer, as 2.1's 15 of 30, a control noise refiner,
//! 33 control channels), written next to it (`<model dir>-controlnet/`).
//!
//! Prints the median denoising time per step without control and with it (scale 0.75, the whole
//! range), and the ControlNet's bytes.
//!
//! Options (after `--`): `--size 256`, `--steps 4`, `--runs 3`, `--shape bench`,
//! `--model-dir DIR`, `--precision auto`.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use zturbo::control::Preprocess;
use zturbo::engine::{CancelToken, Engine, EngineConfig, NullObserver, RunExtras};
use zturbo::families::z_image::config::DitConfig;
use zturbo::families::z_image::synthetic::{self, SyntheticShape};
use zturbo::families::z_image::ZImage;
use zturbo::families::{ModelDir, Precision, PrecisionPolicy};
use zturbo::inputs::InputImage;
use zturbo::memory::planner::MemoryMode;
use zturbo::memory::probe;
use zturbo::nn::torch_rng::TorchGenerator;
use zturbo::request::{ControlSpec, ValidRequest};

struct Opts {
    size: u32,
    steps: u32,
    runs: usize,
    shape: String,
    model_dir: Option<PathBuf>,
    precision: String,
}

fn opts() -> Opts {
    let args: Vec<String> = std::env::args().collect();
    let get = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1).cloned())
    };
    Opts {
        size: get("--size").and_then(|s| s.parse().ok()).unwrap_or(256),
        steps: get("--steps").and_then(|s| s.parse().ok()).unwrap_or(4),
        runs: get("--runs").and_then(|s| s.parse().ok()).unwrap_or(3),
        shape: get("--shape").unwrap_or_else(|| "bench".into()),
        model_dir: get("--model-dir").map(PathBuf::from),
        precision: get("--precision").unwrap_or_else(|| "auto".into()),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A random ControlNet Union in the 2.1 layout for `cfg`'s DiT: `cfg.n_layers / 2` control
/// layers, `cfg.n_refiner_layers` control refiner blocks, 33 control channels.
fn write_controlnet(cfg: &DitConfig, path: &Path) -> anyhow::Result<usize> {
    let mut gen = TorchGenerator::new(20);
    let mut t = std::collections::HashMap::new();
    let (dim, ffn, hd, ada) = (cfg.dim, cfg.ffn_hidden(), cfg.head_dim(), cfg.adaln_dim());
    let mut rand = |shape: &[usize], std: f64| -> anyhow::Result<Tensor> {
        Ok((gen.randn_tensor(shape, &Device::Cpu)? * std)?)
    };
    let mut block = |p: String, first: bool| -> anyhow::Result<()> {
        let std = 1.0 / (dim as f64).sqrt();
        for n in ["to_q", "to_k", "to_v", "to_out.0"] {
            t.insert(format!("{p}.attention.{n}.weight"), rand(&[dim, dim], std)?);
        }
        for n in ["norm_q", "norm_k"] {
            t.insert(
                format!("{p}.attention.{n}.weight"),
                Tensor::ones(hd, candle_core::DType::F32, &Device::Cpu)?,
            );
        }
        t.insert(
            format!("{p}.feed_forward.w1.weight"),
            rand(&[ffn, dim], std)?,
        );
        t.insert(
            format!("{p}.feed_forward.w3.weight"),
            rand(&[ffn, dim], std)?,
        );
        t.insert(
            format!("{p}.feed_forward.w2.weight"),
            rand(&[dim, ffn], 1.0 / (ffn as f64).sqrt())?,
        );
        for n in [
            "attention_norm1",
            "attention_norm2",
            "ffn_norm1",
            "ffn_norm2",
        ] {
            t.insert(
                format!("{p}.{n}.weight"),
                Tensor::ones(dim, candle_core::DType::F32, &Device::Cpu)?,
            );
        }
        t.insert(
            format!("{p}.adaLN_modulation.0.weight"),
            rand(&[4 * dim, ada], 0.02)?,
        );
        t.insert(
            format!("{p}.adaLN_modulation.0.bias"),
            rand(&[4 * dim], 0.02)?,
        );
        let mut projs = vec!["after_proj"];
        if first {
            projs.push("before_proj");
        }
        for n in projs {
            t.insert(format!("{p}.{n}.weight"), rand(&[dim, dim], 0.02)?);
            t.insert(format!("{p}.{n}.bias"), rand(&[dim], 0.02)?);
        }
        Ok(())
    };
    let n_ctrl = cfg.n_layers / 2;
    for k in 0..n_ctrl {
        block(format!("control_layers.{k}"), k == 0)?;
    }
    for k in 0..cfg.n_refiner_layers {
        block(format!("control_noise_refiner.{k}"), k == 0)?;
    }
    let cin = 33 * cfg.patch() * cfg.patch();
    t.insert(
        "control_all_x_embedder.2-1.weight".into(),
        rand(&[dim, cin], 1.0 / (cin as f64).sqrt())?,
    );
    t.insert(
        "control_all_x_embedder.2-1.bias".into(),
        rand(&[dim], 0.02)?,
    );
    candle_core::safetensors::save(&t, path)?;
    Ok(n_ctrl)
}

fn request(o: &Opts, control: Option<ControlSpec>) -> ValidRequest {
    ValidRequest {
        prompt: "a serene mountain lake at dawn, mist rising, pine trees on shore".into(),
        negative_prompt: None,
        width: o.size,
        height: o.size,
        steps: o.steps,
        cfg: 1.0,
        seed: 7,
        batch: 1,
        enhance: false,
        memory_mode: MemoryMode::Performance,
        enhance_exclude: Vec::new(),
        init: None,
        control: control.map(Box::new),
        loras: Vec::new(),
    }
}

/// Median denoising time per step over `runs` jobs (after a warm-up job).
fn step_ms(engine: &mut Engine, req: &ValidRequest, o: &Opts) -> anyhow::Result<f64> {
    let mut times = Vec::new();
    for i in 0..=o.runs {
        let g = engine.generate(
            req,
            &RunExtras::default(),
            &mut NullObserver,
            &CancelToken::new(),
        )?;
        if i > 0 {
            times.push(g.timings.denoise_ms as f64 / o.steps as f64);
        }
    }
    Ok(median(times))
}

fn main() -> anyhow::Result<()> {
    let o = opts();
    let dir = o.model_dir.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("target/bench-models")
            .join(&o.shape)
    });
    if !dir.join("model_index.json").is_file() {
        let shape = SyntheticShape::named(&o.shape)
            .ok_or_else(|| anyhow::anyhow!("unknown shape {}", o.shape))?;
        eprintln!(
            "writing the random-weight `{}` model to {} …",
            o.shape,
            dir.display()
        );
        let tmp = dir.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        synthetic::write(&tmp, &shape, 7)?;
        std::fs::rename(&tmp, &dir)?;
    }
    let device = Device::Cpu;
    let precision: Precision = o.precision.parse().map_err(anyhow::Error::msg)?;
    let policy = PrecisionPolicy::resolve(precision, &device);
    let model = ZImage::open(ModelDir::open(&dir)?, &device, policy)?;
    let cn_dir = dir.with_file_name(format!(
        "{}-controlnet",
        dir.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    std::fs::create_dir_all(&cn_dir)?;
    let cn = cn_dir.join("union-2.1.safetensors");
    let n_ctrl = write_controlnet(model.dit_config(), &cn)?;
    let cn_mb = std::fs::metadata(&cn)?.len() as f64 / 1e6;
    let n_layers = model.dit_config().n_layers;
    let probe = probe::for_device(&device);
    let mut engine = Engine::new(Box::new(model), "bench", probe, EngineConfig::default());
    engine.warm_up()?;
    // A control map: a gradient with a bright square (its content does not change the cost).
    let size = o.size;
    let map = image::RgbImage::from_fn(size, size, |x, y| {
        let v = if (size / 4..3 * size / 4).contains(&x) && (size / 4..3 * size / 4).contains(&y) {
            255
        } else {
            ((x + y) * 255 / (2 * size)) as u8
        };
        image::Rgb([v, v, v])
    });
    let spec = ControlSpec {
        model: "union-2.1".into(),
        path: cn.clone(),
        image: InputImage::rgb(map),
        scale: 0.75,
        preprocess: Preprocess::None,
        start: 0.0,
        end: 1.0,
    };
    let without = step_ms(&mut engine, &request(&o, None), &o)?;
    let with = step_ms(&mut engine, &request(&o, Some(spec)), &o)?;
    println!(
        "ControlNet cost per step: `{}` model ({n_layers} layers), a 2.1-layout ControlNet with {n_ctrl} control layers ({cn_mb:.0} MB file), {}², {} steps, CFG 1, {} precision, {} threads, median of {} runs",
        o.shape,
        o.size,
        o.steps,
        policy.describe(),
        rayon::current_num_threads(),
        o.runs
    );
    println!();
    println!("| run | step | vs none |");
    println!("|---|---|---|");
    println!("| no control | {without:.0} ms | — |");
    println!(
        "| control (scale 0.75, whole range) | {with:.0} ms | {:+.1} % |",
        (with / without - 1.0) * 100.0
    );
    Ok(())
}
