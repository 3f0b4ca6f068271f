//! PyTorch's CPU random generator, bit for bit: `torch.Generator("cpu").manual_seed(s)` followed by
//! `torch.randn(..., generator=g)` in float32. diffusers and ComfyUI draw their noise this way on the
//! CPU, so a seed copied from either gives the same starting noise here.
//!
//! What torch does (ATen `CPUGeneratorImpl`, `DistributionKernels.cpp`, `TransformationHelper.h`):
//! - the engine is a standard mt19937 seeded with the low 32 bits of the seed;
//! - `randn` of a contiguous float32 tensor with at least 16 elements first fills the whole buffer
//!   with uniform floats (24 random bits of one 32-bit draw each), then turns every block of 16 into
//!   normals with Box–Muller (the first 8 are the `u1`s, the next 8 the `u2`s), vectorised with AVX2
//!   through `avx_mathfun`'s `log256_ps` and `sincos256_ps`; when the size is not a multiple of 16,
//!   16 fresh uniforms replace the last 16 values and are transformed again;
//! - below 16 elements every value comes from the scalar `normal_distribution<double>`: two 53-bit
//!   uniforms (64 random bits each), `sqrt(-2·log1p(-u2))·cos(2π·u1)`, keeping the sine half in the
//!   generator for its next scalar draw (the vectorised fill neither reads nor clears it).
//!
//! x86-64 builds of torch compile the vectorised kernels with FMA, and GCC contracts some of
//! `avx_mathfun`'s multiply–adds into fused ones: the `mul_add`s below are exactly those (found by
//! comparing every variant against torch 2.15's output; `tests/torch_rng.rs` checks the result
//! bit for bit). A torch built without AVX2 (or for ARM) rounds some values differently in the
//! last bit; ComfyUI and diffusers on x86-64 — the common case — match these values exactly.

use candle_core::{Device, Tensor};

const N: usize = 624;
const M: usize = 397;

/// The Mersenne Twister as torch seeds it (`at::mt19937`: 32-bit seed, standard tempering).
#[derive(Clone)]
struct Mt19937 {
    state: Box<[u32; N]>,
    next: usize,
}

impl Mt19937 {
    fn new(seed: u32) -> Self {
        let mut state = Box::new([0u32; N]);
        state[0] = seed;
        for j in 1..N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Self { state, next: N }
    }

    fn twist(&mut self) {
        let s = &mut self.state;
        for i in 0..N {
            let y = (s[i] & 0x8000_0000) | (s[(i + 1) % N] & 0x7fff_ffff);
            let mag = if y & 1 == 1 { 0x9908_b0df } else { 0 };
            s[i] = s[(i + M) % N] ^ (y >> 1) ^ mag;
        }
        self.next = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.next >= N {
            self.twist();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }
}

/// `torch.Generator("cpu")` after `manual_seed(seed)`.
#[derive(Clone)]
pub struct TorchGenerator {
    mt: Mt19937,
    /// The sine half of the last scalar Box–Muller pair (torch's `next_double_normal_sample`).
    next_double_normal: Option<f64>,
}

impl TorchGenerator {
    /// `manual_seed(seed)`: any u64 is accepted; torch keeps only its low 32 bits for mt19937.
    pub fn new(seed: u64) -> Self {
        Self {
            mt: Mt19937::new(seed as u32),
            next_double_normal: None,
        }
    }

    /// `generator.random()`: one 32-bit draw.
    pub fn random_u32(&mut self) -> u32 {
        self.mt.next_u32()
    }

    /// `generator.random64()`: two draws, the first one in the high half.
    pub fn random_u64(&mut self) -> u64 {
        let hi = self.mt.next_u32() as u64;
        let lo = self.mt.next_u32() as u64;
        (hi << 32) | lo
    }

    /// `uniform_real_distribution<float>(0, 1)`: 24 random bits → [0, 1).
    fn uniform_f32(&mut self) -> f32 {
        ((self.random_u32() & 0x00ff_ffff) as f64 * (1.0 / (1u64 << 24) as f64)) as f32
    }

