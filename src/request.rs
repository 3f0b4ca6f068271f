//! The one request shape every surface (browser form, CLI, OpenAI, A1111) turns into. The wire form
//! is parsed once into a [`ValidRequest`] with defaults and a seed filled in; everything downstream
//! accepts only that type. Errors name the field, the allowed range and the value given.

use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::control::{ControlDir, Preprocess};
use crate::families::lora::LoraDir;
pub use crate::families::profile::Img2ImgDefaults;
use crate::families::Profile;
use crate::i18n::Translations;
use crate::inputs::{self, CropRegion, InpaintFill, InputImage, ResizeMode};
use crate::memory::planner::MemoryMode;
use crate::nn::scheduler::{steps_run, NoiseKind};

/// Longest prompt accepted, in characters. Text encoders truncate far earlier anyway; this only
/// stops absurd bodies before they reach the tokenizer.
pub const MAX_PROMPT_CHARS: usize = 4000;
pub const MIN_SIDE: u32 = 64;
pub const MAX_SIDE: u32 = 2048;
pub const MIN_STEPS: u32 = 1;
pub const MAX_STEPS: u32 = 100;
/// ComfyUI/A1111 convention: 1.0 = no guidance. Values from the profile's `cfg.intercept_at` up
/// are accepted and clamped to the model's safe maximum before the run.
pub const MIN_CFG: f32 = 1.0;
pub const MAX_CFG: f32 = 30.0;
/// Largest `mask_blur` (σ of the paste-back blur, in pixels).
pub const MAX_MASK_BLUR: u32 = 64;
/// The default strength of inpainting (diffusers' `ZImageInpaintPipeline`): the masked region is
/// repainted from pure noise.
pub const INPAINT_STRENGTH: f64 = 1.0;

/// A generation request as it arrives (JSON body or CLI flags). Unknown fields are an error.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationRequest {
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: Option<String>,
    #[serde(default)]
    pub width: Option<u32>,
    #[serde(default)]
    pub height: Option<u32>,
    #[serde(default)]
    pub steps: Option<u32>,
    #[serde(default)]
    pub cfg: Option<f32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub batch: Option<u32>,
    #[serde(default)]
    pub enhance: Option<bool>,
    #[serde(default)]
    pub memory_mode: Option<MemoryMode>,
    /// Image to image: the input image, base64 (PNG, JPEG or WebP) or a `data:` URL.
    #[serde(default)]
    pub image: Option<String>,
    /// Inpainting: a mask the size of `image`, white = repaint (base64 or a data URL).
    #[serde(default)]
    pub mask: Option<String>,
    /// How much of `image` is repainted, 0–1 (default: the model's image-to-image strength; 1
    /// with a mask).
    #[serde(default)]
    pub strength: Option<f64>,
    /// σ in pixels of the blur that blends the original pixels back outside the mask (default 4).
    #[serde(default)]
    pub mask_blur: Option<u32>,
    /// How `image` and `mask` are fitted to `width`×`height` when their size differs.
    #[serde(default)]
    pub resize_mode: Option<ResizeMode>,
    /// LoRAs from the server's LoRA folder, applied in order (also: `<lora:name:weight>` in the
    /// prompt, as in A1111).
    #[serde(default)]
    pub loras: Option<Vec<LoraSpec>>,
    /// Inpainting: what the masked region starts from (default `original`).
    #[serde(default)]
    pub inpaint_fill: Option<InpaintFill>,
    /// Inpainting: repaint only the masked region, cropped (with `inpaint_full_res_padding`
    /// pixels around it) and scaled to width×height, then pasted back into the whole image (A1111's
    /// "only masked"). Default false: the whole picture at width×height.
    #[serde(default)]
    pub inpaint_full_res: Option<bool>,
    #[serde(default)]
    pub inpaint_full_res_padding: Option<u32>,
    /// Phrases the enhancement must not add (the UI's removed chips), as the preview showed them.
    #[serde(default)]
    pub enhance_exclude: Vec<String>,
    /// The model to run on (a name `/api/models` lists as local); the selected one when absent.
    /// The server checks it and records it with the job; validation ignores it.
    #[serde(default)]
    pub model: Option<String>,
    /// ControlNet: a control image (edges, depth, pose …) that guides the picture's layout.
    #[serde(default)]
    pub control: Option<ControlRequest>,
}

/// A request's ControlNet, as it arrives.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ControlRequest {
    /// A ControlNet in the server's `controlnet` folder (`/controlnet/model_list`); the only one
    /// when absent and there is exactly one.
    #[serde(default)]
    pub model: Option<String>,
    /// The control image, base64 (PNG, JPEG or WebP) or a `data:` URL; fitted to the job's size.
    pub image: String,
    /// `controlnet_conditioning_scale`, 0–2 (default 0.75).
    #[serde(default)]
    pub scale: Option<f64>,
    /// `none` (the image is the map) or `canny`.
    #[serde(default)]
    pub preprocess: Option<String>,
    /// Fraction of the steps where control starts (default 0) and ends (default 1).
    #[serde(default)]
    pub start: Option<f64>,
    #[serde(default)]
    pub end: Option<f64>,
    /// Canny thresholds (default 100 and 200).
    #[serde(default)]
    pub low_threshold: Option<u32>,
    #[serde(default)]
    pub high_threshold: Option<u32>,
}

