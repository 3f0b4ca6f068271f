//! VAE decode right after the last step: whole, or in overlapping latent tiles blended with
//! smootherstep weights into a host buffer (so no full-resolution feature map ever exists); NaN in
//! a tile → that tile again with the VAE in f32; out-of-memory in a whole decode → tiled.

use candle_core::{DType, Device, Tensor};

use super::guard::{all_finite, poison};
use super::{EngineError, Notice, RunState};
use crate::families::{Component, Family};
pub use crate::memory::planner::tile_starts;
use crate::memory::planner::{VaeTiling, DEFAULT_VAE_TILING};
use crate::nn::vae::GroupNormStats;

/// Latent cells of real context decoded around every tile and cropped away again. Measured on the
/// tiny VAE with exact statistics: 8 cells make tiles exact (1e-6), 0 cells leave a mean error of
/// 0.2 % that the overlap blend already hides — far below the statistics estimate's, so the extra
/// compute is not spent by default.
pub const TILE_CONTEXT: usize = 0;

/// smootherstep: C²-continuous ramp from 0 to 1; `s(t) + s(1 − t) = 1`, so two overlapping tiles'
/// weights already sum to one.
fn smootherstep(t: f32) -> f32 {
    let t = t.clamp(0.0, 1.0);
    t * t * t * (t * (t * 6.0 - 15.0) + 10.0)
}

/// Per-pixel weights along one axis of a tile of `n` pixels: ramps of `ramp` pixels on the sides
/// that touch a neighbouring tile, flat elsewhere.
fn axis_weights(n: usize, ramp: usize, ramp_start: bool, ramp_end: bool) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let mut w = 1.0f32;
            if ramp > 0 {
                if ramp_start && i < ramp {
                    w *= smootherstep((i as f32 + 0.5) / ramp as f32);
                }
                if ramp_end && i >= n - ramp {
                    w *= smootherstep(((n - i) as f32 - 0.5) / ramp as f32);
                }
            }
            w
        })
        .collect()
}

/// Decodes latents `[B, C, h, w]` to pixels `[B, 3, h·f, w·f]` (f32, about [-1, 1], on the CPU).
pub(crate) fn decode(
    family: &mut dyn Family,
    latents: &Tensor,
    tiling: Option<VaeTiling>,
    run: &mut RunState<'_>,
) -> Result<Tensor, EngineError> {
    match tiling {
        None => match decode_checked(family, run, &mut |f, _| Ok(f.decode(latents)?)) {
            Err(EngineError::Model(e)) if is_out_of_memory(&e.to_string()) => {
                run.notice(Notice::decode_tiled());
                decode_tiled(family, latents, DEFAULT_VAE_TILING, run)
            }
            other => Ok(other?.to_device(&Device::Cpu)?),
        },
        Some(t) => decode_tiled(family, latents, t, run),
    }
}

fn is_out_of_memory(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("out of memory") || m.contains("out_of_memory") || m.contains("alloc")
}

type Attempt<'a> = dyn FnMut(&mut dyn Family, bool) -> Result<Tensor, EngineError> + 'a;

/// One decode with the guard: NaN/inf → again with the VAE in f32, once. `attempt` gets `true`
/// right after the precision was raised (cached statistics must then be recomputed).
fn decode_checked(
    family: &mut dyn Family,
    run: &mut RunState<'_>,
    attempt: &mut Attempt<'_>,
) -> Result<Tensor, EngineError> {
    let mut raised = false;
    loop {
        run.vae_attempts += 1;
        let mut out = attempt(family, raised)?;
        if run.faults.vae_black(run.vae_attempts, run.salt) {
            tracing::warn!(
                attempt = run.vae_attempts,
                "fault injection: VAE output set to black"
            );
            out = (out.zeros_like()? - 1.0)?;
        }
        if run.faults.vae_nan(run.vae_attempts, run.salt) {
            tracing::warn!(
                attempt = run.vae_attempts,
                "fault injection: VAE output set to NaN"
            );
            out = poison(&out)?;
        }
        if all_finite(&out)? {
            return Ok(out);
        }
        if raised {
            return Err(EngineError::NonFinite {
                stage: "VAE decode".into(),
                detail: "the decoded image is not finite even with the VAE in f32".into(),
            });
        }
        let from = family.components().dtype(Component::Vae);
        family
            .components_mut()
            .set_dtype(Component::Vae, DType::F32)?;
        run.notice(Notice::vae_precision_raised(dtype_name(from)));
        raised = true;
    }
}

