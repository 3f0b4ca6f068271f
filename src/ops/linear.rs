//! Linear layers and matrix products, with bf16 operands and f32 accumulation on the CPU.
//!
//! candle multiplies bf16 matrices on the CPU by converting them to f32 first, so bf16 weights were
//! slower than f32 there. Built with the `mkl` cargo feature on a CPU with AMX or AVX512-BF16 tiles,
//! products go through MKL's `cblas_gemm_bf16bf16f32` instead (ops/cpu/matmul.rs): about
//! 1.3 TFLOP/s on two cores of a Sapphire Rapids Xeon against 0.3 TFLOP/s for f32 (benches/compare,
//! "Profile"). The CPU precision policy then keeps the denoiser's matrices in bf16 (half the
//! memory) while activations, norms, softmax and the residual stream stay in f32 — what CUDA's
//! mixed precision does on the GPU.
//!
//! [`Lin`] is the linear layer that takes this path when its weight is bf16 and its input f32;
//! [`matmul`] multiplies two f32 tensors through bf16 operands on such a CPU and is candle's
//! product on every other device. Without the feature (or without the instructions) the bf16
//! entry points fall back to f32, so results and tests do not depend on the build.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use super::quantized::{LowRankDelta, StoredMatrix};

#[cfg(zturbo_mkl)]
use super::cpu::matmul::{LinearBf16, MatmulBf16};
#[cfg(zturbo_mkl)]
use super::cpu::sgemm::{LinearF32, MatmulF32};