/// The default `controlnet_conditioning_scale` (diffusers' `ZImageControlNetPipeline`).
pub const CONTROL_SCALE: f64 = 0.75;
pub const MAX_CONTROL_SCALE: f64 = 2.0;

/// A job's ControlNet, validated: the file, the map (already preprocessed, fitted to the job's
/// size), the scale and the step range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlSpec {
    /// What the request named.
    pub model: String,
    /// The file or diffusers folder it resolved to when the job was accepted.
    pub path: std::path::PathBuf,
    /// RGB, `width`×`height` of the job: the map the ControlNet sees.
    pub image: InputImage,
    pub scale: f64,
    pub preprocess: Preprocess,
    pub start: f64,
    pub end: f64,
}

/// A LoRA as a request names it: a file in the server's LoRA folder and its weight.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    pub name: String,
    #[serde(default = "one")]
    pub weight: f32,
}

fn one() -> f32 {
    1.0
}

/// Most LoRAs one job may apply.
pub const MAX_LORAS: usize = 8;
/// LoRA weights are accepted in ±this.
pub const MAX_LORA_WEIGHT: f32 = 10.0;

/// At most this many excluded enhancement phrases, each at most [`MAX_EXCLUDE_CHARS`] long.
pub const MAX_EXCLUDED_PHRASES: usize = 64;
pub const MAX_EXCLUDE_CHARS: usize = 200;

/// What a request is validated against: the loaded model's facts and the server's limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub default_width: u32,
    pub default_height: u32,
    pub default_steps: u32,
    pub default_cfg: f32,
    /// Width and height must be multiples of this (the profile's `size_multiple`).
    pub size_multiple: u32,
    pub max_batch: u32,
    pub default_memory_mode: MemoryMode,
    /// Image-to-image defaults and step arithmetic of the loaded model.
    pub img2img: Img2ImgDefaults,
}

/// The default σ of the paste-back blur (A1111's `mask_blur` default).
pub const DEFAULT_MASK_BLUR: u32 = 4;

impl Limits {
    /// The loaded model's defaults and size multiple, with the device's batch limit.
    pub fn new(profile: &Profile, max_batch: u32, default_memory_mode: MemoryMode) -> Self {
        let d = profile.defaults;
        Self {
            default_width: d.width,
            default_height: d.height,
            default_steps: d.steps,
            default_cfg: d.cfg,
            size_multiple: profile.size_multiple,
            max_batch,
            default_memory_mode,
            img2img: profile.img2img,
        }
    }
}

/// A request that passed validation: every field resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub cfg: f32,
    pub seed: u64,
    pub batch: u32,
    pub enhance: bool,
    pub memory_mode: MemoryMode,
    /// Image to image / inpainting; `None` for text to image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<Box<InitImage>>,
    /// LoRAs applied to the denoiser for this job, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<LoraRef>,
    /// Phrases the enhancement leaves out (see [`GenerationRequest::enhance_exclude`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub enhance_exclude: Vec<String>,
    /// The job's ControlNet; `None` without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<Box<ControlSpec>>,
}

/// One LoRA of a job: a low-rank update of the denoiser's weights, scaled by `weight`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraRef {
    /// What the user named (a file stem in `<models-dir>/loras/`, or a file on the CLI).
    pub name: String,
    pub weight: f32,
    /// The file it resolved to when the job was accepted.
    pub path: std::path::PathBuf,
}

/// The image a job starts from, fitted to the job's size, and its mask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InitImage {
    /// RGB, `width`×`height` of the job.
    pub image: InputImage,
    /// Gray, same size, white (≥ 128) = repaint; `None` = image to image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<InputImage>,
    pub strength: f64,
    pub mask_blur: u32,
    /// What the masked region starts from.
    #[serde(default)]
    pub fill: InpaintFill,
    /// "Only masked": the crop of the whole image that `image` and `mask` are (resized to the
    /// job's size); the result is pasted back into the whole image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<CropRegion>,
}

/// Largest `inpaint_full_res_padding`.
pub const MAX_INPAINT_PADDING: u32 = 1024;

/// A user error: which field, and what is wrong with it (`message` in English; `i18n` the same
/// text in the page's other languages, for the errors the page can cause).
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
    #[serde(skip_serializing_if = "Translations::is_empty")]
    pub i18n: Translations,
}

impl FieldError {
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.to_string(),
            message: message.into(),
            i18n: Translations::default(),
        }
    }

    /// The message in Simplified Chinese.
    pub fn zh(mut self, text: impl Into<String>) -> Self {
        self.i18n = Translations::zh(text);
        self
    }

    /// "must be between `lo` and `hi` (got `got`)".
    pub fn range(field: &str, lo: impl Display, hi: impl Display, got: impl Display) -> Self {
        Self::new(field, format!("must be between {lo} and {hi} (got {got})"))
            .zh(format!("必须在 {lo} 到 {hi} 之间（当前为 {got}）"))
    }

    fn input(field: &str, e: &inputs::InputError) -> Self {
        Self::new(field, e.to_string()).zh(e.zh())
    }
}

impl GenerationRequest {
    /// Validation without a LoRA folder (a request naming LoRAs is refused).
    pub fn validate(self, limits: &Limits) -> Result<ValidRequest, FieldError> {
        self.validate_in(limits, None)
    }

