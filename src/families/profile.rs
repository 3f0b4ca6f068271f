//! A family's user-facing facts in one place: defaults, limits, step and CFG presets and the bands
//! that say what a value does (with the texts the UI hints and the prompt advice show). Each family
//! folder's `profile.rs` fills one [`Profile`]; the engine, the prompt advice, the server's
//! `/api/info` and (through it) the UI read it and never repeat a family's numbers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize, Serializer};

use crate::nn::scheduler::NoiseKind;

/// The model families zturbo runs. The wire names are the `family` of `/api/info` and the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FamilyKind {
    #[serde(rename = "z-image")]
    ZImage,
    #[serde(rename = "sd-turbo")]
    SdTurbo,
    #[serde(rename = "sdxl-turbo")]
    SdxlTurbo,
}

impl FamilyKind {
    /// Does the family run ControlNets (Z-Image's ControlNet Union)?
    pub fn has_controlnet(self) -> bool {
        matches!(self, Self::ZImage)
    }

    pub const ALL: [FamilyKind; 3] = [
        FamilyKind::ZImage,
        FamilyKind::SdTurbo,
        FamilyKind::SdxlTurbo,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FamilyKind::ZImage => "z-image",
            FamilyKind::SdTurbo => "sd-turbo",
            FamilyKind::SdxlTurbo => "sdxl-turbo",
        }
    }

    /// The diffusers pipeline class (`model_index.json`'s `_class_name`) this family runs.
    pub fn pipeline_class(self) -> &'static str {
        match self {
            FamilyKind::ZImage => super::z_image::PIPELINE_CLASS,
            FamilyKind::SdTurbo => super::sd_turbo::SD_PIPELINE_CLASS,
            FamilyKind::SdxlTurbo => super::sd_turbo::SDXL_PIPELINE_CLASS,
        }
    }

    /// The family that runs a diffusers pipeline class, if we have one.
    pub fn of_pipeline_class(class: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.pipeline_class() == class)
    }

    /// The published model's profile (the config-derived facts as in its repository).
    pub fn profile(self) -> Profile {
        match self {
            FamilyKind::ZImage => super::z_image::profile::PROFILE,
            FamilyKind::SdTurbo => super::sd_turbo::profile::SD_TURBO,
            FamilyKind::SdxlTurbo => super::sd_turbo::profile::SDXL_TURBO,
        }
    }
}

impl fmt::Display for FamilyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for FamilyKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// A family name that is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown model family `{0}` (known: z-image, sd-turbo, sdxl-turbo)")]
pub struct UnknownFamily(pub String);

impl FromStr for FamilyKind {
    type Err = UnknownFamily;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| UnknownFamily(s.to_owned()))
    }
}

/// The model's user-facing defaults (the UI's and the API's).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Defaults {
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    #[serde(serialize_with = "shortest")]
    pub cfg: f32,
}

/// How a value in a band should be shown: `ok` marks the recommended band, `bad` a value the
/// engine will not run as given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BandLevel {
    Info,
    Ok,
    Warn,
    Bad,
}

/// One range of a ladder. A value falls in the first band whose `max` is ≥ the value (`None` =
/// unbounded, the last band). `hint` is the UI's short line next to the field, `advice` the
/// sentence of the prompt advice; both may hold `{value}`, `{default}` and `{safe}`, which
/// [`Profile::render`] (and the UI) fill in. `zh` holds the same two texts in Simplified Chinese,
/// with the same placeholders and numbers; it goes out as `i18n: {"zh-CN": {hint, advice}}` (see
/// [`crate::i18n`]), so a family's numbers stay in its own folder in every language.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Band {
    #[serde(serialize_with = "shortest_opt")]
    pub max: Option<f32>,
    pub level: BandLevel,
    pub hint: &'static str,
    pub advice: &'static str,
    #[serde(rename = "i18n", serialize_with = "zh_cn_entry")]
    pub zh: BandText,
}

/// A band's two texts in one language.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BandText {
    pub hint: &'static str,
    pub advice: &'static str,
}