pub(crate) fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F64 => "f64",
        _ => "other",
    }
}

/// Tiled decode. The VAE's low-resolution trunk (mid block with its global attention) runs once on
/// the whole latent — cheap, and exact; the upsampling head, where the memory goes, runs tile by
/// tile on the trunk's features, every tile normalised with GroupNorm statistics from one pass of
/// the head over the features downscaled to tile size, so the tiles agree in tone.
fn decode_tiled(
    family: &mut dyn Family,
    latents: &Tensor,
    tiling: VaeTiling,
    run: &mut RunState<'_>,
) -> Result<Tensor, EngineError> {
    let mut cache: Option<(Tensor, GroupNormStats)> = None;
    tiled(latents, tiling, TILE_CONTEXT, |z, (y0, x0)| {
        // Between tiles: a cancel does not wait for the rest of the image.
        if run.cancel.is_cancelled() {
            return Err(EngineError::Cancelled);
        }
        decode_checked(family, run, &mut |f, raised| {
            if raised || cache.is_none() {
                let input = f.vae_input(latents)?;
                let vae = f.components_mut().vae()?;
                let features = vae.trunk(&input)?;
                // Statistics from the whole image at tile size (pooling the latents, not the
                // features: pooled features lose the variance the head normalises away).
                let (_, _, h, w) = input.dims4()?;
                let ((tw, th), _) = tiling.on(w, h);
                let small = vae.trunk(&stats_latents(&input, tw, th)?)?;
                let stats = vae.record_head_stats(&small)?;
                cache = Some((features, stats));
            }
            let Some((features, stats)) = &cache else {
                return Err(EngineError::Invalid("no VAE features".into()));
            };
            let (_, _, th, tw) = z.dims4()?;
            let part = features
                .narrow(2, y0, th)?
                .narrow(3, x0, tw)?
                .contiguous()?;
            Ok(f.components_mut().vae()?.head_with_stats(&part, stats)?)
        })
    })
}

/// The latents subsampled (every f-th cell, f the smallest integer that brings them to no more
/// cells than one `tile_w × tile_h` tile, so the statistics pass needs no more memory than a tile).
/// Subsampling, unlike average pooling, keeps the latents' per-cell distribution — pooling
/// noise-like detail shrinks its variance and every GroupNorm downstream would misjudge the image.
/// By area rather than by side: a band as wide as the image gets statistics as fine as a square
/// tile of the same size would.
pub fn stats_latents(
    latents: &Tensor,
    tile_w: usize,
    tile_h: usize,
) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = latents.dims4()?;
    let cells = tile_w.max(1) * tile_h.max(1);
    // At most the short side, so that neither axis subsamples to nothing.
    let most = h.min(w).max(1);
    let f = (1..=most)
        .find(|&f| (h / f) * (w / f) <= cells)
        .unwrap_or(most);
    if f == 1 {
        return Ok(latents.clone());
    }
    let (hs, ws) = (h / f, w / f);
    latents
        .narrow(2, 0, hs * f)?
        .narrow(3, 0, ws * f)?
        .reshape((b, c, hs, f, ws, f))?
        .narrow(3, f / 2, 1)?
        .narrow(5, f / 2, 1)?
        .reshape((b, c, hs, ws))
}

/// Decodes latents without the engine (tests, benchmarks): the same guard, no fault injection,
/// notices dropped.
pub fn decode_image(
    family: &mut dyn Family,
    latents: &Tensor,
    tiling: Option<VaeTiling>,
) -> Result<Tensor, EngineError> {
    let faults = super::guard::FaultPlan::default();
    let cancel = super::CancelToken::new();
    let mut observer = super::NullObserver;
    let mut run = RunState::new(&faults, &cancel, &mut observer, None);
    decode(family, latents, tiling, &mut run)
}

