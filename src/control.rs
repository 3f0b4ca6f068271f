//! ControlNet inputs that touch no tensor: the folders ControlNet files are found in
//! (`<models-dir>/controlnet/`, a ComfyUI tree's `models/controlnet/`) and the control-image
//! preprocessors (`canny`, in Rust). Imports nothing from the crate.

use std::path::{Path, PathBuf};

use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};

/// How a control image becomes the map the ControlNet sees.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preprocess {
    /// The image is the map (depth, pose, HED, MLSD … made elsewhere, or edges already).
    #[default]
    None,
    /// Canny edges: Gaussian blur (σ 1.4), Sobel, non-maximum suppression, hysteresis.
    Canny,
}

impl Preprocess {
    pub const ALL: [Preprocess; 2] = [Preprocess::None, Preprocess::Canny];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Canny => "canny",
        }
    }

    /// Our names, and the A1111 ControlNet extension's module names for the same thing.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" | "" => Some(Self::None),
            "canny" => Some(Self::Canny),
            _ => None,
        }
    }
}

/// Canny's default thresholds (the A1111 ControlNet extension's `threshold_a`/`threshold_b`).
pub const CANNY_LOW: u32 = 100;
pub const CANNY_HIGH: u32 = 200;
/// σ of the blur before the gradients.
pub const CANNY_SIGMA: f32 = 1.4;

/// The gray OpenCV's `cvtColor(RGB2GRAY)` computes (BT.601, its fixed-point rounding).
pub fn gray_cv(img: &RgbImage) -> GrayImage {
    GrayImage::from_fn(img.width(), img.height(), |x, y| {
        let [r, g, b] = img.get_pixel(x, y).0;
        let v = (r as u32 * 4899 + g as u32 * 9617 + b as u32 * 1868 + (1 << 13)) >> 14;
        image::Luma([v.min(255) as u8])
    })
}

/// Separable Gaussian blur of an 8-bit image, σ `sigma`, kernel `2·round(3σ)+1` wide (OpenCV's
/// size for 8-bit images), borders replicated, rounded back to 8 bits.
pub fn gaussian_blur(img: &GrayImage, sigma: f32) -> GrayImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return img.clone();
    }
    let size = (((sigma * 6.0 + 1.0).round() as usize) | 1).max(3);
    let r = size / 2;
    let mut k: Vec<f64> = (0..size)
        .map(|i| {
            let d = i as f64 - r as f64;
            (-(d * d) / (2.0 * sigma as f64 * sigma as f64)).exp()
        })
        .collect();
    let sum: f64 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= sum);
    let src = img.as_raw();
    let clamp = |v: isize, n: usize| v.clamp(0, n as isize - 1) as usize;
    let mut tmp = vec![0f64; w * h];
    for y in 0..h {
        for x in 0..w {
            let mut acc = 0.0;
            for (i, kv) in k.iter().enumerate() {
                let xx = clamp(x as isize + i as isize - r as isize, w);
                acc += kv * src[y * w + xx] as f64;
            }
            tmp[y * w + x] = acc;
        }
    }
    let mut out = vec![0u8; w * h];
    for y in 0..h {
        for x in 0..w {
            let mut acc = 0.0;
            for (i, kv) in k.iter().enumerate() {
                let yy = clamp(y as isize + i as isize - r as isize, h);
                acc += kv * tmp[yy * w + x];
            }
            out[y * w + x] = acc.round().clamp(0.0, 255.0) as u8;
        }
    }
    GrayImage::from_raw(w as u32, h as u32, out).unwrap_or_else(|| img.clone())
}

