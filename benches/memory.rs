//! `cargo bench --bench memory`: peak memory and time of each memory mode, side by side, on a
//! random-weight Z-Image of real proportions (written once to `target/bench-models/`, never
//! committed). Each mode runs in its own process, so the peak RSS (VmHWM: heap, touched mapped
//! weights, code) is that mode's alone; on a GPU the same harness reports peak device memory.
//!
//! Options (after `--`): `--shape bench|real`, `--sizes 256,512`, `--runs 5`, `--steps 8`,
//! `--cfg 1.8`, `--modes performance,balanced,low`, `--device cpu|cuda`, `--precision auto`,
//! `--weights f32,q8_0,q4_k` (the model as written, or its transformer and text encoder
//! quantized by `zturbo quantize`'s code into GGUF files next to it; with more than one, the table
//! gains a weights column and a `quant:` line compares each to the first in performance mode).

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use zturbo::engine::{CancelToken, Engine, EngineConfig, NullObserver, RunExtras};
use zturbo::families::weights::quantize::{self, Target};
use zturbo::families::weights::{Role, Weights};
use zturbo::families::z_image::synthetic::{self, SyntheticShape};
use zturbo::families::{self, ComponentFiles, ModelDir, Precision, PrecisionPolicy};
use zturbo::memory::planner::MemoryMode;
use zturbo::memory::probe::{self, peak_rss_bytes};
use zturbo::request::ValidRequest;
use zturbo::settings::DeviceSpec;

struct Opts {
    shape: String,
    sizes: Vec<u32>,
    runs: usize,
    steps: u32,
    cfg: f32,
    modes: Vec<MemoryMode>,
    device: String,
    precision: String,
    model_dir: Option<PathBuf>,
    weights: Vec<String>,
    /// `--budget 12GiB` (`none`: the device's free memory).
    budget: Option<u64>,
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
        sizes: get("--sizes")
            .unwrap_or_else(|| "256,512".into())
            .split(',')
            .filter_map(|s| s.parse().ok())
            .collect(),
        runs: get("--runs").and_then(|s| s.parse().ok()).unwrap_or(5),
        steps: get("--steps").and_then(|s| s.parse().ok()).unwrap_or(8),
        cfg: get("--cfg").and_then(|s| s.parse().ok()).unwrap_or(1.8),
        modes: get("--modes")
            .unwrap_or_else(|| "performance,balanced,low".into())
            .split(',')
            .filter_map(|s| s.parse().ok())
            .collect(),
        device: get("--device").unwrap_or_else(|| "cpu".into()),
        precision: get("--precision").unwrap_or_else(|| "auto".into()),
        model_dir: get("--model-dir").map(PathBuf::from),
        budget: get("--budget")
            .filter(|b| b != "none")
            .and_then(|b| zturbo::memory::parse_bytes(&b).ok()),
        weights: get("--weights")
            .unwrap_or_else(|| "f32".into())
            .split(',')
            .map(str::to_string)
            .collect(),
    }
}

