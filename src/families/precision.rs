//! Precision policy: the dtype of each component (text encoder, denoiser compute, the denoiser's
//! residual stream, VAE). The engine chooses it; the families build their modules with it.

use candle_core::{DType, Device};

pub use crate::settings::Precision;

/// Concrete dtypes per component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrecisionPolicy {
    pub text_encoder: DType,
    /// Weights and matmul inputs of the denoiser.
    pub denoiser: DType,
    /// The running hidden state that every block adds into.
    pub residual: DType,
    pub vae: DType,
    /// The denoiser's block projections (attention and feed-forward) as per-channel int8 with
    /// int8 products on the CPU (`--precision int8`); `denoiser` is then f32 (what everything
    /// else in the denoiser runs in).
    pub denoiser_int8: bool,
}

impl PrecisionPolicy {
    pub const F32: Self = Self::uniform(DType::F32);

    /// The dtype of one component (the denoiser's: its compute dtype).
    pub fn of(&self, component: super::Component) -> DType {
        match component {
            super::Component::TextEncoder => self.text_encoder,
            super::Component::Denoiser => self.denoiser,
            super::Component::Vae => self.vae,
        }
    }

    /// Changes one component's dtype. f32 denoiser compute needs an f32 residual stream; any
    /// other dtype goes back to `base_residual`, the residual dtype the policy started with (the
    /// guard raises precision, then restores it).
    pub fn set(&mut self, component: super::Component, dtype: DType, base_residual: DType) {
        match component {
            super::Component::TextEncoder => self.text_encoder = dtype,
            super::Component::Denoiser => {
                self.denoiser = dtype;
                self.residual = if dtype == DType::F32 {
                    DType::F32
                } else {
                    base_residual
                };
            }
            super::Component::Vae => self.vae = dtype,
        }
    }

    pub const fn uniform(dtype: DType) -> Self {
        Self {
            text_encoder: dtype,
            denoiser: dtype,
            residual: dtype,
            vae: dtype,
            denoiser_int8: false,
        }
    }

    pub const MIXED: Self = Self {
        text_encoder: DType::BF16,
        denoiser: DType::F16,
        residual: DType::BF16,
        vae: DType::BF16,
        denoiser_int8: false,
    };

    /// f32 everywhere, the denoiser's block projections in int8 (`--precision int8`).
    pub const INT8: Self = Self {
        denoiser_int8: true,
        ..Self::F32
    };

    /// Whether `precision` can run on `device`: int8 needs the CPU, with AVX512-VNNI (the
    /// kernel's instruction; without it int8 products would be slower than f32). The error
    /// names the option and what is missing.
    pub fn check(precision: Precision, device: &Device) -> Result<(), String> {
        if precision != Precision::Int8 {
            return Ok(());
        }
        if !device.is_cpu() {
            return Err(
                "--precision int8 runs on the CPU only (use auto, mixed, bf16 or f16 on a GPU)"
                    .into(),
            );
        }
        if !crate::ops::cpu::int8::vnni_available() {
            return Err("--precision int8 needs a CPU with AVX512-VNNI, which this one lacks (use auto or f32)".into());
        }
        Ok(())
    }

    /// Whether `auto` picks int8 on this CPU: it has AVX512-VNNI but multiplies bf16 natively
    /// neither (no AVX512-BF16/AMX, a build without MKL, or `ZTURBO_CPU_BF16=0`), and
    /// `ZTURBO_CPU_INT8=0` does not turn it off. (Measured faster than f32 there, at 35+ dB PSNR
    /// against the f32 image: README "int8".)
    pub fn auto_int8() -> bool {
        let off = std::env::var("ZTURBO_CPU_INT8").is_ok_and(|v| v == "0" || v == "off");
        !off && !crate::ops::linear::bf16_ready() && crate::ops::cpu::int8::vnni_available()
    }