    /// Validation with the server's LoRA folder to resolve `loras` (and `<lora:…>` prompt tags).
    pub fn validate_in(
        self,
        limits: &Limits,
        lora_dir: Option<&LoraDir>,
    ) -> Result<ValidRequest, FieldError> {
        self.validate_with(limits, lora_dir, None)
    }

    /// [`GenerationRequest::validate_in`] with the server's ControlNet folders to resolve
    /// `control.model` (a request with `control` and no folders is refused).
    pub fn validate_with(
        mut self,
        limits: &Limits,
        lora_dir: Option<&LoraDir>,
        control_dir: Option<&ControlDir>,
    ) -> Result<ValidRequest, FieldError> {
        let control = self.control.take();
        let (clean, tagged) = extract_lora_tags(&self.prompt)?;
        let mut specs = self.loras.take().unwrap_or_default();
        if !tagged.is_empty() {
            self.prompt = clean;
            specs.extend(tagged);
        }
        let loras = resolve_loras(&specs, lora_dir)?;
        let mut valid = self.validate_plain(limits)?;
        valid.loras = loras;
        if let Some(c) = control {
            valid.control = Some(Box::new(control_spec(
                c,
                control_dir,
                (valid.width, valid.height),
            )?));
        }
        Ok(valid)
    }

    fn validate_plain(self, limits: &Limits) -> Result<ValidRequest, FieldError> {
        let prompt = check_text("prompt", self.prompt)?;
        if prompt.trim().is_empty() {
            return Err(FieldError::new("prompt", "must not be empty").zh("不能为空"));
        }
        let negative_prompt = match self.negative_prompt {
            Some(n) => Some(check_text("negative_prompt", n)?),
            None => None,
        };
        let side = |field: &str, v: Option<u32>, default: u32| -> Result<u32, FieldError> {
            let v = v.unwrap_or(default);
            let m = limits.size_multiple.max(1);
            if !(MIN_SIDE..=MAX_SIDE).contains(&v) {
                return Err(FieldError::range(field, MIN_SIDE, MAX_SIDE, v));
            }
            if v % m != 0 {
                let (lo, hi) = (v / m * m, (v / m + 1) * m);
                return Err(FieldError::new(
                    field,
                    format!("must be a multiple of {m} (got {v}; nearest: {lo} or {hi})"),
                )
                .zh(format!(
                    "必须是 {m} 的倍数（当前为 {v}；最接近的是 {lo} 或 {hi}）"
                )));
            }
            Ok(v)
        };
        let decoded = match &self.image {
            Some(b64) => Some(decode_field("image", b64)?),
            None => None,
        };
        // Without a size, an input image gives its own (rounded down to the size multiple,
        // scaled down to fit the largest side), as diffusers takes the image's size.
        let (dw, dh) = match &decoded {
            Some(img) => image_size(img.width(), img.height(), limits.size_multiple),
            None => (limits.default_width, limits.default_height),
        };
        let width = side("width", self.width, dw)?;
        let height = side("height", self.height, dh)?;
        let default_steps = if decoded.is_some() {
            limits.img2img.steps
        } else {
            limits.default_steps
        };
        let steps = self.steps.unwrap_or(default_steps);
        if !(MIN_STEPS..=MAX_STEPS).contains(&steps) {
            return Err(FieldError::range("steps", MIN_STEPS, MAX_STEPS, steps));
        }
        let cfg = self.cfg.unwrap_or(limits.default_cfg);
        if !cfg.is_finite() || !(MIN_CFG..=MAX_CFG).contains(&cfg) {
            return Err(FieldError::new(
                "cfg",
                format!(
                    "must be between {MIN_CFG} and {MAX_CFG}; 1.0 turns guidance off (got {cfg})"
                ),
            )
            .zh(format!(
                "必须在 {MIN_CFG} 到 {MAX_CFG} 之间；1.0 表示关闭引导（当前为 {cfg}）"
            )));
        }
        let batch = self.batch.unwrap_or(1);
        if batch == 0 || batch > limits.max_batch {
            return Err(FieldError::new(
                "batch",
                format!(
                    "must be between 1 and {} on this device (got {batch})",
                    limits.max_batch
                ),
            )
            .zh(format!(
                "在这台设备上必须在 1 到 {} 之间（当前为 {batch}）",
                limits.max_batch
            )));
        }
        let init = match decoded {
            Some(img) => Some(Box::new(init_image(
                img,
                InitOptions {
                    mask: self.mask.as_deref(),
                    strength: self.strength,
                    mask_blur: self.mask_blur,
                    mode: self.resize_mode.unwrap_or_default(),
                    fill: self.inpaint_fill.unwrap_or_default(),
                    full_res: self.inpaint_full_res.unwrap_or(false),
                    padding: self.inpaint_full_res_padding.unwrap_or(0),
                },
                (width, height),
                steps,
                limits,
            )?)),
            None => {
                for (field, given) in [
                    ("mask", self.mask.is_some()),
                    ("strength", self.strength.is_some()),
                    ("mask_blur", self.mask_blur.is_some()),
                    ("inpaint_fill", self.inpaint_fill.is_some()),
                    ("inpaint_full_res", self.inpaint_full_res.is_some()),
                ] {
                    if given {
                        return Err(FieldError::new(field, "needs an input image (`image`)")
                            .zh("需要一张输入图像（`image`）"));
                    }
                }
                None
            }
        };
        let enhance_exclude = check_excluded(self.enhance_exclude)?;
        Ok(ValidRequest {
            init,
            control: None,
            loras: Vec::new(),
            prompt,
            negative_prompt,
            width,
            height,
            steps,
            cfg,
            seed: self.seed.unwrap_or_else(random_seed),
            batch,
            enhance: self.enhance.unwrap_or(true),
            memory_mode: self.memory_mode.unwrap_or(limits.default_memory_mode),
            enhance_exclude,
        })
    }
}