/// Canny edges of an 8-bit gray image as OpenCV's `Canny(img, low, high)` finds them (3×3 Sobel
/// with replicated borders, L1 magnitude, non-maximum suppression along the gradient's octant,
/// hysteresis: pixels above `low` joined, 8-connected, to one above `high`). 255 = edge.
pub fn canny_gray(img: &GrayImage, low: u32, high: u32) -> GrayImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (low, high) = (low.min(high) as i32, low.max(high) as i32);
    let px = |x: isize, y: isize| -> i32 {
        let x = x.clamp(0, w as isize - 1) as u32;
        let y = y.clamp(0, h as isize - 1) as u32;
        img.get_pixel(x, y).0[0] as i32
    };
    let mut dx = vec![0i32; w * h];
    let mut dy = vec![0i32; w * h];
    // Magnitudes with a ring of zeros around the image (what suppression compares the border with).
    let (mw, mh) = (w + 2, h + 2);
    let mut mag = vec![0i32; mw * mh];
    for y in 0..h {
        for x in 0..w {
            let (xi, yi) = (x as isize, y as isize);
            let gx = px(xi + 1, yi - 1) + 2 * px(xi + 1, yi) + px(xi + 1, yi + 1)
                - px(xi - 1, yi - 1)
                - 2 * px(xi - 1, yi)
                - px(xi - 1, yi + 1);
            let gy = px(xi - 1, yi + 1) + 2 * px(xi, yi + 1) + px(xi + 1, yi + 1)
                - px(xi - 1, yi - 1)
                - 2 * px(xi, yi - 1)
                - px(xi + 1, yi - 1);
            dx[y * w + x] = gx;
            dy[y * w + x] = gy;
            mag[(y + 1) * mw + x + 1] = gx.abs() + gy.abs();
        }
    }
    // tan(22.5°) in 15-bit fixed point, as OpenCV compares the octant.
    const TG22: i64 = 13573;
    const SHIFT: u32 = 15;
    // 0: not an edge, 1: weak, 2: strong.
    let mut class = vec![0u8; w * h];
    let mut stack = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let j = (y + 1) * mw + x + 1;
            let m = mag[j];
            if m <= low {
                continue;
            }
            let (gx, gy) = (dx[y * w + x] as i64, dy[y * w + x] as i64);
            let ax = gx.abs();
            let ay = gy.abs() << SHIFT;
            let tg22x = ax * TG22;
            let keep = if ay < tg22x {
                m > mag[j - 1] && m >= mag[j + 1]
            } else {
                let tg67x = tg22x + (ax << (SHIFT + 1));
                if ay > tg67x {
                    m > mag[j - mw] && m >= mag[j + mw]
                } else {
                    let s: isize = if (gx ^ gy) < 0 { -1 } else { 1 };
                    let up = (j as isize - mw as isize - s) as usize;
                    let down = (j as isize + mw as isize + s) as usize;
                    m > mag[up] && m > mag[down]
                }
            };
            if !keep {
                continue;
            }
            if m > high {
                class[y * w + x] = 2;
                stack.push((x, y));
            } else {
                class[y * w + x] = 1;
            }
        }
    }
    while let Some((x, y)) = stack.pop() {
        for ny in y.saturating_sub(1)..=(y + 1).min(h - 1) {
            for nx in x.saturating_sub(1)..=(x + 1).min(w - 1) {
                if class[ny * w + nx] == 1 {
                    class[ny * w + nx] = 2;
                    stack.push((nx, ny));
                }
            }
        }
    }
    let out = class
        .iter()
        .map(|&c| if c == 2 { 255 } else { 0 })
        .collect();
    GrayImage::from_raw(w as u32, h as u32, out)
        .unwrap_or_else(|| GrayImage::new(w as u32, h as u32))
}

/// The canny preprocessor: gray, blurred (σ [`CANNY_SIGMA`]), edges as white on black RGB (the
/// map the ControlNet Union was trained on).
pub fn canny(img: &RgbImage, low: u32, high: u32) -> RgbImage {
    let edges = canny_gray(&gaussian_blur(&gray_cv(img), CANNY_SIGMA), low, high);
    RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let v = edges.get_pixel(x, y).0[0];
        image::Rgb([v, v, v])
    })
}

/// Applies a preprocessor (`None`: the image as it is).
pub fn preprocess(img: &RgbImage, p: Preprocess, low: u32, high: u32) -> RgbImage {
    match p {
        Preprocess::None => img.clone(),
        Preprocess::Canny => canny(img, low, high),
    }
}

/// One ControlNet a server can use: a single file (`.safetensors`, `.gguf`) or a diffusers folder
/// (`config.json` + `diffusion_pytorch_model.safetensors`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ControlEntry {
    pub name: String,
    pub path: PathBuf,
    pub size_bytes: u64,
}

/// The folders ControlNet files are looked up in, plus files named explicitly (the CLI's).
#[derive(Debug, Clone, Default)]
pub struct ControlDir {
    dirs: Vec<PathBuf>,
    files: Vec<PathBuf>,
}

