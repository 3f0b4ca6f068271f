//! Matrix products of f32 activations through bf16 operands on MKL (feature `mkl`): a linear
//! layer with a bf16 weight, and a batched product of two f32 tensors.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape};
use half::bf16;
use rayon::prelude::*;

use super::mkl::{gemm, gemm_par, to_bf16};

/// `x[…, K] · w[N, K]ᵀ` for f32 `x` and bf16 `w`, both contiguous.
pub(crate) struct LinearBf16;

impl CustomOp2 for LinearBf16 {
    fn name(&self) -> &'static str {
        "linear-bf16-mkl"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (Some((x0, x1)), Some((w0, w1))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
        else {
            candle_core::bail!("linear-bf16: inputs must be contiguous");
        };
        let x = &xs.as_slice::<f32>()?[x0..x1];
        let w = &ws.as_slice::<bf16>()?[w0..w1];
        let (n, k) = wl.shape().dims2()?;
        let dims = xl.shape().dims();
        if dims.last() != Some(&k) {
            candle_core::bail!(
                "linear-bf16: input {:?} against weight {:?}",
                xl.shape(),
                wl.shape()
            );
        }
        let m = x.len() / k.max(1);
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("non-empty") = n;
        let mut out = vec![0f32; m * n];
        if m > 0 && n > 0 && k > 0 {
            let a = to_bf16(x);
            // SAFETY: bf16 is a transparent u16.
            let wb: &[u16] = unsafe { std::slice::from_raw_parts(w.as_ptr().cast(), w.len()) };
            gemm_par(m, n, k, &a, k, wb, k, true, &mut out, n);
        }
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }
}

/// Batched `a[…, M, K] · b[…, K, N]` for f32 tensors through bf16 operands.
pub(crate) struct MatmulBf16;

impl CustomOp2 for MatmulBf16 {
    fn name(&self) -> &'static str {
        "matmul-bf16-mkl"
    }

    fn cpu_fwd(
        &self,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (batch, m, k, n, b_t) = batched_dims(al, bl, "matmul-bf16")?;
        let Some((a0, a1)) = al.contiguous_offsets() else {
            candle_core::bail!("matmul-bf16: lhs must be contiguous");
        };
        let a = to_bf16(&as_.as_slice::<f32>()?[a0..a1]);
        let b_all = bs.as_slice::<f32>()?;
        let b0 = bl.start_offset();
        let b = to_bf16(&b_all[b0..b0 + batch * k * n]);
        let mut out = vec![0f32; batch * m * n];
        if m > 0 && n > 0 && k > 0 {
            out.par_chunks_mut(m * n).enumerate().for_each(|(i, c)| {
                let (ldb, bb) = if b_t {
                    (k, &b[i * n * k..])
                } else {
                    (n, &b[i * k * n..])
                };
                gemm(m, n, k, &a[i * m * k..], k, bb, ldb, b_t, c, n, 0.0);
            });
        }
        let mut dims = al.shape().dims().to_vec();
        let r = dims.len();
        dims[r - 1] = n;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// `(batch, M, K, N, b_t)` of a batched product `a[…, M, K] · b[…, K, N]` with the same leading
/// dims; `b` contiguous (`b_t` false) or the transpose of a contiguous `[…, N, K]` (`b_t` true).
pub(crate) fn batched_dims(
    al: &Layout,
    bl: &Layout,
    op: &str,
) -> candle_core::Result<(usize, usize, usize, usize, bool)> {
    let ad = al.shape().dims();
    let bd = bl.shape().dims();
    let r = ad.len();
    if r < 2 || bd.len() != r || ad[..r - 2] != bd[..r - 2] || ad[r - 1] != bd[r - 2] {
        candle_core::bail!("{op}: shapes {:?} · {:?}", al.shape(), bl.shape());
    }
    let (m, k, n) = (ad[r - 2], ad[r - 1], bd[r - 1]);
    let batch: usize = ad[..r - 2].iter().product();
    // rhs: contiguous `[…, K, N]`, or the transpose of a contiguous `[…, N, K]`.
    let st = bl.stride();
    let b_t = if bl.is_contiguous() {
        false
    } else if st[r - 2] == 1 && st[r - 1] == k && (r == 2 || st[r - 3] == n * k) {
        let lead_ok = (0..r - 2).rev().all(|i| {
            let inner: usize = bd[i + 1..].iter().product();
            st[i] == inner || bd[i] == 1
        });
        if !lead_ok {
            candle_core::bail!("{op}: unsupported rhs strides {st:?}");
        }
        true
    } else {
        candle_core::bail!("{op}: unsupported rhs strides {st:?}");
    };
    Ok((batch, m, k, n, b_t))
}