/// The transformer and text encoder of `dir` quantized to `weights` (`f32`/`bf16`/`as-is`: the
/// folder's own), written once next to the model.
fn component_files(dir: &std::path::Path, weights: &str) -> anyhow::Result<ComponentFiles> {
    if matches!(weights, "f32" | "bf16" | "as-is") {
        return Ok(ComponentFiles::default());
    }
    let model = ModelDir::open(dir)?;
    let mut files = ComponentFiles::default();
    if weights == "fp8" {
        for (component, role) in [
            ("transformer", Role::Transformer),
            ("text_encoder", Role::TextEncoder),
        ] {
            let out = dir.with_file_name(format!(
                "{}-fp8-{component}.safetensors",
                dir.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ));
            if !out.is_file() {
                eprintln!("writing the {component} as scaled fp8: {} …", out.display());
                let w: Weights = model.open_weights_as(component, role)?;
                quantize::write_fp8(&w, role, &out, &mut |_, _| {})?;
            }
            match role {
                Role::Transformer => files.transformer = Some(out),
                _ => files.text_encoder = Some(out),
            }
        }
        return Ok(files);
    }
    let target: Target = weights.parse().map_err(anyhow::Error::msg)?;
    for (component, role) in [
        ("transformer", Role::Transformer),
        ("text_encoder", Role::TextEncoder),
    ] {
        let out = dir.with_file_name(format!(
            "{}-{weights}-{component}.gguf",
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        if !out.is_file() {
            eprintln!(
                "quantizing the {component} to {weights}: {} …",
                out.display()
            );
            let w: Weights = model.open_weights_as(component, role)?;
            let te_cfg = match role {
                Role::TextEncoder => Some(model.read_json("text_encoder/config.json")?),
                _ => None,
            };
            let planned = quantize::plan(&w, role, target)?;
            let meta = quantize::metadata(role, target, te_cfg.as_ref(), "bench");
            quantize::write(&w, &planned, &meta, &out, &mut |_, _| {})?;
        }
        match role {
            Role::Transformer => files.transformer = Some(out),
            _ => files.text_encoder = Some(out),
        }
    }
    Ok(files)
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ChildResult {
    times_ms: Vec<u64>,
    /// Per timed run: text encode, denoise and decode (ms), as the engine times them.
    phases_ms: Vec<[u64; 3]>,
    peak_bytes: u64,
    device_peak_bytes: u64,
    mode: String,
    /// The guard's notices of the last run (`cfg_adjusted`, `black_image` …): none expected.
    #[serde(default)]
    notices: Vec<String>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One mode at one size with one set of weights, in this process: a warm-up job, then `runs`
/// timed jobs.
fn child(
    o: &Opts,
    dir: &PathBuf,
    size: u32,
    mode: MemoryMode,
    weights: &str,
) -> anyhow::Result<ChildResult> {
    let device = o
        .device
        .parse::<DeviceSpec>()
        .map_err(anyhow::Error::msg)?
        .open()
        .map_err(anyhow::Error::msg)?;
    let precision: Precision = o.precision.parse().map_err(anyhow::Error::msg)?;
    let policy = PrecisionPolicy::resolve(precision, &device);
    let files = component_files(dir, weights)?;
    let family = families::open_with(ModelDir::open(dir)?, &files, &device, policy)?;
    let probe = probe::for_device(&device);
    let mut engine = Engine::new(
        family,
        "bench",
        probe.clone(),
        EngineConfig {
            memory_budget: o.budget,
            ..EngineConfig::default()
        },
    );
    let req = ValidRequest {
        prompt: "a serene mountain lake at dawn, mist rising, pine trees on shore".into(),
        negative_prompt: None,
        width: size,
        height: size,
        steps: o.steps,
        cfg: o.cfg,
        seed: 42,
        batch: 1,
        enhance: true,
        memory_mode: mode,
        init: None,
        control: None,
        loras: Vec::new(),
        enhance_exclude: Vec::new(),
    };
    let mut times = Vec::new();
    let mut phases = Vec::new();
    let mut device_peak = 0;
    let mut resolved = String::new();
    let mut notices = Vec::new();
    for i in 0..=o.runs {
        let t = Instant::now();
        let g = engine.generate(
            &req,
            &RunExtras::default(),
            &mut NullObserver,
            &CancelToken::new(),
        )?;
        if i > 0 {
            times.push(t.elapsed().as_millis() as u64);
            let tm = &g.timings;
            phases.push([tm.encode_ms, tm.denoise_ms, tm.decode_ms]);
        }
        device_peak = device_peak.max(g.peak_memory_bytes);
        resolved = g.plan.mode.to_string();
        notices = g.notices.iter().map(|n| n.kind.to_string()).collect();
    }
    Ok(ChildResult {
        times_ms: times,
        phases_ms: phases,
        peak_bytes: if device.is_cpu() {
            peak_rss_bytes().unwrap_or(0)
        } else {
            device_peak
        },
        device_peak_bytes: device_peak,
        mode: resolved,
        notices,
    })
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

fn main() -> anyhow::Result<()> {
    let o = opts();
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes `--bench`; a child gets `--child <size> <mode>`.
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let size: u32 = args[i + 1].parse()?;
        let mode: MemoryMode = args[i + 2].parse()?;
        let weights = args[i + 3].clone();
        let dir = o
            .model_dir
            .clone()
            .ok_or_else(|| anyhow::anyhow!("--model-dir missing"))?;
        let r = child(&o, &dir, size, mode, &weights)?;
        println!("RESULT {}", serde_json::to_string(&r)?);
        return Ok(());
    }

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
        let t = Instant::now();
        let tmp = dir.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        synthetic::write(&tmp, &shape, 7)?;
        std::fs::rename(&tmp, &dir)?;
        eprintln!("written in {:.1} s", t.elapsed().as_secs_f64());
    }
    let weights: u64 = ["transformer", "text_encoder", "vae"]
        .iter()
        .filter_map(|c| std::fs::read_dir(dir.join(c)).ok())
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .filter_map(|e| e.metadata().ok().map(|m| m.len()))
        .sum();
    let exe = std::env::current_exe()?;
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let total_mem = probe::host_memory().map(|m| m.total_bytes).unwrap_or(0);
    println!(
        "memory bench: model `{}` ({:.2} GB of weights on disk), {} steps, cfg {}, {} timed runs per mode after a warm-up, device {}, precision {}, budget {}",
        o.shape,
        weights as f64 / 1e9,
        o.steps,
        o.cfg,
        o.runs,
        o.device,
        o.precision,
        o.budget.map_or("none".into(), gib)
    );
    println!(
        "host: {cpu}, {} threads, {} RAM",
        candle_core::utils::get_num_threads(),
        gib(total_mem)
    );
    println!();
    // Quantized files are written once, here, before any child needs them.
    for w in &o.weights {
        component_files(&dir, w)?;
    }
    let many = o.weights.len() > 1;
    let weights_col = |w: &str| {
        if many {
            format!(" {w} |")
        } else {
            String::new()
        }
    };
    println!(
        "| size |{} mode | peak memory | median time | min–max time | encode / denoise / decode | vs performance (peak / time) |",
        if many { " weights |" } else { "" }
    );
    println!(
        "|---|{}---|---|---|---|---|---|",
        if many { "---|" } else { "" }
    );
    let mut summary = None;
    // Performance-mode (peak, time) per weights, at the last size that has them.
    let mut perf: Vec<(String, u64, f64)> = Vec::new();
    for &size in &o.sizes {
        perf.clear();
        for (wi, w) in o.weights.iter().enumerate() {
            let mut base: Option<(u64, f64)> = None;
            let mut rows = Vec::new();
            for &mode in &o.modes {
                let out = Command::new(&exe)
                    .args([
                        "--child",
                        &size.to_string(),
                        mode.as_str(),
                        w,
                        "--model-dir",
                        dir.to_str().unwrap_or("."),
                    ])
                    .args([
                        "--steps",
                        &o.steps.to_string(),
                        "--runs",
                        &o.runs.to_string(),
                        "--cfg",
                        &o.cfg.to_string(),
                    ])
                    .args(["--device", &o.device, "--precision", &o.precision])
                    .args([
                        "--budget",
                        &o.budget.map_or("none".into(), |b| b.to_string()),
                    ])
                    .output()?;
                let stdout = String::from_utf8_lossy(&out.stdout);
                let Some(line) = stdout.lines().find_map(|l| l.strip_prefix("RESULT ")) else {
                    anyhow::bail!(
                        "{mode} at {size}² with {w} weights failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                };
                let r: ChildResult = serde_json::from_str(line)?;
                let mut t: Vec<f64> = r.times_ms.iter().map(|&v| v as f64 / 1000.0).collect();
                let (lo, hi) = t
                    .iter()
                    .fold((f64::MAX, 0f64), |(a, b), &v| (a.min(v), b.max(v)));
                let med = median(&mut t);
                let phase = |k: usize| {
                    let mut v: Vec<f64> =
                        r.phases_ms.iter().map(|p| p[k] as f64 / 1000.0).collect();
                    median(&mut v)
                };
                let phases = format!("{:.2} / {:.2} / {:.2} s", phase(0), phase(1), phase(2));
                if mode == MemoryMode::Performance {
                    base = Some((r.peak_bytes, med));
                    perf.push((w.clone(), r.peak_bytes, med));
                }
                let rel = base
                    .map(|(p, tm)| {
                        format!(
                            "{:.1} % / {:.2}×",
                            100.0 * r.peak_bytes as f64 / p as f64,
                            med / tm
                        )
                    })
                    .unwrap_or_else(|| "–".into());
                println!(
                    "| {size}² |{} {} | {} | {med:.2} s | {lo:.2}–{hi:.2} s | {phases} | {rel} |",
                    weights_col(w),
                    r.mode,
                    gib(r.peak_bytes)
                );
                if !r.notices.is_empty() {
                    println!("notices ({size}², {w}, {mode}): {}", r.notices.join(", "));
                }
                rows.push((mode, r.peak_bytes, med));
            }
            if wi == 0 {
                if let (Some((bp, bt)), Some((_, lp, lt))) =
                    (base, rows.iter().find(|r| r.0 == MemoryMode::Low))
                {
                    summary = Some((*lp as f64 / bp as f64, lt / bt, bp, *lp, bt, *lt, size));
                }
            }
        }
    }
    if many {
        if let Some((first, fp, ft)) = perf.first().cloned() {
            let parts: Vec<String> = perf[1..]
                .iter()
                .flat_map(|(w, p, t)| {
                    [
                        format!("{w}_peak_ratio={:.3}", *p as f64 / fp as f64),
                        format!("{w}_time_ratio={:.3}", t / ft),
                    ]
                })
                .collect();
            let mut peaks: Vec<&String> = parts.iter().filter(|p| p.contains("_peak_")).collect();
            peaks.extend(parts.iter().filter(|p| p.contains("_time_")));
            println!();
            println!(
                "performance mode, each weights against {first} (peak {}, {ft:.2} s):",
                gib(fp)
            );
            println!(
                "quant: {}",
                peaks
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
    }
    if let Some((pr, tr, bp, lp, bt, lt, size)) = summary {
        println!();
        println!("| device | memory | default peak | optimised peak | reduction | time default → optimised |");
        println!("|---|---|---|---|---|---|");
        println!(
            "| {} ({size}²) | {} | {} | {} | {:.1} % | {bt:.2} s → {lt:.2} s |",
            o.device,
            gib(total_mem),
            gib(bp),
            gib(lp),
            100.0 * (1.0 - pr)
        );
        println!();
        println!("summary: low_peak_ratio={pr:.3} low_time_ratio={tr:.3}");
    }
    Ok(())
}
