//! Input images and masks (image to image, inpainting): decoding PNG, JPEG and WebP (raw bytes,
//! base64 or a data URL) within limits, fitting them to the requested size as A1111's resize
//! modes do, the content-addressed store that lets a queued job survive a restart, and the
//! pipelines' preprocessing (pixels to [-1, 1], the latent mask, the A1111 paste-back).

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use candle_core::{Device, Tensor};
use image::{DynamicImage, GrayImage, ImageFormat, RgbImage};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Largest encoded input accepted (a 16 MiB JSON body holds about 12 MiB of base64, with room
/// for a mask).
pub const MAX_INPUT_BYTES: usize = 10 << 20;
/// Largest decoded input, in pixels per side and in total (decompression bombs stop here).
pub const MAX_INPUT_SIDE: u32 = 8192;
pub const MAX_INPUT_PIXELS: u64 = 4096 * 4096;

/// Why an input could not be used; the caller names the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InputError {
    #[error("is not valid base64 (a PNG, JPEG or WebP file, optionally as a data: URL): {0}")]
    Base64(String),
    #[error("is empty")]
    Empty,
    #[error("is {0} bytes; the limit is {MAX_INPUT_BYTES} bytes")]
    TooLarge(usize),
    #[error("is not a PNG, JPEG or WebP image: {0}")]
    NotAnImage(String),
    #[error(
        "is {0}×{1} pixels; the limit is {MAX_INPUT_SIDE} per side and {MAX_INPUT_PIXELS} in total"
    )]
    TooManyPixels(u32, u32),
    #[error("{0}")]
    Invalid(String),
}

impl InputError {
    /// The same text in Simplified Chinese (a decoder's own detail stays as it reported it).
    pub fn zh(&self) -> String {
        match self {
            InputError::Base64(e) => {
                format!("不是有效的 base64（应为 PNG、JPEG 或 WebP 文件，可以写成 data: URL）：{e}")
            }
            InputError::Empty => "是空的".into(),
            InputError::TooLarge(n) => format!("有 {n} 字节；上限是 {MAX_INPUT_BYTES} 字节"),
            InputError::NotAnImage(e) => format!("不是 PNG、JPEG 或 WebP 图像：{e}"),
            InputError::TooManyPixels(w, h) => {
                format!("有 {w}×{h} 像素；每边最多 {MAX_INPUT_SIDE}，总共最多 {MAX_INPUT_PIXELS}")
            }
            InputError::Invalid(e) => format!("无法使用：{e}"),
        }
    }
}

/// Bytes of a base64 string or a `data:image/…;base64,` URL (whitespace ignored).
pub fn decode_base64(s: &str) -> Result<Vec<u8>, InputError> {
    let s = s.trim();
    let payload = match s.strip_prefix("data:") {
        Some(rest) => match rest.split_once(',') {
            Some((meta, data)) if meta.ends_with(";base64") => data,
            _ => {
                return Err(InputError::Base64(
                    "a data: URL must be base64-encoded (`data:image/png;base64,…`)".into(),
                ))
            }
        },
        None => s,
    };
    let clean: String = payload.chars().filter(|c| !c.is_whitespace()).collect();
    if clean.is_empty() {
        return Err(InputError::Empty);
    }
    if clean.len() / 4 * 3 > MAX_INPUT_BYTES + 3 {
        return Err(InputError::TooLarge(clean.len() / 4 * 3));
    }
    base64::engine::general_purpose::STANDARD
        .decode(clean.as_bytes())
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(clean.as_bytes()))
        .map_err(|e| InputError::Base64(e.to_string()))
}

/// Decodes a PNG, JPEG or WebP file within the size limits.
pub fn decode_image(bytes: &[u8]) -> Result<DynamicImage, InputError> {
    if bytes.is_empty() {
        return Err(InputError::Empty);
    }
    if bytes.len() > MAX_INPUT_BYTES {
        return Err(InputError::TooLarge(bytes.len()));
    }
    let format = image::guess_format(bytes)
        .map_err(|_| InputError::NotAnImage("unrecognised file signature".into()))?;
    if !matches!(
        format,
        ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP
    ) {
        return Err(InputError::NotAnImage(format!(
            "{format:?} files are not accepted"
        )));
    }
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_INPUT_SIDE);
    limits.max_image_height = Some(MAX_INPUT_SIDE);
    limits.max_alloc = Some(MAX_INPUT_PIXELS * 8);
    reader.limits(limits);
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| InputError::NotAnImage(e.to_string()))?;
    if w > MAX_INPUT_SIDE || h > MAX_INPUT_SIDE || w as u64 * h as u64 > MAX_INPUT_PIXELS {
        return Err(InputError::TooManyPixels(w, h));
    }
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_INPUT_PIXELS * 8);
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| InputError::NotAnImage(e.to_string()))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(InputError::Empty);
    }
    Ok(img)
}

