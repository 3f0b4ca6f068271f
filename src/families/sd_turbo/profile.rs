//! SD-Turbo's and SDXL-Turbo's user-facing facts. Both were distilled (adversarial diffusion
//! distillation) at 512² for one step without guidance: the model cards use `guidance_scale = 0`
//! (our CFG 1.0) and 1–4 steps. CFG is still allowed so a negative prompt counts, but above 2 the
//! distilled models oversaturate and burn within one or two steps, so intercepted values (≥ 3) are
//! clamped to 2.

use crate::families::profile::{
    Band, BandLevel, BandText, CfgProfile, Defaults, FamilyKind, Img2ImgDefaults, LatentPreview,
    Profile, StepsProfile,
};
use crate::nn::scheduler::NoiseKind;

pub const SAFE_CFG_MAX: f32 = 2.0;
/// The model cards' settings: 512², one step, no guidance.
pub const SD_TURBO_DEFAULTS: Defaults = Defaults {
    width: 512,
    height: 512,
    steps: 1,
    cfg: 1.0,
};
/// The model cards' image-to-image example: 2 steps at strength 0.5 (one step runs; the
/// pipeline runs `int(steps × strength)` steps, so their product must reach 1).
pub const IMG2IMG_DEFAULTS: Img2ImgDefaults = Img2ImgDefaults {
    steps: 2,
    strength: 0.5,
    noise: NoiseKind::VarianceExploding,
};
/// SDXL-Turbo was distilled at 512² as well (not SDXL's 1024²).
pub const SDXL_TURBO_DEFAULTS: Defaults = SD_TURBO_DEFAULTS;

const STEP_BANDS: &[Band] = &[
    Band {
        max: Some(1.0),
        level: BandLevel::Ok,
        hint: "1 — default: the model is distilled for one step.",
        advice: "1 step: the default, what the model is distilled for.",
        zh: BandText {
            hint: "1 步——默认：模型就是为单步蒸馏的。",
            advice: "1 步：默认值，模型就是为此蒸馏的。",
        },
    },
    Band {
        max: Some(4.0),
        level: BandLevel::Info,
        hint: "{value} steps: a little more detail, {value}× slower.",
        advice: "{value} steps: a little more detail than the default {default}, {value}× slower.",
        zh: BandText {
            hint: "{value} 步：细节稍多一些，速度慢 {value} 倍。",
            advice: "{value} 步：比默认的 {default} 步细节稍多，速度慢 {value} 倍。",
        },
    },
    Band {
        max: None,
        level: BandLevel::Warn,
        hint: "More than 4: no gain for this distilled model, just slower.",
        advice: "{value} steps: no gain past 4 for this distilled model, only slower.",
        zh: BandText {
            hint: "超过 4 步：对这个蒸馏模型没有提升，只是更慢。",
            advice: "{value} 步：超过 4 步对这个蒸馏模型没有提升，只是更慢。",
        },
    },
];

