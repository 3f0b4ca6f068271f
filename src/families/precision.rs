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
        }
    }

    pub const MIXED: Self = Self {
        text_encoder: DType::BF16,
        denoiser: DType::F16,
        residual: DType::BF16,
        vae: DType::BF16,
    };

    pub fn resolve(precision: Precision, device: &Device) -> Self {
        let mut p = match precision {
            Precision::F32 => Self::F32,
            Precision::Bf16 => Self::uniform(DType::BF16),
            Precision::F16 => Self::uniform(DType::F16),
            Precision::Mixed => Self::MIXED,
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
        format!(
            "text_encoder={:?} denoiser={:?} residual={:?} vae={:?}",
            self.text_encoder, self.denoiser, self.residual, self.vae
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
        } else {
            assert_eq!(p, PrecisionPolicy::F32);
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
        assert!("f8".parse::<Precision>().unwrap_err().contains("allowed"));
    }
}