/// Pulls A1111's `<lora:name:weight>` tags (weight optional, default 1) out of a prompt; the
/// prompt keeps the rest, tidied of the spaces and commas the tags leave.
pub fn extract_lora_tags(prompt: &str) -> Result<(String, Vec<LoraSpec>), FieldError> {
    let mut rest = String::with_capacity(prompt.len());
    let mut specs = Vec::new();
    let mut s = prompt;
    while let Some(start) = s.find("<lora:") {
        rest.push_str(&s[..start]);
        let after = &s[start + "<lora:".len()..];
        let Some(end) = after.find('>') else {
            return Err(FieldError::new(
                "prompt",
                "has a `<lora:` tag without its closing `>` (syntax: <lora:name:weight>)",
            )
            .zh("中的 `<lora:` 标签缺少结尾的 `>`（语法：<lora:name:weight>）"));
        };
        let body = &after[..end];
        let (name, weight) = match body.rsplit_once(':') {
            Some((n, w)) => {
                let w: f32 = w.trim().parse().map_err(|_| {
                    FieldError::new(
                        "prompt",
                        format!(
                            "<lora:{body}>: `{w}` is not a weight (syntax: <lora:name:weight>)"
                        ),
                    )
                    .zh(format!(
                        "<lora:{body}>：`{w}` 不是有效的权重（语法：<lora:name:weight>）"
                    ))
                })?;
                (n, w)
            }
            None => (body, 1.0),
        };
        specs.push(LoraSpec {
            name: name.trim().to_string(),
            weight,
        });
        s = &after[end + 1..];
    }
    if specs.is_empty() {
        return Ok((prompt.to_string(), specs));
    }
    rest.push_str(s);
    let tidy = rest
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(", ");
    Ok((tidy, specs))
}

/// Resolves named LoRAs against the server's folder: known names, finite weights in range.
fn resolve_loras(specs: &[LoraSpec], dir: Option<&LoraDir>) -> Result<Vec<LoraRef>, FieldError> {
    if specs.is_empty() {
        return Ok(Vec::new());
    }
    if specs.len() > MAX_LORAS {
        return Err(FieldError::new(
            "loras",
            format!("at most {MAX_LORAS} LoRAs per job (got {})", specs.len()),
        )
        .zh(format!(
            "每个任务最多 {MAX_LORAS} 个 LoRA（当前为 {}）",
            specs.len()
        )));
    }
    let Some(dir) = dir else {
        return Err(FieldError::new(
            "loras",
            "this server has no LoRA folder (put .safetensors files in <models-dir>/loras/)",
        )
        .zh("这台服务器没有 LoRA 文件夹（请把 .safetensors 文件放到 <models-dir>/loras/）"));
    };
    specs
        .iter()
        .map(|l| {
            if !l.weight.is_finite() || l.weight.abs() > MAX_LORA_WEIGHT {
                return Err(FieldError::new(
                    "loras",
                    format!(
                        "`{}`: weight must be between -{MAX_LORA_WEIGHT} and {MAX_LORA_WEIGHT} (got {})",
                        l.name, l.weight
                    ),
                )
                .zh(format!(
                    "`{}`：权重必须在 -{MAX_LORA_WEIGHT} 到 {MAX_LORA_WEIGHT} 之间（当前为 {}）",
                    l.name, l.weight
                )));
            }
            let path = dir.resolve(&l.name).ok_or_else(|| {
                let known = dir.names();
                let (list, list_zh) = if known.is_empty() {
                    ("none".to_string(), "无".to_string())
                } else {
                    (known.join(", "), known.join("、"))
                };
                FieldError::new(
                    "loras",
                    format!(
                        "no LoRA named `{}` in {} (available: {list})",
                        l.name,
                        dir.path().display(),
                    ),
                )
                .zh(format!(
                    "{} 中没有名为 `{}` 的 LoRA（可用：{list_zh}）",
                    dir.path().display(),
                    l.name,
                ))
            })?;
            dir.check(&path)
                .map_err(|e| {
                    FieldError::new("loras", format!("`{}`: {e}", l.name))
                        .zh(format!("`{}` 无法使用：{e}", l.name))
                })?;
            Ok(LoraRef {
                name: l.name.clone(),
                weight: l.weight,
                path,
            })
        })
        .collect()
}

