//! `zturbo soak`: hundreds of random jobs through a real `zturbo serve` (HTTP, queue, journal,
//! worker) with faults injected at a set rate, then an audit: every job accounted for, every image
//! on disk, readable and not blank, every failure explained.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use zturbo::nn::rng::NoiseRng;

#[derive(clap::Args)]
pub struct SoakArgs {
    /// Jobs to run.
    #[arg(long, default_value_t = 500)]
    jobs: usize,
    /// Probability of an injected fault at every denoiser attempt and decode (see ZTURBO_FAULT).
    #[arg(long, default_value_t = 0.05)]
    fault_rate: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Model to serve.
    #[arg(long, default_value = "demo")]
    model: String,
    /// Image sides to draw from (multiples of the model's size multiple).
    #[arg(long, value_delimiter = ',', default_value = "128,192,256,320")]
    sizes: Vec<u32>,
    /// Where outputs and the journal go (a fresh temporary folder by default).
    #[arg(long)]
    outputs: Option<PathBuf>,
}

const WORDS: &[&str] = &[
    "a",
    "serene",
    "mountain",
    "lake",
    "at",
    "dawn",
    "cyberpunk",
    "street",
    "neon",
    "signs",
    "rain",
    "portrait",
    "of",
    "an",
    "old",
    "fisherman",
    "red",
    "fox",
    "in",
    "snow",
    "forest",
    "cabin",
    "night",
    "lighthouse",
    "storm",
    "bowl",
    "ramen",
    "vintage",
    "car",
    "desert",
    "castle",
    "dragon",
    "spaceship",
    "golden",
    "hour",
    "misty",
    "harbor",
    "cat",
    "window",
    "sunset",
];

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(args: &SoakArgs, outputs: &Path) -> Result<Server> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "serve",
        "--model",
        &args.model,
        "--port",
        "0",
        "--queue-size",
        "64",
    ])
    .arg("--outputs")
    .arg(outputs)
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    if args.fault_rate > 0.0 {
        cmd.env(
            "ZTURBO_FAULT",
            format!("random@rate={},seed={}", args.fault_rate, args.seed),
        );
    } else {
        cmd.env_remove("ZTURBO_FAULT");
    }
    let mut child = cmd.spawn().context("starting zturbo serve")?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .ok_or_else(|| anyhow!("server did not start: {line:?}"))?
        .to_string();
    Ok(Server { child, base })
}

