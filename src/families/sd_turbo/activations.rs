//! SD-Turbo's and SDXL-Turbo's memory formulas: the UNet mapped onto the planner's sequence model
//! (one token per latent pixel), the widest CLIP tower and the VAE, in the dtypes activations run
//! in. The UNet's convolutions build their im2col whole, so only the VAE's caps come from `ops`.

use candle_core::{DType, Device};

use super::clip::ClipTextConfig;
use super::config::UNetPlan;
use super::unet::UNetPrecision;
use crate::families::slot::vae_activations;
use crate::families::PrecisionPolicy;
use crate::memory::activations::{
    ActivationModel, SequenceActivations, ATTN_SCORE_COPIES, CONV_INPUT_COPIES, CONV_KERNEL_AREA,
    CONV_OUTPUT_COPIES,
};
use crate::nn::vae::VaeConfig;
use crate::ops::linear::activation_dtype;

/// Architecture numbers of a UNet pipeline (SD 2.x / SDXL), for [`model`]. Per-level
/// lists are in down-block order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UNetArch {
    pub block_out_channels: Vec<u64>,
    /// Level `k` has cross-attention transformer blocks.
    pub attention: Vec<bool>,
    pub heads: Vec<u64>,
    pub layers_per_block: Vec<u64>,
    /// Text rows the cross-attention attends to (77) — also the text encoder's sequence length.
    pub context_tokens: u32,
    /// The widest text encoder (SDXL runs its two one after the other).
    pub text_hidden: u64,
    pub text_heads: u64,
    pub text_ffn_hidden: u64,
    pub vae_block_out_channels: Vec<u32>,
    pub vae_scale: u32,
    /// UNet weights/matmul element size.
    pub elem_bytes: u64,
    /// Element size of the hidden state between layers and of the skip connections.
    pub residual_elem_bytes: u64,
    pub text_elem_bytes: u64,
    pub vae_elem_bytes: u64,
}

impl UNetArch {
    /// A loaded folder's numbers: the UNet's plan, the widest of its CLIP towers (SDXL runs its
    /// two one after the other), the VAE, and the dtypes activations run in (`unet`: the UNet's
    /// compute and residual dtypes).
    #[allow(clippy::too_many_arguments)]
    pub fn of<'a>(
        plan: &UNetPlan,
        clips: impl Iterator<Item = &'a ClipTextConfig>,
        context_tokens: usize,
        vae: &VaeConfig,
        unet: UNetPrecision,
        policy: &PrecisionPolicy,
        device: &Device,
    ) -> Self {
        let elem = |d: DType| d.size_in_bytes() as u64;
        let widest = clips.max_by_key(|c| c.hidden_size);
        Self {
            block_out_channels: plan.channels.iter().map(|&c| c as u64).collect(),
            attention: plan.down_attn.clone(),
            heads: plan.heads.iter().map(|&h| h as u64).collect(),
            layers_per_block: plan.layers.iter().map(|&l| l as u64).collect(),
            context_tokens: context_tokens as u32,
            text_hidden: widest.map_or(0, |c| c.hidden_size as u64),
            text_heads: widest.map_or(0, |c| c.num_attention_heads as u64),
            text_ffn_hidden: widest.map_or(0, |c| c.intermediate_size as u64),
            vae_block_out_channels: vae.block_out_channels.iter().map(|&c| c as u32).collect(),
            vae_scale: vae.scale_factor() as u32,
            elem_bytes: elem(unet.compute),
            residual_elem_bytes: elem(unet.residual),
            text_elem_bytes: elem(policy.text_encoder),
            vae_elem_bytes: elem(activation_dtype(policy.vae, device)),
        }
    }

    /// stabilityai/sd-turbo (SD 2.1 UNet, OpenCLIP-H text tower) with the `mixed` policy
    /// (f16 UNet, bf16 residual, bf16 text encoder and VAE).
    pub fn sd_turbo() -> Self {
        Self {
            block_out_channels: vec![320, 640, 1280, 1280],
            attention: vec![true, true, true, false],
            heads: vec![5, 10, 20, 20],
            layers_per_block: vec![2, 2, 2, 2],
            context_tokens: 77,
            text_hidden: 1024,
            text_heads: 16,
            text_ffn_hidden: 4096,
            vae_block_out_channels: vec![128, 256, 512, 512],
            vae_scale: 8,
            elem_bytes: 2,
            residual_elem_bytes: 2,
            text_elem_bytes: 2,
            vae_elem_bytes: 2,
        }
    }
}