/// `enhance_exclude`: a bounded list of short phrases without control characters.
pub fn check_excluded(list: Vec<String>) -> Result<Vec<String>, FieldError> {
    const FIELD: &str = "enhance_exclude";
    if list.len() > MAX_EXCLUDED_PHRASES {
        return Err(FieldError::new(
            FIELD,
            format!(
                "at most {MAX_EXCLUDED_PHRASES} phrases (got {})",
                list.len()
            ),
        )
        .zh(format!(
            "最多 {MAX_EXCLUDED_PHRASES} 个短语（当前为 {}）",
            list.len()
        )));
    }
    list.into_iter()
        .map(|p| {
            let n = p.chars().count();
            if n > MAX_EXCLUDE_CHARS {
                return Err(FieldError::new(
                    FIELD,
                    format!("each phrase must be at most {MAX_EXCLUDE_CHARS} characters (got {n})"),
                )
                .zh(format!(
                    "每个短语最多 {MAX_EXCLUDE_CHARS} 个字符（当前为 {n}）"
                )));
            }
            if p.chars().any(char::is_control) {
                return Err(no_control_characters(FIELD));
            }
            Ok(p.trim().to_string())
        })
        .collect()
}

fn no_control_characters(field: &str) -> FieldError {
    FieldError::new(field, "must not contain control characters").zh("不能包含控制字符")
}

fn decode_field(field: &str, b64: &str) -> Result<image::DynamicImage, FieldError> {
    let bytes = inputs::decode_base64(b64).map_err(|e| FieldError::input(field, &e))?;
    inputs::decode_image(&bytes).map_err(|e| FieldError::input(field, &e))
}

/// The size an input image gives a job: its own, scaled down to fit [`MAX_SIDE`], rounded down to
/// the size multiple and at least [`MIN_SIDE`].
pub fn image_size(w: u32, h: u32, multiple: u32) -> (u32, u32) {
    let m = multiple.max(1);
    let scale = (MAX_SIDE as f64 / w.max(h).max(1) as f64).min(1.0);
    let fit = |v: u32| {
        let v = (v as f64 * scale).floor() as u32;
        (v / m * m).max(MIN_SIDE.div_ceil(m) * m)
    };
    (fit(w), fit(h))
}

/// Checks a request's `control`: a known ControlNet, an image that decodes, scale in [0, 2],
/// 0 ≤ start < end ≤ 1; the image is fitted to the job's size and preprocessed here, so the job
/// journals the map itself.
pub fn control_spec(
    c: ControlRequest,
    dir: Option<&ControlDir>,
    (width, height): (u32, u32),
) -> Result<ControlSpec, FieldError> {
    let Some(dir) = dir else {
        return Err(FieldError::new(
            "control.model",
            "this server has no ControlNet folder (put ControlNet files in <models-dir>/controlnet/)",
        )
        .zh("此服务器没有 ControlNet 文件夹（请把 ControlNet 文件放入 <models-dir>/controlnet/）"));
    };
    let known = dir.names();
    let available = if known.is_empty() {
        "none".to_string()
    } else {
        known.join(", ")
    };
    let name = match c.model {
        Some(m) => m,
        None if known.len() == 1 => known[0].clone(),
        None => {
            return Err(FieldError::new(
                "control.model",
                format!(
                    "name a ControlNet (available in {}: {available})",
                    dir.describe()
                ),
            )
            .zh(format!(
                "请指定一个 ControlNet（{} 中可用：{available}）",
                dir.describe()
            )))
        }
    };
    let path = dir.resolve(&name).ok_or_else(|| {
        FieldError::new(
            "control.model",
            format!(
                "no ControlNet named `{name}` in {} (available: {available})",
                dir.describe()
            ),
        )
        .zh(format!(
            "{} 中没有名为 `{name}` 的 ControlNet（可用：{available}）",
            dir.describe()
        ))
    })?;
    let scale = c.scale.unwrap_or(CONTROL_SCALE);
    if !scale.is_finite() || !(0.0..=MAX_CONTROL_SCALE).contains(&scale) {
        return Err(FieldError::range(
            "control.scale",
            0,
            MAX_CONTROL_SCALE,
            scale,
        ));
    }
    let start = c.start.unwrap_or(0.0);
    let end = c.end.unwrap_or(1.0);
    for (field, v) in [("control.start", start), ("control.end", end)] {
        if !v.is_finite() || !(0.0..=1.0).contains(&v) {
            return Err(FieldError::new(
                field,
                format!("must be a fraction of the steps between 0 and 1 (got {v})"),
            )
            .zh(format!("必须是 0 到 1 之间的步数比例（当前为 {v}）")));
        }
    }
    if start >= end {
        return Err(FieldError::new(
            "control.start",
            format!("must be below control.end (got start {start}, end {end})"),
        )
        .zh(format!(
            "必须小于 control.end（当前 start 为 {start}，end 为 {end}）"
        )));
    }
    let preprocess = match c.preprocess.as_deref() {
        None => Preprocess::None,
        Some(p) => Preprocess::parse(p).ok_or_else(|| {
            FieldError::new(
                "control.preprocess",
                format!(
                    "`{p}` is not a preprocessor here (available: {}); bring depth or pose maps \
                     made elsewhere with preprocess `none`",
                    Preprocess::ALL.map(|p| p.as_str()).join(", ")
                ),
            )
            .zh(format!(
                "`{p}` 不是此处可用的预处理器（可用：{}）；深度图或姿态图请在别处生成后以 none 传入",
                Preprocess::ALL.map(|p| p.as_str()).join(", ")
            ))
        })?,
    };
    let low = c.low_threshold.unwrap_or(crate::control::CANNY_LOW);
    let high = c.high_threshold.unwrap_or(crate::control::CANNY_HIGH);
    for (field, v) in [
        ("control.low_threshold", low),
        ("control.high_threshold", high),
    ] {
        if v > 1020 {
            return Err(FieldError::range(field, 0, 1020, v));
        }
    }
    if low > high {
        return Err(FieldError::new(
            "control.low_threshold",
            format!("must not exceed control.high_threshold (got {low} > {high})"),
        )
        .zh(format!(
            "不能大于 control.high_threshold（当前 {low} > {high}）"
        )));
    }
    let img = decode_field("control.image", &c.image)?;
    let rgb = inputs::fit(&inputs::to_rgb(&img), width, height, ResizeMode::Stretch);
    let map = crate::control::preprocess(&rgb, preprocess, low, high);
    Ok(ControlSpec {
        model: name,
        path,
        image: InputImage::rgb(map),
        scale,
        preprocess,
        start,
        end,
    })
}