fn zh_cn_entry<S: Serializer>(text: &BandText, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(1))?;
    m.serialize_entry(crate::i18n::ZH_CN, text)?;
    m.end()
}

/// The band `value` falls in (the last one for values past every bound, and for NaN).
pub fn band_of(bands: &'static [Band], value: f32) -> Option<&'static Band> {
    bands
        .iter()
        .find(|b| b.max.is_some_and(|m| value <= m))
        .or(bands.last())
}

/// Step count: the form's presets and what each count does.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepsProfile {
    pub presets: &'static [u32],
    pub bands: &'static [Band],
}

impl StepsProfile {
    pub fn band(&self, steps: u32) -> Option<&'static Band> {
        band_of(self.bands, steps as f32)
    }
}

/// Classifier-free guidance scale (ComfyUI/A1111 convention: 1.0 = off): presets, the value from
/// which a request is intercepted and clamped to the safe maximum, and what each range does.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CfgProfile {
    #[serde(serialize_with = "shortest_list")]
    pub presets: &'static [f32],
    #[serde(serialize_with = "shortest")]
    pub intercept_at: f32,
    pub bands: &'static [Band],
}

impl CfgProfile {
    pub fn band(&self, cfg: f32) -> Option<&'static Band> {
        band_of(self.bands, cfg)
    }
}

/// A family's image-to-image defaults and how its pipeline turns strength into steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Img2ImgDefaults {
    /// Steps when an image is given and `steps` is not.
    pub steps: u32,
    /// Strength when an image is given (without a mask) and `strength` is not.
    pub strength: f64,
    /// Decides how strength cuts the schedule (see [`NoiseKind`]).
    pub noise: NoiseKind,
}

/// How the denoiser's latents look in colour without the VAE (the live preview): a linear map
/// per latent cell, `rgb = bias + Σ_c latent[c] · factors[c]`, in [-1, 1], applied to the
/// denoised estimate in the denoiser's own latent space (after the VAE's scale and shift, as the
/// scheduler sees it) — the approach of ComfyUI's `Latent2RGBPreviewer`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatentPreview {
    /// One `[r, g, b]` row per latent channel.
    pub factors: &'static [[f32; 3]],
    pub bias: [f32; 3],
}

/// Per-family facts in one place. The constants come from the family's `profile.rs`; the three
/// config-derived numbers (`latent_channels`, `vae_scale_factor`, `size_multiple`) are replaced by
/// the opened folder's own when a model is loaded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Profile {
    pub family: FamilyKind,
    pub latent_channels: usize,
    /// Pixels per latent cell.
    pub vae_scale_factor: usize,
    /// Width and height must be multiples of this.
    pub size_multiple: u32,
    pub defaults: Defaults,
    /// Highest CFG the model tolerates without breaking; intercepted requests are clamped to it.
    pub safe_cfg_max: f32,
    /// Most images per job the form offers (the memory planner may allow fewer).
    pub max_batch: u32,
    /// The sampler's name as A1111 metadata shows it (`Euler (flow)`, `Euler`).
    pub sampler: &'static str,
    pub steps: StepsProfile,
    pub cfg: CfgProfile,
    pub img2img: Img2ImgDefaults,
    /// The live preview's latent → RGB projection.
    pub preview: LatentPreview,
}

/// The profile as `/api/info` sends it (`model.profile`): the UI draws presets and hints from it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ProfileView<'a> {
    pub family: FamilyKind,
    pub steps: &'a StepsProfile,
    pub cfg: &'a CfgProfile,
    /// Image-to-image defaults (steps, strength) and how strength cuts the schedule (`noise`:
    /// `flow` or `variance_exploding`, where steps × strength must reach 1).
    pub img2img: &'a Img2ImgDefaults,
}

