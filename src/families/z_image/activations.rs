//! Z-Image's memory formulas: the activation model the planner plans with, from the DiT, text
//! encoder and VAE configs and the dtypes activations run in. The attention's score caps are the
//! forward code's own (`ops::attention`).

use candle_core::{DType, Device};
use candle_transformers::models::z_image::text_encoder::TextEncoderConfig;

use super::config::DitConfig;
use super::MAX_SEQUENCE_LENGTH;
use crate::families::slot::vae_activations;
use crate::families::PrecisionPolicy;
use crate::memory::{ActivationModel, SequenceActivations};
use crate::nn::vae::VaeConfig;
use crate::ops::attention::{LOW_MEMORY_SCORE_CHUNK_ELEMS, SCORE_CHUNK_ELEMS};
use crate::ops::linear::activation_dtype;

/// Architecture numbers of a Z-Image-style single-stream DiT pipeline, for [`model`].
/// Layer counts do not appear: layers run one after another, so their activations do not add up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZImageArch {
    pub dim: u64,
    pub heads: u64,
    pub ffn_hidden: u64,
    pub patch_size: u32,
    /// Maximum caption tokens (padded).
    pub cap_tokens: u32,
    pub text_hidden: u64,
    pub text_heads: u64,
    pub text_ffn_hidden: u64,
    pub vae_block_out_channels: Vec<u32>,
    pub vae_scale: u32,
    /// Activation element size of denoiser and text encoder (2 for bf16/f16).
    pub elem_bytes: u64,
    /// Activation element size of the VAE decode (4 when decoding in f32).
    pub vae_elem_bytes: u64,
}

impl ZImageArch {
    /// Tongyi-MAI/Z-Image-Turbo as in candle-transformers 0.11 `Config::z_image_turbo()`,
    /// `TextEncoderConfig::z_image()` (Qwen3-4B) and `VaeConfig::z_image()`, all in bf16.
    pub fn turbo() -> Self {
        Self {
            dim: 3840,
            heads: 30,
            ffn_hidden: 3840 / 3 * 8,
            patch_size: 2,
            cap_tokens: 512,
            text_hidden: 2560,
            text_heads: 32,
            text_ffn_hidden: 9728,
            vae_block_out_channels: vec![128, 256, 512, 512],
            vae_scale: 8,
            elem_bytes: 2,
            vae_elem_bytes: 2,
        }
    }
}

impl ZImageArch {
    /// A loaded folder's numbers, in the dtypes its activations run in under `policy` on `device`.
    pub fn of(
        dit: &DitConfig,
        te: &TextEncoderConfig,
        vae: &VaeConfig,
        policy: &PrecisionPolicy,
        device: &Device,
    ) -> Self {
        let elem = |d: DType| activation_dtype(d, device).size_in_bytes() as u64;
        Self {
            dim: dit.dim as u64,
            heads: dit.n_heads as u64,
            ffn_hidden: dit.ffn_hidden() as u64,
            patch_size: dit.patch() as u32,
            cap_tokens: MAX_SEQUENCE_LENGTH as u32,
            text_hidden: te.hidden_size as u64,
            text_heads: te.num_attention_heads as u64,
            text_ffn_hidden: te.intermediate_size as u64,
            vae_block_out_channels: vae.block_out_channels.iter().map(|&c| c as u32).collect(),
            vae_scale: vae.scale_factor() as u32,
            elem_bytes: elem(policy.denoiser),
            vae_elem_bytes: elem(policy.vae),
        }
    }
}

pub fn model(arch: &ZImageArch) -> ActivationModel {
    ActivationModel {
        denoiser: SequenceActivations {
            max_scores: SCORE_CHUNK_ELEMS as u64,
            ..SequenceActivations::transformer(
                arch.dim,
                arch.heads,
                arch.ffn_hidden,
                arch.elem_bytes,
            )
        },
        denoiser_pixels_per_token: arch.vae_scale.saturating_mul(arch.patch_size),
        denoiser_context_tokens: arch.cap_tokens,
        text_encoder: SequenceActivations::transformer(
            arch.text_hidden,
            arch.text_heads,
            arch.text_ffn_hidden,
            arch.elem_bytes,
        ),
        text_tokens: arch.cap_tokens,
        vae: vae_activations(
            &arch.vae_block_out_channels,
            arch.vae_scale,
            arch.vae_elem_bytes,
        ),
        low_memory_scores: Some(LOW_MEMORY_SCORE_CHUNK_ELEMS as u64),
    }
}

/// Tongyi-MAI/Z-Image-Turbo in bf16 ([`ZImageArch::turbo`]).
pub fn turbo() -> ActivationModel {
    model(&ZImageArch::turbo())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_coefficients_match_hand_counts() {
        let a = turbo();
        // max(16·3840, 8·3840 + 4·10240) = 71 680 bf16 elements per token.
        assert_eq!(a.denoiser.bytes_per_token, 71_680 * 2);
        assert_eq!(a.denoiser.bytes_per_score, 2 * 2);
        assert_eq!(a.denoiser.heads, 30);
        // Qwen3-4B: max(16·2560, 8·2560 + 4·9728) = 59 392 elements.
        assert_eq!(a.text_encoder.bytes_per_token, 59_392 * 2);
        // Full-resolution VAE resnet: 256 in · 3 + 2 · 128 out = 1 024 bf16 elements per pixel; the
        // banded im2col buffer is a constant 16 Mi elements.
        assert_eq!(a.vae.bytes_per_pixel, 1_024 * 2);
        assert_eq!(a.vae.im2col_bytes, (16 << 20) * 2);
        assert_eq!(a.denoiser.max_scores, 64 << 20);
        // 1024² → 64² patches + 512 caption tokens.
        assert_eq!(a.denoiser_tokens(1024, 1024), 4096 + 512);
        assert_eq!(a.latent_size(1024, 1024), (128, 128));
    }
}
