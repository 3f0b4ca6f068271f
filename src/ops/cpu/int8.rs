//! The int8 product of `--precision int8`: `x[M, K] · w[N, K]ᵀ` with the weight quantized once
//! at load (symmetric, one scale per output channel, codes in −127…127) and the activations
//! quantized per call, one scale per row (token), as unsigned bytes with zero point 128 — the
//! operand pair (u8 × s8 → s32) of AVX512-VNNI's `vpdpbusd`.
//!
//! With `a = q_a + 128` the integer sum is `Σ a·q_w = Σ q_a·q_w + 128·Σ q_w`; the second term is
//! a per-column constant, computed at load (`comp`), so the epilogue is
//! `y[m, n] = (acc − comp[n]) · s_a[m] · s_w[n] (+ bias[n])`.
//!
//! Layout ([`PackedInt8`]): the weight is stored in panels of 16 output channels (one zmm of s32
//! accumulators); inside a panel, k runs in groups of 4, and each group holds 16 × 4 bytes —
//! channel `j`'s four consecutive k values at bytes `4j..4j+4` — so one 64-byte load feeds one
//! `vpdpbusd` for 16 channels, and one broadcast 32-bit word of a row's activations (its four k
//! values) feeds all of them. K is padded to a multiple of 4 and N to a multiple of 16 with zero
//! codes, which add nothing to any sum.
//!
//! The micro-kernel keeps 6 rows × 64 columns of s32 accumulators in 24 zmm registers and runs the
//! whole K for them: the 64-column stripe of the weight (64·K bytes: 240 KiB at K = 3840, 640 KiB
//! at K = 10240) stays in the core's L2 while every row tile of the activations streams past it.
//! Threads take column stripes (rayon, the pool the other CPU ops use). CPUs without AVX512-VNNI
//! run the same layout through a portable loop (exact same integer sums, much slower).

use rayon::prelude::*;

/// Output channels per panel (16 s32 lanes).
pub const PANEL: usize = 16;
/// Panels per micro-tile (64 columns).
const TILE_PANELS: usize = 4;
/// Rows per micro-tile.
const TILE_ROWS: usize = 6;
/// The zero point added to every activation code.
const ZERO_POINT: i32 = 128;
/// The largest K whose sums cannot overflow s32 (255 · 127 · K < 2³¹).
pub const MAX_K: usize = 65_536;

/// A weight `[n, k]` quantized to per-channel int8 and packed for the kernel.
#[derive(Debug, Clone)]
pub struct PackedInt8 {
    /// `[n, k]`.
    shape: [usize; 2],
    n: usize,
    k: usize,
    /// K rounded up to a multiple of 4.
    kp: usize,
    /// `n.div_ceil(16)` panels of `kp · 16` codes each.
    codes: Vec<i8>,
    /// Per channel, padded to whole panels (0 in the padding).
    scale: Vec<f32>,
    /// `128 · Σ_k q[n, k]` per channel, padded to whole panels.
    comp: Vec<i32>,
}

/// Activations quantized per row: `rows × kp` bytes (zero point 128) and one scale per row.
pub struct QuantRows {
    pub codes: Vec<u8>,
    pub scale: Vec<f32>,
    pub kp: usize,
}

