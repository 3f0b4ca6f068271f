//! Z-Image-Turbo's user-facing facts: 1024², 8 steps, CFG 1.8, and what each step count and CFG
//! value does. The numbers are the seed study's: composition forms at 4 steps, 8 is the detail
//! threshold, from 12 images over-sharpen; CFG 1.8 has the best usable rate (89.6 %), 2.2 is sharp
//! and may overexpose, the forced-CFG example recovered at 2.4, from 3 the model breaks.

use crate::families::profile::{
    Band, BandLevel, BandText, CfgProfile, Defaults, FamilyKind, Img2ImgDefaults, LatentPreview,
    Profile, StepsProfile,
};
use crate::nn::scheduler::NoiseKind;

/// The forced-CFG example recovered at 2.4; above it Z-Image-Turbo overexposes and breaks.
pub const SAFE_CFG_MAX: f32 = 2.4;
pub const DEFAULTS: Defaults = Defaults {
    width: 1024,
    height: 1024,
    steps: 8,
    cfg: 1.8,
};

/// `ZImageImg2ImgPipeline`'s default strength, with the model's 8 steps (5 of them run).
pub const IMG2IMG_DEFAULTS: Img2ImgDefaults = Img2ImgDefaults {
    steps: DEFAULTS.steps,
    strength: 0.6,
    noise: NoiseKind::Flow,
};

const STEP_BANDS: &[Band] = &[
    Band {
        max: Some(1.0),
        level: BandLevel::Warn,
        hint: "Very few steps: a rough layout only.",
        advice: "1 step: even the composition forms only at 4; {default} is the default.",
        zh: BandText {
            hint: "步数太少：只有粗略的布局。",
            advice: "1 步：构图要到 4 步才成形；默认是 {default} 步。",
        },
    },
    Band {
        max: Some(3.0),
        level: BandLevel::Warn,
        hint: "Very few steps: a rough layout only.",
        advice: "{value} steps: even the composition forms only at 4; {default} is the default.",
        zh: BandText {
            hint: "步数太少：只有粗略的布局。",
            advice: "{value} 步：构图要到 4 步才成形；默认是 {default} 步。",
        },
    },
    Band {
        max: Some(4.0),
        level: BandLevel::Info,
        hint: "4 — composition only.",
        advice: "4 steps: composition only, good for quick drafts; {default} is the default \
                 (detail threshold).",
        zh: BandText {
            hint: "4 步——只有构图。",
            advice: "4 步：只有构图，适合快速出草稿；默认是 {default} 步（细节阈值）。",
        },
    },
    Band {
        max: Some(5.0),
        level: BandLevel::Info,
        hint: "Between composition and basic texture.",
        advice: "5 steps: between composition and basic texture; {default} is the default \
                 (detail threshold).",
        zh: BandText {
            hint: "介于构图和基本纹理之间。",
            advice: "5 步：介于构图和基本纹理之间；默认是 {default} 步（细节阈值）。",
        },
    },
    Band {
        max: Some(6.0),
        level: BandLevel::Info,
        hint: "6 — basic texture.",
        advice: "6 steps: basic texture; {default} is the default (detail threshold).",
        zh: BandText {
            hint: "6 步——基本纹理。",
            advice: "6 步：有了基本纹理；默认是 {default} 步（细节阈值）。",
        },
    },
    Band {
        max: Some(7.0),
        level: BandLevel::Info,
        hint: "Just under the detail threshold.",
        advice: "7 steps: just below the detail threshold; {default} is the default.",
        zh: BandText {
            hint: "略低于细节阈值。",
            advice: "7 步：略低于细节阈值；默认是 {default} 步。",
        },
    },
    Band {
        max: Some(8.0),
        level: BandLevel::Ok,
        hint: "8 — default: the detail threshold the model is distilled for.",
        advice: "8 steps: the default, the detail threshold.",
        zh: BandText {
            hint: "8 步——默认：模型蒸馏时针对的细节阈值。",
            advice: "8 步：默认值，即细节阈值。",
        },
    },
    Band {
        max: Some(11.0),
        level: BandLevel::Info,
        hint: "Past the default: little visible gain, slower.",
        advice: "{value} steps: little gain over 8, only slower.",
        zh: BandText {
            hint: "超过默认值：肉眼几乎看不出提升，只会更慢。",
            advice: "{value} 步：比 8 步几乎没有提升，只是更慢。",
        },
    },
    Band {
        max: Some(12.0),
        level: BandLevel::Warn,
        hint: "12 — no gain; starts to over-sharpen.",
        advice: "12 steps: no gain over 8, and from 12 images start to over-sharpen.",
        zh: BandText {
            hint: "12 步——没有提升，开始过度锐化。",
            advice: "12 步：比 8 步没有提升，而且从 12 步起图像开始过度锐化。",
        },
    },
    Band {
        max: None,
        level: BandLevel::Warn,
        hint: "More than 12: no gain and over-sharpening; just slower.",
        advice: "{value} steps: no gain over 8, and from 12 images start to over-sharpen.",
        zh: BandText {
            hint: "超过 12 步：没有提升，还会过度锐化，只是更慢。",
            advice: "{value} 步：比 8 步没有提升，而且从 12 步起图像开始过度锐化。",
        },
    },
];