/// The image-to-image and inpainting options of a request, before validation.
struct InitOptions<'a> {
    mask: Option<&'a str>,
    strength: Option<f64>,
    mask_blur: Option<u32>,
    mode: ResizeMode,
    fill: InpaintFill,
    full_res: bool,
    padding: u32,
}

/// Checks and fits the image-to-image inputs: strength in [0, 1] that leaves at least one step,
/// a mask of the image's size with something to repaint; with "only masked", the crop around the
/// mask becomes the job's image.
fn init_image(
    img: image::DynamicImage,
    o: InitOptions<'_>,
    (width, height): (u32, u32),
    steps: u32,
    limits: &Limits,
) -> Result<InitImage, FieldError> {
    let rgb = inputs::to_rgb(&img);
    let mask = match o.mask {
        Some(b64) => {
            let m = decode_field("mask", b64)?;
            if (m.width(), m.height()) != (img.width(), img.height()) {
                let (mw, mh, iw, ih) = (m.width(), m.height(), img.width(), img.height());
                return Err(FieldError::new(
                    "mask",
                    format!("is {mw}×{mh} but the image is {iw}×{ih}: they must be the same size"),
                )
                .zh(format!(
                    "尺寸为 {mw}×{mh}，但图像是 {iw}×{ih}：两者必须一样大"
                )));
            }
            let m = inputs::to_luma_pil(&m);
            if inputs::mask_is_empty(&m) {
                return Err(FieldError::new(
                    "mask",
                    "is empty: nothing is white (≥ 128), so nothing would be repainted",
                )
                .zh("是空的：没有白色区域（≥ 128），所以不会重绘任何地方"));
            }
            Some(m)
        }
        None => {
            for (field, set) in [
                ("inpaint_fill", o.fill != InpaintFill::Original),
                ("inpaint_full_res", o.full_res),
            ] {
                if set {
                    return Err(
                        FieldError::new(field, "needs a mask (`mask`)").zh("需要蒙版（`mask`）")
                    );
                }
            }
            None
        }
    };
    if o.padding > MAX_INPAINT_PADDING {
        return Err(FieldError::range(
            "inpaint_full_res_padding",
            0,
            MAX_INPAINT_PADDING,
            o.padding,
        ));
    }
    let default = if mask.is_some() {
        INPAINT_STRENGTH
    } else {
        limits.img2img.strength
    };
    let strength = o.strength.unwrap_or(default);
    if !strength.is_finite() || !(0.0..=1.0).contains(&strength) {
        return Err(FieldError::range("strength", 0, 1, strength));
    }
    if steps_run(limits.img2img.noise, steps as usize, strength) == 0 {
        let product = steps as f64 * strength;
        let (rule, rule_zh) = match limits.img2img.noise {
            NoiseKind::VarianceExploding => (
                format!(
                    "this model runs int(steps × strength) steps, so steps × strength must be at \
                     least 1 (got {steps} × {strength} = {product})"
                ),
                format!(
                    "这个模型运行 int(步数 × 强度) 步，所以步数 × 强度至少要为 1\
                     （当前为 {steps} × {strength} = {product}）"
                ),
            ),
            NoiseKind::Flow => (
                "use a strength above 0".to_string(),
                "请使用大于 0 的强度".to_string(),
            ),
        };
        return Err(FieldError::new(
            "strength",
            format!("{strength} with {steps} steps runs no denoising step: {rule}"),
        )
        .zh(format!(
            "强度 {strength} 配合 {steps} 步不会运行任何去噪步骤：{rule_zh}"
        )));
    }
    let mask_blur = o.mask_blur.unwrap_or(DEFAULT_MASK_BLUR);
    if mask_blur > MAX_MASK_BLUR {
        return Err(FieldError::range("mask_blur", 0, MAX_MASK_BLUR, mask_blur));
    }
    // "Only masked": the job works on the crop around the mask, resized (and filled) to its size.
    let (region, job_rgb, job_mask) = match (&mask, o.full_res) {
        (Some(m), true) => {
            let (x, y, cw, ch) = inputs::crop_region(m, o.padding, width, height)
                .ok_or_else(|| FieldError::new("mask", "is empty").zh("是空的"))?;
            let crop_rgb = image::imageops::crop_imm(&rgb, x, y, cw, ch).to_image();
            let crop_mask = image::imageops::crop_imm(m, x, y, cw, ch).to_image();
            let region = CropRegion {
                x,
                y,
                width: cw,
                height: ch,
                image: InputImage::rgb(rgb.clone()),
                mask: InputImage::gray(m.clone()),
            };
            let fit_rgb = inputs::fit(&crop_rgb, width, height, ResizeMode::ResizeAndFill);
            let fit_mask = inputs::fit(&crop_mask, width, height, ResizeMode::ResizeAndFill);
            (Some(region), fit_rgb, Some(fit_mask))
        }
        _ => (
            None,
            inputs::fit(&rgb, width, height, o.mode),
            mask.as_ref().map(|m| inputs::fit(m, width, height, o.mode)),
        ),
    };
    if job_mask.as_ref().is_some_and(inputs::mask_is_empty) {
        return Err(FieldError::new(
            "mask",
            format!("has nothing white (≥ 128) left once fitted to {width}×{height}"),
        )
        .zh(format!(
            "缩放到 {width}×{height} 后没有剩下白色区域（≥ 128）"
        )));
    }
    Ok(InitImage {
        image: InputImage::rgb(job_rgb),
        mask: job_mask.map(InputImage::gray),
        strength,
        mask_blur,
        fill: o.fill,
        region,
    })
}

