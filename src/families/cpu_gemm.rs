//! Matrix products on the CPU with bf16 operands and f32 accumulation.
//!
//! candle multiplies bf16 matrices on the CPU by converting them to f32 first, so bf16 weights were
//! slower than f32 there. Built with the `mkl` cargo feature on a CPU with AMX or AVX512-BF16 tiles,
//! products go through MKL's `cblas_gemm_bf16bf16f32` instead: about 1.3 TFLOP/s on two cores of a
//! Sapphire Rapids Xeon against 0.3 TFLOP/s for f32 (benches/compare, "Profile"). The CPU precision
//! policy then keeps the denoiser's matrices in bf16 (half the memory) while activations, norms,
//! softmax and the residual stream stay in f32 — what CUDA's mixed precision does on the GPU.
//!
//! [`Lin`] is the linear layer that takes this path when its weight is bf16 and its input f32;
//! [`matmul`] multiplies two f32 tensors through bf16 operands; [`attention`] is the fused CPU
//! attention (blocks of query rows: scores, in-place softmax, ·V — f32 products through candle's
//! `gemm`, or bf16 operands through MKL); [`silu_mul`] is the fused SwiGLU gate. Without the feature
//! (or without the instructions) the bf16 entry points fall back to f32, so results and tests do
//! not depend on the build.

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Module, Shape, Tensor};
use candle_nn::VarBuilder;

use super::lora::LowRank;

/// Defines `$name(args)`: runs `$plain` compiled with AVX-512F enabled when the CPU has it (the
/// compiler then vectorises its loops 16 lanes wide), as is otherwise.
macro_rules! with_avx512 {
    ($vis:vis fn $name:ident($($arg:ident: $ty:ty),*) => $plain:ident) => {
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn wide($($arg: $ty),*) {
                    $plain($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F, checked just above.
                    return unsafe { wide($($arg),*) };
                }
            }
            $plain($($arg),*)
        }
    };
}
pub(crate) use with_avx512;

/// True when this build and this CPU multiply bf16 operands natively (MKL + AMX or AVX512-BF16),
/// and `ZTURBO_CPU_BF16=0` does not turn it off.
pub fn bf16_ready() -> bool {
    static READY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *READY.get_or_init(|| {
        let off = std::env::var("ZTURBO_CPU_BF16").is_ok_and(|v| v == "0" || v == "off");
        cfg!(feature = "mkl") && !off && cpu_has_bf16_dot()
    })
}

/// AMX-BF16 (CPUID.7.0:EDX[22]) or AVX512-BF16 (CPUID.7.1:EAX[5]).
fn cpu_has_bf16_dot() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        if __cpuid(0).eax < 7 {
            return false;
        }
        let l0 = __cpuid_count(7, 0);
        let l1 = __cpuid_count(7, 1);
        (l0.edx >> 22) & 1 == 1 || (l1.eax >> 5) & 1 == 1
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The dtype activations run in when a component's weights are stored as `weights` on `device`:
/// f32 for bf16 weights on a CPU that multiplies bf16 natively, otherwise the weights' own dtype.
pub fn activation_dtype(weights: DType, device: &Device) -> DType {
    if weights == DType::BF16 && device.is_cpu() && bf16_ready() {
        DType::F32
    } else {
        weights
    }
}

/// A linear layer `y = x·Wᵀ + b` whose weight may be stored in a narrower dtype than its input
/// (bf16 weight, f32 input on the CPU). The bias is kept in the activation dtype.
///
/// It is also the LoRA seam: a job's low-rank updates are attached with [`Lin::set_lora`] and
/// replaced by the next job's without touching the base weight — at run time
/// (`y += Σ s·(x·Aᵀ)·Bᵀ`, [`LoraMode::Runtime`]) or merged into a dense copy of the weight
/// ([`LoraMode::Merged`]).
#[derive(Debug, Clone)]
pub struct Lin {
    linear: candle_nn::Linear,
    /// The activation dtype (the bias is stored in it; LoRA factors are converted to it).
    act: DType,
    /// The module path in the weight file (`layers.0.attention.to_q`): LoRAs find the layer by it.
    name: std::sync::Arc<str>,
    /// Runtime low-rank updates of the current job, in the activation dtype.
    lora: Vec<LowRank>,
    /// The weight with the current job's updates merged in, used instead of `linear`'s.
    merged: Option<candle_nn::Linear>,
}

