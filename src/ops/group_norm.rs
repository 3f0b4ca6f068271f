//! GroupNorm over `[B, C, H, W]` (+ SiLU), with statistics accumulated in f32 (f64 on the CPU)
//! whatever the dtype. The statistics are a separate step so a caller can reuse them (the tiled
//! VAE decode normalises every tile with the whole image's). f32 on the CPU: one sweep for the
//! statistics and one for scale, shift and SiLU (ops/cpu/group_norm.rs) instead of a layer norm,
//! a multiply, an add and a SiLU, each a sweep over the feature map.

use candle_core::{DType, Tensor};

use super::cpu::group_norm::{ChannelAffine, GroupStats};

fn cpu_f32(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

fn check_groups(c: usize, groups: usize) -> candle_core::Result<()> {
    if groups == 0 || c % groups != 0 {
        candle_core::bail!("group norm: {c} channels in {groups} groups");
    }
    Ok(())
}

/// Mean and population variance per group of `x` `[B, C, H, W]`: two f32 tensors `[B, G, 1]`.
pub fn group_stats(x: &Tensor, groups: usize) -> candle_core::Result<(Tensor, Tensor)> {
    let (b, c, h, w) = x.dims4()?;
    check_groups(c, groups)?;
    if cpu_f32(x) {
        let st = x.contiguous()?.apply_op1_no_bwd(&GroupStats { groups })?; // [B, G, 2]
        return Ok((
            st.narrow(2, 0, 1)?.contiguous()?,
            st.narrow(2, 1, 1)?.contiguous()?,
        ));
    }
    let xf = x
        .to_dtype(DType::F32)?
        .reshape((b, groups, (c / groups) * h * w))?;
    let mean = xf.mean_keepdim(2)?;
    let var = xf.broadcast_sub(&mean)?.sqr()?.mean_keepdim(2)?;
    Ok((mean, var))
}

/// GroupNorm of `x` with the given statistics (`[B, G, 1]`, from [`group_stats`]), affine
/// `weight`/`bias` `[C]`, then SiLU when `silu`; the result in `x`'s dtype.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_with(
    x: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let g = mean.dim(1)?;
    check_groups(c, g)?;
    if cpu_f32(x) {
        // Per channel: y = x·a + s with a = γ / √(var + ε), s = β − mean·a.
        let rstd = (var.to_dtype(DType::F32)? + eps)?.sqrt()?.recip()?; // [B, G, 1]
        let gamma = weight.to_dtype(DType::F32)?.reshape((1, g, c / g))?;
        let beta = bias.to_dtype(DType::F32)?.reshape((1, g, c / g))?;
        let a = rstd.broadcast_mul(&gamma)?; // [B, G, C/G]
        let shift = beta.broadcast_sub(&mean.to_dtype(DType::F32)?.broadcast_mul(&a)?)?;
        let a = a.reshape((b, c))?.contiguous()?;
        let shift = shift.reshape((b, c))?.contiguous()?;
        return x
            .contiguous()?
            .apply_op3_no_bwd(&a, &shift, &ChannelAffine { silu });
    }
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?.reshape((b, g, (c / g) * h * w))?;
    let mut t = xf.broadcast_sub(mean)?;
    drop(xf);
    t = t.broadcast_div(&(var + eps)?.sqrt()?)?;
    t = t.reshape((b, c, h, w))?.to_dtype(dtype)?;
    t = t.broadcast_mul(&weight.to_dtype(dtype)?.reshape((1, c, 1, 1))?)?;
    t = t.broadcast_add(&bias.to_dtype(dtype)?.reshape((1, c, 1, 1))?)?;
    if silu {
        candle_nn::ops::silu(&t)
    } else {
        Ok(t)
    }
}

/// GroupNorm of `x` with its own statistics (+ SiLU). Off the CPU's f32 path it is one fused
/// layer norm over each group's values (f32 accumulation in any dtype) instead of a chain of
/// full-size f32 temporaries: at 1024² a 128-channel map is 0.5 GB in f32.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> candle_core::Result<Tensor> {
    if cpu_f32(x) {
        let (mean, var) = group_stats(x, groups)?;
        return group_norm_with(x, &mean, &var, weight, bias, eps, silu);
    }
    let (b, c, h, w) = x.dims4()?;
    check_groups(c, groups)?;
    let dtype = x.dtype();
    let n = (c / groups) * h * w;
    let ones = Tensor::ones(n, dtype, x.device())?;
    let zeros = Tensor::zeros(n, dtype, x.device())?;
    let normed = candle_nn::ops::layer_norm(
        &x.contiguous()?.reshape((b * groups, n))?,
        &ones,
        &zeros,
        eps as f32,
    )?
    .reshape((b, c, h, w))?;
    drop((ones, zeros));
    let scaled = normed.broadcast_mul(&weight.to_dtype(dtype)?.reshape((1, c, 1, 1))?)?;
    drop(normed);
    let y = scaled.broadcast_add(&bias.to_dtype(dtype)?.reshape((1, c, 1, 1))?)?;
    if silu {
        candle_nn::ops::silu(&y)
    } else {
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Reference: PyTorch's `F.group_norm` (population variance, ε inside the root), followed by
    /// `F.silu`, written out with candle's elementwise ops.
    #[test]
    fn every_path_matches_the_definition() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (b, c, h, w, g) = (2, 6, 5, 7, 3);
        let x = ((Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)? * 3.0)? + 0.5)?;
        let weight = Tensor::randn(1f32, 0.3, c, &dev)?;
        let bias = Tensor::randn(0f32, 0.3, c, &dev)?;
        let xg = x.reshape((b, g, (c / g) * h * w))?;
        let mean = xg.mean_keepdim(2)?;
        let var = xg.broadcast_sub(&mean)?.sqr()?.mean_keepdim(2)?;
        let norm = xg
            .broadcast_sub(&mean)?
            .broadcast_div(&(&var + 1e-6)?.sqrt()?)?
            .reshape((b, c, h, w))?;
        let want = norm
            .broadcast_mul(&weight.reshape((1, c, 1, 1))?)?
            .broadcast_add(&bias.reshape((1, c, 1, 1))?)?;
        let want_silu = candle_nn::ops::silu(&want)?;
        let diff = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
            (a.to_dtype(DType::F32)? - b)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()
        };
        for silu in [false, true] {
            let want = if silu { &want_silu } else { &want };
            // CPU f32 kernels, with own and with given statistics.
            assert!(diff(&group_norm(&x, &weight, &bias, g, 1e-6, silu)?, want)? < 1e-5);
            let (m, v) = group_stats(&x, g)?;
            let got = group_norm_with(&x, &m, &v, &weight, &bias, 1e-6, silu)?;
            assert!(diff(&got, want)? < 1e-5);
            // The other devices' paths (taken here by a half input).
            let xh = x.to_dtype(DType::F16)?;
            assert!(diff(&group_norm(&xh, &weight, &bias, g, 1e-6, silu)?, want)? < 3e-2);
            let (m, v) = group_stats(&xh, g)?;
            let got = group_norm_with(&xh, &m, &v, &weight, &bias, 1e-6, silu)?;
            assert!(diff(&got, want)? < 3e-2);
        }
        assert!(group_stats(&x, 4).is_err());
        Ok(())
    }
}
