//! zturbo's side of the side-by-side comparison with diffusers (`benches/compare/run.sh` drives it;
//! `benches/compare/README.md` says how). Loads one model folder through the library API
//! (`families::open` + `Engine::generate`, exactly what `zturbo generate` runs), then waits on stdin:
//! every line `run` (or `run <out-dir>`, which also writes the final latents and the RGB8 image there)
//! runs one generation and prints one JSON line of per-stage timings. The driver alternates these
//! calls with the diffusers process, so neither side runs while the other is timed.
//!
//! Threads: candle's CPU backend reads `RAYON_NUM_THREADS` (and `CANDLE_NUM_THREADS` for its
//! barrier pool); the driver sets both, and the `ready` line reports what candle resolved.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use candle_core::{Device, Tensor};
use clap::Parser;
use serde_json::json;

use zturbo::engine::{
    CancelToken, Engine, EngineConfig, Notice, Observer, Phase, RunExtras, StepEvent,
};
use zturbo::families::{self, ModelDir, Precision, PrecisionPolicy};
use zturbo::memory::planner::MemoryMode;
use zturbo::request::{GenerationRequest, Limits};

#[derive(Parser)]
struct Args {
    /// A diffusers-layout Z-Image folder.
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    width: u32,
    #[arg(long)]
    height: u32,
    #[arg(long)]
    steps: u32,
    /// ComfyUI convention: 1.0 = guidance off (= diffusers guidance_scale 0).
    #[arg(long, default_value_t = 1.0)]
    cfg: f32,
    #[arg(long, default_value = "a serene mountain lake at dawn")]
    prompt: String,
    #[arg(long, default_value = "blurry")]
    negative_prompt: String,
    /// Safetensors file with the initial noise `latents` `[1, C, H/8, W/8]` (shared with diffusers).
    #[arg(long)]
    init_latents: PathBuf,
    /// zturbo's precision (`auto`: f32, or bf16 denoiser matrices with f32 activations on a CPU
    /// with native bf16 products in an `mkl` build).
    #[arg(long, default_value = "f32")]
    precision: Precision,
    /// Accepted and ignored: `cargo bench` passes `--bench` to harness-less targets.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Wall-clock marks of one generation, taken as the engine reports its phases and steps.
struct Marks {
    start: Instant,
    encode: Option<Instant>,
    denoise: Option<Instant>,
    steps: Vec<Instant>,
    decode: Option<Instant>,
    notices: Vec<Notice>,
}

impl Observer for Marks {
    fn phase(&mut self, phase: Phase) {
        let now = Some(Instant::now());
        match phase {
            Phase::Encode => self.encode = now,
            Phase::Denoise => self.denoise = now,
            Phase::Decode => self.decode = now,
        }
    }
    fn step(&mut self, _event: &StepEvent) {
        self.steps.push(Instant::now());
    }
    fn notice(&mut self, n: &Notice) {
        self.notices.push(n.clone());
    }
}

fn secs(a: Instant, b: Instant) -> f64 {
    b.duration_since(a).as_secs_f64()
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = Device::Cpu;
    let t_load = Instant::now();
    let policy = PrecisionPolicy::resolve(args.precision, &device);
    let dir = ModelDir::open(&args.model)?;
    let family = families::open(dir, &device, policy)?;
    // What the family resolved (an SD model runs its UNet in f32 under `int8`, and says so).
    let resolved = family.components().policy().describe();
    let probe = zturbo::memory::probe::for_device(&device);
    let mut engine = Engine::new(family, "compare", probe, EngineConfig::default());
    engine.warm_up()?;
    let limits = Limits::new(engine.profile(), 1, MemoryMode::Performance);
    let req = GenerationRequest {
        prompt: args.prompt.clone(),
        negative_prompt: Some(args.negative_prompt.clone()),
        width: Some(args.width),
        height: Some(args.height),
        steps: Some(args.steps),
        cfg: Some(args.cfg),
        seed: Some(0),
        batch: Some(1),
        // Prompts reach the model verbatim, as diffusers receives them.
        enhance: Some(false),
        memory_mode: Some(MemoryMode::Performance),
        ..Default::default()
    }
    .validate(&limits)
    .map_err(|e| anyhow!("{}: {}", e.field, e.message))?;
    let init = load_latents(&args.init_latents)?;
    let extras = RunExtras {
        init_latents: Some(init),
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(
        out,
        "{}",
        json!({
            "ready": true,
            "threads": candle_core::utils::get_num_threads(),
            "load_s": t_load.elapsed().as_secs_f64(),
            "candle": "0.11",
            "precision": resolved,
            "cpu_bf16_products": zturbo::ops::linear::bf16_ready(),
        })
    )?;
    out.flush()?;

    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let mut words = line.split_whitespace();
        match words.next() {
            Some("run") => {}
            Some("quit") | None => break,
            Some(other) => return Err(anyhow!("unknown command `{other}`")),
        }
        let save_dir = words.next().map(PathBuf::from);
        let mut marks = Marks {
            start: Instant::now(),
            encode: None,
            denoise: None,
            steps: Vec::new(),
            decode: None,
            notices: Vec::new(),
        };
        let gen = engine
            .generate(&req, &extras, &mut marks, &CancelToken::new())
            .map_err(|e| anyhow!("generation failed: {e}"))?;
        let end = Instant::now();
        let (enc, den, dec) = match (marks.encode, marks.denoise, marks.decode) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => return Err(anyhow!("the engine did not report every phase")),
        };
        let mut prev = den;
        let step_s: Vec<f64> = marks
            .steps
            .iter()
            .map(|&t| {
                let d = secs(prev, t);
                prev = t;
                d
            })
            .collect();
        if let Some(dir) = &save_dir {
            save_outputs(dir, &gen.latents, &gen.images[0])?;
        }
        writeln!(
            out,
            "{}",
            json!({
                "text_encode_s": secs(enc, den),
                "steps_s": step_s,
                "denoise_s": secs(den, dec),
                "vae_decode_s": secs(dec, end),
                "total_s": secs(marks.start, end),
                "engine_timings_ms": gen.timings,
                "plan": { "mode": gen.plan.mode, "vae_tiled": gen.plan.vae_tiling.is_some() },
                "notices": marks.notices,
                "peak_memory_bytes": gen.peak_memory_bytes,
            })
        )?;
        out.flush()?;
    }
    Ok(())
}

fn load_latents(p: &Path) -> Result<Tensor> {
    let tensors = candle_core::safetensors::load(p, &Device::Cpu)
        .with_context(|| format!("{}: not a readable safetensors file", p.display()))?;
    tensors
        .get("latents")
        .cloned()
        .ok_or_else(|| anyhow!("{}: no tensor named `latents`", p.display()))
}

/// `latents.safetensors` (tensor `latents`) and `image.rgb` (raw RGB8, row-major).
fn save_outputs(
    dir: &Path,
    latents: &Tensor,
    image: &zturbo::engine::GeneratedImage,
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let map = std::collections::HashMap::from([("latents".to_string(), latents.clone())]);
    candle_core::safetensors::save(&map, dir.join("latents.safetensors"))?;
    std::fs::write(dir.join("image.rgb"), &image.rgb)?;
    Ok(())
}
