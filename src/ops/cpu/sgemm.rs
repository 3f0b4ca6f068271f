//! f32 matrix products on the CPU. Builds that link MKL (`cfg(zturbo_mkl)`, see build.rs) call
//! MKL's `cblas_sgemm` — what PyTorch's CPU products use, and 10–30 % faster than candle's `gemm`
//! crate on the DiT's shapes (benches/compare, "Profile"); every other build calls the `gemm`
//! crate. [`LinearF32`] and [`MatmulF32`] are the candle ops over them that `ops::linear` uses in
//! MKL builds.

#[cfg(zturbo_mkl)]
use candle_core::{CpuStorage, CustomOp2, Layout, Shape};
#[cfg(zturbo_mkl)]
use rayon::prelude::*;

/// The f32 GEMM a product runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// MKL's `cblas_sgemm` (builds that link MKL; elsewhere it means the `gemm` crate).
    Mkl,
    /// The `gemm` crate.
    GemmCrate,
}

/// `c[m×n] = a[m×k] · op(b) + beta·c` for row-major f32 slices; `b_t`: `b` is stored `[n, k]`
/// (row stride `ldb`), else `[k, n]`. On the calling thread only, with [`chosen`]'s backend.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    b_t: bool,
    c: &mut [f32],
    ldc: usize,
    beta: f32,
) {
    sgemm_on(chosen(), m, n, k, (a, lda), (b, ldb, b_t), (c, ldc), beta)
}

/// [`sgemm`] on a given backend.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm_on(
    backend: Backend,
    m: usize,
    n: usize,
    k: usize,
    (a, lda): (&[f32], usize),
    (b, ldb, b_t): (&[f32], usize, bool),
    (c, ldc): (&mut [f32], usize),
    beta: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    check_bounds(m, n, k, (a, lda), (b, ldb, b_t), (c, ldc));
    #[cfg(not(zturbo_mkl))]
    let _ = backend;
    #[cfg(zturbo_mkl)]
    if backend == Backend::Mkl {
        assert!([m, n, k, lda, ldb, ldc]
            .iter()
            .all(|&v| v <= i32::MAX as usize));
        // SAFETY: the asserts above keep every element MKL reads or writes inside the slices.
        unsafe {
            super::mkl::cblas_sgemm(
                super::mkl::ROW_MAJOR,
                super::mkl::NO_TRANS,
                if b_t {
                    super::mkl::TRANS
                } else {
                    super::mkl::NO_TRANS
                },
                m as i32,
                n as i32,
                k as i32,
                1.0,
                a.as_ptr(),
                lda.max(1) as i32,
                b.as_ptr(),
                ldb.max(1) as i32,
                beta,
                c.as_mut_ptr(),
                ldc as i32,
            );
        }
        return;
    }
    gemm_crate(
        m,
        n,
        k,
        (a, lda),
        (b, ldb, b_t),
        (c, ldc),
        beta,
        gemm::Parallelism::None,
    );
}

/// Panics unless every element the product reads or writes lies inside the slices.
fn check_bounds(
    m: usize,
    n: usize,
    k: usize,
    (a, lda): (&[f32], usize),
    (b, ldb, b_t): (&[f32], usize, bool),
    (c, ldc): (&[f32], usize),
) {
    assert!(lda >= k && (k == 0 || a.len() >= (m - 1) * lda + k));
    if k > 0 {
        if b_t {
            assert!(ldb >= k && b.len() >= (n - 1) * ldb + k);
        } else {
            assert!(ldb >= n && b.len() >= (k - 1) * ldb + n);
        }
    }
    assert!(ldc >= n && c.len() >= (m - 1) * ldc + n);
}

