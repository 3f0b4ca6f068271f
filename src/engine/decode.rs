//! VAE decode right after the last step: whole, or in overlapping latent tiles blended with
//! smootherstep weights into a host buffer (so no full-resolution feature map ever exists); NaN in
//! a tile → that tile again with the VAE in f32; out-of-memory in a whole decode → tiled.

use candle_core::{DType, Device, Tensor};

use super::guard::{all_finite, poison};
use super::{EngineError, Notice, RunState};
use crate::families::{Component, Family};
use crate::memory::planner::{VaeTiling, DEFAULT_VAE_TILING};

/// Tile origins along one axis: stride `tile − overlap`, the last tile flush with the end.
pub fn tile_starts(len: usize, tile: usize, overlap: usize) -> Vec<usize> {
    if len <= tile {
        return vec![0];
    }
    let stride = tile.saturating_sub(overlap).max(1);
    let mut starts: Vec<usize> = (0..)
        .map(|i| i * stride)
        .take_while(|s| s + tile < len)
        .collect();
    starts.push(len - tile);
    starts.dedup();
    starts
}

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
        None => match decode_checked(family, latents, run) {
            Err(EngineError::Model(e)) if is_out_of_memory(&e.to_string()) => {
                run.notice(Notice::new(
                    "decode_tiled",
                    "VAE decode ran out of memory; decoding in tiles instead".to_string(),
                ));
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

/// One decode with the guard: NaN/inf → again with the VAE in f32, once.
fn decode_checked(
    family: &mut dyn Family,
    z: &Tensor,
    run: &mut RunState<'_>,
) -> Result<Tensor, EngineError> {
    let mut raised = false;
    loop {
        run.vae_attempts += 1;
        let mut out = family.decode(z)?;
        if run.faults.vae_nan(run.vae_attempts) {
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
        let from = family.dtype(Component::Vae);
        family.set_dtype(Component::Vae, DType::F32)?;
        run.notice(Notice {
            kind: "precision_raised".into(),
            message: format!(
                "VAE produced NaN in {}; decoded again in f32",
                dtype_name(from)
            ),
            component: Some("vae".into()),
            ..Notice::default()
        });
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

fn decode_tiled(
    family: &mut dyn Family,
    latents: &Tensor,
    tiling: VaeTiling,
    run: &mut RunState<'_>,
) -> Result<Tensor, EngineError> {
    let (b, _c, h, w) = latents.dims4()?;
    let tile = (tiling.tile_latent as usize).max(1);
    let overlap = (tiling.overlap_latent as usize).min(tile / 2);
    let ys = tile_starts(h, tile, overlap);
    let xs = tile_starts(w, tile, overlap);
    let mut out: Option<(usize, Vec<f32>, Vec<f32>)> = None; // (factor, pixels, weight sums)
    for (yi, &y0) in ys.iter().enumerate() {
        for (xi, &x0) in xs.iter().enumerate() {
            let th = tile.min(h);
            let tw = tile.min(w);
            let z = latents.narrow(2, y0, th)?.narrow(3, x0, tw)?.contiguous()?;
            let px = decode_checked(family, &z, run)?
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?;
            let (_, ch, ph, pw) = px.dims4()?;
            let f = ph / th;
            let (factor, buf, wsum) = out.get_or_insert_with(|| {
                (
                    f,
                    vec![0f32; b * ch * h * f * w * f],
                    vec![0f32; h * f * w * f],
                )
            });
            let (big_h, big_w) = (h * *factor, w * *factor);
            let ramp = overlap * *factor;
            let wy = axis_weights(ph, ramp, yi > 0, yi + 1 < ys.len());
            let wx = axis_weights(pw, ramp, xi > 0, xi + 1 < xs.len());
            let data = px.flatten_all()?.to_vec1::<f32>()?;
            let (oy, ox) = (y0 * *factor, x0 * *factor);
            for bi in 0..b {
                for ci in 0..ch {
                    for (r, wyr) in wy.iter().enumerate() {
                        let src = ((bi * ch + ci) * ph + r) * pw;
                        let dst = ((bi * ch + ci) * big_h + oy + r) * big_w + ox;
                        for col in 0..pw {
                            buf[dst + col] += data[src + col] * wyr * wx[col];
                        }
                    }
                }
            }
            for (r, wyr) in wy.iter().enumerate() {
                let dst = (oy + r) * big_w + ox;
                for col in 0..pw {
                    wsum[dst + col] += wyr * wx[col];
                }
            }
        }
    }
    let Some((factor, mut buf, wsum)) = out else {
        return Err(EngineError::Invalid("empty latent".into()));
    };
    let plane = h * factor * w * factor;
    for (i, v) in buf.iter_mut().enumerate() {
        *v /= wsum[i % plane].max(f32::MIN_POSITIVE);
    }
    let ch = buf.len() / (b * plane);
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
