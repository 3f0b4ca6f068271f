//! `cargo bench --bench preview`: what the live preview costs per denoising step, against the
//! step itself, on the memory bench's random-weight Z-Image of real proportions (`--shape bench`,
//! written once to `target/bench-models/`) at 512². The target: at most 3 % of a step.
//!
//! Per step, a preview is (a) the denoised estimate x̂₀ = x − σ·d of the first image, a tensor
//! operation inside the step loop, (b) its copy to the host, also on the engine thread, and (c)
//! the latent → RGB projection and the PNG data URL, on the worker's preview thread. Both are timed on their own, on the real step's latents, next to the step
//! time of runs without previews, then with them (so the total can be compared too — noisy on a
//! loaded machine; the per-part times are the figure to quote).
//!
//! Options (after `--`): `--shape bench|real`, `--size 512`, `--steps 4`, `--runs 3`,
//! `--cfg 1.8`, `--device cpu|cuda`, `--precision auto`, `--model-dir DIR`.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Tensor};
use zturbo::engine::preview;
use zturbo::engine::{CancelToken, Engine, EngineConfig, Observer, RunExtras, StepEvent};
use zturbo::families::z_image::synthetic::{self, SyntheticShape};
use zturbo::families::{self, LatentPreview, ModelDir, Precision, PrecisionPolicy};
use zturbo::memory::planner::MemoryMode;
use zturbo::memory::probe;
use zturbo::request::ValidRequest;
use zturbo::settings::DeviceSpec;

struct Opts {
    shape: String,
    size: u32,
    steps: u32,
    runs: usize,
    cfg: f32,
    device: String,
    precision: String,
    model_dir: Option<PathBuf>,
}