/// True when this build and this CPU multiply bf16 operands natively (MKL + AMX or AVX512-BF16),
/// and `ZTURBO_CPU_BF16=0` does not turn it off.
pub fn bf16_ready() -> bool {
    static READY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *READY.get_or_init(|| {
        let off = std::env::var("ZTURBO_CPU_BF16").is_ok_and(|v| v == "0" || v == "off");
        cfg!(zturbo_mkl) && !off && cpu_has_bf16_dot()
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

/// A linear layer `y = x·Wᵀ + b (+ Σ scale·x·Aᵀ·Bᵀ)`.
///
/// The weight is kept as it was stored ([`StoredMatrix`]): a plain tensor, possibly narrower than
/// the input (bf16 weight, f32 input on the CPU), or quantized (GGUF blocks, fp8 codes), which is
/// dequantized into `dense` — the model's weight dtype — just before its product and dropped
/// right after, so only one layer's dense copy ever exists. The bias is kept in the activation
/// dtype.
///
/// Low-rank deltas (LoRA) ride on top at run time: [`Lin::set_deltas`] (or [`Lin::set_lora`],
/// which a job's LoRAs use) replaces them without touching, reloading or dequantizing-and-keeping
/// the base weight — or, in [`LoraMode::Merged`], a dense copy of the weight with the updates
/// merged in is used instead of it.
#[derive(Debug, Clone)]
pub struct Lin {
    weight: StoredMatrix,
    bias: Option<Tensor>,
    dense: DType,
    deltas: Vec<LowRankDelta>,
    /// The module path in the weight file (`layers.0.attention.to_q`): LoRAs find the layer by it.
    name: std::sync::Arc<str>,
    /// The weight (in `dense`) with the current job's updates merged in, used instead of `weight`.
    merged: Option<Tensor>,
}

/// One low-rank update of one linear layer: `scale · (x·downᵀ)·upᵀ`.
#[derive(Debug, Clone)]
pub struct LowRank {
    /// `[rank, in]`.
    pub down: Tensor,
    /// `[out, rank]`.
    pub up: Tensor,
    pub scale: f64,
}

impl LowRank {
    /// The update for `x` `[…, in]` → `[…, out]`, in `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.delta().apply(x)
    }

    /// The dense update `scale·up·down` `[out, in]` (f32), for merging into a weight copy.
    pub fn dense(&self) -> candle_core::Result<Tensor> {
        let up = self.up.to_dtype(DType::F32)?;
        let down = self.down.to_dtype(DType::F32)?;
        up.matmul(&down)? * self.scale
    }

    pub fn to(&self, dtype: DType, device: &Device) -> candle_core::Result<Self> {
        Ok(Self {
            down: self.down.to_device(device)?.to_dtype(dtype)?,
            up: self.up.to_device(device)?.to_dtype(dtype)?,
            scale: self.scale,
        })
    }

    /// As the run-time delta `Lin` adds (`a` = down, `b` = up).
    pub fn delta(&self) -> LowRankDelta {
        LowRankDelta {
            a: self.down.clone(),
            b: self.up.clone(),
            scale: self.scale,
        }
    }
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

    /// From a weight as stored (a quantized one stays quantized and multiplies in `dense`); the
    /// bias is converted to the activation dtype for `dense` on `device`. (Loading from model
    /// files: `Lin::load`, in `families::weights`.)
    pub fn from_stored(
        weight: StoredMatrix,
        bias: Option<Tensor>,
        dense: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let act = activation_dtype(dense, device);
        Ok(Self {
            weight,
            bias: bias.map(|b| b.to_dtype(act)).transpose()?,
            dense,
            deltas: Vec::new(),
            name: "".into(),
            merged: None,
        })
    }

    /// From loaded tensors; the bias is converted to `act`, the activation dtype.
    pub fn from_parts(
        weight: Tensor,
        bias: Option<Tensor>,
        act: DType,
    ) -> candle_core::Result<Self> {
        let bias = bias.map(|b| b.to_dtype(act)).transpose()?;
        Ok(Self {
            dense: weight.dtype(),
            weight: StoredMatrix::Dense(weight),
            bias,
            deltas: Vec::new(),
            name: "".into(),
            merged: None,
        })
    }

    /// The plain weight tensor, `None` when it is stored quantized.
    pub fn weight(&self) -> Option<&Tensor> {
        match &self.weight {
            StoredMatrix::Dense(w) => Some(w),
            _ => None,
        }
    }

    /// The weight as stored (plain or quantized).
    pub fn stored(&self) -> &StoredMatrix {
        &self.weight
    }

    /// The dtype the weight multiplies in (its own, or the one it is dequantized into).
    pub fn weight_dtype(&self) -> DType {
        self.dense
    }

    /// Replaces the low-rank deltas added to this layer's output (empty: none). Each `A` must be
    /// `[rank, in]` and each `B` `[out, rank]`.
    pub fn set_deltas(&mut self, deltas: Vec<LowRankDelta>) -> candle_core::Result<()> {
        let dims = self.weight.dims();
        let (out, inp) = (dims[0], dims[1]);
        for d in &deltas {
            let (ra, ia) = d.a.dims2()?;
            let (ob, rb) = d.b.dims2()?;
            if ia != inp || ob != out || ra != rb {
                candle_core::bail!(
                    "low-rank delta A {:?} · B {:?} does not fit a [{out}, {inp}] weight",
                    d.a.dims(),
                    d.b.dims()
                )
            }
        }
        self.deltas = deltas;
        Ok(())
    }

    pub fn deltas(&self) -> &[LowRankDelta] {
        &self.deltas
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
        match self.weight.dims() {
            [o, i] => Ok((*o, *i)),
            d => candle_core::bail!("linear weight of shape {d:?}"),
        }
    }

    /// Replaces the layer's LoRA updates (none: back to the base weight): as run-time deltas in
    /// the activation dtype, or merged into a dense copy of the weight.
    pub fn set_lora(&mut self, updates: &[LowRank], mode: LoraMode) -> candle_core::Result<()> {
        self.deltas.clear();
        self.merged = None;
        if updates.is_empty() {
            return Ok(());
        }
        let dev = stored_device(&self.weight);
        match mode {
            LoraMode::Runtime => {
                let act = activation_dtype(self.dense, &dev);
                let deltas = updates
                    .iter()
                    .map(|u| Ok(u.to(act, &dev)?.delta()))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                self.set_deltas(deltas)?;
            }
            LoraMode::Merged => {
                let mut w = self.weight.dequantize(DType::F32)?;
                for u in updates {
                    w = (w + u.to(DType::F32, &dev)?.dense()?)?;
                }
                self.merged = Some(w.to_dtype(self.dense)?);
            }
        }
        Ok(())
    }

    /// Whether updates are attached.
    pub fn has_lora(&self) -> bool {
        !self.deltas.is_empty() || self.merged.is_some()
    }
}

impl Module for Lin {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = match (&self.merged, &self.weight) {
            (Some(w), _) => dense_linear(x, w, self.bias.as_ref())?,
            (None, StoredMatrix::Dense(w)) => dense_linear(x, w, self.bias.as_ref())?,
            (None, StoredMatrix::Int8(w)) => int8_linear(x, w, self.bias.as_ref())?,
            (None, stored) => {
                // One layer's dense copy, alive only for this product.
                let w = stored.dequantize(self.dense)?;
                dense_linear(x, &w, self.bias.as_ref())?
            }
        };
        self.deltas.iter().try_fold(y, |y, d| {
            let dy = d.apply(x)?.to_dtype(y.dtype())?;
            y + dy
        })
    }
}

fn stored_device(w: &StoredMatrix) -> Device {
    match w {
        StoredMatrix::Dense(t) => t.device().clone(),
        StoredMatrix::Blocks(q) => q.blocks.device(),
        StoredMatrix::Fp8(f) => f.codes.device().clone(),
        StoredMatrix::Int8(_) => Device::Cpu,
    }
}

/// `x·wᵀ (+ b)` through the int8 kernel (ops/cpu/int8.rs): f32 activations quantized per row,
/// s32 sums, f32 out (an input in another dtype is converted to f32 and back).
fn int8_linear(
    x: &Tensor,
    w: &super::quantized::PackedInt8,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() {
        candle_core::bail!("int8 weights multiply on the CPU only");
    }
    let bias = bias
        .map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>())
        .transpose()?;
    let y = x
        .to_dtype(DType::F32)?
        .contiguous()?
        .apply_op1_no_bwd(&super::cpu::int8::LinearInt8 { w, bias })?;
    y.to_dtype(x.dtype())
}