    /// `uniform_real_distribution<double>(0, 1)`: 53 random bits → [0, 1).
    fn uniform_f64(&mut self) -> f64 {
        (self.random_u64() & ((1u64 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `normal_distribution<double>(0, 1)` (the scalar path), with torch's one-value cache.
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_double_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(n, generator=self)` in float32: `n` standard-normal values.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(16) {
            normal_fill_16(block);
        }
        if n % 16 != 0 {
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            normal_fill_16(tail);
        }
        data
    }

    /// `torch.randn(shape, generator=self)` as a float32 tensor on `device`.
    pub fn randn_tensor(
        &mut self,
        shape: &[usize],
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let n = shape.iter().product();
        Tensor::from_vec(self.randn(n), shape, device)
    }
}

/// A constant as C writes `(float)1.2345`: the decimal read as a double, then rounded to float.
const fn k(v: f64) -> f32 {
    v as f32
}

/// Box–Muller over 16 uniforms in place: `[u1 × 8, u2 × 8]` → `[r·cos θ × 8, r·sin θ × 8]`.
fn normal_fill_16(data: &mut [f32]) {
    // `_mm256_set1_ps(2.0f * c10::pi<double>)`: the product in double, rounded once.
    let two_pi = (2.0f64 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        let u1 = 1.0f32 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0f32 * log_ps(u1)).sqrt();
        let theta = two_pi * u2;
        let (sin, cos) = sincos_ps(theta);
        data[j] = radius * cos;
        data[j + 8] = radius * sin;
    }
}

/// `avx_mathfun`'s `log256_ps` (Cephes `logf`) for one lane, with the x86-64 build's fused
/// multiply–adds. `x` is in (0, 1] here.
fn log_ps(x: f32) -> f32 {
    if x.is_nan() || x <= 0.0 {
        return f32::NAN;
    }
    let x = x.max(f32::MIN_POSITIVE);
    let bits = x.to_bits();
    let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
    // Mantissa in [0.5, 1).
    let mut x = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    let below = x < k(std::f64::consts::FRAC_1_SQRT_2);
    let tmp = if below { x } else { 0.0 };
    x -= 1.0;
    if below {
        e -= 1.0;
    }
    x += tmp;
    let z = x * x;
    let mut y = k(7.0376836292E-2);
    for p in [
        k(-1.1514610310E-1),
        k(1.1676998740E-1),
        k(-1.2420140846E-1),
        k(1.4249322787E-1),
        k(-1.6668057665E-1),
        k(2.0000714765E-1),
        k(-2.4999993993E-1),
        k(3.3333331174E-1),
    ] {
        y = y.mul_add(x, p);
    }
    y *= x;
    y = y.mul_add(z, e * k(-2.12194440e-4));
    y = z.mul_add(-0.5, y);
    x += y;
    e.mul_add(k(0.693359375), x)
}

/// `avx_mathfun`'s `sincos256_ps` (Cephes `sinf`/`cosf`) for one lane: `(sin x, cos x)`, with
/// the x86-64 build's fused multiply–adds.
fn sincos_ps(x: f32) -> (f32, f32) {
    let mut sign_sin = x.is_sign_negative();
    let mut x = x.abs();
    // 4/π, then the octant rounded up to even (cvttps truncates; x ≥ 0 here).
    let mut j = (x * k(1.27323954473516)) as i32;
    j = (j + 1) & !1;
    let y = j as f32;
    let swap_sign = j & 4 != 0;
    let poly_is_sin = j & 2 == 0;
    // Extended-precision modular arithmetic: x − y·π/4 in three parts.
    x = y.mul_add(k(-0.78515625), x);
    x = y.mul_add(k(-2.418_756_484_985_351_6e-4), x);
    x = y.mul_add(k(-3.774_894_977_445_941e-8), x);
    let sign_cos = (!(j - 2)) & 4 != 0;
    sign_sin ^= swap_sign;
    let z = x * x;
    // cos polynomial on [-π/4, π/4].
    let mut c = k(2.443315711809948E-005);
    c = c.mul_add(z, k(-1.388731625493765E-003));
    c = c.mul_add(z, k(4.166664568298827E-002));
    c *= z;
    c = c.mul_add(z, -(z * 0.5));
    c += 1.0;
    // sin polynomial.
    let mut s = k(-1.9515295891E-4);
    s = s.mul_add(z, k(8.3321608736E-3));
    s = s.mul_add(z, k(-1.6666654611E-1));
    s *= z;
    s = s.mul_add(x, x);
    let (sin, cos) = if poly_is_sin { (s, c) } else { (c, s) };
    (
        if sign_sin { -sin } else { sin },
        if sign_cos { -cos } else { cos },
    )
}

/// Standard-normal noise of `shape` as `torch.randn(shape, generator=torch.Generator("cpu")
/// .manual_seed(seed))` makes it.
pub fn randn(seed: u64, shape: &[usize], device: &Device) -> candle_core::Result<Tensor> {
    TorchGenerator::new(seed).randn_tensor(shape, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_the_reference_sequence() {
        // The C++ standard pins std::mt19937 (default seed 5489): its 10000th output is 4123659995.
        let mut mt = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = mt.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn seeds_keep_their_low_32_bits() {
        // torch: Generator().manual_seed(2**32 + 5) draws what manual_seed(5) draws.
        let a = TorchGenerator::new((1u64 << 32) + 5).randn(20);
        let b = TorchGenerator::new(5).randn(20);
        assert_eq!(a, b);
    }

    #[test]
    fn scalar_path_caches_the_sine_half() {
        // Two draws of 1 equal one draw of 2 (the second value is the cached sine).
        let mut g = TorchGenerator::new(3);
        let one = [g.randn(1), g.randn(1)].concat();
        assert_eq!(one, TorchGenerator::new(3).randn(2));
    }
}