/// Runs `decode_tile` over overlapping tiles of `latents` (`[B, C, h, w]`; it gets the tile and
/// its origin) and blends the pixel tiles into one host buffer, normalising by the summed weights.
pub fn tiled<E: From<candle_core::Error>>(
    latents: &Tensor,
    tiling: VaeTiling,
    context: usize,
    mut decode_tile: impl FnMut(&Tensor, (usize, usize)) -> Result<Tensor, E>,
) -> Result<Tensor, E> {
    let (b, _c, h, w) = latents.dims4()?;
    let ((tw, th), (ox, oy)) = tiling.on(w, h);
    let ys = tile_starts(h, th, oy);
    let xs = tile_starts(w, tw, ox);
    let mut out: Option<(usize, usize, Vec<f32>, Vec<f32>)> = None; // (factor, channels, pixels, weight sums)
    for (yi, &y0) in ys.iter().enumerate() {
        for (xi, &x0) in xs.iter().enumerate() {
            // Decode the tile with `context` extra cells around it (where the image has them) and
            // keep only the tile: its edge pixels then see real neighbours instead of zero padding.
            let (ry0, rx0) = (y0.saturating_sub(context), x0.saturating_sub(context));
            let (ry1, rx1) = ((y0 + th + context).min(h), (x0 + tw + context).min(w));
            let z = latents
                .narrow(2, ry0, ry1 - ry0)?
                .narrow(3, rx0, rx1 - rx0)?
                .contiguous()?;
            let region = decode_tile(&z, (ry0, rx0))?;
            let f = region.dim(2)? / (ry1 - ry0);
            let px = region
                .narrow(2, (y0 - ry0) * f, th * f)?
                .narrow(3, (x0 - rx0) * f, tw * f)?
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?;
            drop(region);
            let (_, ch, ph, pw) = px.dims4()?;
            let (factor, _, buf, wsum) = out.get_or_insert_with(|| {
                (
                    f,
                    ch,
                    vec![0f32; b * ch * h * f * w * f],
                    vec![0f32; h * f * w * f],
                )
            });
            let (big_h, big_w) = (h * *factor, w * *factor);
            let wy = axis_weights(ph, oy * *factor, yi > 0, yi + 1 < ys.len());
            let wx = axis_weights(pw, ox * *factor, xi > 0, xi + 1 < xs.len());
            let data = px.flatten_all()?.to_vec1::<f32>()?;
            let (oy, ox) = (y0 * *factor, x0 * *factor);
            for bi in 0..b {
                for ci in 0..ch {
                    for (r, wr) in wy.iter().enumerate() {
                        let src = ((bi * ch + ci) * ph + r) * pw;
                        let dst = ((bi * ch + ci) * big_h + oy + r) * big_w + ox;
                        let row = &data[src..src + pw];
                        for ((o, v), wc) in buf[dst..dst + pw].iter_mut().zip(row).zip(&wx) {
                            *o += v * wr * wc;
                        }
                    }
                }
            }
            for (r, wr) in wy.iter().enumerate() {
                let dst = (oy + r) * big_w + ox;
                for (o, wc) in wsum[dst..dst + pw].iter_mut().zip(&wx) {
                    *o += wr * wc;
                }
            }
        }
    }
    let Some((factor, ch, mut buf, wsum)) = out else {
        return Err(candle_core::Error::Msg("empty latent".into()).into());
    };
    let plane = h * factor * w * factor;
    for (i, v) in buf.iter_mut().enumerate() {
        *v /= wsum[i % plane].max(f32::MIN_POSITIVE);
    }
    Ok(Tensor::from_vec(
        buf,
        (b, ch, h * factor, w * factor),
        &Device::Cpu,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_every_cell_and_end_flush() {
        for len in [1usize, 8, 32, 33, 40, 56, 64, 100, 128] {
            let s = tile_starts(len, 32, 8);
            let t = 32.min(len);
            assert_eq!(s[0], 0);
            assert_eq!(*s.last().unwrap() + t, len, "len {len}: {s:?}");
            for w in s.windows(2) {
                assert!(w[1] > w[0] && w[1] - w[0] <= 24, "len {len}: {s:?}");
            }
        }
    }

    #[test]
    fn blend_weights_sum_to_one_in_overlaps() {
        let ramp = 16;
        let a = axis_weights(64, ramp, false, true);
        let b = axis_weights(64, ramp, true, false);
        // Tile b starts where the last `ramp` pixels of a begin.
        for i in 0..ramp {
            let s = a[64 - ramp + i] + b[i];
            assert!((s - 1.0).abs() < 1e-5, "{i}: {s}");
        }
        assert_eq!(a[0], 1.0);
        assert_eq!(b[63], 1.0);
    }
}
