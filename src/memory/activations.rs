//! Activation models: how many bytes a component's forward holds at its peak, as a function of
//! the request (sequence length, image size, batch). The generic building blocks — a transformer's
//! per-token and per-score bytes, an AutoencoderKL decode — are here; each family's
//! `activations.rs` assembles its [`ActivationModel`] from them with its own numbers and the forward
//! code's chunk and band caps. Plain data, so the planner stays a pure function.

use serde::{Deserialize, Serialize};

use super::planner::VaeTiling;

// Activation coefficients.
//
// The generic building blocks of the families' formulas (`families/*/activations.rs`, which read the chunk and
// band caps from `ops`), counted from our own forward code (`families/z_image/dit.rs`, `nn/vae.rs`,
// `families/sd_turbo/`) and calibrated against peaks measured with the counting allocator (`cargo bench --bench calibrate`, f32 on the
// CPU, the `bench` synthetic Z-Image). Measured vs planned on that model (planned / measured): denoiser call
// with CFG 1.24 at 256² and 1.13 at 512²; text encoder at 512 tokens 1.19; VAE decode 1.0–1.05 whole and tiled.
// The estimates stay on the safe side of every measurement. Every coefficient is a public field of
// `ActivationModel` and can be overridden.

/// (tokens × dim) tensors live at a DiT block's attention peak: residual, norm, modulated input, q/k/v,
/// q/k after QK-norm, q/k after RoPE, contiguous per-head q/k/v, context, its reshaped copy, output
/// projection.
pub const ATTN_PHASE_DIM_COPIES: u64 = 16;
/// (tokens × dim) tensors live at the MLP peak: residual, two norms, modulated input, attention output,
/// its norm, the new residual and the MLP output.
pub const MLP_PHASE_DIM_COPIES: u64 = 8;
/// (tokens × ffn_hidden) tensors live at the SwiGLU peak: gate, silu(gate), up, product.
pub const MLP_PHASE_HIDDEN_COPIES: u64 = 4;
/// Attention score tensors alive at once: `q·kᵀ` (+ mask) and its softmax.
pub const ATTN_SCORE_COPIES: u64 = 2;
/// im2col column buffer of a 3 × 3 convolution, in input-channel multiples (the UNet's convolutions
/// build it whole).
pub const CONV_KERNEL_AREA: u64 = 9;
/// Input-channel-wide tensors alive around a VAE resnet's first conv: block input (kept for the skip),
/// group norm, swish.
pub const CONV_INPUT_COPIES: u64 = 3;
/// Output-channel-wide tensors of an im2col conv: matmul result and its NCHW copy.
pub const CONV_OUTPUT_COPIES: u64 = 2;
/// Bytes per output pixel of the tiled decoder's accumulator: f32 RGB sum plus f32 blend weight.
pub const TILE_ACCUMULATOR_BYTES_PER_PIXEL: u64 = 16;

/// Activation bytes of a transformer as a function of sequence length, per sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceActivations {
    /// Live bytes per token that scale linearly with the sequence (projections, MLP).
    pub bytes_per_token: u64,
    pub heads: u64,
    /// Live bytes per attention-score element (copies alive at once × element size); 0 when attention is
    /// fused (flash attention) and scores never exist in full.
    pub bytes_per_score: u64,
    /// Most score elements that exist at once (chunked attention); `u64::MAX` when unchunked.
    pub max_scores: u64,
}

impl SequenceActivations {
    /// From a transformer's shape, with the copy counts above. `elem_bytes` is the activation dtype's size.
    pub fn transformer(dim: u64, heads: u64, ffn_hidden: u64, elem_bytes: u64) -> Self {
        let attn_phase = ATTN_PHASE_DIM_COPIES.saturating_mul(dim);
        let mlp_phase = MLP_PHASE_DIM_COPIES
            .saturating_mul(dim)
            .saturating_add(MLP_PHASE_HIDDEN_COPIES.saturating_mul(ffn_hidden));
        // One term for both phases (the larger) keeps the formula simple; it over-counts the attention
        // phase by a few (tokens × dim) copies, which errs on the safe side.
        Self {
            bytes_per_token: attn_phase.max(mlp_phase).saturating_mul(elem_bytes),
            heads,
            bytes_per_score: ATTN_SCORE_COPIES.saturating_mul(elem_bytes),
            max_scores: u64::MAX,
        }
    }

    /// Peak activation bytes for `batch` sequences of `tokens` tokens.
    pub fn bytes(&self, tokens: u64, batch: u64) -> u64 {
        let linear = self
            .bytes_per_token
            .saturating_mul(tokens)
            .saturating_mul(batch);
        let score_elems = self
            .heads
            .saturating_mul(tokens.saturating_mul(tokens))
            .saturating_mul(batch)
            .min(self.max_scores);
        linear.saturating_add(self.bytes_per_score.saturating_mul(score_elems))
    }
}

/// Activation bytes of a VAE decode, per image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VaeActivations {
    /// Output pixels per latent pixel along each side.
    pub scale: u32,
    /// Peak live bytes per output pixel in the convolution stages (the full-resolution resnets dominate).
    pub bytes_per_pixel: u64,
    /// Live bytes per element of the mid-block attention scores over (latent pixels)².
    pub bytes_per_score: u64,
    /// Bytes per output pixel the tiled decoder keeps for the whole image (blend accumulator).
    pub tile_accumulator_bytes_per_pixel: u64,
    /// Largest im2col buffer of one convolution (banded), in bytes.
    pub im2col_bytes: u64,
    /// Query rows of the mid-block attention computed at once.
    pub attention_rows: u64,
}

