//! `cargo bench --bench lora`: what a LoRA costs per job, runtime updates against merged weights,
//! on a random-weight Z-Image of real proportions (the memory bench's `bench` shape, written once to
//! `target/bench-models/`). Two random LoRAs of rank `--rank` on every attention and feed-forward
//! layer of every block (what a full-coverage Z-Image LoRA updates) are written next to it
//! (`<model dir>-loras/`).
//!
//! Per mode it prints: reading and matching a file (first load), attaching it to the loaded model,
//! switching to the other LoRA (parsed file cached, as the engine keeps them), removing it, and the
//! denoising time per step with and without a LoRA (medians of `--runs` jobs after a warm-up).
//!
//! Options (after `--`): `--size 256`, `--steps 4`, `--runs 3`, `--rank 16`, `--shape bench`,
//! `--model-dir DIR`, `--precision auto`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use zturbo::engine::{CancelToken, Engine, EngineConfig, NullObserver, RunExtras};
use zturbo::families::lora::{LoraFile, LoraSet};
use zturbo::families::z_image::synthetic::{self, SyntheticShape};
use zturbo::families::z_image::ZImage;
use zturbo::families::{ModelDir, Precision, PrecisionPolicy};
use zturbo::memory::planner::MemoryMode;
use zturbo::memory::probe;
use zturbo::nn::torch_rng::TorchGenerator;
use zturbo::ops::linear::LoraMode;
use zturbo::request::{LoraRef, ValidRequest};

struct Opts {
    size: u32,
    steps: u32,
    runs: usize,
    rank: usize,
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
        rank: get("--rank").and_then(|s| s.parse().ok()).unwrap_or(16),
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

/// A kohya-named LoRA of `rank` on every attention and feed-forward layer of the DiT's blocks.
fn write_lora(
    m: &ZImage,
    path: &Path,
    rank: usize,
    seed: u64,
) -> anyhow::Result<Vec<(usize, usize)>> {
    let cfg = m.dit_config();
    let mut gen = TorchGenerator::new(seed);
    let mut tensors = std::collections::HashMap::new();
    let mut layers = Vec::new();
    let groups = [
        ("noise_refiner", cfg.n_refiner_layers),
        ("context_refiner", cfg.n_refiner_layers),
        ("layers", cfg.n_layers),
    ];
    let (dim, ffn) = (cfg.dim, cfg.ffn_hidden());
    for (g, n) in groups {
        for i in 0..n {
            for (name, out, inp) in [
                ("attention.to_q", dim, dim),
                ("attention.to_k", dim, dim),
                ("attention.to_v", dim, dim),
                ("attention.to_out.0", dim, dim),
                ("feed_forward.w1", ffn, dim),
                ("feed_forward.w2", dim, ffn),
                ("feed_forward.w3", ffn, dim),
            ] {
                let key = format!("lora_unet_{g}_{i}_{}", name.replace('.', "_"));
                let down = (gen.randn_tensor(&[rank, inp], &Device::Cpu)? * 0.01)?;
                let up = (gen.randn_tensor(&[out, rank], &Device::Cpu)? * 0.01)?;
                tensors.insert(format!("{key}.lora_down.weight"), down);
                tensors.insert(format!("{key}.lora_up.weight"), up);
                tensors.insert(
                    format!("{key}.alpha"),
                    Tensor::new(rank as f32, &Device::Cpu)?,
                );
                layers.push((out, inp));
            }
        }
    }
    candle_core::safetensors::save(&tensors, path)?;
    Ok(layers)
}

fn request(o: &Opts, loras: &[PathBuf]) -> ValidRequest {
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
        control: None,
        loras: loras
            .iter()
            .map(|p| LoraRef {
                name: "bench".into(),
                weight: 0.8,
                path: p.clone(),
            })
            .collect(),
    }
}

/// Median denoising time per step over `runs` jobs (after a warm-up job).
fn step_ms(engine: &mut Engine, o: &Opts, loras: &[PathBuf]) -> anyhow::Result<f64> {
    let req = request(o, loras);
    let mut times = Vec::new();
    for i in 0..=o.runs {
        let g = engine.generate(
            &req,
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

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
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
    let open = || ZImage::open(ModelDir::open(&dir).expect("model folder"), &device, policy);
    // The two LoRAs go next to the model folder (`<dir>-loras`).
    let lora_dir = dir.with_file_name(format!(
        "{}-loras",
        dir.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    std::fs::create_dir_all(&lora_dir)?;
    let (a, b) = (
        lora_dir.join("a.safetensors"),
        lora_dir.join("b.safetensors"),
    );
    let probe_model = open()?;
    let layers = write_lora(&probe_model, &a, o.rank, 1)?;
    let w_bytes = policy.denoiser.size_in_bytes() as f64;
    let act_bytes =
        zturbo::ops::linear::activation_dtype(policy.denoiser, &device).size_in_bytes() as f64;
    let runtime_mb: f64 = layers
        .iter()
        .map(|(o_, i)| (o.rank * (o_ + i)) as f64 * act_bytes)
        .sum::<f64>()
        / 1e6;
    let merged_mb: f64 = layers
        .iter()
        .map(|(o_, i)| (o_ * i) as f64 * w_bytes)
        .sum::<f64>()
        / 1e6;
    write_lora(&probe_model, &b, o.rank, 2)?;
    let file_mb = std::fs::metadata(&a)?.len() as f64 / 1e6;
    drop(probe_model);

    println!(
        "LoRA cost per job: `{}` model, {} LoRA layers of rank {} ({file_mb:.1} MB file), {}², {} steps, CFG 1, {} precision, {} threads, median of {} runs",
        o.shape,
        layers.len(),
        o.rank,
        o.size,
        o.steps,
        policy.describe(),
        rayon::current_num_threads(),
        o.runs
    );
    println!();
    println!("| mode | read + match file | attach (first) | switch A→B | remove | step without | step with | per-step overhead | memory held |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for mode in [LoraMode::Runtime, LoraMode::Merged] {
        let mut m = open()?;
        m.set_lora_mode(mode)?;
        let probe = probe::for_device(&device);
        let mut engine = Engine::new(Box::new(m), "bench", probe, EngineConfig::default());
        engine.warm_up()?;
        let base = step_ms(&mut engine, &o, &[])?;
        // First load: read and match the file, then attach it to the loaded DiT.
        let t = Instant::now();
        let fa = Arc::new(LoraFile::read(&a, engine.family_mut().lora_layers())?);
        let read = ms(t);
        let fb = Arc::new(LoraFile::read(&b, engine.family_mut().lora_layers())?);
        let t = Instant::now();
        engine
            .family_mut()
            .set_loras(Arc::new(LoraSet::new(&[(fa.clone(), 0.8)])))?;
        let attach = ms(t);
        let t = Instant::now();
        engine
            .family_mut()
            .set_loras(Arc::new(LoraSet::new(&[(fb, 0.8)])))?;
        let switch = ms(t);
        let t = Instant::now();
        engine
            .family_mut()
            .set_loras(Arc::new(LoraSet::default()))?;
        let remove = ms(t);
        let with = step_ms(&mut engine, &o, std::slice::from_ref(&a))?;
        let (name, held) = match mode {
            LoraMode::Runtime => ("runtime", runtime_mb),
            LoraMode::Merged => ("merged", merged_mb),
        };
        println!(
            "| {name} | {read:.0} ms | {attach:.0} ms | {switch:.0} ms | {remove:.0} ms | {base:.0} ms | {with:.0} ms | {:+.1} % | {held:.1} MB |",
            (with / base - 1.0) * 100.0
        );
    }
    Ok(())
}