/// [`sgemm`] through the `gemm` crate, on `parallelism`'s threads (asserts done by the caller).
#[allow(clippy::too_many_arguments)]
fn gemm_crate(
    m: usize,
    n: usize,
    k: usize,
    (a, lda): (&[f32], usize),
    (b, ldb, b_t): (&[f32], usize, bool),
    (c, ldc): (&mut [f32], usize),
    beta: f32,
    parallelism: gemm::Parallelism,
) {
    let (rhs_cs, rhs_rs) = if b_t { (ldb, 1) } else { (1, ldb) };
    // SAFETY: the caller's asserts keep every element inside the slices; gemm computes
    // dst = beta_dst·dst + 1·lhs·rhs, reading dst only when `beta` ≠ 0.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            beta != 0.0,
            a.as_ptr(),
            1,
            lda as isize,
            b.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            beta,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The f32 GEMM this process multiplies with: in a build with MKL, MKL's `cblas_sgemm` on Intel
/// CPUs and the `gemm` crate elsewhere — on AMD's Zen 4 the `gemm` crate's AVX-512 kernels ran
/// the DiT's feed-forward products 1.3–1.5× and the VAE's 3×3 taps 1.1–1.3× faster than MKL
/// (benches/compare_ops, `dit.linear.*`, `vae.conv3x3.*`); without MKL, the `gemm` crate.
/// `ZTURBO_SGEMM=mkl|gemm` chooses by hand.
pub fn chosen() -> Backend {
    static CHOSEN: std::sync::OnceLock<Backend> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| {
        if !cfg!(zturbo_mkl) {
            return Backend::GemmCrate;
        }
        match std::env::var("ZTURBO_SGEMM").as_deref() {
            Ok("mkl") => Backend::Mkl,
            Ok("gemm") => Backend::GemmCrate,
            _ if cpu_vendor_is_intel() => Backend::Mkl,
            _ => Backend::GemmCrate,
        }
    })
}

/// CPUID leaf 0's vendor string is `GenuineIntel`.
fn cpu_vendor_is_intel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let r = std::arch::x86_64::__cpuid(0);
        let mut v = [0u8; 12];
        v[..4].copy_from_slice(&r.ebx.to_le_bytes());
        v[4..8].copy_from_slice(&r.edx.to_le_bytes());
        v[8..].copy_from_slice(&r.ecx.to_le_bytes());
        &v == b"GenuineIntel"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`sgemm`] across the rayon pool: MKL (linked sequential, see ops/cpu/mkl.rs) with the rows of
/// `a` and `c` split, at least 64 per task; the `gemm` crate with its own split.
#[cfg(zturbo_mkl)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm_par(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    b_t: bool,
    c: &mut [f32],
    ldc: usize,
    beta: f32,
) {
    sgemm_par_on(chosen(), m, n, k, (a, lda), (b, ldb, b_t), (c, ldc), beta)
}

/// [`sgemm_par`] on a given backend.
#[cfg(zturbo_mkl)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm_par_on(
    backend: Backend,
    m: usize,
    n: usize,
    k: usize,
    (a, lda): (&[f32], usize),
    (b, ldb, b_t): (&[f32], usize, bool),
    (c, ldc): (&mut [f32], usize),
    beta: f32,
) {
    let threads = rayon::current_num_threads().max(1);
    if backend == Backend::GemmCrate {
        if m == 0 || n == 0 {
            return;
        }
        check_bounds(m, n, k, (a, lda), (b, ldb, b_t), (c, ldc));
        // The `gemm` crate splits the product over the pool itself (as candle's own product does).
        let parallelism = if threads > 1 && m * n * k >= 1 << 18 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        return gemm_crate(
            m,
            n,
            k,
            (a, lda),
            (b, ldb, b_t),
            (c, ldc),
            beta,
            parallelism,
        );
    }
    let rows = m.div_ceil(threads).max(64);
    if rows >= m || n == 0 {
        return sgemm_on(backend, m, n, k, (a, lda), (b, ldb, b_t), (c, ldc), beta);
    }
    c[..(m - 1) * ldc + n]
        .par_chunks_mut(rows * ldc)
        .enumerate()
        .for_each(|(i, c)| {
            let r0 = i * rows;
            let mr = rows.min(m - r0);
            let a = &a[r0 * lda..];
            sgemm_on(backend, mr, n, k, (a, lda), (b, ldb, b_t), (c, ldc), beta);
        });
}

/// `x[…, K] · w[N, K]ᵀ (+ bias)` for f32 `x` and `w`, both contiguous; the bias (length N) is
/// written into the output before the product accumulates onto it (one pass fewer than a
/// separate broadcast add).
#[cfg(zturbo_mkl)]
pub(crate) struct LinearF32 {
    pub(crate) bias: Option<Vec<f32>>,
}