/// How a job's LoRAs reach a layer (see `benches/lora.rs` for what each costs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraMode {
    /// Two thin products per call next to the base weight, which is never touched (works on any
    /// base storage, quantized included; switching only swaps the small factors).
    #[default]
    Runtime,
    /// `W + Σ s·B·A` computed once into a dense copy of each updated weight (its dtype): no
    /// per-call cost, but a full weight copy per updated layer, rebuilt on every switch.
    Merged,
}

impl Lin {
    /// Loads `weight` `[out, in]` (and `bias` `[out]`) from `vb` in its dtype; when that is bf16 on
    /// a bf16-ready CPU the bias is converted to f32.
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let act = activation_dtype(vb.dtype(), vb.device());
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = bias.then(|| vb.get(out_dim, "bias")).transpose()?;
        let mut lin = Self::from_parts(weight, bias, act)?;
        lin.name = vb.prefix().into();
        Ok(lin)
    }

    /// From loaded tensors; the bias is converted to `act`, the activation dtype.
    pub fn from_parts(
        weight: Tensor,
        bias: Option<Tensor>,
        act: DType,
    ) -> candle_core::Result<Self> {
        let bias = bias.map(|b| b.to_dtype(act)).transpose()?;
        Ok(Self {
            linear: candle_nn::Linear::new(weight, bias),
            act,
            name: "".into(),
            lora: Vec::new(),
            merged: None,
        })
    }

    pub fn weight(&self) -> &Tensor {
        self.linear.weight()
    }

    /// The module path this layer was loaded from (empty when built from tensors).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Names the layer by its module path (when built from tensors).
    pub fn set_name(&mut self, name: impl Into<std::sync::Arc<str>>) {
        self.name = name.into();
    }

    /// `(out, in)`.
    pub fn dims(&self) -> candle_core::Result<(usize, usize)> {
        self.linear.weight().dims2()
    }

    /// Replaces the layer's LoRA updates (none: back to the base weight).
    pub fn set_lora(&mut self, updates: &[LowRank], mode: LoraMode) -> candle_core::Result<()> {
        self.lora.clear();
        self.merged = None;
        if updates.is_empty() {
            return Ok(());
        }
        let dev = self.linear.weight().device().clone();
        match mode {
            LoraMode::Runtime => {
                self.lora = updates
                    .iter()
                    .map(|u| u.to(self.act, &dev))
                    .collect::<candle_core::Result<_>>()?;
            }
            LoraMode::Merged => {
                let w = self.linear.weight();
                let mut dense = w.to_dtype(DType::F32)?;
                for u in updates {
                    dense = (dense + u.to(DType::F32, &dev)?.dense()?)?;
                }
                self.merged = Some(candle_nn::Linear::new(
                    dense.to_dtype(w.dtype())?,
                    self.linear.bias().cloned(),
                ));
            }
        }
        Ok(())
    }

    /// Whether updates are attached.
    pub fn has_lora(&self) -> bool {
        !self.lora.is_empty() || self.merged.is_some()
    }
}

impl Module for Lin {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let linear = self.merged.as_ref().unwrap_or(&self.linear);
        let mut y = if x.dtype() == linear.weight().dtype() {
            linear.forward(x)?
        } else {
            let y = linear_mixed(x, linear.weight())?;
            match linear.bias() {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            }
        };
        for u in &self.lora {
            let xa = if x.dtype() == self.act {
                x.clone()
            } else {
                x.to_dtype(self.act)?
            };
            let d = u.forward(&xa)?.to_dtype(y.dtype())?;
            y = (y + d)?;
        }
        Ok(y)
    }
}