fn job_body(rng: &mut NoiseRng, sizes: &[u32]) -> Value {
    let n_words = 3 + (rng.next_u64() % 12) as usize;
    let prompt: Vec<&str> = (0..n_words)
        .map(|_| WORDS[(rng.next_u64() % WORDS.len() as u64) as usize])
        .collect();
    let pick = |r: &mut NoiseRng, v: &[u32]| v[(r.next_u64() % v.len() as u64) as usize];
    let cfg = 1.0 + (rng.next_u64() % 26) as f64 / 10.0; // 1.0 … 3.5
    json!({
        "prompt": prompt.join(" "),
        "width": pick(rng, sizes),
        "height": pick(rng, sizes),
        "steps": pick(rng, &[4, 6, 8, 12]),
        "cfg": cfg,
        "seed": rng.next_u64() >> 11,
        "enhance": rng.next_u64() % 4 != 0,
    })
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

pub fn run(args: SoakArgs) -> Result<()> {
    let outputs = match &args.outputs {
        Some(o) => o.clone(),
        None => std::env::temp_dir().join(format!("zturbo-soak-{}", std::process::id())),
    };
    std::fs::create_dir_all(&outputs)?;
    let server = start_server(&args, &outputs)?;
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build();
    let started = Instant::now();
    let mut rng = NoiseRng::new(args.seed);
    let mut submitted: Vec<String> = Vec::new();
    let mut outstanding: Vec<String> = Vec::new();
    let mut records: HashMap<String, Value> = HashMap::new();
    let mut next = 0;
    eprintln!(
        "soak: {} jobs on `{}`, fault rate {}, outputs in {}",
        args.jobs,
        args.model,
        args.fault_rate,
        outputs.display()
    );
    while records.len() < args.jobs {
        // Keep the queue fed, but not overfull.
        while next < args.jobs && outstanding.len() < 16 {
            let body = job_body(&mut rng, &args.sizes);
            match agent
                .post(&format!("{}/api/jobs", server.base))
                .send_json(body)
            {
                Ok(resp) => {
                    let v: Value = resp.into_json()?;
                    let id = v["id"]
                        .as_str()
                        .ok_or_else(|| anyhow!("no id in {v}"))?
                        .to_string();
                    submitted.push(id.clone());
                    outstanding.push(id);
                    next += 1;
                }
                Err(ureq::Error::Status(429, _)) => break,
                Err(e) => bail!("submit failed: {e}"),
            }
        }
        std::thread::sleep(Duration::from_millis(150));
        let mut still = Vec::new();
        for id in outstanding.drain(..) {
            let v: Value = agent
                .get(&format!("{}/api/jobs/{id}", server.base))
                .call()
                .map_err(|e| anyhow!("job {id}: {e}"))?
                .into_json()?;
            match v["state"].as_str() {
                Some("done" | "failed" | "cancelled") => {
                    records.insert(id, v);
                }
                _ => still.push(id),
            }
        }
        outstanding = still;
        if started.elapsed() > Duration::from_secs(6 * 3600) {
            bail!("soak exceeded 6 hours");
        }
        if records.len() % 50 == 0 && !records.is_empty() {
            eprint!("\r{} / {} jobs", records.len(), args.jobs);
        }
    }
    eprintln!();
    let wall = started.elapsed();

    // Audit.
    let mut completed = 0;
    let mut failed: BTreeMap<String, usize> = BTreeMap::new();
    let mut cancelled = 0;
    let mut black = 0;
    let mut unreadable = 0;
    let mut lost = submitted.len() - records.len();
    let mut notices: BTreeMap<String, usize> = BTreeMap::new();
    let mut peaks = Vec::new();
    let mut images = 0;
    for id in &submitted {
        let Some(r) = records.get(id) else { continue };
        for n in r["notices"].as_array().into_iter().flatten() {
            *notices
                .entry(n["kind"].as_str().unwrap_or("?").to_string())
                .or_default() += 1;
        }
        match r["state"].as_str() {
            Some("done") => {
                completed += 1;
                if let Some(p) = r["peak_memory_bytes"].as_u64() {
                    peaks.push(p);
                }
                let urls = r["images"].as_array().cloned().unwrap_or_default();
                if urls.is_empty() {
                    lost += 1;
                }
                for u in urls {
                    images += 1;
                    let name = u.as_str().unwrap_or("").rsplit('/').next().unwrap_or("");
                    match image::open(outputs.join(name)) {
                        Ok(img) => {
                            let rgb = img.to_rgb8();
                            let (lo, hi) = rgb
                                .as_raw()
                                .iter()
                                .fold((255u8, 0u8), |(a, b), &v| (a.min(v), b.max(v)));
                            if hi.saturating_sub(lo) < 4 {
                                black += 1;
                            }
                        }
                        Err(_) => unreadable += 1,
                    }
                }
            }
            Some("failed") => {
                let e = r["error"].as_str().unwrap_or("").to_string();
                let e = if e.is_empty() {
                    "(no explanation!)".to_string()
                } else {
                    e
                };
                let key = without_numbers(&e);
                *failed.entry(key).or_default() += 1;
            }
            _ => cancelled += 1,
        }
    }
    // Nothing may be left pending in the journal.
    let pending = std::fs::read_dir(outputs.join(".jobs"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .filter(|t| t.contains("\"queued\"") || t.contains("\"running\""))
                .count()
        })
        .unwrap_or(0);
    peaks.sort_unstable();
    let failed_total: usize = failed.values().sum();
    let unexplained = failed.get("(no explanation!)").copied().unwrap_or(0);

    println!("| soak | value |");
    println!("|---|---|");
    println!("| jobs | {} ({} images) |", submitted.len(), images);
    println!(
        "| model, fault rate | {}, {} per denoiser attempt and per decode (black: half that) |",
        args.model, args.fault_rate
    );
    println!("| completed | {completed} |");
    println!("| failed (all explained) | {failed_total} ({unexplained} unexplained) |");
    println!("| cancelled | {cancelled} |");
    println!("| lost (no result or image missing) | {lost} |");
    println!("| left pending in the journal | {pending} |");
    println!("| black images | {black} |");
    println!("| NaN / unreadable images | {unreadable} |");
    for kind in [
        "cfg_clamped",
        "cfg_adjusted",
        "step_retried",
        "precision_raised",
        "black_retry",
        "memory_mode",
        "decode_tiled",
    ] {
        println!(
            "| notices: {kind} | {} |",
            notices.get(kind).copied().unwrap_or(0)
        );
    }
    println!(
        "| peak memory per job (min / median / max) | {} / {} / {} |",
        mib(percentile(&peaks, 0.0)),
        mib(percentile(&peaks, 0.5)),
        mib(percentile(&peaks, 1.0))
    );
    println!(
        "| wall time | {:.1} min ({:.1} jobs/min) |",
        wall.as_secs_f64() / 60.0,
        submitted.len() as f64 / wall.as_secs_f64() * 60.0
    );
    for (msg, n) in &failed {
        println!("| failure × {n} | {msg} |");
    }
    let ok = black == 0 && unreadable == 0 && lost == 0 && pending == 0 && unexplained == 0;
    println!("\nsummary: jobs={} completed={completed} failed={failed_total} black={black} nan={unreadable} lost={lost} ok={ok}", submitted.len());
    if !ok {
        bail!("soak found problems (see the table)");
    }
    Ok(())
}

/// A failure message with its numbers (steps, seeds, values) each replaced by `#`, to group
/// failures of one kind; digits inside words (`f32`, `bf16`) stay.
fn without_numbers(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut prev: Option<char> = None;
    let mut in_word = false;
    for c in message.chars() {
        if c.is_ascii_digit() {
            if !prev.is_some_and(|p| p.is_ascii_digit()) {
                in_word = prev.is_some_and(char::is_alphabetic);
                if !in_word {
                    out.push('#');
                }
            }
            if in_word {
                out.push(c);
            }
        } else {
            out.push(c);
        }
        prev = Some(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::without_numbers;

    #[test]
    fn failures_group_without_their_numbers_but_keep_dtype_names() {
        assert_eq!(
            without_numbers("step 12 failed at cfg 2.4 in f32 (seed 1000003), bf16 too"),
            "step # failed at cfg #.# in f32 (seed #), bf16 too"
        );
    }
}
