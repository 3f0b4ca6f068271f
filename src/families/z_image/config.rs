//! `transformer/config.json` of Z-Image's DiT, with diffusers' defaults and the checks a folder
//! must pass before anything is built from it.

use serde::Deserialize;

/// Width of the adaLN conditioning vector (capped at the model width).
const ADALN_EMBED_DIM: usize = 256;

/// `transformer/config.json` (unknown fields ignored; defaults are diffusers').
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct DitConfig {
    #[serde(default = "d_patch")]
    pub all_patch_size: Vec<usize>,
    #[serde(default = "d_fpatch")]
    pub all_f_patch_size: Vec<usize>,
    #[serde(default = "d_in")]
    pub in_channels: usize,
    #[serde(default = "d_dim")]
    pub dim: usize,
    #[serde(default = "d_layers")]
    pub n_layers: usize,
    #[serde(default = "d_refiner")]
    pub n_refiner_layers: usize,
    #[serde(default = "d_heads")]
    pub n_heads: usize,
    #[serde(default = "d_heads")]
    pub n_kv_heads: usize,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_true")]
    pub qk_norm: bool,
    #[serde(default = "d_cap")]
    pub cap_feat_dim: usize,
    #[serde(default = "d_theta")]
    pub rope_theta: f64,
    #[serde(default = "d_tscale")]
    pub t_scale: f64,
    #[serde(default = "d_axes_dims")]
    pub axes_dims: Vec<usize>,
    #[serde(default = "d_axes_lens")]
    pub axes_lens: Vec<usize>,
}

fn d_patch() -> Vec<usize> {
    vec![2]
}
fn d_fpatch() -> Vec<usize> {
    vec![1]
}
fn d_in() -> usize {
    16
}
fn d_dim() -> usize {
    3840
}
fn d_layers() -> usize {
    30
}
fn d_refiner() -> usize {
    2
}
fn d_heads() -> usize {
    30
}
fn d_eps() -> f64 {
    1e-5
}
fn d_true() -> bool {
    true
}
fn d_cap() -> usize {
    2560
}
fn d_theta() -> f64 {
    256.0
}
fn d_tscale() -> f64 {
    1000.0
}
fn d_axes_dims() -> Vec<usize> {
    vec![32, 48, 48]
}
fn d_axes_lens() -> Vec<usize> {
    vec![1024, 512, 512]
}

impl DitConfig {
    /// Transformer blocks in all: both refiners and the main layers.
    pub fn n_blocks(&self) -> usize {
        2 * self.n_refiner_layers + self.n_layers
    }

    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }

    /// diffusers: `int(dim / 3 * 8)` (float division, then truncation).
    pub fn ffn_hidden(&self) -> usize {
        (self.dim as f64 / 3.0 * 8.0) as usize
    }

    pub fn adaln_dim(&self) -> usize {
        self.dim.min(ADALN_EMBED_DIM)
    }

    pub fn patch(&self) -> usize {
        self.all_patch_size.first().copied().unwrap_or(2)
    }

    pub fn f_patch(&self) -> usize {
        self.all_f_patch_size.first().copied().unwrap_or(1)
    }

    /// Checks the invariants the forward relies on; the message names the offending keys.
    pub fn validate(&self) -> Result<(), String> {
        if self.n_heads == 0 || self.dim == 0 || self.dim % self.n_heads != 0 {
            return Err(format!(
                "dim ({}) must be a positive multiple of n_heads ({})",
                self.dim, self.n_heads
            ));
        }
        if self.all_patch_size.is_empty()
            || self.all_patch_size.len() != self.all_f_patch_size.len()
        {
            return Err(
                "all_patch_size and all_f_patch_size must be non-empty and equally long".into(),
            );
        }
        if self.patch() == 0 || self.f_patch() == 0 {
            return Err("patch sizes must be positive".into());
        }
        if self.f_patch() != 1 {
            return Err(format!(
                "all_f_patch_size[0] = {} (only single-frame images, 1, are supported)",
                self.f_patch()
            ));
        }
        if self.axes_dims.len() != 3 || self.axes_lens.len() != 3 {
            return Err(
                "axes_dims and axes_lens must have 3 entries (frame, height, width)".into(),
            );
        }
        if self.axes_dims.iter().sum::<usize>() != self.head_dim() {
            return Err(format!(
                "sum(axes_dims) = {} must equal dim / n_heads = {}",
                self.axes_dims.iter().sum::<usize>(),
                self.head_dim()
            ));
        }
        if self.axes_dims.iter().any(|d| d % 2 != 0) {
            return Err("every axes_dims entry must be even (rotary pairs)".into());
        }
        Ok(())
    }
}
