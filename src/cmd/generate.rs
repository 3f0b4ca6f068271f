//! `zturbo generate`: images from the terminal, with the request's flags (or a PNG's parameters),
//! a progress bar, and the PNGs written with their parameters embedded.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use zturbo::engine::output::{self, a1111_parameters, encode_png, write_atomic};
use zturbo::engine::{load, CancelToken, Notice, Observer, Phase, RunExtras, StepEvent};
use zturbo::memory::planner::MemoryMode;
use zturbo::request::{GenerationRequest, Limits};

use crate::ModelArgs;

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, required_unless_present = "from_png")]
    prompt: Option<String>,
    #[arg(long)]
    negative_prompt: Option<String>,
    #[arg(long)]
    width: Option<u32>,
    #[arg(long)]
    height: Option<u32>,
    #[arg(long)]
    steps: Option<u32>,
    /// Guidance scale, ComfyUI/A1111 convention: 1.0 = off.
    #[arg(long)]
    cfg: Option<f32>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    batch: Option<u32>,
    /// on: prompt enhancement and the default negative prompt; off: prompts go to the model untouched.
    #[arg(long, value_parser = parse_on_off)]
    enhance: Option<bool>,
    #[arg(long)]
    memory_mode: Option<MemoryMode>,
    /// Output PNG (with several images: name-1.png, name-2.png, …).
    #[arg(long, short)]
    output: PathBuf,
    /// Initial noise: a safetensors file with one tensor `latents` of shape (B, C, H/8, W/8),
    /// used exactly like diffusers' `latents=` argument (with --image: the loop's start latents,
    /// as `ZImageImg2ImgPipeline(latents=…)` takes them).
    #[arg(long)]
    init_latents: Option<PathBuf>,
    /// Write the final latents (before the VAE) as tensor `latents` to this safetensors file.
    #[arg(long)]
    save_latents: Option<PathBuf>,
    /// Take prompt, size, steps, CFG and seed from a PNG's parameters (flags still override).
    #[arg(long)]
    from_png: Option<PathBuf>,
    /// Image to image: start from this PNG, JPEG or WebP (its size is the default size).
    #[arg(long)]
    image: Option<PathBuf>,
    /// How much of --image is repainted, 0–1 (default: the model's, 1 with --mask).
    #[arg(long, requires = "image")]
    strength: Option<f64>,
    /// Inpainting: a mask the size of --image, white = repaint.
    #[arg(long, requires = "image")]
    mask: Option<PathBuf>,
    /// σ in pixels of the blur that blends the original back outside the mask (default 4).
    #[arg(long, requires = "mask")]
    mask_blur: Option<u32>,
    /// How --image and --mask are fitted to --width/--height: stretch, crop-and-resize,
    /// resize-and-fill.
    #[arg(long, value_parser = parse_resize_mode)]
    resize_mode: Option<zturbo::inputs::ResizeMode>,
    /// A LoRA file and its weight (default 1), e.g. `--lora style.safetensors:0.8`; repeat for
    /// several (applied in order). `<lora:name:weight>` in the prompt names files in
    /// <models-dir>/loras/.
    #[arg(long = "lora", value_name = "FILE[:WEIGHT]", value_parser = parse_lora)]
    loras: Vec<(PathBuf, f32)>,
    /// What the masked region starts from: original (default), fill (the surrounding colours),
    /// latent-noise, latent-nothing (A1111's inpainting fill).
    #[arg(long, requires = "mask", value_parser = parse_fill)]
    inpaint_fill: Option<zturbo::inputs::InpaintFill>,
    /// Repaint only the masked region: its crop (plus --inpaint-padding pixels) is generated at
    /// --width×--height and pasted back into the whole image (A1111's "only masked").
    #[arg(long, requires = "mask")]
    inpaint_full_res: bool,
    /// Pixels of context around the mask with --inpaint-full-res.
    #[arg(long, requires = "inpaint_full_res")]
    inpaint_padding: Option<u32>,
    /// ControlNet: a Z-Image ControlNet Union file (or diffusers folder), or a name in
    /// <models-dir>/controlnet/.
    #[arg(long, requires = "control_image")]
    controlnet: Option<PathBuf>,
    /// The control image (edges, depth, pose …), fitted to the output size; used as given unless
    /// --control-preprocess names a preprocessor.
    #[arg(long, requires = "controlnet")]
    control_image: Option<PathBuf>,
    /// How strongly the control guides, 0–2 (default 0.75).
    #[arg(long, requires = "controlnet")]
    control_scale: Option<f64>,
    /// none (the image is the map) or canny.
    #[arg(long, requires = "controlnet")]
    control_preprocess: Option<String>,
    /// Fraction of the steps where control starts (default 0).
    #[arg(long, requires = "controlnet")]
    control_start: Option<f64>,
    /// Fraction of the steps where control ends (default 1).
    #[arg(long, requires = "controlnet")]
    control_end: Option<f64>,
}