#[cfg(zturbo_mkl)]
impl CustomOp2 for LinearF32 {
    fn name(&self) -> &'static str {
        "linear-f32-mkl"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = super::f32_slice(xs, xl, "linear-f32")?;
        let w = super::f32_slice(ws, wl, "linear-f32")?;
        let (n, k) = wl.shape().dims2()?;
        let dims = xl.shape().dims();
        if dims.last() != Some(&k) || self.bias.as_ref().is_some_and(|b| b.len() != n) {
            candle_core::bail!(
                "linear-f32: input {:?} against weight {:?}",
                xl.shape(),
                wl.shape()
            );
        }
        let m = x
            .len()
            .checked_div(k)
            .unwrap_or_else(|| dims[..dims.len() - 1].iter().product());
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("non-empty") = n;
        let mut out = match &self.bias {
            Some(b) if n > 0 => b.repeat(m),
            _ => vec![0f32; m * n],
        };
        let beta = if self.bias.is_some() { 1.0 } else { 0.0 };
        if m > 0 && n > 0 {
            sgemm_par(m, n, k, x, k, w, k, true, &mut out, n, beta);
        }
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }
}

/// Batched `a[…, M, K] · b[…, K, N]` for f32 tensors: `a` contiguous, `b` contiguous or the
/// transpose of a contiguous `[…, N, K]`; one product per batch item across the rayon pool
/// (rows split when there are fewer items than threads).
#[cfg(zturbo_mkl)]
pub(crate) struct MatmulF32;

#[cfg(zturbo_mkl)]
impl CustomOp2 for MatmulF32 {
    fn name(&self) -> &'static str {
        "matmul-f32-mkl"
    }

    fn cpu_fwd(
        &self,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (batch, m, k, n, b_t) = super::matmul::batched_dims(al, bl, "matmul-f32")?;
        let a = super::f32_slice(as_, al, "matmul-f32")?;
        let b_all = bs.as_slice::<f32>()?;
        let b0 = bl.start_offset();
        let b = &b_all[b0..b0 + batch * k * n];
        let mut out = vec![0f32; batch * m * n];
        if m > 0 && n > 0 {
            let ldb = if b_t { k } else { n };
            if batch >= rayon::current_num_threads() {
                out.par_chunks_mut(m * n).enumerate().for_each(|(i, c)| {
                    let (ai, bi) = (&a[i * m * k..], &b[i * k * n..]);
                    sgemm(m, n, k, ai, k, bi, ldb, b_t, c, n, 0.0);
                });
            } else {
                for (i, c) in out.chunks_mut(m * n).enumerate() {
                    let (ai, bi) = (&a[i * m * k..], &b[i * k * n..]);
                    sgemm_par(m, n, k, ai, k, bi, ldb, b_t, c, n, 0.0);
                }
            }
        }
        let mut dims = al.shape().dims().to_vec();
        let r = dims.len();
        dims[r - 1] = n;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook triple loop, the reference for both layouts of `b`.
    fn naive(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], b_t: bool) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| a[i * k + p] * if b_t { b[j * k + p] } else { b[p * n + j] })
                    .sum();
            }
        }
        c
    }

    #[test]
    fn sgemm_matches_the_triple_loop_with_both_layouts_and_beta() {
        // The second size is big enough for the `gemm` crate's threaded split in `sgemm_par`.
        for (m, n, k) in [(37, 29, 53), (301, 47, 61)] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0)
                .collect();
            for backend in [Backend::Mkl, Backend::GemmCrate] {
                for b_t in [false, true] {
                    let want = naive(m, n, k, &a, &b, b_t);
                    let ldb = if b_t { k } else { n };
                    let worst = |c: &[f32], offset: f32| {
                        c.iter()
                            .zip(&want)
                            .map(|(x, y)| (x - offset - y).abs())
                            .fold(0f32, f32::max)
                    };
                    let mut c = vec![1f32; m * n];
                    sgemm_on(backend, m, n, k, (&a, k), (&b, ldb, b_t), (&mut c, n), 0.0);
                    assert!(worst(&c, 0.0) < 1e-3, "{backend:?} b_t {b_t}");
                    // beta 1 accumulates onto what is there.
                    let mut c = vec![1f32; m * n];
                    sgemm_on(backend, m, n, k, (&a, k), (&b, ldb, b_t), (&mut c, n), 1.0);
                    assert!(worst(&c, 1.0) < 1e-3, "{backend:?} b_t {b_t}, beta 1");
                    #[cfg(zturbo_mkl)]
                    {
                        let mut c = vec![1f32; m * n];
                        sgemm_par_on(backend, m, n, k, (&a, k), (&b, ldb, b_t), (&mut c, n), 1.0);
                        assert!(worst(&c, 1.0) < 1e-3, "{backend:?} b_t {b_t}, threaded");
                    }
                }
            }
        }
    }
}