/// How an input of another size is fitted to the requested size (A1111's `resize_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// Stretch to the size (A1111 0 "Just resize", and 3 "Just resize (latent upscale)").
    #[default]
    Stretch,
    /// Scale to cover the size, then cut the overflow evenly (A1111 1 "Crop and resize").
    CropAndResize,
    /// Scale to fit inside the size, then fill the bands with the edge pixels (A1111 2
    /// "Resize and fill").
    ResizeAndFill,
}

impl ResizeMode {
    /// A1111's `resize_mode` number.
    pub fn from_a1111(n: i64) -> Option<Self> {
        match n {
            0 | 3 => Some(Self::Stretch),
            1 => Some(Self::CropAndResize),
            2 => Some(Self::ResizeAndFill),
            _ => None,
        }
    }
}

/// RGB of any input the way PIL's `convert("RGB")` makes it (alpha dropped, not composited).
pub fn to_rgb(img: &DynamicImage) -> RgbImage {
    img.to_rgb8()
}

/// A mask as PIL's `convert("L")` makes it: `L = (19595·R + 38470·G + 7471·B + 2¹⁵) >> 16`
/// (ITU-R 601 luma, what diffusers' mask processor uses), or the gray channel itself.
pub fn to_luma_pil(img: &DynamicImage) -> GrayImage {
    match img {
        DynamicImage::ImageLuma8(g) => g.clone(),
        DynamicImage::ImageLumaA8(_)
        | DynamicImage::ImageLuma16(_)
        | DynamicImage::ImageLumaA16(_) => img.to_luma8(),
        _ => {
            let rgb = img.to_rgb8();
            GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| {
                let p = rgb.get_pixel(x, y).0;
                let l =
                    (19595 * p[0] as u32 + 38470 * p[1] as u32 + 7471 * p[2] as u32 + 0x8000) >> 16;
                image::Luma([l as u8])
            })
        }
    }
}

/// The input's alpha as a mask where transparent = repaint (OpenAI's edit convention): white
/// where alpha is 0, black elsewhere. `None` when the image has no alpha channel.
pub fn mask_from_alpha(img: &DynamicImage) -> Option<GrayImage> {
    if !img.color().has_alpha() {
        return None;
    }
    let rgba = img.to_rgba8();
    Some(GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        image::Luma([if rgba.get_pixel(x, y).0[3] == 0 {
            255
        } else {
            0
        }])
    }))
}

/// Fits an image to `width`×`height` (Lanczos3, as diffusers' processor resizes with PIL's
/// Lanczos). An image already of that size is returned unchanged.
pub fn fit<P>(
    img: &image::ImageBuffer<P, Vec<u8>>,
    width: u32,
    height: u32,
    mode: ResizeMode,
) -> image::ImageBuffer<P, Vec<u8>>
where
    P: image::Pixel<Subpixel = u8> + 'static,
{
    use image::imageops::{self, FilterType};
    let (w, h) = img.dimensions();
    if (w, h) == (width, height) {
        return img.clone();
    }
    match mode {
        ResizeMode::Stretch => imageops::resize(img, width, height, FilterType::Lanczos3),
        ResizeMode::CropAndResize => {
            let scale = (width as f64 / w as f64).max(height as f64 / h as f64);
            let sw = ((w as f64 * scale).round() as u32).max(width);
            let sh = ((h as f64 * scale).round() as u32).max(height);
            let scaled = imageops::resize(img, sw, sh, FilterType::Lanczos3);
            imageops::crop_imm(&scaled, (sw - width) / 2, (sh - height) / 2, width, height)
                .to_image()
        }
        ResizeMode::ResizeAndFill => {
            let scale = (width as f64 / w as f64).min(height as f64 / h as f64);
            let sw = ((w as f64 * scale).round() as u32).clamp(1, width);
            let sh = ((h as f64 * scale).round() as u32).clamp(1, height);
            let scaled = imageops::resize(img, sw, sh, FilterType::Lanczos3);
            let (ox, oy) = ((width - sw) / 2, (height - sh) / 2);
            image::ImageBuffer::from_fn(width, height, |x, y| {
                let sx = x.saturating_sub(ox).min(sw - 1);
                let sy = y.saturating_sub(oy).min(sh - 1);
                *scaled.get_pixel(sx, sy)
            })
        }
    }
}