/// Bounds sit on the 0.01 grid the form and the advice show (`x < 1.45` is `max 1.44`).
const CFG_BANDS: &[Band] = &[
    Band {
        max: Some(1.0),
        level: BandLevel::Info,
        hint: "Guidance off: fastest; the negative prompt has no effect.",
        advice: "CFG {value}: guidance off, fastest, and the negative prompt has no effect; \
                 {default} is the default (best usable rate, 89.6 %).",
        zh: BandText {
            hint: "关闭引导：速度最快；反向提示词不起作用。",
            advice: "CFG {value}：关闭引导，速度最快，反向提示词不起作用；默认是 {default}（可用率最高，89.6 %）。",
        },
    },
    Band {
        max: Some(1.44),
        level: BandLevel::Info,
        hint: "Very soft; may drift from the prompt.",
        advice: "CFG {value}: a very soft look that may drift from the prompt; {default} is the \
                 default (best usable rate, 89.6 %).",
        zh: BandText {
            hint: "非常柔和，可能偏离提示词。",
            advice: "CFG {value}：画面非常柔和，可能偏离提示词；默认是 {default}（可用率最高，89.6 %）。",
        },
    },
    Band {
        max: Some(1.64),
        level: BandLevel::Info,
        hint: "Soft.",
        advice: "CFG {value}: a soft look (1.5 is soft); {default} is the default (best usable \
                 rate, 89.6 %).",
        zh: BandText {
            hint: "柔和。",
            advice: "CFG {value}：画面柔和（1.5 偏柔和）；默认是 {default}（可用率最高，89.6 %）。",
        },
    },
    Band {
        max: Some(1.74),
        level: BandLevel::Info,
        hint: "Soft, close to the default.",
        advice: "CFG {value}: close to the default {default}, the best usable rate (89.6 %).",
        zh: BandText {
            hint: "柔和，接近默认值。",
            advice: "CFG {value}：接近默认值 {default}，即可用率最高的设置（89.6 %）。",
        },
    },
    Band {
        max: Some(1.85),
        level: BandLevel::Ok,
        hint: "{default} — default, best usable rate.",
        advice: "CFG {value}: at the default {default}, the best usable rate (89.6 %).",
        zh: BandText {
            hint: "{default}——默认值，可用率最高。",
            advice: "CFG {value}：即默认值 {default}，可用率最高（89.6 %）。",
        },
    },
    Band {
        max: Some(2.19),
        level: BandLevel::Info,
        hint: "Slightly crisper than the default.",
        advice: "CFG {value}: slightly crisper than the default {default} (best usable rate, \
                 89.6 %).",
        zh: BandText {
            hint: "比默认值稍微锐利一些。",
            advice: "CFG {value}：比默认值 {default} 稍微锐利一些（默认值可用率最高，89.6 %）。",
        },
    },
    Band {
        max: Some(SAFE_CFG_MAX),
        level: BandLevel::Info,
        hint: "Sharp, may overexpose.",
        advice: "CFG {value}: sharp (2.2) but may overexpose; {default} is the default.",
        zh: BandText {
            hint: "锐利，可能过曝。",
            advice: "CFG {value}：锐利（2.2）但可能过曝；默认是 {default}。",
        },
    },
    Band {
        max: Some(2.99),
        level: BandLevel::Warn,
        hint: "Above the safe max {safe}: the engine lowers it if a step goes black.",
        advice: "CFG {value}: above 2.2 images overexpose, and above {safe} the model breaks \
                 (black images; the engine lowers CFG when a step fails); {default} is the \
                 default.",
        zh: BandText {
            hint: "高于安全上限 {safe}：如果某一步出现黑图，引擎会自动调低。",
            advice: "CFG {value}：高于 2.2 图像会过曝，高于 {safe} 模型会崩坏（出现黑图；某一步失败时引擎会调低 CFG）；默认是 {default}。",
        },
    },
    Band {
        max: None,
        level: BandLevel::Bad,
        hint: "≥ 3.0 is intercepted: the engine clamps it to the safe max {safe}.",
        advice: "CFG {value}: from 3 this model breaks (black images), so the value is \
                 intercepted and lowered to {safe}; {default} is the default.",
        zh: BandText {
            hint: "≥ 3.0 会被拦截：引擎会把它降到安全上限 {safe}。",
            advice: "CFG {value}：从 3 起该模型会崩坏（出现黑图），所以该值会被拦截并降到 {safe}；默认是 {default}。",
        },
    },
];