/// `x·wᵀ` for an f32 `x` `[…, K]` and a weight `w` `[N, K]` of another dtype.
fn linear_mixed(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "mkl")]
    if x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::BF16 && bf16_ready() {
        return x
            .contiguous()?
            .apply_op2_no_bwd(&w.contiguous()?, &mkl::LinearBf16);
    }
    let w = w.to_dtype(x.dtype())?;
    x.broadcast_matmul(&w.t()?)
}

/// `a·b` for f32 tensors `[…, M, K]`·`[…, K, N]` (same leading dims; `b` contiguous or the
/// transpose of a contiguous tensor), with bf16 operands and f32 accumulation when `bf16` is set and
/// the CPU supports it; otherwise candle's product in the tensors' dtype.
pub fn matmul(a: &Tensor, b: &Tensor, bf16: bool) -> candle_core::Result<Tensor> {
    #[cfg(feature = "mkl")]
    if bf16
        && a.device().is_cpu()
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && bf16_ready()
    {
        return a.contiguous()?.apply_op2_no_bwd(b, &mkl::MatmulBf16);
    }
    let _ = bf16;
    a.matmul(b)
}

/// softmax(q·kᵀ + bias)·v for a pre-scaled `q` `[B, H, L, D]`, `k`, `v` `[B, H, Lk, D]` and an
/// optional additive `bias` broadcastable to `[B, 1, 1, Lk]`, fused on the CPU for f32 tensors: per
/// head, blocks of query rows get their scores (one product), an in-place softmax and the product
/// with `v`, so no score matrix beyond one ≈ 1 MiB block ever exists. With `bf16` on a bf16-ready
/// CPU the products take bf16 operands (MKL), else f32 (candle's `gemm`). Returns `None` off the
/// CPU or for other dtypes (the caller runs its own).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    bf16: bool,
) -> candle_core::Result<Option<Tensor>> {
    if !(q.device().is_cpu()
        && [q, k, v].iter().all(|t| t.dtype() == DType::F32)
        && bias.is_none_or(|b| b.dtype() == DType::F32))
    {
        return Ok(None);
    }
    let (b, _, _, _) = q.dims4()?;
    let lk = k.dim(2)?;
    let bias = match bias {
        Some(t) => Some(
            t.broadcast_as((b, 1, 1, lk))?
                .flatten_all()?
                .to_vec1::<f32>()?,
        ),
        None => None,
    };
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    #[cfg(feature = "mkl")]
    if bf16 && bf16_ready() {
        let op = mkl::AttentionBf16 { bias };
        return Ok(Some(q.apply_op3_no_bwd(&k, &v, &op)?));
    }
    let _ = bf16;
    Ok(Some(q.apply_op3_no_bwd(&k, &v, &AttentionF32 { bias })?))
}

/// Checks the fused attention's inputs; returns `(b, h, l, lk, d)`.
fn attention_dims(
    ql: &Layout,
    kl: &Layout,
    vl: &Layout,
    bias: Option<&[f32]>,
) -> candle_core::Result<(usize, usize, usize, usize, usize)> {
    let (b, h, l, d) = ql.shape().dims4()?;
    let (kb, kh, lk, kd) = kl.shape().dims4()?;
    if (kb, kh, kd) != (b, h, d) || vl.shape().dims4()? != (b, h, lk, d) {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?}",
            ql.shape(),
            kl.shape(),
            vl.shape()
        );
    }
    if bias.is_some_and(|v| v.len() != b * lk) {
        candle_core::bail!("attention: bias does not match {b}×{lk}");
    }
    Ok((b, h, l, lk, d))
}

/// Score rows per block of the fused attention (with the key count, ≈ 1 MiB of f32 scores:
/// the block stays in cache between the two products).
const SCORE_BLOCK_ELEMS: usize = 1 << 18;

/// [`attention`] with f32 products through candle's `gemm` crate (one thread per head).
struct AttentionF32 {
    bias: Option<Vec<f32>>,
}