impl Lin {
    /// Converts the weight to per-channel int8 for the CPU's int8 kernel (`--precision int8`),
    /// once, at load: the f32 (or quantized) weight is dropped, the codes stay. A layer whose
    /// input is too wide for s32 sums keeps its weight.
    pub fn quantize_int8(&mut self) -> candle_core::Result<()> {
        let (_, k) = self.dims()?;
        if k > super::cpu::int8::MAX_K || !stored_device(&self.weight).is_cpu() {
            return Ok(());
        }
        self.weight = self.weight.to_int8()?;
        self.dense = DType::F32;
        Ok(())
    }
}

fn dense_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    // f32 on the CPU in an MKL build: MKL's sgemm with the bias written first (one pass).
    #[cfg(zturbo_mkl)]
    if x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 {
        let bias = bias
            .map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>())
            .transpose()?;
        return x
            .contiguous()?
            .apply_op2_no_bwd(&w.contiguous()?, &LinearF32 { bias });
    }
    if x.dtype() == w.dtype() {
        return candle_nn::Linear::new(w.clone(), bias.cloned()).forward(x);
    }
    let y = linear_mixed(x, w)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// `x·wᵀ` for an f32 `x` `[…, K]` and a weight `w` `[N, K]` of another dtype.
fn linear_mixed(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(zturbo_mkl)]
    if x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::BF16 && bf16_ready() {
        return x
            .contiguous()?
            .apply_op2_no_bwd(&w.contiguous()?, &LinearBf16);
    }
    let w = w.to_dtype(x.dtype())?;
    x.broadcast_matmul(&w.t()?)
}

/// `a·b` for tensors `[…, M, K]`·`[…, K, N]` (same leading dims; `b` contiguous or the transpose
/// of a contiguous tensor). On a bf16-ready CPU with `bf16` set, f32 tensors multiply through bf16
/// operands with f32 accumulation (MKL); other f32 CPU products in an MKL build go through MKL's
/// sgemm; on every other device and dtype it is candle's product.
pub fn matmul(a: &Tensor, b: &Tensor, bf16: bool) -> candle_core::Result<Tensor> {
    #[cfg(zturbo_mkl)]
    if bf16
        && a.device().is_cpu()
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && bf16_ready()
    {
        return a.contiguous()?.apply_op2_no_bwd(b, &MatmulBf16);
    }
    let _ = bf16;
    #[cfg(zturbo_mkl)]
    if a.device().is_cpu() && a.dtype() == DType::F32 && b.dtype() == DType::F32 {
        // MKL's sgemm; a `b` in another layout than the two it takes is made contiguous.
        let a = a.contiguous()?;
        return match a.apply_op2_no_bwd(b, &MatmulF32) {
            Ok(y) => Ok(y),
            Err(_) => a.apply_op2_no_bwd(&b.contiguous()?, &MatmulF32),
        };
    }
    a.matmul(b)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn lin_in_int8_matches_the_f32_product_within_quantization() -> candle_core::Result<()> {
        // Per-channel int8 weight, per-row int8 activations: within ~2 % of the largest output
        // of x·wᵀ + b, with a 3-D input, the bias added in the epilogue and a LoRA delta on top.
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (40, 70), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 40, &dev)?;
        let x = Tensor::randn(0f32, 1.0, (2, 9, 70), &dev)?;
        let f32_lin = Lin::from_parts(w.clone(), Some(b), DType::F32)?;
        let mut lin = f32_lin.clone();
        lin.quantize_int8()?;
        assert_eq!(lin.stored().kind(), "int8");
        assert!(lin.weight().is_none() && lin.stored().stored_bytes() < 40 * 70 * 4 / 2);
        let check = |lin: &Lin, want: &Tensor| -> candle_core::Result<()> {
            let y = x.apply(lin)?;
            assert_eq!((y.dims(), y.dtype()), (want.dims(), DType::F32));
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            let diff = (y - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 0.02 * scale, "max |diff| {diff} of {scale}");
            Ok(())
        };
        check(&lin, &x.apply(&f32_lin)?)?;
        let lora = LowRank {
            down: Tensor::randn(0f32, 1.0, (3, 70), &dev)?,
            up: Tensor::randn(0f32, 1.0, (40, 3), &dev)?,
            scale: 0.5,
        };
        let mut f32_lora = f32_lin.clone();
        f32_lora.set_lora(std::slice::from_ref(&lora), LoraMode::Runtime)?;
        lin.set_lora(std::slice::from_ref(&lora), LoraMode::Runtime)?;
        check(&lin, &x.apply(&f32_lora)?)?;
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
}