/// What the masked region of an inpainting job starts from (A1111's `inpainting_fill`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InpaintFill {
    /// The input image as it is (A1111 1 "original"; diffusers' pipelines).
    #[default]
    Original,
    /// The region painted over with the colours around it, blurred in, before encoding (A1111 0
    /// "fill").
    Fill,
    /// The region's clean latents replaced by unit noise (A1111 2 "latent noise").
    LatentNoise,
    /// The region's clean latents set to zero (A1111 3 "latent nothing").
    LatentNothing,
}

impl InpaintFill {
    pub fn from_a1111(n: i64) -> Option<Self> {
        match n {
            0 => Some(Self::Fill),
            1 => Some(Self::Original),
            2 => Some(Self::LatentNoise),
            3 => Some(Self::LatentNothing),
            _ => None,
        }
    }
}

/// A1111's `masking.fill`: the unmasked colours spread into the masked region by ever finer blurs
/// of the premultiplied image, composited one over the other (radius 256, 64, 16 ×2, 4 ×4, 2 ×2,
/// then the image itself), so the region is painted with its surroundings' colours.
pub fn fill_masked(img: &RgbImage, mask: &GrayImage) -> RgbImage {
    use image::{ImageBuffer, Rgba};
    let (w, h) = img.dimensions();
    // Premultiplied RGBA, alpha = not masked.
    let pre: ImageBuffer<Rgba<f32>, Vec<f32>> = ImageBuffer::from_fn(w, h, |x, y| {
        let a = if mask.get_pixel(x, y).0[0] >= 128 {
            0.0
        } else {
            1.0
        };
        let p = img.get_pixel(x, y).0;
        Rgba([
            p[0] as f32 / 255.0 * a,
            p[1] as f32 / 255.0 * a,
            p[2] as f32 / 255.0 * a,
            a,
        ])
    });
    let mut out: ImageBuffer<Rgba<f32>, Vec<f32>> = ImageBuffer::new(w, h);
    for (radius, repeats) in [
        (256.0, 1),
        (64.0, 1),
        (16.0, 2),
        (4.0, 4),
        (2.0, 2),
        (0.0, 1),
    ] {
        let blurred = if radius > 0.0 {
            image::imageops::fast_blur(&pre, radius)
        } else {
            pre.clone()
        };
        for _ in 0..repeats {
            for (o, b) in out.pixels_mut().zip(blurred.pixels()) {
                let ba = b.0[3];
                if ba <= 0.0 {
                    continue;
                }
                // `alpha_composite` of the un-premultiplied blur over what is there.
                let oa = o.0[3];
                let na = ba + oa * (1.0 - ba);
                for c in 0..3 {
                    let src = b.0[c] / ba;
                    let dst = o.0[c];
                    o.0[c] = (src * ba + dst * oa * (1.0 - ba)) / na.max(f32::MIN_POSITIVE);
                }
                o.0[3] = na;
            }
        }
    }
    RgbImage::from_fn(w, h, |x, y| {
        let p = out.get_pixel(x, y).0;
        image::Rgb([0, 1, 2].map(|c| (p[c] * 255.0).round().clamp(0.0, 255.0) as u8))
    })
}

/// "Only masked" inpainting (A1111's `inpaint_full_res`): the region of the full image that is
/// repainted at the job's size, and pasted back into it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CropRegion {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
    /// The whole input image and mask (the job's image and mask are the resized crop).
    pub image: InputImage,
    pub mask: InputImage,
}

