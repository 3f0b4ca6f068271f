//! `cargo bench --bench calibrate`: measures the activation memory of each phase (text encoding,
//! one denoiser call, VAE decode whole and tiled) with the counting allocator on the CPU, next to
//! the planner's estimate for the same shapes — the evidence behind the activation coefficients
//! in `src/memory/planner.rs`. Options: `--shape bench`, `--sizes 256,512,768`.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use zturbo::engine::decode::decode_image;
use zturbo::families::z_image::synthetic::{self, SyntheticShape};
use zturbo::families::{self, Component, ModelDir, PrecisionPolicy, StepInput};
use zturbo::memory::alloc;
use zturbo::memory::format_bytes;
use zturbo::memory::planner::DEFAULT_VAE_TILING;

fn peak_of<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let base = alloc::live_bytes();
    alloc::reset_peak();
    let t = std::time::Instant::now();
    let out = f();
    eprintln!("  ({:.2} s)", t.elapsed().as_secs_f64());
    (out, alloc::peak_bytes().saturating_sub(base))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let get = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let shape_name = get("--shape").unwrap_or_else(|| "bench".into());
    let sizes: Vec<usize> = get("--sizes")
        .unwrap_or_else(|| "256,512,768".into())
        .split(',')
        .filter_map(|s| s.parse().ok())
        .collect();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/bench-models")
        .join(&shape_name);
    if !dir.join("model_index.json").is_file() {
        let shape =
            SyntheticShape::named(&shape_name).ok_or_else(|| anyhow::anyhow!("unknown shape"))?;
        let tmp = dir.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        synthetic::write(&tmp, &shape, 7)?;
        std::fs::rename(&tmp, &dir)?;
    }
    let mut m = families::open(ModelDir::open(&dir)?, &Device::Cpu, PrecisionPolicy::F32)?;
    let act = m.activation_model();
    println!("calibration on `{shape_name}` (f32, CPU, counting allocator): measured peak above the resident weights vs the planner's estimate");
    println!();
    println!("| phase | size | measured | planner | planner / measured |");
    println!("|---|---|---|---|---|");
    let row = |phase: &str, size: String, measured: u64, est: u64| {
        println!(
            "| {phase} | {size} | {} | {} | {:.2} |",
            format_bytes(measured),
            format_bytes(est),
            est as f64 / measured.max(1) as f64
        );
    };

    m.components_mut().load(Component::TextEncoder)?;
    let long = "a serene mountain lake at dawn, mist rising, pine trees on shore, ".repeat(20);
    let (cond, te) = peak_of(|| m.encode(&long, Some("blurry")));
    let cond = cond?;
    let tokens = cond.positive.hidden.dim(0)? as u64;
    row(
        "text encoder (prompt + negative)",
        format!("{tokens} tokens"),
        te,
        act.text_encoder.bytes(tokens, 2),
    );
    m.components_mut().unload(Component::TextEncoder);

    m.components_mut().load(Component::Denoiser)?;
    for &s in &sizes {
        let lat = s / 8;
        let x = Tensor::randn(0f32, 1.0, (1, 16, lat, lat), &Device::Cpu)?;
        let schedule = m.schedule(8, lat, lat)?;
        let (r, den) = peak_of(|| {
            m.predict(
                &x,
                &cond,
                StepInput {
                    index: 0,
                    schedule: &schedule,
                    cfg: 1.8,
                },
            )
        });
        r?;
        // The sequence this call really had: image tokens plus the padded caption.
        let tok = ((lat / 2) * (lat / 2)) as u64 + tokens.div_ceil(32) * 32;
        row(
            "denoiser call, CFG (batch 2)",
            format!("{s}²"),
            den,
            act.denoiser.bytes(tok, 2),
        );
    }
    m.components_mut().unload(Component::Denoiser);

    m.components_mut().load(Component::Vae)?;
    for &s in &sizes {
        let lat = (s / 8) as u64;
        let z = Tensor::randn(0f32, 1.0, (1, 16, lat as usize, lat as usize), &Device::Cpu)?;
        let (r, full) = peak_of(|| m.decode(&z));
        r?;
        row(
            "VAE decode, whole",
            format!("{s}²"),
            full,
            act.vae.decode_bytes(lat, lat),
        );
        let (r, tiled) = peak_of(|| decode_image(m.as_mut(), &z, Some(DEFAULT_VAE_TILING)));
        r?;
        row(
            "VAE decode, tiled 32/8",
            format!("{s}²"),
            tiled,
            act.vae.tiled_decode_bytes(lat, lat, DEFAULT_VAE_TILING),
        );
    }
    Ok(())
}