fn parse_fill(s: &str) -> Result<zturbo::inputs::InpaintFill, String> {
    use zturbo::inputs::InpaintFill;
    match s {
        "original" => Ok(InpaintFill::Original),
        "fill" => Ok(InpaintFill::Fill),
        "latent-noise" => Ok(InpaintFill::LatentNoise),
        "latent-nothing" => Ok(InpaintFill::LatentNothing),
        _ => Err(format!(
            "`{s}`: expected original, fill, latent-noise or latent-nothing"
        )),
    }
}

/// `FILE[:WEIGHT]`: the weight is what follows the last `:` when it is a number.
fn parse_lora(s: &str) -> Result<(PathBuf, f32), String> {
    if let Some((file, w)) = s.rsplit_once(':') {
        if let Ok(w) = w.parse::<f32>() {
            if !w.is_finite() {
                return Err(format!("`{s}`: the weight must be a finite number"));
            }
            return Ok((PathBuf::from(file), w));
        }
    }
    Ok((PathBuf::from(s), 1.0))
}

fn parse_resize_mode(s: &str) -> Result<zturbo::inputs::ResizeMode, String> {
    use zturbo::inputs::ResizeMode;
    match s {
        "stretch" => Ok(ResizeMode::Stretch),
        "crop-and-resize" => Ok(ResizeMode::CropAndResize),
        "resize-and-fill" => Ok(ResizeMode::ResizeAndFill),
        _ => Err(format!(
            "`{s}`: expected stretch, crop-and-resize or resize-and-fill"
        )),
    }
}

/// A file's bytes as base64, for the request's image fields.
fn file_base64(flag: &str, p: &Path) -> Result<String> {
    use base64::Engine as _;
    let bytes = std::fs::read(p).with_context(|| format!("{flag} {}", p.display()))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

pub fn parse_on_off(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("`{s}`: expected on or off")),
    }
}

/// Terminal progress: a bar over steps when stderr is a terminal, notices as `notice:` lines.
struct CliObserver {
    bar: Option<ProgressBar>,
}

impl Observer for CliObserver {
    fn phase(&mut self, phase: Phase) {
        if let Some(b) = &self.bar {
            b.set_message(phase.as_str());
        }
    }
    fn step(&mut self, e: &StepEvent) {
        if let Some(b) = &self.bar {
            b.set_length(e.total as u64);
            b.set_position(e.step as u64);
        }
    }
    fn notice(&mut self, n: &Notice) {
        let line = format!("notice: {}", notice_line(n));
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }
}

/// `cfg_adjusted 3.2 -> 2.4 at step 3`, or the kind and message.
fn notice_line(n: &Notice) -> String {
    let num = |v: f32| format!("{}", (v * 100.0).round() / 100.0);
    match (n.from, n.to) {
        (Some(a), Some(b)) => {
            let at = n.step.map(|s| format!(" at step {s}")).unwrap_or_default();
            format!("{} {} -> {}{at}", n.kind, num(a), num(b))
        }
        _ => format!("{} {}", n.kind, n.message),
    }
}