impl PackedInt8 {
    /// Quantizes a row-major f32 weight `[n, k]` (symmetric, one scale per row = output channel:
    /// `s = max|w| / 127`, `q = round(w / s)`). A row that holds NaN or ±inf gets a NaN scale, so
    /// its outputs are NaN (as the f32 product's would be) and the guard sees them.
    pub fn quantize(w: &[f32], n: usize, k: usize) -> Result<Self, String> {
        if w.len() != n * k {
            return Err(format!("int8 weight: {} values for [{n}, {k}]", w.len()));
        }
        if k > MAX_K {
            return Err(format!(
                "int8 weight: k = {k} exceeds {MAX_K} (s32 sums could overflow)"
            ));
        }
        let kp = k.div_ceil(4) * 4;
        let panels = n.div_ceil(PANEL);
        let mut codes = vec![0i8; panels * kp * PANEL];
        let mut scale = vec![0f32; panels * PANEL];
        let mut comp = vec![0i32; panels * PANEL];
        codes
            .par_chunks_mut(kp * PANEL)
            .zip(scale.par_chunks_mut(PANEL))
            .zip(comp.par_chunks_mut(PANEL))
            .enumerate()
            .for_each(|(p, ((panel, scale), comp))| {
                for j in 0..PANEL {
                    let row = p * PANEL + j;
                    if row >= n {
                        break;
                    }
                    let src = &w[row * k..(row + 1) * k];
                    let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
                    if !amax.is_finite() || src.iter().any(|v| v.is_nan()) {
                        scale[j] = f32::NAN;
                        continue;
                    }
                    if amax == 0.0 {
                        continue;
                    }
                    let s = amax / 127.0;
                    let inv = 127.0 / amax;
                    let mut sum = 0i32;
                    for (kk, v) in src.iter().enumerate() {
                        let q = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
                        panel[(kk / 4) * 4 * PANEL + j * 4 + kk % 4] = q;
                        sum += q as i32;
                    }
                    scale[j] = s;
                    comp[j] = ZERO_POINT * sum;
                }
            });
        Ok(Self {
            shape: [n, k],
            n,
            k,
            kp,
            codes,
            scale,
            comp,
        })
    }

    /// `(n, k)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// `[n, k]` as a slice.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Bytes held: codes, scales and compensation terms.
    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * self.scale.len() + 4 * self.comp.len()
    }

    /// The weight the codes stand for, `[n, k]` row-major f32 (`q · s`).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n * self.k];
        out.par_chunks_mut(self.k.max(1))
            .enumerate()
            .for_each(|(row, dst)| {
                let (p, j) = (row / PANEL, row % PANEL);
                let panel = &self.codes[p * self.kp * PANEL..];
                for (kk, d) in dst.iter_mut().enumerate() {
                    let q = panel[(kk / 4) * 4 * PANEL + j * 4 + kk % 4];
                    *d = q as f32 * self.scale[p * PANEL + j];
                }
            });
        out
    }

    /// `y = x · wᵀ (+ bias)` for row-major `x` `[m, k]` into `y` `[m, n]`, with the kernel this
    /// CPU has ([`vnni_available`]) or the portable one.
    pub fn matmul(&self, x: &[f32], m: usize, bias: Option<&[f32]>, y: &mut [f32]) {
        let kernel = if vnni_available() {
            Kernel::Vnni
        } else {
            Kernel::Portable
        };
        self.matmul_with(x, m, bias, y, kernel)
    }

    /// [`PackedInt8::matmul`] with a chosen kernel (tests compare the two).
    pub fn matmul_with(
        &self,
        x: &[f32],
        m: usize,
        bias: Option<&[f32]>,
        y: &mut [f32],
        kernel: Kernel,
    ) {
        assert_eq!(x.len(), m * self.k, "int8 matmul: input length");
        assert_eq!(y.len(), m * self.n, "int8 matmul: output length");
        if let Some(b) = bias {
            assert_eq!(b.len(), self.n, "int8 matmul: bias length");
        }
        if m == 0 || self.n == 0 {
            return;
        }
        let a = quantize_rows(x, m, self.k);
        let mut bias_p = vec![0f32; self.scale.len()];
        if let Some(b) = bias {
            bias_p[..self.n].copy_from_slice(b);
        }
        let out = SharedOut(y.as_mut_ptr());
        let stripes = self.n.div_ceil(PANEL * TILE_PANELS);
        let run = |s: usize| {
            let p0 = s * TILE_PANELS;
            let panels = TILE_PANELS.min(self.n.div_ceil(PANEL) - p0);
            let c0 = p0 * PANEL;
            let cols = (panels * PANEL).min(self.n - c0);
            let mut r0 = 0;
            while r0 < m {
                let rows = TILE_ROWS.min(m - r0);
                let t = Tile {
                    a: &a.codes[r0 * a.kp..],
                    lda: a.kp,
                    a_scale: &a.scale[r0..],
                    b: &self.codes[p0 * self.kp * PANEL..],
                    panel_stride: self.kp * PANEL,
                    groups: self.kp / 4,
                    w_scale: &self.scale[c0..],
                    comp: &self.comp[c0..],
                    bias: &bias_p[c0..],
                    // SAFETY: the tile writes rows r0..r0+rows, columns c0..c0+cols of y, which
                    // no other stripe or tile touches.
                    out: unsafe { out.get().add(r0 * self.n + c0) },
                    ldc: self.n,
                    cols,
                };
                // SAFETY: every slice above spans rows·kp (a), panels·kp·16 (b) and panels·16
                // (scales, comp, bias) elements, and `out` rows × cols within y.
                unsafe { t.run(rows, panels, kernel) };
                r0 += rows;
            }
        };
        if stripes > 1 && m * self.n * self.k >= 1 << 18 {
            (0..stripes).into_par_iter().for_each(run);
        } else {
            (0..stripes).for_each(run);
        }
    }
}

