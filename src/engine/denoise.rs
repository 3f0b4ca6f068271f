//! The sampler loop: one Euler step per schedule entry, `x += (σ_next − σ)·d`, with the guard
//! after every step (finite check → roll back, lower CFG, retry; then raise precision), a
//! cancellation check before every step and after the last, and the freed memory handed back
//! after each step.

use candle_core::{DType, Tensor};

use super::guard::{self, all_finite, CFG_BACKOFF, MAX_STEP_RETRIES};
use super::{decode::dtype_name, release_memory, EngineError, Notice, Phase, RunState, StepEvent};
use crate::families::{Component, Conditioning, Family, Schedule, StepInput};

/// Inpainting's blend (diffusers' `ZImageInpaintPipeline` / `StableDiffusionInpaintPipeline`
/// with a 4-channel denoiser): after every step the region outside the mask is replaced by the
/// input image's latents noised to the next step's level (the clean latents after the last).
pub(crate) struct Inpaint {
    /// `[1, 1, h, w]`, 1 = repaint.
    pub mask: Tensor,
    /// `[B, C, h, w]`: each image's posterior sample, as sampler latents.
    pub image_latents: Tensor,
    /// `[B, C, h, w]`: the noise each image started from.
    pub noise: Tensor,
}

impl Inpaint {
    fn blend(&self, i: usize, schedule: &Schedule, x: &Tensor) -> candle_core::Result<Tensor> {
        let proper = if i + 1 < schedule.steps() {
            schedule.add_noise(&self.image_latents, &self.noise, schedule.sigmas[i + 1])?
        } else {
            self.image_latents.clone()
        };
        let keep = (1.0 - &self.mask)?;
        proper.broadcast_mul(&keep)? + x.broadcast_mul(&self.mask)?
    }
}

/// Runs the whole schedule from `x` (already scaled by `init_noise_sigma`). `cfg` is updated in
/// place when the guard lowers it; the rest of the run keeps the lowered value.
pub(crate) fn denoise(
    family: &mut dyn Family,
    mut x: Tensor,
    cond: &Conditioning,
    schedule: &Schedule,
    cfg: &mut f32,
    run: &mut RunState<'_>,
    inpaint: Option<&Inpaint>,
) -> Result<Tensor, EngineError> {
    let total = schedule.steps();
    let started = std::time::Instant::now();
    for i in 0..total {
        if run.cancel.is_cancelled() {
            return Err(EngineError::Cancelled);
        }
        run.set_step(Phase::Denoise, Some(i + 1));
        let dt = schedule.sigmas[i + 1] - schedule.sigmas[i];
        let mut attempt = 0u32;
        let mut retries = 0u32;
        let mut precision_raised = false;
        let preview;
        x = loop {
            attempt += 1;
            let step = StepInput {
                index: i,
                schedule,
                cfg: *cfg,
            };
            let mut d = family.predict(&x, cond, step)?;
            if run.faults.denoiser_nan(i + 1, attempt, run.salt) {
                tracing::warn!(
                    step = i + 1,
                    attempt,
                    "fault injection: denoiser output set to NaN"
                );
                d = guard::poison(&d)?;
            }
            let d32 = d.to_dtype(DType::F32)?;
            let next = (&x + (&d32 * dt as f64)?)?;
            if all_finite(&next)? {
                // The live preview looks at the denoised estimate, not at the noisy latents:
                // x̂₀ = x − σ·d for the Euler ODE of both the flow and the ε models.
                preview = if run.wants_preview() {
                    x.narrow(0, 0, 1)
                        .and_then(|x1| {
                            let d1 = d32.narrow(0, 0, 1)?;
                            (x1 - (d1 * schedule.sigmas[i] as f64)?)?.squeeze(0)
                        })
                        .map_err(|e| tracing::debug!("no preview for step {}: {e}", i + 1))
                        .ok()
                } else {
                    None
                };
                break match inpaint {
                    Some(p) => p.blend(i, schedule, &next)?,
                    None => next,
                };
            }
            // Roll back: `x` still holds the previous step's latents; `next` is discarded.
            drop(next);
            if retries < MAX_STEP_RETRIES {
                retries += 1;
                let from = *cfg;
                let guided = from > 1.0 && cond.negative.is_some();
                if guided {
                    *cfg = (from * CFG_BACKOFF).max(1.0);
                    run.notice(Notice::cfg_adjusted(i + 1, from, *cfg));
                } else {
                    run.notice(Notice::step_retried(i + 1));
                }
                continue;
            }
            let current = family.components().dtype(Component::Denoiser);
            if !precision_raised && current != DType::F32 {
                precision_raised = true;
                family
                    .components_mut()
                    .set_dtype(Component::Denoiser, DType::F32)?;
                run.notice(Notice::denoiser_precision_raised(
                    i + 1,
                    MAX_STEP_RETRIES as usize,
                    dtype_name(current),
                ));
                continue;
            }
            return Err(EngineError::NonFinite {
                stage: format!("denoising step {} of {total}", i + 1),
                detail: format!(
                    "the latents stayed NaN/inf after {retries} retries (CFG lowered to {:.2}) with the denoiser in {}",
                    *cfg,
                    dtype_name(family.components().dtype(Component::Denoiser))
                ),
            });
        };
        release_memory(family.components().device());
        run.step(StepEvent {
            step: i + 1,
            total,
            sigma: schedule.sigmas[i + 1],
            elapsed_ms: started.elapsed().as_millis() as u64,
        });
        if let Some(x0) = preview {
            run.preview(i + 1, total, &x0);
        }
    }
    // After the last step too: a cancel during it (a 1-step model's only one) is not ignored.
    if run.cancel.is_cancelled() {
        return Err(EngineError::Cancelled);
    }
    Ok(x)
}