/// A1111's `get_crop_region` + `expand_crop_region`: the bounding box of the mask's non-zero
/// pixels grown by `padding`, then widened (or heightened) to the aspect ratio of
/// `width`×`height`, within the image. `None` for an empty mask.
pub fn crop_region(
    mask: &GrayImage,
    padding: u32,
    width: u32,
    height: u32,
) -> Option<(u32, u32, u32, u32)> {
    let (iw, ih) = mask.dimensions();
    let (mut x1, mut y1, mut x2, mut y2) = (iw, ih, 0u32, 0u32);
    for (x, y, p) in mask.enumerate_pixels() {
        if p.0[0] > 0 {
            x1 = x1.min(x);
            y1 = y1.min(y);
            x2 = x2.max(x + 1);
            y2 = y2.max(y + 1);
        }
    }
    if x2 <= x1 || y2 <= y1 {
        return None;
    }
    let (mut x1, mut y1) = (
        x1.saturating_sub(padding) as i64,
        y1.saturating_sub(padding) as i64,
    );
    let (mut x2, mut y2) = ((x2 + padding).min(iw) as i64, (y2 + padding).min(ih) as i64);
    let (iw, ih) = (iw as i64, ih as i64);
    // Grows [a, b) of an axis of length `len` to `desired` (a float, truncated like Python's
    // int()), half on each side, shifted back inside [0, len).
    let grow = |a: &mut i64, b: &mut i64, desired: f64, len: i64| {
        let diff = (desired - (*b - *a) as f64) as i64;
        *a -= diff.div_euclid(2);
        *b += diff - diff.div_euclid(2);
        if *b >= len {
            let d = *b - len;
            *b -= d;
            *a -= d;
        }
        if *a < 0 {
            *b -= *a;
            *a = 0;
        }
        if *b >= len {
            *b = len;
        }
    };
    let ratio_crop = (x2 - x1) as f64 / (y2 - y1) as f64;
    let ratio_proc = width as f64 / height as f64;
    if ratio_crop > ratio_proc {
        let desired = (x2 - x1) as f64 / ratio_proc;
        grow(&mut y1, &mut y2, desired, ih);
    } else {
        let desired = (y2 - y1) as f64 * ratio_proc;
        grow(&mut x1, &mut x2, desired, iw);
    }
    Some((x1 as u32, y1 as u32, (x2 - x1) as u32, (y2 - y1) as u32))
}

/// Whether an image's mask has anything to repaint: a pixel that diffusers binarises to 1
/// (value/255 ≥ 0.5, i.e. ≥ 128).
pub fn mask_is_empty(mask: &GrayImage) -> bool {
    !mask.pixels().any(|p| p.0[0] >= 128)
}

/// Pixels of an input, attached while the job is live (not serialised: the store holds them).
#[derive(Debug, Clone)]
pub enum Pixels {
    Rgb(Arc<RgbImage>),
    Gray(Arc<GrayImage>),
}

/// An input image or mask as a request carries it: identified by its content (the store's file
/// name), with its pixels attached while they are in memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InputImage {
    /// SHA-256 of the kind, size and raw pixels (hex): the file `<store>/<sha256>.png`.
    pub sha256: String,
    pub width: u32,
    pub height: u32,
    #[serde(skip)]
    pixels: Option<Pixels>,
}

impl PartialEq for InputImage {
    fn eq(&self, other: &Self) -> bool {
        self.sha256 == other.sha256 && self.width == other.width && self.height == other.height
    }
}

fn digest(kind: &str, w: u32, h: u32, raw: &[u8]) -> String {
    let mut s = Sha256::new();
    s.update(kind.as_bytes());
    s.update(w.to_le_bytes());
    s.update(h.to_le_bytes());
    s.update(raw);
    format!("{:x}", s.finalize())
}

impl InputImage {
    pub fn rgb(img: RgbImage) -> Self {
        Self {
            sha256: digest("rgb", img.width(), img.height(), img.as_raw()),
            width: img.width(),
            height: img.height(),
            pixels: Some(Pixels::Rgb(Arc::new(img))),
        }
    }

    pub fn gray(img: GrayImage) -> Self {
        Self {
            sha256: digest("gray", img.width(), img.height(), img.as_raw()),
            width: img.width(),
            height: img.height(),
            pixels: Some(Pixels::Gray(Arc::new(img))),
        }
    }

    pub fn is_loaded(&self) -> bool {
        self.pixels.is_some()
    }

    pub fn as_rgb(&self) -> Option<&RgbImage> {
        match &self.pixels {
            Some(Pixels::Rgb(p)) => Some(p),
            _ => None,
        }
    }

    pub fn as_gray(&self) -> Option<&GrayImage> {
        match &self.pixels {
            Some(Pixels::Gray(p)) => Some(p),
            _ => None,
        }
    }