/// `x[…, K] · w[N, K]ᵀ (+ bias)` for a contiguous f32 `x` against a packed int8 weight.
pub(crate) struct LinearInt8<'a> {
    pub(crate) w: &'a PackedInt8,
    pub(crate) bias: Option<Vec<f32>>,
}

impl candle_core::CustomOp1 for LinearInt8<'_> {
    fn name(&self) -> &'static str {
        "linear-int8"
    }

    fn cpu_fwd(
        &self,
        xs: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = super::f32_slice(xs, xl, "linear-int8")?;
        let (n, k) = self.w.dims();
        let dims = xl.shape().dims();
        if dims.last() != Some(&k) || self.bias.as_ref().is_some_and(|b| b.len() != n) {
            candle_core::bail!(
                "linear-int8: input {:?} against an int8 weight [{n}, {k}]",
                xl.shape()
            );
        }
        let m: usize = dims[..dims.len() - 1].iter().product();
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("non-empty") = n;
        let mut y = vec![0f32; m * n];
        self.w.matmul(x, m, self.bias.as_deref(), &mut y);
        Ok((
            candle_core::CpuStorage::F32(y),
            candle_core::Shape::from(out_dims),
        ))
    }
}

/// Which micro-kernel runs the tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AVX512-VNNI `vpdpbusd` (only where [`vnni_available`]).
    Vnni,
    /// Plain integer loops over the same layout.
    Portable,
}

/// True when this CPU has AVX512-F, -BW and -VNNI (the int8 kernel's instructions).
pub fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Quantizes `x` `[m, k]` per row: `s = max|x| / 127`, codes `round(x / s) + 128` (1…255), the
/// padding to `kp` at the zero point. A row with NaN or ±inf gets a NaN scale.
pub fn quantize_rows(x: &[f32], m: usize, k: usize) -> QuantRows {
    let kp = k.div_ceil(4) * 4;
    let mut codes = vec![ZERO_POINT as u8; m * kp];
    let mut scale = vec![0f32; m];
    let work = |(dst, (src, s)): (&mut [u8], (&[f32], &mut f32))| quantize_row(src, dst, s);
    if m * k >= 1 << 16 {
        codes
            .par_chunks_mut(kp.max(1))
            .zip(x.par_chunks(k.max(1)).zip(scale.par_iter_mut()))
            .for_each(work);
    } else {
        codes
            .chunks_mut(kp.max(1))
            .zip(x.chunks(k.max(1)).zip(scale.iter_mut()))
            .for_each(work);
    }
    QuantRows { codes, scale, kp }
}

super::with_avx512!(fn quantize_row(src: &[f32], dst: &mut [u8], s: &mut f32) => quantize_row_plain);

#[inline(always)]
fn quantize_row_plain(src: &[f32], dst: &mut [u8], s: &mut f32) {
    let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
    let nan = src.iter().fold(false, |acc, v| acc | v.is_nan());
    if nan || !amax.is_finite() {
        *s = f32::NAN;
        return;
    }
    if amax == 0.0 {
        *s = 0.0;
        return;
    }
    *s = amax / 127.0;
    let inv = 127.0 / amax;
    for (d, v) in dst.iter_mut().zip(src) {
        // |v·inv| ≤ 127 (+ rounding), so the code stays in 0…255 after the clamp.
        *d = ((v * inv).round_ties_even().clamp(-127.0, 127.0) as i32 + ZERO_POINT) as u8;
    }
}