impl candle_core::CustomOp3 for AttentionF32 {
    fn name(&self) -> &'static str {
        "attention-f32"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, h, l, lk, d) = attention_dims(ql, kl, vl, self.bias.as_deref())?;
        let q = f32_slice(qs, ql, "attention-f32")?;
        let k = f32_slice(ks, kl, "attention-f32")?;
        let v = f32_slice(vs, vl, "attention-f32")?;
        let mut out = vec![0f32; q.len()];
        if l == 0 || lk == 0 || d == 0 {
            return Ok((CpuStorage::F32(out), ql.shape().clone()));
        }
        let block = (SCORE_BLOCK_ELEMS / lk).max(16).min(l);
        use rayon::prelude::*;
        out.par_chunks_mut(l * d).enumerate().for_each_init(
            || vec![0f32; block * lk],
            |scores, (bh, out)| {
                let bias = self
                    .bias
                    .as_ref()
                    .map(|v| &v[(bh / h) * lk..(bh / h + 1) * lk]);
                let (kh, vh) = (
                    &k[bh * lk * d..(bh + 1) * lk * d],
                    &v[bh * lk * d..(bh + 1) * lk * d],
                );
                for r0 in (0..l).step_by(block) {
                    let rows = block.min(l - r0);
                    let qa = &q[(bh * l + r0) * d..(bh * l + r0 + rows) * d];
                    // SAFETY (both products): every index stays inside the slices, whose lengths
                    // are rows·d (qa), lk·d (kh, vh), rows·lk (scores) and rows·d (out rows).
                    unsafe {
                        // scores[r, j] = Σ_i qa[r, i] · kh[j, i]
                        gemm::gemm(
                            rows,
                            lk,
                            d,
                            scores.as_mut_ptr(),
                            1,
                            lk as isize,
                            false,
                            qa.as_ptr(),
                            1,
                            d as isize,
                            kh.as_ptr(),
                            d as isize,
                            1,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                    for s in scores[..rows * lk].chunks_mut(lk) {
                        softmax_row(s, bias);
                    }
                    let o = &mut out[r0 * d..(r0 + rows) * d];
                    // SAFETY: as above.
                    unsafe {
                        // o[r, i] = Σ_j scores[r, j] · vh[j, i]
                        gemm::gemm(
                            rows,
                            d,
                            lk,
                            o.as_mut_ptr(),
                            1,
                            d as isize,
                            false,
                            scores.as_ptr(),
                            1,
                            lk as isize,
                            vh.as_ptr(),
                            1,
                            d as isize,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                }
            },
        );
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }
}

with_avx512!(pub(crate) fn softmax_row(s: &mut [f32], bias: Option<&[f32]>) => softmax_row_plain);

/// (+ bias), − max, exp, normalise. The max and the sum run over 16 lanes (the compiler does not
/// reorder a single float accumulator, so one-lane reductions would stay scalar).
#[inline(always)]
fn softmax_row_plain(s: &mut [f32], bias: Option<&[f32]>) {
    const W: usize = 16;
    if let Some(bias) = bias {
        for (x, b) in s.iter_mut().zip(bias) {
            *x += *b;
        }
    }
    let mut lanes = [f32::NEG_INFINITY; W];
    let mut chunks = s.chunks_exact(W);
    for c in &mut chunks {
        for (m, x) in lanes.iter_mut().zip(c) {
            *m = m.max(*x);
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(lanes.iter())
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    let mut sums = [0f32; W];
    let mut chunks = s.chunks_exact_mut(W);
    for c in &mut chunks {
        for (acc, x) in sums.iter_mut().zip(c.iter_mut()) {
            *x = fast_exp(*x - max);
            *acc += *x;
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for x in chunks.into_remainder() {
        *x = fast_exp(*x - max);
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in s.iter_mut() {
        *x *= inv;
    }
}

/// `c[m×n] (+)= a[m×k] · op(b)` on one thread with row-major bf16 operands (`b_t`: b stored
/// `[n, k]`), `beta` 0 (overwrite) or 1 (accumulate). For kernels that tile their own work.
#[cfg(feature = "mkl")]
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_bf16(
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
    mkl::gemm(m, n, k, a, lda, b, ldb, b_t, c, ldc, beta)
}

/// f32 → bf16 bits for a whole slice (rounding to nearest even), in parallel.
#[cfg(feature = "mkl")]
pub(crate) fn to_bf16_bits(src: &[f32]) -> Vec<u16> {
    mkl::to_bf16(src)
}

/// The elements of a contiguous f32 CPU tensor (custom ops' inputs), or `op`'s error naming it.
pub(crate) fn f32_slice<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let Some((o1, o2)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: inputs must be contiguous");
    };
    Ok(&s.as_slice::<f32>()?[o1..o2])
}

/// `silu(a) · b`, fused into one pass for contiguous f32 tensors on the CPU (two candle ops and an
/// intermediate tensor otherwise).
pub fn silu_mul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if a.device().is_cpu()
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && a.dims() == b.dims()
    {
        return a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &SiluMul);
    }
    candle_nn::ops::silu(a)? * b
}

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = f32_slice(s1, l1, "silu-mul")?;
        let b = f32_slice(s2, l2, "silu-mul")?;
        let mut out = vec![0f32; a.len()];
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 14;
        out.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(|(o, (a, b))| silu_mul_slice(a, b, o));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

with_avx512!(fn silu_mul_slice(a: &[f32], b: &[f32], out: &mut [f32]) => silu_mul_scalar);

/// Written so that the compiler vectorises it: `exp` through 2^n · p(f) with a degree-6 polynomial
/// (see [`fast_exp`]), no branches in the loop.
#[inline(always)]
fn silu_mul_scalar(a: &[f32], b: &[f32], out: &mut [f32]) {
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = x / (1.0 + exp_neg(x)) * y;
    }
}

/// diffusers' GEGLU on `h` `[…, 2n]`: `h[…, :n] · gelu(h[…, n:])` with the exact (erf) GELU,
/// fused into one pass over contiguous f32 rows on the CPU (a chunk, two copies, the GELU and the
/// product otherwise: on SD-Turbo's UNet the scalar `erf` alone was most of the feed-forward).
pub fn geglu(h: &Tensor) -> candle_core::Result<Tensor> {
    let last = h.dim(candle_core::D::Minus1)?;
    if h.device().is_cpu() && h.dtype() == DType::F32 && last % 2 == 0 {
        return h.contiguous()?.apply_op1_no_bwd(&Geglu);
    }
    let parts = h.chunk(2, candle_core::D::Minus1)?;
    &parts[0] * parts[1].gelu_erf()?
}

struct Geglu;

impl candle_core::CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let h = f32_slice(s, l, "geglu")?;
        let dims = l.shape().dims();
        let n = dims[dims.len() - 1] / 2;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank ≥ 1") = n;
        let mut out = vec![0f32; h.len() / 2];
        if let Some(per) = (1usize << 14).checked_div(n) {
            use rayon::prelude::*;
            let rows = per + 1;
            out.par_chunks_mut(rows * n)
                .zip(h.par_chunks(rows * 2 * n))
                .for_each(|(o, h)| {
                    for (o, h) in o.chunks_mut(n).zip(h.chunks(2 * n)) {
                        let (a, g) = h.split_at(n);
                        geglu_row(a, g, o);
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }
}

with_avx512!(fn geglu_row(a: &[f32], g: &[f32], out: &mut [f32]) => geglu_row_plain);

#[inline(always)]
fn geglu_row_plain(a: &[f32], g: &[f32], out: &mut [f32]) {
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(g) {
        *o = x * gelu_erf(y);
    }
}

/// GELU with the exact form `x/2 · (1 + erf(x/√2))`, `erf` by Abramowitz & Stegun 7.1.26 (absolute
/// error ≤ 1.5e-7) with [`fast_exp`]; branch-free so that loops over it vectorise.
#[inline(always)]
pub(crate) fn gelu_erf(x: f32) -> f32 {
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    let erf_abs = 1.0 - poly * fast_exp(-a * a);
    0.5 * x * (1.0 + erf_abs.copysign(z))
}

/// e^(−x), clamped to the range where f32 stays finite and normal.
#[inline(always)]
pub(crate) fn exp_neg(x: f32) -> f32 {
    fast_exp(-x)
}

/// e^x for x in f32's normal range (clamped to [−87.3, 88.3]); relative error ≤ 4e-6 (≤ 1e-6
/// for |x| < 15).
/// Branch-free (rounding by the 1.5·2²³ trick) so that loops over it vectorise.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    let x = x.clamp(-87.3, 88.3);
    let t = x * std::f32::consts::LOG2_E;
    let r = t + MAGIC;
    let n = r - MAGIC; // t rounded to the nearest integer
    let ni = (r.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    // 2^f = e^(f·ln2) for f = t − n in [−0.5, 0.5]: Taylor to degree 7 in g = f·ln2, |g| ≤ 0.347.
    let g = (t - n) * std::f32::consts::LN_2;
    let p = 1.0
        + g * (1.0
            + g * (0.5
                + g * (1.0 / 6.0
                    + g * (1.0 / 24.0
                        + g * (1.0 / 120.0 + g * (1.0 / 720.0 + g * (1.0 / 5040.0)))))));
    p * f32::from_bits(((ni + 127) as u32) << 23)
}

/// f32 → bf16 bits, rounding to nearest even; NaN stays a (quiet) NaN. Branch-free.
#[cfg(feature = "mkl")]
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    if x.is_nan() {
        0x7fc0
    } else {
        rounded
    }
}

#[cfg(feature = "mkl")]
mod mkl {
    //! The MKL bindings (static libraries from the `mkl-static` wheel; see build.rs).

    use candle_core::{CpuStorage, CustomOp2, Layout, Shape};
    use half::bf16;
    use rayon::prelude::*;

    const ROW_MAJOR: i32 = 101;
    const NO_TRANS: i32 = 111;
    const TRANS: i32 = 112;

    unsafe extern "C" {
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
    pub(super) fn to_bf16(src: &[f32]) -> Vec<u16> {
        let mut dst = vec![0u16; src.len()];
        const CHUNK: usize = 1 << 15;
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(d, s)| convert(s, d));
        dst
    }

    super::with_avx512!(fn convert(src: &[f32], dst: &mut [u16]) => convert_plain);

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
    pub(super) fn gemm_par(
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
    pub(super) fn gemm(
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

    /// `x[…, K] · w[N, K]ᵀ` for f32 `x` and bf16 `w`, both contiguous.
    pub(super) struct LinearBf16;

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
            let (Some((x0, x1)), Some((w0, w1))) =
                (xl.contiguous_offsets(), wl.contiguous_offsets())
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

    /// softmax(q·kᵀ + bias)·v for f32 `q` (pre-scaled), `k`, `v` `[B, H, L, D]` / `[B, H, Lk, D]`,
    /// with bf16 operands: per head, blocks of query rows get their scores (one product), a
    /// softmax that writes bf16 probabilities directly, and the product with `v` — no score matrix
    /// beyond one block ever exists. `bias`: `[B, Lk]` additive, f32.
    pub(super) struct AttentionBf16 {
        pub(super) bias: Option<Vec<f32>>,
    }

    impl candle_core::CustomOp3 for AttentionBf16 {
        fn name(&self) -> &'static str {
            "attention-bf16-mkl"
        }

        fn cpu_fwd(
            &self,
            qs: &CpuStorage,
            ql: &Layout,
            ks: &CpuStorage,
            kl: &Layout,
            vs: &CpuStorage,
            vl: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            let (b, h, l, lk, d) = super::attention_dims(ql, kl, vl, self.bias.as_deref())?;
            let q = super::f32_slice(qs, ql, "attention-bf16")?;
            let k = super::f32_slice(ks, kl, "attention-bf16")?;
            let v = super::f32_slice(vs, vl, "attention-bf16")?;
            let mut out = vec![0f32; b * h * l * d];
            if l == 0 || lk == 0 || d == 0 {
                return Ok((CpuStorage::F32(out), ql.shape().clone()));
            }
            let qb = to_bf16(q);
            let kb = to_bf16(k);
            let vb = to_bf16(v);
            let block = (super::SCORE_BLOCK_ELEMS / lk).max(16).min(l);
            // One head per task, each with its own score block (heads ≥ threads in every model).
            out.par_chunks_mut(l * d).enumerate().for_each_init(
                || (vec![0f32; block * lk], vec![0u16; block * lk]),
                |(scores, probs), (bh, out)| {
                    let bias = self
                        .bias
                        .as_ref()
                        .map(|v| &v[(bh / h) * lk..(bh / h + 1) * lk]);
                    let (kh, vh) = (&kb[bh * lk * d..], &vb[bh * lk * d..]);
                    for r0 in (0..l).step_by(block) {
                        let rows = block.min(l - r0);
                        let qa = &qb[(bh * l + r0) * d..];
                        gemm(rows, lk, d, qa, d, kh, d, true, scores, lk, 0.0);
                        for s in scores[..rows * lk].chunks_mut(lk) {
                            super::softmax_row(s, bias);
                        }
                        convert(&scores[..rows * lk], &mut probs[..rows * lk]);
                        gemm(
                            rows,
                            d,
                            lk,
                            probs,
                            lk,
                            vh,
                            d,
                            false,
                            &mut out[r0 * d..],
                            d,
                            0.0,
                        );
                    }
                },
            );
            Ok((CpuStorage::F32(out), ql.shape().clone()))
        }
    }

    /// Batched `a[…, M, K] · b[…, K, N]` for f32 tensors through bf16 operands.
    pub(super) struct MatmulBf16;

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
            let ad = al.shape().dims();
            let bd = bl.shape().dims();
            let r = ad.len();
            if r < 2 || bd.len() != r || ad[..r - 2] != bd[..r - 2] || ad[r - 1] != bd[r - 2] {
                candle_core::bail!("matmul-bf16: shapes {:?} · {:?}", al.shape(), bl.shape());
            }
            let (m, k, n) = (ad[r - 2], ad[r - 1], bd[r - 1]);
            let batch: usize = ad[..r - 2].iter().product();
            let Some((a0, a1)) = al.contiguous_offsets() else {
                candle_core::bail!("matmul-bf16: lhs must be contiguous");
            };
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
                    candle_core::bail!("matmul-bf16: unsupported rhs strides {st:?}");
                }
                true
            } else {
                candle_core::bail!("matmul-bf16: unsupported rhs strides {st:?}");
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
            let mut dims = ad.to_vec();
            dims[r - 1] = n;
            Ok((CpuStorage::F32(out), Shape::from(dims)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_close_to_exp() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let rel = ((fast_exp(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
            x += 0.01;
        }
        // The range reduction t = x·log2(e) in f32 carries |x|·6e-8 absolute error into the
        // exponent: ≈ 4e-6 relative at |x| ≈ 87, below 1e-6 for the softmax range |x| < 15.
        assert!(worst < 1e-5, "worst relative error {worst}");
        let floor = (-87.3f32).exp();
        assert!(((fast_exp(-1000.0) - floor) / floor).abs() < 1e-5);
    }

    #[test]
    fn silu_mul_matches_candle() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let a = (Tensor::randn(0f32, 3.0, (7, 1001), &dev)? * 4.0)?;
        let b = Tensor::randn(0f32, 1.0, (7, 1001), &dev)?;
        let want = (candle_nn::ops::silu(&a)? * &b)?;
        let got = silu_mul(&a, &b)?;
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "max |diff| {diff}");
        Ok(())
    }

    #[test]
    fn lin_with_a_bf16_weight_matches_the_f32_product() -> candle_core::Result<()> {
        // A bf16 weight against an f32 input: bf16 operands, f32 accumulation (or candle's
        // conversion without MKL) — within bf16's rounding of the exact x·wᵀ + b, in f32.
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (24, 16), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 24, &dev)?;
        let x = Tensor::randn(0f32, 1.0, (2, 5, 16), &dev)?;
        let want = x.broadcast_matmul(&w.t()?)?.broadcast_add(&b)?;
        let mixed = Lin::from_parts(
            w.to_dtype(DType::BF16)?,
            Some(b.to_dtype(DType::BF16)?),
            DType::F32,
        )?;
        let y = x.apply(&mixed)?;
        assert_eq!(y.dtype(), DType::F32);
        let diff = (y - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 0.1, "max |diff| {diff}");
        Ok(())
    }

    #[test]
    fn matmul_bf16_matches_f32_within_rounding() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (2, 3, 9, 32), &dev)?;
        let bt = Tensor::randn(0f32, 1.0, (2, 3, 11, 32), &dev)?;
        let b = bt.t()?; // transposed view
        let want = a.matmul(&b.contiguous()?)?;
        for rhs in [b.clone(), b.contiguous()?] {
            let got = matmul(&a, &rhs, true)?;
            assert_eq!(got.dims(), &[2, 3, 9, 11]);
            let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 0.15, "max |diff| {diff}");
        }
        let exact = matmul(&a, &b, false)?;
        let diff = (exact - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "max |diff| {diff}");
        Ok(())
    }

    #[test]
    fn geglu_matches_the_unfused_ops() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        // Wide range, zeros and the tails (GELU → 0 and → x) included.
        let h = (Tensor::randn(0f32, 1.0, (3, 5, 2 * 37), &dev)? * 4.0)?;
        let h = h.slice_assign(
            &[0..1, 0..1, 37..74],
            &Tensor::zeros((1, 1, 37), DType::F32, &dev)?,
        )?;
        let parts = h.chunk(2, candle_core::D::Minus1)?;
        let want = (&parts[0] * parts[1].gelu_erf()?)?;
        let got = geglu(&h)?;
        assert_eq!(got.dims(), &[3, 5, 37]);
        let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "max |diff| {diff}");
        for x in [-40f32, -9.0, -3.0, -0.5, 0.0, 1e-3, 0.7, 2.5, 9.0, 40.0] {
            let exact = Tensor::new(&[x], &dev)?.gelu_erf()?.to_vec1::<f32>()?[0];
            assert!(
                (gelu_erf(x) - exact).abs() <= 2e-7 * x.abs().max(1.0),
                "gelu({x})"
            );
        }
        Ok(())
    }

    #[test]
    fn fused_attention_matches_softmax_product() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (b, h, l, lk, d) = (2, 3, 37, 41, 16);
        let q = (Tensor::randn(0f32, 1.0, (b, h, l, d), &dev)? * 0.25)?;
        let k = Tensor::randn(0f32, 1.0, (b, h, lk, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (b, h, lk, d), &dev)?;
        let mut mask = vec![0f32; b * lk];
        for m in &mut mask[lk + 30..] {
            *m = f32::NEG_INFINITY; // the second item's last keys are padding
        }
        let bias = Tensor::from_vec(mask, (b, 1, 1, lk), &dev)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(&bias)?;
        let want = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
        // f32 products: equal up to summation order; bf16 operands (where native): within bf16.
        let exact = attention(&q, &k, &v, Some(&bias), false)?.expect("f32 on the CPU");
        let diff = (exact - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "f32: max |diff| {diff}");
        let narrow = attention(&q, &k, &v, Some(&bias), true)?.expect("f32 on the CPU");
        let diff = (narrow - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 0.05, "bf16 operands: max |diff| {diff}");
        // Fewer query rows than a score block's minimum (a UNet's coarsest level: 4 tokens
        // attending to 77 of text).
        let (qs, ks, vs) = (
            Tensor::randn(0f32, 0.25, (1, 2, 4, d), &dev)?,
            Tensor::randn(0f32, 1.0, (1, 2, 77, d), &dev)?,
            Tensor::randn(0f32, 1.0, (1, 2, 77, d), &dev)?,
        );
        let want = candle_nn::ops::softmax_last_dim(&qs.matmul(&ks.t()?)?)?.matmul(&vs)?;
        for bf16 in [false, true] {
            let got = attention(&qs, &ks, &vs, None, bf16)?.expect("f32 on the CPU");
            let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < if bf16 { 0.05 } else { 1e-5 }, "4 rows: {diff}");
        }
        // Other dtypes are left to the caller.
        let q16 = q.to_dtype(DType::F16)?;
        assert!(attention(&q16, &k, &v, None, false)?.is_none());
        Ok(())
    }
}