impl ControlDir {
    /// `<models-dir>/controlnet/` and, when the models dir is (in) a ComfyUI tree,
    /// `models/controlnet/` there.
    pub fn for_models_dir(models_dir: &Path) -> Self {
        let mut dirs = vec![models_dir.join("controlnet")];
        for c in [
            models_dir.join("models").join("controlnet"),
            models_dir
                .parent()
                .map(|p| p.join("controlnet"))
                .unwrap_or_default(),
        ] {
            if c.is_dir() && !dirs.contains(&c) {
                dirs.push(c);
            }
        }
        Self {
            dirs,
            files: Vec::new(),
        }
    }

    /// Also accepts this file (or folder) by its path or its name.
    pub fn with_file(mut self, path: PathBuf) -> Self {
        self.files.push(path);
        self
    }

    /// Where files are looked for (messages).
    pub fn describe(&self) -> String {
        self.dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn entry(path: &Path) -> Option<ControlEntry> {
        let name = path.file_name()?.to_str()?;
        if name.starts_with('.') {
            return None;
        }
        if path.is_dir() {
            let file = path.join("diffusion_pytorch_model.safetensors");
            let meta = std::fs::metadata(&file).ok()?;
            return (path.join("config.json").is_file()).then(|| ControlEntry {
                name: name.to_string(),
                path: path.to_path_buf(),
                size_bytes: meta.len(),
            });
        }
        let stem = name
            .strip_suffix(".safetensors")
            .or_else(|| name.strip_suffix(".gguf"))?;
        let meta = std::fs::metadata(path).ok()?;
        (meta.is_file() && !stem.is_empty()).then(|| ControlEntry {
            name: stem.to_string(),
            path: path.to_path_buf(),
            size_bytes: meta.len(),
        })
    }

    /// Every ControlNet found, by name (the first folder wins a name clash).
    pub fn list(&self) -> Vec<ControlEntry> {
        let mut out: Vec<ControlEntry> = self.files.iter().filter_map(|p| Self::entry(p)).collect();
        for d in &self.dirs {
            let Ok(rd) = std::fs::read_dir(d) else {
                continue;
            };
            let mut found: Vec<ControlEntry> = rd
                .flatten()
                .filter_map(|e| Self::entry(&e.path()))
                .collect();
            found.sort_by(|a, b| a.name.cmp(&b.name));
            for e in found {
                if !out.iter().any(|o| o.name == e.name) {
                    out.push(e);
                }
            }
        }
        out
    }

    pub fn names(&self) -> Vec<String> {
        self.list().into_iter().map(|e| e.name).collect()
    }

    /// The ControlNet a request names: a listed name (with or without its extension), or the
    /// path of an explicitly given file. Never a path outside the folders otherwise.
    pub fn resolve(&self, name: &str) -> Option<PathBuf> {
        if let Some(p) = self.files.iter().find(|p| p.as_os_str() == name) {
            return Some(p.clone());
        }
        let stem = name
            .strip_suffix(".safetensors")
            .or_else(|| name.strip_suffix(".gguf"))
            .unwrap_or(name);
        // A1111 clients send `name [hash]`.
        let stem = match stem.rsplit_once(" [") {
            Some((s, h)) if h.ends_with(']') => s,
            _ => stem,
        };
        self.list()
            .into_iter()
            .find(|e| e.name == stem)
            .map(|e| e.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canny_finds_a_square_outline_and_nothing_in_flat_areas() {
        let img = GrayImage::from_fn(40, 40, |x, y| {
            image::Luma([if (10..30).contains(&x) && (10..30).contains(&y) {
                200
            } else {
                20
            }])
        });
        let e = canny_gray(&img, 100, 200);
        assert_eq!(e.get_pixel(2, 2).0[0], 0);
        assert_eq!(e.get_pixel(20, 20).0[0], 0);
        // Every side of the square has edge pixels next to the boundary.
        for (x, y) in [(20, 10), (20, 29), (10, 20), (29, 20)] {
            let near = (x.max(1) - 1..=x + 1)
                .flat_map(|xx| (y.max(1) - 1..=y + 1).map(move |yy| (xx, yy)))
                .any(|(xx, yy)| e.get_pixel(xx, yy).0[0] == 255);
            assert!(near, "no edge near ({x}, {y})");
        }
    }

    #[test]
    fn preprocess_names_parse() {
        assert_eq!(Preprocess::parse("Canny"), Some(Preprocess::Canny));
        assert_eq!(Preprocess::parse("none"), Some(Preprocess::None));
        assert_eq!(Preprocess::parse("depth_midas"), None);
    }
}