/// The output pointer, shared by the stripes (each writes its own columns).
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: stripes and tiles write disjoint elements (see `matmul_with`).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}
impl SharedOut {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// One micro-tile: up to 6 rows × up to 4 panels.
struct Tile<'a> {
    a: &'a [u8],
    lda: usize,
    a_scale: &'a [f32],
    b: &'a [i8],
    panel_stride: usize,
    groups: usize,
    w_scale: &'a [f32],
    comp: &'a [i32],
    bias: &'a [f32],
    out: *mut f32,
    ldc: usize,
    /// Valid output columns (≤ panels·16).
    cols: usize,
}

impl Tile<'_> {
    /// # Safety
    /// `out` must be valid for `rows` rows of `cols` columns at stride `ldc`; `Kernel::Vnni` only
    /// where [`vnni_available`].
    unsafe fn run(&self, rows: usize, panels: usize, kernel: Kernel) {
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni => unsafe { vnni::dispatch(self, rows, panels) },
            _ => self.portable(rows, panels),
        }
    }

    fn portable(&self, rows: usize, panels: usize) {
        for r in 0..rows {
            let a = &self.a[r * self.lda..r * self.lda + self.groups * 4];
            for p in 0..panels {
                let b = &self.b[p * self.panel_stride..p * self.panel_stride + self.groups * 64];
                let mut acc = [0i32; PANEL];
                for (ag, bg) in a.chunks_exact(4).zip(b.chunks_exact(4 * PANEL)) {
                    for (j, acc) in acc.iter_mut().enumerate() {
                        let w = &bg[j * 4..j * 4 + 4];
                        *acc += (0..4).map(|t| ag[t] as i32 * w[t] as i32).sum::<i32>();
                    }
                }
                for (j, acc) in acc.iter().enumerate() {
                    let c = p * PANEL + j;
                    if c >= self.cols {
                        break;
                    }
                    let v = (acc - self.comp[c]) as f32 * (self.a_scale[r] * self.w_scale[c])
                        + self.bias[c];
                    // SAFETY: row r < rows, column c < cols (the caller's contract).
                    unsafe { *self.out.add(r * self.ldc + c) = v };
                }
            }
        }
    }
}

// The AVX-512 intrinsics are stable from Rust 1.89 — as is the `avx512f` target feature that
// `with_avx512!` already enables — while Cargo.toml still declares 1.85.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::incompatible_msrv)]
mod vnni {
    use std::arch::x86_64::*;

    use super::{Tile, PANEL};