const CFG_BANDS: &[Band] = &[
    Band {
        max: Some(1.0),
        level: BandLevel::Ok,
        hint: "{default} — default: guidance off, as the model was distilled; the negative \
               prompt is unused.",
        advice: "CFG {value}: guidance off, as the model was distilled; the default and fastest.",
        zh: BandText {
            hint: "{default}——默认：关闭引导，与模型蒸馏时一致；反向提示词不会被使用。",
            advice: "CFG {value}：关闭引导，与模型蒸馏时一致；这是默认值，也最快。",
        },
    },
    Band {
        max: Some(SAFE_CFG_MAX),
        level: BandLevel::Info,
        hint: "Guidance on: the negative prompt takes effect, two UNet passes per step; colours \
               may oversaturate.",
        advice: "CFG {value}: guidance on (two UNet passes per step) so the negative prompt \
                 counts; this distilled model oversaturates quickly, {default} (off) is the \
                 default.",
        zh: BandText {
            hint: "开启引导：反向提示词生效，每步运行两次 UNet；颜色可能过饱和。",
            advice: "CFG {value}：开启引导（每步运行两次 UNet），反向提示词才会生效；这个蒸馏模型很快就会过饱和，默认是 {default}（关闭）。",
        },
    },
    Band {
        max: Some(2.99),
        level: BandLevel::Warn,
        hint: "Above the safe max {safe}: the engine lowers it if a step goes black.",
        advice: "CFG {value}: above {safe} this distilled model burns colours; from 3 the value \
                 is intercepted and lowered to {safe}. {default} (off) is the default.",
        zh: BandText {
            hint: "高于安全上限 {safe}：如果某一步出现黑图，引擎会自动调低。",
            advice: "CFG {value}：高于 {safe} 这个蒸馏模型会烧色；从 3 起该值会被拦截并降到 {safe}。默认是 {default}（关闭）。",
        },
    },
    Band {
        max: None,
        level: BandLevel::Bad,
        hint: "≥ 3.0 is intercepted: the engine clamps it to the safe max {safe}.",
        advice: "CFG {value}: above {safe} this distilled model burns colours, so from 3 the \
                 value is intercepted and lowered to {safe}. {default} (off) is the default.",
        zh: BandText {
            hint: "≥ 3.0 会被拦截：引擎会把它降到安全上限 {safe}。",
            advice: "CFG {value}：高于 {safe} 这个蒸馏模型会烧色，所以从 3 起该值会被拦截并降到 {safe}。默认是 {default}（关闭）。",
        },
    },
];

const STEPS: StepsProfile = StepsProfile {
    presets: &[1, 2, 4, 8],
    bands: STEP_BANDS,
};

const CFG: CfgProfile = CfgProfile {
    presets: &[1.0, 1.5, 2.0],
    intercept_at: 3.0,
    bands: CFG_BANDS,
};

/// SD 2.1's VAE (SD-Turbo's) has SD 1.x's latent space (4 channels, scale 0.18215): the linear
/// colour approximation ComfyUI publishes for it (`comfy/latent_formats.py`, class `SD15`).
const SD_PREVIEW: LatentPreview = LatentPreview {
    factors: &[
        [0.3512, 0.2297, 0.3227],
        [0.3250, 0.4974, 0.2350],
        [-0.2829, 0.1762, 0.2721],
        [-0.2120, -0.2616, -0.7177],
    ],
    bias: [0.0, 0.0, 0.0],
};

/// SDXL's VAE (scale 0.13025) has its own latent colours (ComfyUI's class `SDXL`).
const SDXL_PREVIEW: LatentPreview = LatentPreview {
    factors: &[
        [0.3651, 0.4232, 0.4341],
        [-0.2533, -0.0042, 0.1068],
        [0.1076, 0.1111, -0.0362],
        [-0.3165, -0.2492, -0.2188],
    ],
    bias: [0.1084, -0.0175, -0.0011],
};

/// `stabilityai/sd-turbo` (4 latent channels, VAE factor 8).
pub const SD_TURBO: Profile = Profile {
    family: FamilyKind::SdTurbo,
    latent_channels: 4,
    vae_scale_factor: 8,
    size_multiple: 8,
    defaults: SD_TURBO_DEFAULTS,
    safe_cfg_max: SAFE_CFG_MAX,
    max_batch: 8,
    sampler: "Euler",
    steps: STEPS,
    cfg: CFG,
    img2img: IMG2IMG_DEFAULTS,
    preview: SD_PREVIEW,
};

/// `stabilityai/sdxl-turbo`: the same ladders as SD-Turbo.
pub const SDXL_TURBO: Profile = Profile {
    family: FamilyKind::SdxlTurbo,
    defaults: SDXL_TURBO_DEFAULTS,
    preview: SDXL_PREVIEW,
    ..SD_TURBO
};