impl Profile {
    pub fn view(&self) -> ProfileView<'_> {
        ProfileView {
            family: self.family,
            steps: &self.steps,
            cfg: &self.cfg,
            img2img: &self.img2img,
        }
    }

    /// Fills a band text's placeholders: `{value}` (as given), `{default}` (the default of the
    /// ladder the text belongs to, `default`), `{safe}` (the safe CFG maximum).
    pub fn render(&self, text: &str, value: &str, default: &str) -> String {
        // Callers pass a band's `hint`/`advice` or its `zh` twin: the same placeholders.
        text.replace("{value}", value)
            .replace("{default}", default)
            .replace("{safe}", &fmt_num(self.safe_cfg_max))
    }
}

/// "1.8", "3.0", "1.85": enough digits to tell values apart without float noise.
pub fn fmt_num(x: f32) -> String {
    if !x.is_finite() {
        return x.to_string();
    }
    let s = format!("{x:.2}");
    match s.strip_suffix('0') {
        Some(t) if !t.ends_with('.') => t.to_owned(),
        _ => s,
    }
}

/// An f32 as the f64 with the same shortest decimal form, so 1.8f32 is sent as 1.8 rather than
/// 1.7999999523162842 (which a client would show and compare against).
pub fn shortest_f64(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

fn shortest<S: Serializer>(x: &f32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(shortest_f64(*x))
}

fn shortest_opt<S: Serializer>(x: &Option<f32>, s: S) -> Result<S::Ok, S::Error> {
    match x {
        Some(v) => s.serialize_some(&shortest_f64(*v)),
        None => s.serialize_none(),
    }
}

fn shortest_list<S: Serializer>(xs: &&'static [f32], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(xs.iter().map(|&x| shortest_f64(x)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ladder_ends_unbounded_and_rises() {
        for kind in FamilyKind::ALL {
            let p = kind.profile();
            for bands in [p.steps.bands, p.cfg.bands] {
                let (last, rest) = bands.split_last().expect("a ladder has bands");
                assert_eq!(last.max, None, "{kind}: the last band is unbounded");
                let maxes: Vec<f32> = rest.iter().map(|b| b.max.expect("bounded")).collect();
                assert!(maxes.windows(2).all(|w| w[0] < w[1]), "{kind}: {maxes:?}");
            }
            // Defaults and presets sit in the bands the profile recommends.
            let d = p.defaults;
            assert_eq!(p.steps.band(d.steps).map(|b| b.level), Some(BandLevel::Ok));
            assert_eq!(p.cfg.band(d.cfg).map(|b| b.level), Some(BandLevel::Ok));
            assert!(p.safe_cfg_max < p.cfg.intercept_at, "{kind}");
            let bad = p.cfg.band(p.cfg.intercept_at).map(|b| b.level);
            assert_eq!(bad, Some(BandLevel::Bad), "{kind}: the intercepted band");
            let below = p.cfg.band(p.cfg.intercept_at - 0.01).map(|b| b.level);
            assert_ne!(
                below,
                Some(BandLevel::Bad),
                "{kind}: just below interception"
            );
            assert!(p.steps.presets.contains(&d.steps), "{kind}");
            assert_eq!(kind.profile().family, kind);
            assert_eq!(
                FamilyKind::of_pipeline_class(kind.pipeline_class()),
                Some(kind)
            );
            assert_eq!(kind.as_str().parse::<FamilyKind>(), Ok(kind));
        }
    }

    #[test]
    fn a_value_falls_in_the_first_band_whose_max_is_at_least_it() {
        let p = FamilyKind::ZImage.profile();
        let b = p.steps.band(4).unwrap();
        assert_eq!(b.max, Some(4.0));
        assert_eq!(p.steps.band(5).unwrap().max, Some(5.0));
        assert_eq!(p.steps.band(1000).unwrap().max, None);
        assert_eq!(p.cfg.band(f32::NAN).unwrap().max, None);
    }

    #[test]
    fn the_view_is_the_ui_contract() {
        let p = FamilyKind::SdTurbo.profile();
        let v = serde_json::to_value(p.view()).unwrap();
        let keys = |v: &serde_json::Value| -> std::collections::BTreeSet<String> {
            v.as_object().unwrap().keys().cloned().collect()
        };
        assert_eq!(
            keys(&v),
            ["cfg", "family", "img2img", "steps"]
                .map(String::from)
                .into()
        );
        assert_eq!(v["family"], "sd-turbo");
        // The page's strength slider and its "steps × strength ≥ 1" check read these.
        assert_eq!(
            v["img2img"],
            serde_json::json!({"steps": 2, "strength": 0.5, "noise": "variance_exploding"})
        );
        assert_eq!(v["steps"]["presets"], serde_json::json!([1, 2, 4, 8]));
        assert_eq!(v["cfg"]["intercept_at"], 3.0);
        let bands = v["cfg"]["bands"].as_array().unwrap();
        assert_eq!(bands[0]["max"], 1.0);
        assert!(bands.last().unwrap()["max"].is_null());
        for b in bands {
            let want = ["advice", "hint", "i18n", "level", "max"].map(String::from);
            assert_eq!(keys(b), want.into());
            let zh = &b["i18n"]["zh-CN"];
            assert_eq!(keys(zh), ["advice", "hint"].map(String::from).into());
        }
        let z = serde_json::to_value(FamilyKind::ZImage.profile().view()).unwrap();
        // f32 values go out in their shortest form (1.8, not 1.7999999523162842).
        assert_eq!(z["cfg"]["presets"][1], 1.8);
    }

    #[test]
    fn every_family_previews_each_of_its_latent_channels() {
        for kind in FamilyKind::ALL {
            let p = kind.profile();
            assert_eq!(p.preview.factors.len(), p.latent_channels, "{kind}");
            // A neutral (all-zero) latent maps to a mid grey, not to black or white.
            assert!(p.preview.bias.iter().all(|b| b.abs() < 0.5), "{kind}");
        }
    }

    /// Every band of every family has its Chinese hint and advice, with the English text's
    /// placeholders and numbers (a translation keeps "8", "2.4", "89.6").
    #[test]
    fn every_band_has_its_chinese_texts() {
        use crate::i18n::{has_cjk, number_set};
        let placeholders = |s: &str| -> std::collections::BTreeSet<String> {
            let mut out = std::collections::BTreeSet::new();
            let mut rest = s;
            while let Some(i) = rest.find('{') {
                let Some(j) = rest[i..].find('}') else { break };
                out.insert(rest[i..i + j + 1].to_owned());
                rest = &rest[i + j + 1..];
            }
            out
        };
        for kind in FamilyKind::ALL {
            let p = kind.profile();
            for (ladder, bands) in [("steps", p.steps.bands), ("cfg", p.cfg.bands)] {
                for (i, b) in bands.iter().enumerate() {
                    for (what, en, zh) in [
                        ("hint", b.hint, b.zh.hint),
                        ("advice", b.advice, b.zh.advice),
                    ] {
                        let at = format!("{kind} {ladder} band {i} {what}");
                        assert!(has_cjk(zh), "{at}: no Chinese text: {zh:?}");
                        assert_eq!(placeholders(en), placeholders(zh), "{at}: placeholders");
                        assert_eq!(number_set(en), number_set(zh), "{at}: numbers");
                        // Rendered, the two still state the same numbers.
                        let (en, zh) = (p.render(en, "2.5", "1.8"), p.render(zh, "2.5", "1.8"));
                        assert_eq!(number_set(&en), number_set(&zh), "{at}: {en} / {zh}");
                    }
                }
            }
        }
    }

    #[test]
    fn placeholders_are_filled() {
        let p = FamilyKind::ZImage.profile();
        let s = p.render("{value} of {default}, safe {safe}", "2.5", "1.8");
        assert_eq!(s, "2.5 of 1.8, safe 2.4");
        assert_eq!(fmt_num(1.8), "1.8");
        assert_eq!(fmt_num(3.0), "3.0");
        assert_eq!(fmt_num(1.85), "1.85");
    }
}