/// `zturbo generate`: one request through the engine on this thread, PNGs with their parameters.
pub fn run(args: GenerateArgs) -> Result<()> {
    let from_png = match &args.from_png {
        Some(p) => {
            let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            let chunks = output::png_text_chunks(&bytes)
                .with_context(|| format!("{}: not a readable PNG", p.display()))?;
            let text = chunks
                .into_iter()
                .find(|(k, _)| k == "parameters")
                .map(|(_, v)| v)
                .ok_or_else(|| anyhow!("{}: no `parameters` text chunk", p.display()))?;
            Some(output::parse_parameters(&text))
        }
        None => None,
    };
    let settings = args.model.settings();
    let mut engine = load::open(&settings, load::resolve(&settings, false)?)?;
    let limits = Limits::new(engine.profile(), 64, MemoryMode::Auto);
    let fp = from_png.unwrap_or_default();
    let lora_dir = zturbo::families::lora::LoraDir::new(args.model.models_dir.join("loras"));
    let mut control_dir = zturbo::control::ControlDir::for_models_dir(&args.model.models_dir);
    if let Some(p) = args.controlnet.as_ref().filter(|p| p.exists()) {
        control_dir = control_dir.with_file(p.clone());
    }
    let control = match (&args.controlnet, &args.control_image) {
        (Some(net), Some(img)) => Some(zturbo::request::ControlRequest {
            model: Some(net.to_string_lossy().into_owned()),
            image: file_base64("--control-image", img)?,
            scale: args.control_scale,
            preprocess: args.control_preprocess.clone(),
            start: args.control_start,
            end: args.control_end,
            ..Default::default()
        }),
        _ => None,
    };
    let req = GenerationRequest {
        prompt: args.prompt.clone().unwrap_or(fp.prompt),
        negative_prompt: args.negative_prompt.clone().or(fp.negative_prompt),
        width: args.width.or(fp.width),
        height: args.height.or(fp.height),
        steps: args.steps.or(fp.steps),
        cfg: args.cfg.or(fp.cfg),
        seed: args.seed.or(fp.seed),
        batch: args.batch,
        enhance: args.enhance.or(args.from_png.as_ref().map(|_| false)),
        memory_mode: args.memory_mode,
        image: match &args.image {
            Some(p) => Some(file_base64("--image", p)?),
            None => None,
        },
        mask: match &args.mask {
            Some(p) => Some(file_base64("--mask", p)?),
            None => None,
        },
        strength: args.strength,
        mask_blur: args.mask_blur,
        resize_mode: args.resize_mode,
        loras: None,
        inpaint_fill: args.inpaint_fill,
        inpaint_full_res: args.inpaint_full_res.then_some(true),
        inpaint_full_res_padding: args.inpaint_padding,
        control,
        ..Default::default()
    }
    .validate_with(&limits, Some(&lora_dir), Some(&control_dir))
    .map_err(|e| {
        let flag = match e.field.as_str() {
            "inpaint_full_res_padding" => "inpaint-padding".to_string(),
            "control.model" => "controlnet".to_string(),
            f => f.replace(['_', '.'], "-"),
        };
        let file = match e.field.as_str() {
            "image" => args.image.as_ref(),
            "mask" => args.mask.as_ref(),
            "control.model" => args.controlnet.as_ref(),
            "control.image" => args.control_image.as_ref(),
            _ => None,
        };
        match file {
            Some(p) => anyhow!("--{flag} {}: {}", p.display(), e.message),
            None => anyhow!("--{flag}: {}", e.message),
        }
    })?;

    let mut req = req;
    for (path, weight) in &args.loras {
        if !path.is_file() {
            bail!("--lora {}: no such file", path.display());
        }
        req.loras.push(zturbo::request::LoraRef {
            name: path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            weight: *weight,
            path: path.clone(),
        });
    }
    let extras = RunExtras {
        init_latents: match &args.init_latents {
            Some(p) => Some(load_latents(p)?),
            None => None,
        },
    };
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = ProgressBar::new(req.steps as u64);
        b.set_style(
            ProgressStyle::with_template("{msg:>7} [{bar:30}] {pos}/{len} steps {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    });
    let mut observer = CliObserver { bar };
    let result = engine.generate(&req, &extras, &mut observer, &CancelToken::new());
    if let Some(b) = &observer.bar {
        b.finish_and_clear();
    }
    let gen = result.map_err(|e| anyhow!("generation failed: {e}"))?;

    if let Some(p) = &args.save_latents {
        let bytes = safetensors_bytes(&gen.latents)?;
        write_atomic(p, &bytes).with_context(|| format!("writing {}", p.display()))?;
    }
    let n = gen.images.len();
    for (i, img) in gen.images.iter().enumerate() {
        let path = if n == 1 {
            args.output.clone()
        } else {
            numbered(&args.output, i + 1)
        };
        let params_text = a1111_parameters(&gen.params, img.seed, &gen.notices);
        let rec = output::record_text(None, &gen, img.seed);
        let png = encode_png(img, &[("parameters", &params_text), ("zturbo", &rec)])?;
        write_atomic(&path, &png).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {} (seed {})", path.display(), img.seed);
    }
    eprintln!(
        "done in {:.2} s (encode {} ms, denoise {} ms, decode {} ms), peak memory {}",
        gen.timings.total_ms as f64 / 1000.0,
        gen.timings.encode_ms,
        gen.timings.denoise_ms,
        gen.timings.decode_ms,
        zturbo::memory::format_bytes(gen.peak_memory_bytes)
    );
    if zturbo::profile::enabled() {
        eprintln!(
            "profile (ZTURBO_PROFILE):\n{}",
            zturbo::profile::take_report()
        );
    }
    Ok(())
}

fn numbered(path: &Path, i: usize) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = path
        .extension()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "png".into());
    path.with_file_name(format!("{stem}-{i}.{ext}"))
}

fn load_latents(p: &Path) -> Result<candle_core::Tensor> {
    let tensors = candle_core::safetensors::load(p, &candle_core::Device::Cpu)
        .with_context(|| format!("{}: not a readable safetensors file", p.display()))?;
    tensors
        .get("latents")
        .cloned()
        .ok_or_else(|| anyhow!("{}: no tensor named `latents`", p.display()))
}

fn safetensors_bytes(t: &candle_core::Tensor) -> Result<Vec<u8>> {
    let t = t.to_device(&candle_core::Device::Cpu)?;
    let map = std::collections::HashMap::from([("latents".to_string(), t)]);
    let dir =
        std::env::temp_dir().join(format!("zturbo-latents-{}.safetensors", std::process::id()));
    candle_core::safetensors::save(&map, &dir)?;
    let bytes = std::fs::read(&dir)?;
    let _ = std::fs::remove_file(&dir);
    Ok(bytes)
}