    pub fn resolve(precision: Precision, device: &Device) -> Self {
        let mut p = match precision {
            Precision::F32 => Self::F32,
            Precision::Bf16 => Self::uniform(DType::BF16),
            Precision::F16 => Self::uniform(DType::F16),
            Precision::Mixed => Self::MIXED,
            Precision::Int8 if device.is_cpu() => Self::INT8,
            // Refused by `check` before loading; the device's own choice otherwise.
            Precision::Int8 => return Self::resolve(Precision::Auto, device),
            Precision::Auto => {
                if device.is_cuda() {
                    Self::MIXED
                } else if device.is_metal() {
                    Self::uniform(DType::BF16)
                } else if crate::ops::linear::bf16_ready() {
                    // bf16 denoiser and VAE matrices multiplied natively (AMX / AVX512-BF16
                    // through MKL) with f32 activations and accumulation; the text encoder
                    // stays f32 (it is a small share of the time).
                    Self {
                        denoiser: DType::BF16,
                        vae: DType::BF16,
                        ..Self::F32
                    }
                } else if Self::auto_int8() {
                    Self::INT8
                } else {
                    Self::F32
                }
            }
        };
        // candle's CPU convolution has no bf16 kernel; halves buy nothing on a CPU anyway.
        if device.is_cpu() && p.vae == DType::BF16 && !crate::ops::linear::bf16_ready() {
            p.vae = DType::F32;
        }
        p
    }

    /// For logs and job records.
    pub fn describe(&self) -> String {
        let denoiser = if self.denoiser_int8 {
            "int8".to_string()
        } else {
            format!("{:?}", self.denoiser)
        };
        format!(
            "text_encoder={:?} denoiser={denoiser} residual={:?} vae={:?}",
            self.text_encoder, self.residual, self.vae
        )
        .to_lowercase()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_on_cpu_is_f32_unless_bf16_is_native() {
        let p = PrecisionPolicy::resolve(Precision::Auto, &Device::Cpu);
        if crate::ops::linear::bf16_ready() {
            assert_eq!(p.denoiser, DType::BF16);
            assert_eq!(
                crate::ops::linear::activation_dtype(p.denoiser, &Device::Cpu),
                DType::F32
            );
            assert_eq!((p.text_encoder, p.vae), (DType::F32, DType::BF16));
        } else if PrecisionPolicy::auto_int8() {
            assert_eq!(p, PrecisionPolicy::INT8);
        } else {
            assert_eq!(p, PrecisionPolicy::F32);
        }
    }

    #[test]
    fn int8_is_the_cpu_f32_policy_with_int8_projections_or_a_named_refusal() {
        let p = PrecisionPolicy::resolve(Precision::Int8, &Device::Cpu);
        assert_eq!(p, PrecisionPolicy::INT8);
        assert_eq!(
            (p.denoiser, p.residual, p.vae),
            (DType::F32, DType::F32, DType::F32)
        );
        assert!(p.describe().contains("denoiser=int8"), "{}", p.describe());
        match PrecisionPolicy::check(Precision::Int8, &Device::Cpu) {
            Ok(()) => assert!(crate::ops::cpu::int8::vnni_available()),
            Err(e) => {
                assert!(!crate::ops::cpu::int8::vnni_available());
                assert!(
                    e.contains("--precision int8") && e.contains("AVX512-VNNI"),
                    "{e}"
                );
            }
        }
        for other in [
            Precision::Auto,
            Precision::F32,
            Precision::Bf16,
            Precision::Mixed,
        ] {
            assert!(PrecisionPolicy::check(other, &Device::Cpu).is_ok());
        }
    }

    #[test]
    fn mixed_keeps_residual_in_bf16() {
        let p = PrecisionPolicy::resolve(Precision::Mixed, &Device::Cpu);
        assert_eq!(p.denoiser, DType::F16);
        assert_eq!(p.residual, DType::BF16);
        assert_eq!(p.text_encoder, DType::BF16);
        // No bf16 convolution on the CPU: the VAE stays f32 there.
        let native = crate::ops::linear::bf16_ready();
        assert_eq!(p.vae, if native { DType::BF16 } else { DType::F32 });
    }

    #[test]
    fn parses_names() {
        assert_eq!("FP16".parse::<Precision>(), Ok(Precision::F16));
        assert_eq!("INT8".parse::<Precision>(), Ok(Precision::Int8));
        assert_eq!(Precision::Int8.to_string(), "int8");
        let e = "int4".parse::<Precision>().unwrap_err();
        assert!(e.contains("`int4`") && e.contains("int8"), "{e}");
        assert!("f8".parse::<Precision>().unwrap_err().contains("allowed"));
    }
}