    /// Runs the micro-kernel instantiated for `rows` × `panels`.
    ///
    /// # Safety
    /// As [`Tile::run`], on a CPU with AVX512-F/BW/VNNI.
    pub(super) unsafe fn dispatch(t: &Tile, rows: usize, panels: usize) {
        macro_rules! by_rows {
            ($p:literal) => {
                match rows {
                    6 => kernel::<6, $p>(t),
                    5 => kernel::<5, $p>(t),
                    4 => kernel::<4, $p>(t),
                    3 => kernel::<3, $p>(t),
                    2 => kernel::<2, $p>(t),
                    _ => kernel::<1, $p>(t),
                }
            };
        }
        // SAFETY: the caller checked the CPU features.
        unsafe {
            match panels {
                4 => by_rows!(4),
                3 => by_rows!(3),
                2 => by_rows!(2),
                _ => by_rows!(1),
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn kernel<const R: usize, const P: usize>(t: &Tile) {
        let mut acc = [[_mm512_setzero_si512(); P]; R];
        let a = t.a.as_ptr();
        let b = t.b.as_ptr();
        for g in 0..t.groups {
            let mut bv = [_mm512_setzero_si512(); P];
            for (p, bv) in bv.iter_mut().enumerate() {
                // SAFETY: panel p spans `groups · 64` bytes from p · panel_stride.
                *bv = unsafe { _mm512_loadu_si512(b.add(p * t.panel_stride + g * 64).cast()) };
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: row r spans `groups · 4` bytes from r · lda.
                let word = unsafe { (a.add(r * t.lda + g * 4) as *const i32).read_unaligned() };
                let av = _mm512_set1_epi32(word);
                for (acc, bv) in acc.iter_mut().zip(&bv) {
                    *acc = _mm512_dpbusd_epi32(*acc, av, *bv);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let rs = _mm512_set1_ps(t.a_scale[r]);
            for (p, acc) in acc.iter().enumerate() {
                let c0 = p * PANEL;
                if c0 >= t.cols {
                    break;
                }
                // SAFETY: scales, comp and bias are padded to whole panels.
                let (ws, comp, bias) = unsafe {
                    (
                        _mm512_loadu_ps(t.w_scale.as_ptr().add(c0)),
                        _mm512_loadu_si512(t.comp.as_ptr().add(c0).cast()),
                        _mm512_loadu_ps(t.bias.as_ptr().add(c0)),
                    )
                };
                let v = _mm512_cvtepi32_ps(_mm512_sub_epi32(*acc, comp));
                let y = _mm512_fmadd_ps(v, _mm512_mul_ps(rs, ws), bias);
                let left = t.cols - c0;
                // SAFETY: row r, columns c0..c0+min(16, left) lie inside the tile's output.
                unsafe {
                    let dst = t.out.add(r * t.ldc + c0);
                    if left >= PANEL {
                        _mm512_storeu_ps(dst, y);
                    } else {
                        _mm512_mask_storeu_ps(dst, ((1u32 << left) - 1) as u16, y);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [−1, 1) with a few larger ones (outliers per row).
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let v = ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                if i % 97 == 3 {
                    v * 6.0
                } else {
                    v
                }
            })
            .collect()
    }

    /// The exact f32 product `x · wᵀ + b` (f64 sums).
    fn reference(
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|p| x[i * k + p] as f64 * w[j * k + p] as f64)
                    .sum();
                y[i * n + j] = s as f32 + b.map_or(0.0, |b| b[j]);
            }
        }
        y
    }

    /// The integer product the codes stand for, computed plainly from dequantized operands.
    fn dequantized_reference(
        x: &[f32],
        packed: &PackedInt8,
        b: Option<&[f32]>,
        m: usize,
    ) -> Vec<f32> {
        let (n, k) = packed.dims();
        let w = packed.dequantize();
        let q = quantize_rows(x, m, k);
        let xd: Vec<f32> = (0..m * k)
            .map(|i| {
                let (r, c) = (i / k, i % k);
                (q.codes[r * q.kp + c] as i32 - ZERO_POINT) as f32 * q.scale[r]
            })
            .collect();
        reference(&xd, &w, b, m, n, k)
    }

    fn kernels() -> Vec<Kernel> {
        let mut v = vec![Kernel::Portable];
        if vnni_available() {
            v.push(Kernel::Vnni);
        }
        v
    }

    #[test]
    fn matches_the_dequantized_product_exactly_and_f32_within_quantization() {
        // Odd sizes: k not a multiple of 4 (or 64), n not a multiple of 16 (or 64), m = 1 and
        // rows not a multiple of the 6-row tile.
        for &(m, n, k) in &[
            (1, 16, 4),
            (1, 37, 53),
            (7, 70, 130),
            (13, 129, 257),
            (6, 64, 64),
            (25, 200, 1031),
        ] {
            let x = values(m * k, (m * 31 + k) as u64);
            let w = values(n * k, (n * 17 + k) as u64);
            let b = values(n, 5);
            let packed = PackedInt8::quantize(&w, n, k).unwrap();
            let exact = reference(&x, &w, Some(&b), m, n, k);
            let deq = dequantized_reference(&x, &packed, Some(&b), m);
            // |x|·|w| summed: the scale the quantization error is relative to.
            let mag: Vec<f32> = {
                let xa: Vec<f32> = x.iter().map(|v| v.abs()).collect();
                let wa: Vec<f32> = w.iter().map(|v| v.abs()).collect();
                reference(&xa, &wa, None, m, n, k)
            };
            for kernel in kernels() {
                let mut y = vec![f32::NAN; m * n];
                packed.matmul_with(&x, m, Some(&b), &mut y, kernel);
                for i in 0..m * n {
                    // Same integer sums: equal to the dequantized product up to f32 rounding.
                    let tol = 1e-5 * mag[i].max(1.0);
                    assert!(
                        (y[i] - deq[i]).abs() <= tol,
                        "{kernel:?} {m}×{n}×{k} at {i}: {} vs dequantized {}",
                        y[i],
                        deq[i]
                    );
                    // Two 8-bit roundings: within ~1.5 % of Σ|x||w| of the exact product.
                    assert!(
                        (y[i] - exact[i]).abs() <= 0.015 * mag[i] + 1e-6,
                        "{kernel:?} {m}×{n}×{k} at {i}: {} vs exact {} (Σ|x||w| {})",
                        y[i],
                        exact[i],
                        mag[i]
                    );
                }
            }
        }
    }

    #[test]
    fn vnni_and_portable_kernels_agree_bit_for_bit_in_their_sums() {
        if !vnni_available() {
            return;
        }
        let (m, n, k) = (19, 150, 515);
        let x = values(m * k, 1);
        let w = values(n * k, 2);
        let packed = PackedInt8::quantize(&w, n, k).unwrap();
        let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
        packed.matmul_with(&x, m, None, &mut a, Kernel::Portable);
        packed.matmul_with(&x, m, None, &mut b, Kernel::Vnni);
        for (i, (a, b)) in a.iter().zip(&b).enumerate() {
            // One fused multiply-add against two roundings: at most an ulp or so apart.
            assert!(
                (a - b).abs() <= 1e-6 * a.abs().max(1.0),
                "at {i}: {a} vs {b}"
            );
        }
    }

    #[test]
    fn zero_and_non_finite_rows() {
        let (m, n, k) = (3, 20, 9);
        let mut x = values(m * k, 3);
        x[..k].iter_mut().for_each(|v| *v = 0.0); // row 0: zeros
        x[k + 2] = f32::NAN; // row 1: NaN
        let mut w = values(n * k, 4);
        w[5 * k..6 * k].iter_mut().for_each(|v| *v = 0.0); // channel 5: zeros
        w[7 * k + 1] = f32::INFINITY; // channel 7: inf
        let packed = PackedInt8::quantize(&w, n, k).unwrap();
        for kernel in kernels() {
            let mut y = vec![1f32; m * n];
            packed.matmul_with(&x, m, None, &mut y, kernel);
            assert!(y[..n].iter().enumerate().all(|(j, v)| *v == 0.0 || j == 7));
            assert!(y[n..2 * n].iter().all(|v| v.is_nan()), "{kernel:?}");
            assert!(y[2 * n + 7].is_nan() && y[2 * n + 5] == 0.0, "{kernel:?}");
        }
    }

    #[test]
    fn quantize_rejects_bad_shapes_and_dequantizes_within_half_a_step() {
        assert!(PackedInt8::quantize(&[0.0; 5], 2, 3).is_err());
        assert!(PackedInt8::quantize(&[], 0, MAX_K + 1).is_err());
        let (n, k) = (17, 10);
        let w = values(n * k, 9);
        let packed = PackedInt8::quantize(&w, n, k).unwrap();
        let back = packed.dequantize();
        for r in 0..n {
            let amax = w[r * k..(r + 1) * k]
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()));
            for c in 0..k {
                let e = (back[r * k + c] - w[r * k + c]).abs();
                assert!(e <= amax / 127.0 * 0.5 + 1e-6, "({r}, {c}): {e}");
            }
        }
        // codes + scales + compensation, padded to 2 panels of 16 channels, k to 12.
        assert_eq!(packed.bytes(), 2 * 16 * 12 + 2 * 4 * 32);
    }
}