fn check_text(field: &str, text: String) -> Result<String, FieldError> {
    let n = text.chars().count();
    if n > MAX_PROMPT_CHARS {
        return Err(FieldError::new(
            field,
            format!("must be at most {MAX_PROMPT_CHARS} characters (got {n})"),
        )
        .zh(format!("最多 {MAX_PROMPT_CHARS} 个字符（当前为 {n}）")));
    }
    if text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t' && c != '\r')
    {
        return Err(no_control_characters(field));
    }
    Ok(text)
}

/// Largest seed handed out at random: JavaScript numbers are exact up to 2^53, so the UI can show
/// and reuse every seed it gets.
pub const MAX_RANDOM_SEED: u64 = (1 << 53) - 1;

/// A fresh random seed (no RNG crate needed: the std hasher is randomly keyed per process).
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    h.finish() & MAX_RANDOM_SEED
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            default_width: 1024,
            default_height: 1024,
            default_steps: 8,
            default_cfg: 1.8,
            size_multiple: 16,
            max_batch: 4,
            default_memory_mode: MemoryMode::Auto,
            img2img: Img2ImgDefaults {
                steps: 8,
                strength: 0.6,
                noise: NoiseKind::Flow,
            },
        }
    }

    fn req(json: &str) -> Result<ValidRequest, FieldError> {
        let r: GenerationRequest = serde_json::from_str(json).expect("parses");
        r.validate(&limits())
    }

    #[test]
    fn defaults_fill_in() {
        let v = req(r#"{"prompt":"a lake"}"#).unwrap();
        assert_eq!((v.width, v.height, v.steps, v.batch), (1024, 1024, 8, 1));
        assert_eq!(v.cfg, 1.8);
        assert!(v.enhance);
        assert!(v.seed <= MAX_RANDOM_SEED);
    }

    fn png_b64(w: u32, h: u32, luma: u8) -> String {
        use base64::Engine as _;
        let img = image::GrayImage::from_pixel(w, h, image::Luma([luma]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        base64::engine::general_purpose::STANDARD.encode(out.into_inner())
    }

    /// Every error the page's form can cause comes with its Chinese text, stating the same
    /// numbers as the English one (the page shows it next to the field in zh-CN).
    /// The error carries a Chinese text stating the same numbers as its English one.
    fn assert_chinese_text(e: &FieldError) {
        let zh = &e.i18n.zh_cn;
        assert!(
            crate::i18n::has_cjk(zh),
            "{}: no Chinese text for {:?}",
            e.field,
            e.message
        );
        assert_eq!(
            crate::i18n::number_set(&e.message),
            crate::i18n::number_set(zh),
            "{}: {} / {zh}",
            e.field,
            e.message
        );
    }

    #[test]
    fn field_errors_have_their_chinese_text() {
        let img = png_b64(64, 64, 200);
        let long = "x".repeat(MAX_PROMPT_CHARS + 1);
        let many: Vec<String> = (0..=MAX_EXCLUDED_PHRASES)
            .map(|i| format!("p{i}"))
            .collect();
        let cases = [
            (r#"{"prompt":" "}"#.to_owned(), "prompt"),
            (format!(r#"{{"prompt":"{long}"}}"#), "prompt"),
            (r#"{"prompt":"a\u0001b"}"#.to_owned(), "prompt"),
            (r#"{"prompt":"a <lora:x"}"#.to_owned(), "prompt"),
            (r#"{"prompt":"a <lora:x:abc>"}"#.to_owned(), "prompt"),
            (r#"{"prompt":"a <lora:x:0.5>"}"#.to_owned(), "loras"),
            (r#"{"prompt":"x","width":100}"#.to_owned(), "width"),
            (r#"{"prompt":"x","height":5000}"#.to_owned(), "height"),
            (r#"{"prompt":"x","steps":0}"#.to_owned(), "steps"),
            (r#"{"prompt":"x","cfg":50}"#.to_owned(), "cfg"),
            (r#"{"prompt":"x","batch":9}"#.to_owned(), "batch"),
            (r#"{"prompt":"x","strength":0.5}"#.to_owned(), "strength"),
            (
                format!(
                    r#"{{"prompt":"x","enhance_exclude":{}}}"#,
                    serde_json::json!(many)
                ),
                "enhance_exclude",
            ),
            (
                format!(
                    r#"{{"prompt":"x","enhance_exclude":["{}"]}}"#,
                    "y".repeat(201)
                ),
                "enhance_exclude",
            ),
            (r#"{"prompt":"x","image":"%%%"}"#.to_owned(), "image"),
            (r#"{"prompt":"x","image":"aGVsbG8="}"#.to_owned(), "image"),
            (
                format!(r#"{{"prompt":"x","image":"{img}","strength":2}}"#),
                "strength",
            ),
            (
                format!(r#"{{"prompt":"x","image":"{img}","strength":0}}"#),
                "strength",
            ),
            (
                format!(r#"{{"prompt":"x","image":"{img}","mask_blur":10000}}"#),
                "mask_blur",
            ),
            (
                format!(
                    r#"{{"prompt":"x","image":"{img}","mask":"{}"}}"#,
                    png_b64(32, 32, 255)
                ),
                "mask",
            ),
            (
                format!(
                    r#"{{"prompt":"x","image":"{img}","mask":"{}"}}"#,
                    png_b64(64, 64, 0)
                ),
                "mask",
            ),
            (
                format!(r#"{{"prompt":"x","image":"{img}","inpaint_full_res":true}}"#),
                "inpaint_full_res",
            ),
        ];
        for (json, field) in &cases {
            let e = req(json).expect_err(json);
            assert_eq!(&e.field, field, "{json}");
            assert_chinese_text(&e);
        }
    }

    #[test]
    fn control_errors_have_their_chinese_text() {
        let tmp = std::env::temp_dir().join(format!("zturbo-cn-zh-{}", std::process::id()));
        let dir = tmp.join("controlnet");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("union.safetensors"), b"not read here").unwrap();
        std::fs::write(dir.join("other.safetensors"), b"not read here").unwrap();
        let cdir = ControlDir::for_models_dir(&tmp);
        let img = png_b64(64, 64, 200);
        let cases: Vec<(String, &str, bool)> = vec![
            (format!(r#"{{"image":"{img}"}}"#), "control.model", false),
            (format!(r#"{{"image":"{img}"}}"#), "control.model", true),
            (
                format!(r#"{{"model":"nope","image":"{img}"}}"#),
                "control.model",
                true,
            ),
            (
                format!(r#"{{"model":"union","image":"{img}","scale":3}}"#),
                "control.scale",
                true,
            ),
            (
                format!(r#"{{"model":"union","image":"{img}","start":1.5}}"#),
                "control.start",
                true,
            ),
            (
                format!(r#"{{"model":"union","image":"{img}","start":0.6,"end":0.5}}"#),
                "control.start",
                true,
            ),
            (
                format!(r#"{{"model":"union","image":"{img}","preprocess":"depth"}}"#),
                "control.preprocess",
                true,
            ),
            (
                format!(r#"{{"model":"union","image":"{img}","high_threshold":2000}}"#),
                "control.high_threshold",
                true,
            ),
            (
                format!(
                    r#"{{"model":"union","image":"{img}","low_threshold":200,"high_threshold":100}}"#
                ),
                "control.low_threshold",
                true,
            ),
        ];
        for (control, field, with_dir) in &cases {
            let json = format!(r#"{{"prompt":"x","width":64,"height":64,"control":{control}}}"#);
            let r: GenerationRequest = serde_json::from_str(&json).expect("parses");
            let e = r
                .validate_with(&limits(), None, with_dir.then_some(&cdir))
                .expect_err(&json);
            assert_eq!(&e.field, field, "{json}: {}", e.message);
            assert_chinese_text(&e);
        }
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn errors_name_field_range_and_value() {
        let e = req(r#"{"prompt":"x","width":100}"#).unwrap_err();
        assert_eq!(e.field, "width");
        assert!(
            e.message.contains("multiple of 16") && e.message.contains("100"),
            "{e}"
        );
        let e = req(r#"{"prompt":"x","steps":0}"#).unwrap_err();
        assert_eq!(e.field, "steps");
        assert!(e.message.contains("between 1 and 100"), "{e}");
        let e = req(r#"{"prompt":"x","steps":500}"#).unwrap_err();
        assert!(e.message.contains("500"));
        let e = req(r#"{"prompt":"x","cfg":-1}"#).unwrap_err();
        assert_eq!(e.field, "cfg");
        let e = req(r#"{"prompt":"x","batch":9}"#).unwrap_err();
        assert_eq!(e.field, "batch");
        let e = req(r#"{"prompt":"   "}"#).unwrap_err();
        assert_eq!(e.field, "prompt");
        let long = "a".repeat(MAX_PROMPT_CHARS + 1);
        let e = req(&format!(r#"{{"prompt":"{long}"}}"#)).unwrap_err();
        assert_eq!(e.field, "prompt");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let r: Result<GenerationRequest, _> = serde_json::from_str(r#"{"prompt":"x","stepz":4}"#);
        assert!(r.unwrap_err().to_string().contains("stepz"));
    }

    #[test]
    fn high_cfg_is_accepted_for_interception() {
        assert_eq!(req(r#"{"prompt":"x","cfg":3.2}"#).unwrap().cfg, 3.2);
    }

    #[test]
    fn random_seeds_differ() {
        assert_ne!(random_seed(), random_seed());
    }
}
