//! The live preview: the denoised estimate of a step turned into a small PNG without the VAE —
//! one linear latent → RGB projection per latent cell (the family profile's [`LatentPreview`]),
//! so it costs a few multiply-adds per cell instead of a decode. One pixel per latent cell (at
//! most 256 on the long side: 2048 px / 8), sent to the browser as a `data:image/png` URL that
//! the page scales up.

use base64::Engine as _;
use candle_core::{DType, Tensor};

use crate::families::LatentPreview;

/// The longest side a preview may have; larger latents are reduced by box averaging.
pub const MAX_PREVIEW_SIDE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    #[error("preview: expected latents [C, h, w], got {0:?}")]
    Shape(Vec<usize>),
    #[error("preview: the latents have {got} channels, the family's projection {want}")]
    Channels { got: usize, want: usize },
    #[error("preview: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("preview: PNG: {0}")]
    Png(String),
}

/// An RGB preview image.
#[derive(Debug, Clone, PartialEq)]
pub struct PreviewImage {
    pub width: usize,
    pub height: usize,
    /// `width × height × 3` bytes, row-major.
    pub rgb: Vec<u8>,
}

impl PreviewImage {
    /// A `data:image/png;base64,…` URL (fast compression: the PNG is re-made every step).
    pub fn data_url(&self) -> Result<String, PreviewError> {
        let mut png = Vec::with_capacity(self.rgb.len() / 2 + 64);
        {
            let mut enc = png::Encoder::new(&mut png, self.width as u32, self.height as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            enc.set_compression(png::Compression::Fast);
            let mut w = enc
                .write_header()
                .map_err(|e| PreviewError::Png(e.to_string()))?;
            w.write_image_data(&self.rgb)
                .map_err(|e| PreviewError::Png(e.to_string()))?;
        }
        let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
        Ok(format!("data:image/png;base64,{b64}"))
    }
}

/// Projects `[C, h, w]` latents to RGB with `p`: `rgb = bias + Σ_c latent[c]·factors[c]` in
/// [-1, 1], mapped to [0, 255]; latents wider or taller than [`MAX_PREVIEW_SIDE`] are averaged
/// down by an integer factor first.
pub fn project(latents: &Tensor, p: &LatentPreview) -> Result<PreviewImage, PreviewError> {
    let (dims, data) = to_host(latents)?;
    project_raw(&data, dims, p)
}

/// The latents' shape `[C, h, w]` and values on the host (what the step loop hands over; the
/// projection can then run on another thread).
pub fn to_host(latents: &Tensor) -> Result<([usize; 3], Vec<f32>), PreviewError> {
    let dims = latents.dims().to_vec();
    let [c, h, w] = dims[..] else {
        return Err(PreviewError::Shape(dims));
    };
    let data = latents
        .to_dtype(DType::F32)?
        .to_device(&candle_core::Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(([c, h, w], data))
}

/// [`project`] on host values, `data` holding `c × h × w` floats.
pub fn project_raw(
    data: &[f32],
    [c, h, w]: [usize; 3],
    p: &LatentPreview,
) -> Result<PreviewImage, PreviewError> {
    if c != p.factors.len() {
        return Err(PreviewError::Channels {
            got: c,
            want: p.factors.len(),
        });
    }
    if data.len() != c * h * w {
        return Err(PreviewError::Shape(vec![data.len()]));
    }
    let k = h.max(w).div_ceil(MAX_PREVIEW_SIDE).max(1);
    let (oh, ow) = (h / k, w / k);
    let plane = h * w;
    let inv = 1.0 / (k * k) as f32;
    let mut rgb = Vec::with_capacity(oh * ow * 3);
    for oy in 0..oh {
        for ox in 0..ow {
            let mut acc = p.bias;
            for (ch, f) in p.factors.iter().enumerate() {
                let base = ch * plane;
                let mut v = 0.0f32;
                for dy in 0..k {
                    let row = base + (oy * k + dy) * w + ox * k;
                    v += data[row..row + k].iter().sum::<f32>();
                }
                v *= inv;
                acc[0] += v * f[0];
                acc[1] += v * f[1];
                acc[2] += v * f[2];
            }
            for a in acc {
                // [-1, 1] → [0, 255]; NaN (a broken step) shows as black rather than panicking.
                let u = ((a + 1.0) * 127.5).round();
                rgb.push(if u.is_nan() {
                    0
                } else {
                    u.clamp(0.0, 255.0) as u8
                });
            }
        }
    }
    Ok(PreviewImage {
        width: ow,
        height: oh,
        rgb,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    const TWO: LatentPreview = LatentPreview {
        factors: &[[1.0, 0.0, 0.5], [0.0, 1.0, -0.5]],
        bias: [0.0, -0.5, 0.0],
    };

    #[test]
    fn each_cell_is_the_bias_plus_the_weighted_channels() {
        // Reference: the formula by hand. Cell (0,0): c0 = 1, c1 = 0 → r = 1, g = -0.5,
        // b = 0.5 → 255, 64 (63.75 rounded), 191 (191.25). Cell (0,1): c0 = -1, c1 = 1 → r = -1,
        // g = 0.5, b = -1 → 0, 191, 0.
        let t = Tensor::from_vec(vec![1f32, -1.0, 0.0, 1.0], (2, 1, 2), &Device::Cpu).unwrap();
        let img = project(&t, &TWO).unwrap();
        assert_eq!((img.width, img.height), (2, 1));
        assert_eq!(img.rgb, vec![255, 64, 191, 0, 191, 0]);
        // Out of range saturates; NaN is black.
        let t = Tensor::from_vec(vec![9f32, f32::NAN, 0.0, 0.0], (2, 1, 2), &Device::Cpu).unwrap();
        assert_eq!(project(&t, &TWO).unwrap().rgb[..3], [255, 64, 255]);
        assert_eq!(project(&t, &TWO).unwrap().rgb[3], 0);
    }

    #[test]
    fn large_latents_are_averaged_down_to_256() {
        let (h, w) = (300usize, 150usize);
        let t = Tensor::ones((2, h, w), DType::F32, &Device::Cpu).unwrap();
        let img = project(&t, &TWO).unwrap();
        assert_eq!((img.width, img.height), (75, 150));
        assert!(img.width.max(img.height) <= MAX_PREVIEW_SIDE);
        // Averaging ones gives ones: every pixel as for a single cell of (1, 1).
        assert!(img.rgb.chunks(3).all(|p| p == [255, 191, 128]));
    }

    #[test]
    fn bad_shapes_are_errors_and_the_png_decodes() {
        let t = Tensor::zeros((3, 4, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(
            project(&t, &TWO),
            Err(PreviewError::Channels { got: 3, want: 2 })
        ));
        let t = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(project(&t, &TWO), Err(PreviewError::Shape(_))));
        let t = Tensor::zeros((2, 5, 7), DType::F32, &Device::Cpu).unwrap();
        let url = project(&t, &TWO).unwrap().data_url().unwrap();
        let b64 = url.strip_prefix("data:image/png;base64,").unwrap();
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let img = image::load_from_memory(&png).unwrap();
        assert_eq!((img.width(), img.height()), (7, 5));
    }
}