    /// The pixels as a lossless PNG.
    pub fn png(&self) -> Result<Vec<u8>, InputError> {
        let mut out = Vec::new();
        let res = match &self.pixels {
            Some(Pixels::Rgb(p)) => p.write_to(&mut Cursor::new(&mut out), ImageFormat::Png),
            Some(Pixels::Gray(p)) => p.write_to(&mut Cursor::new(&mut out), ImageFormat::Png),
            None => return Err(InputError::Invalid("input pixels are not loaded".into())),
        };
        res.map_err(|e| InputError::Invalid(format!("encoding the input as PNG: {e}")))?;
        Ok(out)
    }
}

/// `<outputs>/inputs/`: input images and masks of accepted jobs, one PNG per content hash, so a
/// job journaled with only the hash finds its pixels after a restart.
#[derive(Debug, Clone)]
pub struct InputStore {
    dir: PathBuf,
}

pub const INPUTS_DIR: &str = "inputs";

impl InputStore {
    pub fn new(outputs: &Path) -> Self {
        Self {
            dir: outputs.join(INPUTS_DIR),
        }
    }

    fn path(&self, sha: &str) -> Option<PathBuf> {
        (sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| self.dir.join(format!("{sha}.png")))
    }

    /// Writes an input's pixels (once per content; atomically).
    pub fn save(&self, input: &InputImage) -> Result<(), InputError> {
        let path = self
            .path(&input.sha256)
            .ok_or_else(|| InputError::Invalid("malformed input hash".into()))?;
        if path.is_file() {
            return Ok(());
        }
        let png = input.png()?;
        crate::engine::output::write_atomic(&path, &png)
            .map_err(|e| InputError::Invalid(format!("{}: {e}", path.display())))
    }

    /// Attaches the stored pixels to `input` (no-op when they already are).
    pub fn load(&self, input: &mut InputImage, gray: bool) -> Result<(), InputError> {
        if input.is_loaded() {
            return Ok(());
        }
        let path = self
            .path(&input.sha256)
            .ok_or_else(|| InputError::Invalid("malformed input hash".into()))?;
        let bytes = std::fs::read(&path).map_err(|e| {
            InputError::Invalid(format!(
                "the stored input {} is missing: {e}",
                path.display()
            ))
        })?;
        let img = image::load_from_memory_with_format(&bytes, ImageFormat::Png)
            .map_err(|e| InputError::Invalid(format!("{}: {e}", path.display())))?;
        let loaded = if gray {
            InputImage::gray(img.to_luma8())
        } else {
            InputImage::rgb(img.to_rgb8())
        };
        if loaded != *input {
            return Err(InputError::Invalid(format!(
                "{}: the stored pixels do not match the job's input",
                path.display()
            )));
        }
        *input = loaded;
        Ok(())
    }
}

/// RGB pixels → `[1, 3, H, W]` f32 in [-1, 1], as diffusers' `VaeImageProcessor.preprocess`
/// computes it (`x / 255` in f32, then `2x − 1`).
pub fn pixels_tensor(img: &RgbImage, device: &Device) -> candle_core::Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut data = vec![0f32; 3 * h * w];
    for (i, p) in img.as_raw().chunks_exact(3).enumerate() {
        for c in 0..3 {
            let x = p[c] as f32 / 255.0;
            data[c * h * w + i] = 2.0 * x - 1.0;
        }
    }
    Tensor::from_vec(data, (1, 3, h, w), device)
}

