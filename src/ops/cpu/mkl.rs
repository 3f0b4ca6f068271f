//! The MKL bindings (static libraries from the `mkl-static` wheel; see build.rs): f32 products
//! (`cblas_sgemm`, used by ops/cpu/sgemm.rs), bf16 × bf16 → f32 products on one thread, split across the rayon pool, and f32 → bf16 rounding of whole slices.

use rayon::prelude::*;

pub(crate) const ROW_MAJOR: i32 = 101;
pub(crate) const NO_TRANS: i32 = 111;
pub(crate) const TRANS: i32 = 112;

unsafe extern "C" {
    pub(crate) fn cblas_sgemm(
        layout: i32,
        transa: i32,
        transb: i32,
        m: i32,
        n: i32,
        k: i32,
        alpha: f32,
        a: *const f32,
        lda: i32,
        b: *const f32,
        ldb: i32,
        beta: f32,
        c: *mut f32,
        ldc: i32,
    );
    fn cblas_gemm_bf16bf16f32(
        layout: i32,
        transa: i32,
        transb: i32,
        m: i32,
        n: i32,
        k: i32,
        alpha: f32,
        a: *const u16,
        lda: i32,
        b: *const u16,
        ldb: i32,
        beta: f32,
        c: *mut f32,
        ldc: i32,
    );
}

/// Rounds f32 → bf16 (nearest even; NaN stays NaN, overflow becomes ∞), in parallel.
pub(crate) fn to_bf16(src: &[f32]) -> Vec<u16> {
    let mut dst = vec![0u16; src.len()];
    const CHUNK: usize = 1 << 15;
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| convert(s, d));
    dst
}

super::with_avx512!(pub(crate) fn convert(src: &[f32], dst: &mut [u16]) => convert_plain);

#[inline(always)]
fn convert_plain(src: &[f32], dst: &mut [u16]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = super::bf16_bits(*s);
    }
}

/// [`gemm`] with the rows of `a` and `c` split across the rayon pool. MKL is linked sequential:
/// its own OpenMP team and candle's rayon pool would otherwise spin against each other on the
/// same cores between calls (the fused attention ran 5× slower that way).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_par(
    m: usize,
    n: usize,
    k: usize,
    a: &[u16],
    lda: usize,
    b: &[u16],
    ldb: usize,
    b_t: bool,
    c: &mut [f32],
    ldc: usize,
) {
    let threads = rayon::current_num_threads().max(1);
    // Rows per task: an even split, but at least 64 rows so each call stays efficient.
    let rows = m.div_ceil(threads).max(64);
    if rows >= m {
        return gemm(m, n, k, a, lda, b, ldb, b_t, c, ldc, 0.0);
    }
    c[..(m - 1) * ldc + n]
        .par_chunks_mut(rows * ldc)
        .enumerate()
        .for_each(|(i, c)| {
            let r0 = i * rows;
            let mr = rows.min(m - r0);
            gemm(mr, n, k, &a[r0 * lda..], lda, b, ldb, b_t, c, ldc, 0.0);
        });
}

/// `c[m×n] = a[m×k] · op(b)` with row-major bf16 operands; `b_t`: b is stored `[n, k]`. One
/// thread (MKL sequential).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    m: usize,
    n: usize,
    k: usize,
    a: &[u16],
    lda: usize,
    b: &[u16],
    ldb: usize,
    b_t: bool,
    c: &mut [f32],
    ldc: usize,
    beta: f32,
) {
    assert!(m > 0 && n > 0 && k > 0);
    assert!(lda >= k && a.len() >= (m - 1) * lda + k);
    if b_t {
        assert!(ldb >= k && b.len() >= (n - 1) * ldb + k);
    } else {
        assert!(ldb >= n && b.len() >= (k - 1) * ldb + n);
    }
    assert!(ldc >= n && c.len() >= (m - 1) * ldc + n);
    assert!([m, n, k, lda, ldb, ldc]
        .iter()
        .all(|&v| v <= i32::MAX as usize));
    // SAFETY: the asserts above keep every element MKL reads or writes inside the slices.
    unsafe {
        cblas_gemm_bf16bf16f32(
            ROW_MAJOR,
            NO_TRANS,
            if b_t { TRANS } else { NO_TRANS },
            m as i32,
            n as i32,
            k as i32,
            1.0,
            a.as_ptr(),
            lda as i32,
            b.as_ptr(),
            ldb as i32,
            beta,
            c.as_mut_ptr(),
            ldc as i32,
        );
    }
}