fn opts() -> Opts {
    let args: Vec<String> = std::env::args().collect();
    let get = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1).cloned())
    };
    Opts {
        shape: get("--shape").unwrap_or_else(|| "bench".into()),
        size: get("--size").and_then(|s| s.parse().ok()).unwrap_or(512),
        steps: get("--steps").and_then(|s| s.parse().ok()).unwrap_or(4),
        runs: get("--runs").and_then(|s| s.parse().ok()).unwrap_or(3),
        cfg: get("--cfg").and_then(|s| s.parse().ok()).unwrap_or(1.8),
        device: get("--device").unwrap_or_else(|| "cpu".into()),
        precision: get("--precision").unwrap_or_else(|| "auto".into()),
        model_dir: get("--model-dir").map(PathBuf::from),
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

/// Step times (from the engine's step events) and, with previews on, the worker's share of each
/// preview: projection + PNG + base64, as `JobObserver::preview` does it.
struct Timing {
    preview: Option<LatentPreview>,
    last_ms: u64,
    step_ms: Vec<f64>,
    copy_ms: Vec<f64>,
    render_ms: Vec<f64>,
    bytes: Vec<usize>,
    /// One step's x̂₀ inputs kept to time the estimate on its own afterwards.
    sample: Option<Tensor>,
}

impl Observer for Timing {
    fn step(&mut self, e: &StepEvent) {
        self.step_ms.push((e.elapsed_ms - self.last_ms) as f64);
        self.last_ms = e.elapsed_ms;
    }

    fn wants_preview(&self) -> bool {
        self.preview.is_some()
    }

    fn preview(&mut self, _step: usize, _total: usize, x0: &Tensor) {
        let Some(p) = &self.preview else { return };
        // On the engine thread: the copy to the host (as JobObserver::preview).
        let t = Instant::now();
        let (dims, data) = preview::to_host(x0).expect("preview");
        self.copy_ms.push(t.elapsed().as_secs_f64() * 1e3);
        // On the preview thread: projection, PNG, base64.
        let t = Instant::now();
        let url = preview::project_raw(&data, dims, p)
            .and_then(|img| img.data_url())
            .expect("preview");
        self.render_ms.push(t.elapsed().as_secs_f64() * 1e3);
        self.bytes.push(url.len());
        self.sample.get_or_insert_with(|| x0.clone());
    }
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
    let device = o
        .device
        .parse::<DeviceSpec>()
        .map_err(anyhow::Error::msg)?
        .open()
        .map_err(anyhow::Error::msg)?;
    let precision: Precision = o.precision.parse().map_err(anyhow::Error::msg)?;
    let policy = PrecisionPolicy::resolve(precision, &device);
    let family = families::open(ModelDir::open(&dir)?, &device, policy)?;
    let probe = probe::for_device(&device);
    let mut engine = Engine::new(family, "bench", probe, EngineConfig::default());
    let latent_preview = engine.profile().preview;
    let req = ValidRequest {
        prompt: "a serene mountain lake at dawn, mist rising, pine trees on shore".into(),
        negative_prompt: None,
        width: o.size,
        height: o.size,
        steps: o.steps,
        cfg: o.cfg,
        seed: 42,
        batch: 1,
        enhance: true,
        memory_mode: MemoryMode::Performance,
        init: None,
        control: None,
        loras: Vec::new(),
        enhance_exclude: Vec::new(),
    };
    let mut run = |preview: Option<LatentPreview>| -> anyhow::Result<Timing> {
        let mut t = Timing {
            preview,
            last_ms: 0,
            step_ms: Vec::new(),
            copy_ms: Vec::new(),
            render_ms: Vec::new(),
            bytes: Vec::new(),
            sample: None,
        };
        engine.generate(&req, &RunExtras::default(), &mut t, &CancelToken::new())?;
        Ok(t)
    };
    eprintln!(
        "{} ({}), {}², {} steps, CFG {}: warming up …",
        dir.display(),
        o.device,
        o.size,
        o.steps,
        o.cfg
    );
    run(None)?;
    let (mut off, mut on, mut copy, mut render, mut bytes) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut sample = None;
    // Alternate, so drift on a busy machine hits both sides alike.
    for _ in 0..o.runs {
        off.extend(run(None)?.step_ms);
        let t = run(Some(latent_preview))?;
        on.extend(t.step_ms);
        copy.extend(t.copy_ms);
        render.extend(t.render_ms);
        bytes.extend(t.bytes);
        sample = sample.or(t.sample);
    }
    // x̂₀ = x − σ·d on tensors of the step's shape (batch of one, f32), as the loop computes it.
    let x0 = sample.ok_or_else(|| anyhow::anyhow!("no preview was made"))?;
    let x = x0.unsqueeze(0)?;
    let d = x.to_dtype(DType::F32)?;
    let mut estimate = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let e = (x.narrow(0, 0, 1)? - (d.narrow(0, 0, 1)? * 0.5)?)?.squeeze(0)?;
        device.synchronize()?;
        drop(e);
        estimate.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let step = median(off.clone());
    let (c, r, e) = (median(copy), median(render), median(estimate));
    let dims = x0.dims().to_vec();
    println!();
    println!(
        "| {}² · {} steps · {} | median |",
        o.size, o.steps, o.device
    );
    println!("|---|---:|");
    println!("| step without previews | {step:.1} ms |");
    println!(
        "| step with previews (whole step, noisy) | {:.1} ms |",
        median(on)
    );
    println!("| x̂₀ estimate (engine thread, in the step loop) | {e:.3} ms |");
    println!("| copy to the host (engine thread) | {c:.3} ms |");
    println!("| projection + PNG + base64 (preview thread) | {r:.3} ms |");
    println!(
        "| cost on the engine thread / step | {:.3} % ({:.3} ms of {step:.1} ms) |",
        (e + c) / step * 100.0,
        e + c
    );
    println!(
        "| all preview work / step (if it ran on the step's thread) | {:.3} % ({:.3} ms) |",
        (e + c + r) / step * 100.0,
        e + c + r
    );
    println!(
        "| preview size | {}×{} px, {:.1} KiB data URL |",
        dims[2],
        dims[1],
        median(bytes.iter().map(|&b| b as f64).collect()) / 1024.0
    );
    Ok(())
}