/// A UNet pipeline (SD / SDXL). The UNet is mapped onto the sequence model with one "token" per
/// latent pixel (`denoiser_pixels_per_token` = VAE scale, no context tokens in the sequence);
/// level `k` of the UNet runs at `1/4^k` of those tokens. Per token it holds:
///
/// * the skip connections of the whole down path (conv_in, every resnet/attention output and
///   every downsampler output), alive until the up path consumes them — in the residual dtype;
/// * plus the largest working set of one layer, the max over levels of (a) an up-path resnet
///   on the concatenated input (`c_k + max(c_k, c_k+1)` channels: im2col, norm, swish, the
///   conv output) and
///   (b) a transformer block at an attention level (the DiT's copy counts, GEGLU's hidden
///   width `4·c`), and of the cross-attention scores against the `context_tokens` text rows.
///
/// Self-attention scores grow with the square of the level's tokens: level `k` contributes
/// `heads_k · (T/4^k)²` elements, so the model keeps `heads = 1` and folds the largest
/// `heads_k / 16^k` into `bytes_per_score`. Score elements cost the compute dtype (q·kᵀ) plus
/// two f32 copies (softmax in and out; f32 compute casts nothing, so two f32 copies only).
pub fn model(arch: &UNetArch) -> ActivationModel {
    let levels = arch.block_out_channels.len();
    let elem = arch.elem_bytes.max(1);
    let residual = arch.residual_elem_bytes.max(1);
    let score_bytes = ATTN_SCORE_COPIES
        .saturating_mul(4)
        .saturating_add(if elem == 4 { 0 } else { elem });
    let quarter = |v: u64, k: usize| -> u64 {
        let shift = u32::try_from(2 * k).unwrap_or(u32::MAX);
        v.checked_shr(shift).unwrap_or(0)
    };
    let mut skips = 0u64;
    let mut working = 0u64;
    let mut score_coeff = 0u64;
    let context = u64::from(arch.context_tokens);
    for k in 0..levels {
        let c = arch.block_out_channels[k];
        let layers = arch.layers_per_block.get(k).copied().unwrap_or(1);
        let mut level_skips = layers.saturating_mul(c);
        if k == 0 {
            level_skips = level_skips.saturating_add(c); // conv_in
        }
        skips = skips.saturating_add(quarter(level_skips, k));
        if k + 1 < levels {
            skips = skips.saturating_add(quarter(c, k + 1)); // downsampler output
        }
        // The first up-path resnet of level k sees the level below (upsampled) next to the skip.
        let below = arch.block_out_channels.get(k + 1).copied().unwrap_or(c);
        let concat = c.saturating_add(below.max(c));
        let resnet = (CONV_KERNEL_AREA + CONV_INPUT_COPIES)
            .saturating_mul(concat)
            .saturating_add(CONV_OUTPUT_COPIES.saturating_mul(c))
            .saturating_mul(elem);
        let mut level_work = resnet;
        if arch.attention.get(k).copied().unwrap_or(false) {
            let heads = arch.heads.get(k).copied().unwrap_or(1);
            let block = SequenceActivations::transformer(c, heads, 4 * c, elem).bytes_per_token;
            let cross = heads.saturating_mul(context).saturating_mul(score_bytes);
            level_work = level_work.max(block.saturating_add(cross));
            let shift = u32::try_from(4 * k).unwrap_or(u32::MAX);
            let self_scores = heads
                .saturating_mul(score_bytes)
                .saturating_add((1u64 << shift.min(63)) - 1)
                .checked_shr(shift)
                .unwrap_or(0);
            score_coeff = score_coeff.max(self_scores);
        }
        working = working.max(quarter(level_work, k));
    }
    ActivationModel {
        denoiser: SequenceActivations {
            bytes_per_token: skips.saturating_mul(residual).saturating_add(working),
            heads: 1,
            bytes_per_score: score_coeff,
            max_scores: u64::MAX,
        },
        denoiser_pixels_per_token: arch.vae_scale,
        denoiser_context_tokens: 0,
        text_encoder: SequenceActivations::transformer(
            arch.text_hidden,
            arch.text_heads,
            arch.text_ffn_hidden,
            arch.text_elem_bytes,
        ),
        text_tokens: arch.context_tokens,
        vae: vae_activations(
            &arch.vae_block_out_channels,
            arch.vae_scale,
            arch.vae_elem_bytes,
        ),
        low_memory_scores: None,
    }
}

