//! A job's ControlNet, family-agnostic: attach the network the request names (before the memory
//! plan, so its bytes count), then encode the control image as diffusers'
//! `ZImageControlNetPipeline` does — the VAE posterior's mode (not a sample), shifted and scaled —
//! and, for inpainting (`ZImageControlNetInpaintPipeline`), the kept region and the latents of the
//! image with the masked pixels zeroed. The family pads the channels and runs the network.

use candle_core::{DType, Tensor};

use super::{Engine, EngineError};
use crate::families::{ControlInfo, ControlInput};
use crate::request::ValidRequest;

/// Inpainting with control follows `ZImageControlNetInpaintPipeline`: the mask and the masked
/// image go to the ControlNet, and the latents start from noise over the whole schedule (no
/// strength, no latent blend); the original pixels are still pasted back outside the mask.
pub fn control_inpaint(req: &ValidRequest) -> bool {
    req.control.is_some() && req.init.as_ref().is_some_and(|i| i.mask.is_some())
}

impl Engine {
    /// Attaches the job's ControlNet to the model (or detaches the last job's).
    pub(super) fn attach_control(
        &mut self,
        req: &ValidRequest,
    ) -> Result<Option<ControlInfo>, EngineError> {
        let path = req.control.as_ref().map(|c| c.path.as_path());
        Ok(self.family.set_controlnet(path)?)
    }

    /// Encodes the control image (and inpainting's inputs) and hands them to the family.
    pub(super) fn prepare_control(&mut self, req: &ValidRequest) -> Result<(), EngineError> {
        let Some(spec) = &req.control else {
            return Ok(());
        };
        let rgb = spec.image.as_rgb().ok_or_else(|| {
            EngineError::Invalid("the control image's pixels are not loaded".into())
        })?;
        if (rgb.width(), rgb.height()) != (req.width, req.height) {
            return Err(EngineError::Invalid(format!(
                "the control image is {}×{}; this job is {}×{}",
                rgb.width(),
                rgb.height(),
                req.width,
                req.height
            )));
        }
        let device = self.family.components().device().clone();
        let latents = self.encode_mode(&crate::inputs::pixels_tensor(rgb, &device)?)?;
        let inpaint = match (&req.init, control_inpaint(req)) {
            (Some(init), true) => {
                let image = init.image.as_rgb().ok_or_else(|| {
                    EngineError::Invalid("the input image's pixels are not loaded".into())
                })?;
                let mask = init
                    .mask
                    .as_ref()
                    .and_then(|m| m.as_gray())
                    .ok_or_else(|| {
                        EngineError::Invalid("the mask's pixels are not loaded".into())
                    })?;
                // `image * (mask < 0.5)` on the [-1, 1] pixels (the binarised mask: ≥ 128 is 1).
                let (w, h) = (mask.width() as usize, mask.height() as usize);
                let keep: Vec<f32> = mask
                    .as_raw()
                    .iter()
                    .map(|&v| if v >= 128 { 0.0 } else { 1.0 })
                    .collect();
                let keep = Tensor::from_vec(keep, (1, 1, h, w), &device)?;
                let masked = crate::inputs::pixels_tensor(image, &device)?.broadcast_mul(&keep)?;
                let masked = self.encode_mode(&masked)?;
                // `1 − mask`, nearest-sampled to the latent size.
                let f = self.family.profile().vae_scale_factor;
                let kept = (1.0 - crate::inputs::latent_mask(mask, f, &device)?)?;
                Some((kept, masked))
            }
            _ => None,
        };
        self.family.set_control(Some(ControlInput {
            latents,
            inpaint,
            scale: spec.scale,
            start: spec.start,
            end: spec.end,
        }))?;
        Ok(())
    }

    /// `retrieve_latents(vae.encode(x), sample_mode="argmax")`, shifted and scaled.
    fn encode_mode(&mut self, pixels: &Tensor) -> Result<Tensor, EngineError> {
        let posterior = self.family.components_mut().vae_encoder()?.encode(pixels)?;
        Ok(self
            .family
            .components()
            .vae_config()
            .latents_from_sample(&posterior.mean.to_dtype(DType::F32)?)?)
    }
}