/// Z-Image-Turbo decodes with FLUX.1's VAE (16 channels, scale 0.3611, shift 0.1159), so its
/// latents share FLUX's linear colour approximation. The coefficients are the least-squares fit
/// ComfyUI publishes for FLUX latents (`comfy/latent_formats.py`, class `Flux`).
const PREVIEW: LatentPreview = LatentPreview {
    factors: &[
        [-0.0346, 0.0244, 0.0681],
        [0.0034, 0.0210, 0.0687],
        [0.0275, -0.0668, -0.0433],
        [-0.0174, 0.0160, 0.0617],
        [0.0859, 0.0721, 0.0329],
        [0.0004, 0.0383, 0.0115],
        [0.0405, 0.0861, 0.0915],
        [-0.0236, -0.0185, -0.0259],
        [-0.0245, 0.0250, 0.1180],
        [0.1008, 0.0755, -0.0421],
        [-0.0515, 0.0201, 0.0011],
        [0.0428, -0.0012, -0.0036],
        [0.0817, 0.0765, 0.0749],
        [-0.1264, -0.0522, -0.1103],
        [-0.0280, -0.0881, -0.0499],
        [-0.1262, -0.0982, -0.0778],
    ],
    bias: [-0.0329, -0.0718, -0.0851],
};

/// The published model's profile (16 latent channels, VAE factor 8, patch 2).
pub const PROFILE: Profile = Profile {
    family: FamilyKind::ZImage,
    latent_channels: 16,
    vae_scale_factor: 8,
    size_multiple: 16,
    defaults: DEFAULTS,
    safe_cfg_max: SAFE_CFG_MAX,
    max_batch: 8,
    sampler: "Euler (flow)",
    steps: StepsProfile {
        presets: &[4, 6, 8, 12],
        bands: STEP_BANDS,
    },
    cfg: CfgProfile {
        presets: &[1.5, 1.8, 2.2, 3.0],
        intercept_at: 3.0,
        bands: CFG_BANDS,
    },
    img2img: IMG2IMG_DEFAULTS,
    preview: PREVIEW,
};