/// stabilityai/sd-turbo with the `mixed` policy ([`UNetArch::sd_turbo`]).
pub fn sd_turbo() -> ActivationModel {
    model(&UNetArch::sd_turbo())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::planner::{
        default_reserve, plan, ComponentBytes, MemoryMode, PlanInput, Residency,
    };

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn unet_coefficients_match_hand_counts() {
        let a = sd_turbo();
        // Skips: level 0 conv_in + 2 layers (3·320) + downsampler 320/4; level 1 2·640/4 + 640/16;
        // level 2 2·1280/16 + 1280/64; level 3 2·1280/64 = 960 + 80 + 320 + 40 + 160 + 20 + 40.
        let skips = 1_620 * 2;
        // Level 0's first up resnet on 640 + 320 concatenated channels: 12·960 + 2·320 elements;
        // the transformer block (max(16·320, 8·320 + 4·1280) elements) plus 5 heads × 77 cross
        // scores × (2·4 + 2) bytes is less (19 210 bytes).
        let working = (12 * 960 + 2 * 320) * 2;
        assert_eq!(a.denoiser.bytes_per_token, skips + working);
        // Level 0 self-attention: 5 heads × (2 f32 + 1 f16 copies).
        assert_eq!(a.denoiser.bytes_per_score, 50);
        assert_eq!(a.denoiser.heads, 1);
        assert_eq!(a.denoiser_tokens(512, 512), 64 * 64);
        assert_eq!(a.text_tokens, 77);
        // One 512² pass: about 0.9 GB, dominated by the level-0 attention scores.
        let one = a.denoiser.bytes(a.denoiser_tokens(512, 512), 1);
        assert!(one > 800 * MIB && one < GIB, "{one}");
    }

    #[test]
    fn sd_turbo_fits_a_6_gib_card_in_performance_mode() {
        // Weights of stabilityai/sd-turbo in the mixed policy: UNet 865.9 M params in f16, the
        // OpenCLIP-H text tower 340.4 M in bf16, the VAE decoder 49.5 M in bf16.
        let components = ComponentBytes {
            text_encoder: 680_800_000,
            denoiser: 1_731_800_000,
            denoiser_largest_block: 0,
            denoiser_blocks: 0,
            vae_decoder: 99_000_000,
            ..Default::default()
        };
        let input = PlanInput {
            device_total: 6 * GIB,
            device_free: 6 * GIB - 300 * MIB,
            budget: None,
            reserve: default_reserve(6 * GIB),
            components,
            activations: sd_turbo(),
            width: 512,
            height: 512,
            batch: 1,
            cfg_on: false,
            mode: MemoryMode::Auto,
        };
        let p = plan(&input);
        assert_eq!(p.mode, MemoryMode::Performance, "{}", p.summary());
        assert!(p.fits);
        // Without block streaming the low mode loads the UNet whole for its phase.
        let low = plan(&PlanInput {
            mode: MemoryMode::Low,
            ..input
        });
        assert_eq!(low.denoiser, Residency::LoadUseFree);
    }
}