/// The inpainting mask at latent resolution `[1, 1, H/f, W/f]`: binarised (value/255 ≥ 0.5 → 1)
/// and downsampled by nearest neighbour (pixel `(f·i, f·j)`), as diffusers'
/// `mask_processor.preprocess` then `interpolate(mode="nearest")` make it.
pub fn latent_mask(
    mask: &GrayImage,
    factor: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let (h, w) = (
        mask.height() as usize / factor,
        mask.width() as usize / factor,
    );
    let data: Vec<f32> = (0..h * w)
        .map(|i| {
            let (y, x) = (i / w * factor, i % w * factor);
            if mask.get_pixel(x as u32, y as u32).0[0] >= 128 {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(data, (1, 1, h, w), device)
}

/// A1111's overlay: the original pixels pasted back outside the mask, blended through the mask
/// blurred with a Gaussian of σ = `blur` pixels (`mask_blur`), so only the repainted region
/// changes and its border fades in.
pub fn paste_back(generated: &mut [u8], original: &RgbImage, mask: &GrayImage, blur: u32) {
    let soft = if blur > 0 {
        image::imageops::blur(mask, blur as f32)
    } else {
        mask.clone()
    };
    for ((px, orig), m) in generated
        .chunks_exact_mut(3)
        .zip(original.pixels())
        .zip(soft.pixels())
    {
        let a = m.0[0] as f32 / 255.0;
        for (p, o) in px.iter_mut().zip(orig.0) {
            let v = *p as f32 * a + o as f32 * (1.0 - a);
            *p = v.round().clamp(0.0, 255.0) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_bytes(img: &DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn base64_and_data_urls_decode() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(4, 3, image::Rgb([1, 2, 3])));
        let b64 = base64::engine::general_purpose::STANDARD.encode(png_bytes(&img));
        for s in [b64.clone(), format!("data:image/png;base64,{b64}")] {
            let got = decode_image(&decode_base64(&s).unwrap()).unwrap();
            assert_eq!(got.to_rgb8(), img.to_rgb8());
        }
        assert!(matches!(
            decode_base64("data:image/png,xyz"),
            Err(InputError::Base64(_))
        ));
        assert!(matches!(decode_base64("!!!"), Err(InputError::Base64(_))));
        assert!(matches!(decode_base64("  "), Err(InputError::Empty)));
    }

    #[test]
    fn non_images_and_bombs_are_refused() {
        assert!(matches!(
            decode_image(b"hello world, not a png"),
            Err(InputError::NotAnImage(_))
        ));
        assert!(matches!(decode_image(&[]), Err(InputError::Empty)));
        // A PNG header claiming 100000×100000 pixels: refused from the header alone.
        let big = GrayImage::new(1, 1);
        let mut png = png_bytes(&DynamicImage::ImageLuma8(big));
        png[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        png[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        assert!(decode_image(&png).is_err());
    }

    #[test]
    fn pil_luma_and_binarisation() {
        // PIL: Image.new("RGB", (1, 1), (200, 100, 50)).convert("L").getpixel((0, 0)) == 124.
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(1, 1, image::Rgb([200, 100, 50])));
        assert_eq!(to_luma_pil(&img).get_pixel(0, 0).0[0], 124);
        let mut m = GrayImage::new(16, 16);
        assert!(mask_is_empty(&m));
        m.put_pixel(8, 0, image::Luma([127]));
        assert!(mask_is_empty(&m));
        m.put_pixel(8, 0, image::Luma([128]));
        assert!(!mask_is_empty(&m));
        let t = latent_mask(&m, 8, &Device::Cpu).unwrap();
        assert_eq!(
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0.0, 1.0, 0.0, 0.0]
        );
    }

    #[test]
    fn store_round_trip_and_resize_modes() {
        let dir = std::env::temp_dir().join(format!("zturbo-inputs-{}", std::process::id()));
        let store = InputStore::new(&dir);
        let img = RgbImage::from_fn(20, 10, |x, y| image::Rgb([x as u8 * 10, y as u8 * 20, 7]));
        let input = InputImage::rgb(img.clone());
        store.save(&input).unwrap();
        let json = serde_json::to_string(&input).unwrap();
        let mut back: InputImage = serde_json::from_str(&json).unwrap();
        assert!(!back.is_loaded());
        store.load(&mut back, false).unwrap();
        assert_eq!(back.as_rgb().unwrap(), &img);
        std::fs::remove_dir_all(&dir).unwrap();

        for mode in [
            ResizeMode::Stretch,
            ResizeMode::CropAndResize,
            ResizeMode::ResizeAndFill,
        ] {
            let f = fit(&img, 16, 16, mode);
            assert_eq!(f.dimensions(), (16, 16), "{mode:?}");
        }
        assert_eq!(fit(&img, 20, 10, ResizeMode::CropAndResize), img);
    }

    #[test]
    fn alpha_becomes_the_edit_mask() {
        let mut rgba = image::RgbaImage::from_pixel(2, 1, image::Rgba([9, 9, 9, 255]));
        rgba.put_pixel(1, 0, image::Rgba([9, 9, 9, 0]));
        let m = mask_from_alpha(&DynamicImage::ImageRgba8(rgba)).unwrap();
        assert_eq!(m.as_raw(), &vec![0, 255]);
        assert!(mask_from_alpha(&DynamicImage::ImageRgb8(RgbImage::new(1, 1))).is_none());
    }
}