impl VaeActivations {
    /// From an AutoencoderKL decoder's `block_out_channels` (encoder order, as in its `config.json`), with
    /// one level per entry: the decoder walks them reversed from latent resolution, doubling the side at
    /// each level but the last. `im2col_elems`: the convolutions' band cap; `attention_rows`: the mid
    /// block's query rows per chunk (both the forward code's, `ops::conv` / `ops::attention`).
    pub fn autoencoder_kl(
        block_out_channels: &[u32],
        scale: u32,
        elem_bytes: u64,
        im2col_elems: u64,
        attention_rows: u64,
    ) -> Self {
        let reversed: Vec<u64> = block_out_channels
            .iter()
            .rev()
            .map(|&c| u64::from(c))
            .collect();
        let levels = reversed.len();
        let mut worst_per_pixel = 0u64;
        for (i, &c_out) in reversed.iter().enumerate() {
            // The mid block runs at the widest (last) channel count, which feeds level 0.
            let c_in = if i == 0 { c_out } else { reversed[i - 1] };
            // The im2col buffer is banded (a constant, below), so only feature maps scale.
            let per_level_pixel = c_in
                .saturating_mul(CONV_INPUT_COPIES)
                .saturating_add(CONV_OUTPUT_COPIES.saturating_mul(c_out));
            // Level i covers 1 / 4^(levels-1-i) of the output pixels.
            let shift = u32::try_from(2 * (levels - 1 - i)).unwrap_or(u32::MAX);
            let per_output_pixel = per_level_pixel.checked_shr(shift).unwrap_or(0);
            worst_per_pixel = worst_per_pixel.max(per_output_pixel);
        }
        Self {
            scale,
            bytes_per_pixel: worst_per_pixel.saturating_mul(elem_bytes),
            bytes_per_score: ATTN_SCORE_COPIES.saturating_mul(elem_bytes),
            tile_accumulator_bytes_per_pixel: TILE_ACCUMULATOR_BYTES_PER_PIXEL,
            im2col_bytes: im2col_elems.saturating_mul(elem_bytes),
            attention_rows,
        }
    }

    /// Peak bytes to decode a `latent_w × latent_h` latent in one go.
    pub fn decode_bytes(&self, latent_w: u64, latent_h: u64) -> u64 {
        let scale = u64::from(self.scale);
        let pixels = latent_w
            .saturating_mul(scale)
            .saturating_mul(latent_h.saturating_mul(scale));
        let latent_pixels = latent_w.saturating_mul(latent_h);
        // Convolutions and the mid-block attention run at different times: the peak is the larger.
        let conv = self
            .bytes_per_pixel
            .saturating_mul(pixels)
            .saturating_add(self.im2col_bytes);
        let attn = self
            .bytes_per_score
            .saturating_mul(latent_pixels.saturating_mul(latent_pixels.min(self.attention_rows)));
        conv.max(attn)
    }

    /// Peak bytes to decode the same latent tile by tile.
    pub fn tiled_decode_bytes(&self, latent_w: u64, latent_h: u64, tiling: VaeTiling) -> u64 {
        let tile_w = u64::from(tiling.tile_width_latent.max(1));
        let tile_h = u64::from(tiling.tile_height_latent.max(1));
        let scale = u64::from(self.scale);
        let pixels = latent_w
            .saturating_mul(scale)
            .saturating_mul(latent_h.saturating_mul(scale));
        let accumulator = self.tile_accumulator_bytes_per_pixel.saturating_mul(pixels);
        self.decode_bytes(latent_w.min(tile_w), latent_h.min(tile_h))
            .saturating_add(accumulator)
    }
}

/// Activation model of one model family. Plain data: constructors derive it from architecture numbers,
/// and any field can be replaced by a calibrated value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivationModel {
    pub denoiser: SequenceActivations,
    /// Output pixels per denoiser token along each side (VAE scale × patch size).
    pub denoiser_pixels_per_token: u32,
    /// Text tokens in the denoiser's sequence next to the image tokens (the caption at its padded maximum).
    pub denoiser_context_tokens: u32,
    pub text_encoder: SequenceActivations,
    /// Tokens the text encoder runs over per prompt (its maximum).
    pub text_tokens: u32,
    pub vae: VaeActivations,
    /// The denoiser's score cap in low mode, when the family then runs batch items (the CFG pair
    /// included) one at a time; `None` when low mode runs the batch as usual.
    pub low_memory_scores: Option<u64>,
}

impl ActivationModel {
    /// Denoiser tokens for an image: patches plus the caption.
    pub fn denoiser_tokens(&self, width: u32, height: u32) -> u64 {
        let per = self.denoiser_pixels_per_token.max(1);
        let patches = u64::from(width.div_ceil(per)) * u64::from(height.div_ceil(per));
        patches.saturating_add(u64::from(self.denoiser_context_tokens))
    }

    /// Latent size (width, height) for an image.
    pub fn latent_size(&self, width: u32, height: u32) -> (u64, u64) {
        let scale = self.vae.scale.max(1);
        (
            u64::from(width.div_ceil(scale)),
            u64::from(height.div_ceil(scale)),
        )
    }
}
