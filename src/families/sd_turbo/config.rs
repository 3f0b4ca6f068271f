//! `unet/config.json` of diffusers' `UNet2DConditionModel` as SD 2.x and SDXL write it, with
//! diffusers' defaults, resolved once into the per-block [`UNetPlan`] the model is built from;
//! options we do not implement are refused by name.

use serde::Deserialize;

/// A config value given once for all blocks or once per block.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// One value per block (`n` blocks), or an error naming `field`.
    fn expand(&self, n: usize, field: &str) -> Result<Vec<T>, String> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Many(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Many(v) => Err(format!(
                "{field} has {} entries but there are {n} down blocks",
                v.len()
            )),
        }
    }
}

/// `unet/config.json` (unknown fields ignored, diffusers' defaults). Options we do not implement
/// are kept as raw JSON so `validate` can name them.
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "d_4")]
    pub in_channels: usize,
    #[serde(default = "d_4")]
    pub out_channels: usize,
    #[serde(default, deserialize_with = "null_is_default")]
    pub center_input_sample: bool,
    #[serde(default = "d_true", deserialize_with = "null_is_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_mid")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_false_json")]
    pub only_cross_attention: serde_json::Value,
    #[serde(default = "d_boc")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_layers")]
    pub layers_per_block: PerBlock<usize>,
    #[serde(default = "d_1usize")]
    pub downsample_padding: usize,
    #[serde(default = "d_1f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_cross")]
    pub cross_attention_dim: PerBlock<usize>,
    #[serde(default = "d_tlpb")]
    pub transformer_layers_per_block: PerBlock<usize>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default, deserialize_with = "null_is_default")]
    pub dual_cross_attention: bool,
    #[serde(default, deserialize_with = "null_is_default")]
    pub use_linear_projection: bool,
    #[serde(default, deserialize_with = "null_is_default")]
    pub upcast_attention: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default, deserialize_with = "null_is_default")]
    pub resnet_skip_time_act: bool,
    #[serde(default = "d_1f")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "d_3")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_3")]
    pub conv_out_kernel: usize,
    #[serde(default = "d_default")]
    pub attention_type: String,
    #[serde(default, deserialize_with = "null_is_default")]
    pub class_embeddings_concat: bool,
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
}

/// diffusers writes `null` for some booleans (e.g. SDXL's `upcast_attention`): null means the
/// default.
fn null_is_default<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}
fn null_is_true<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(true))
}

fn d_4() -> usize {
    4
}
fn d_3() -> usize {
    3
}
fn d_true() -> bool {
    true
}
fn d_false_json() -> serde_json::Value {
    serde_json::Value::Bool(false)
}
fn d_down() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_up() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_boc() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_layers() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn d_1usize() -> usize {
    1
}
fn d_1f() -> f64 {
    1.0
}
fn d_silu() -> String {
    "silu".into()
}
fn d_groups() -> Option<usize> {
    Some(32)
}
fn d_eps() -> f64 {
    1e-5
}
fn d_cross() -> PerBlock<usize> {
    PerBlock::One(1280)
}
fn d_tlpb() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn d_head_dim() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn d_default() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}

/// The per-block numbers the model is built from, resolved from the config once.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetPlan {
    pub channels: Vec<usize>,
    /// Down block i has cross-attention.
    pub down_attn: Vec<bool>,
    /// Up block i (in up order) has cross-attention.
    pub up_attn: Vec<bool>,
    pub layers: Vec<usize>,
    pub heads: Vec<usize>,
    pub transformer_layers: Vec<usize>,
    pub cross_dim: Vec<usize>,
    pub groups: usize,
    /// SDXL's `text_time` conditioning: (time-id embedding width, input width of `add_embedding`).
    pub text_time: Option<(usize, usize)>,
}

impl UNetPlan {
    pub fn time_embed_dim(&self) -> usize {
        self.channels[0] * 4
    }

    /// Pixels per latent cell lost by the down path (2 per downsampler).
    pub fn downscale(&self) -> usize {
        1 << (self.channels.len().saturating_sub(1))
    }
}

impl UNetConfig {
    /// Resolves the config into per-block numbers, rejecting every option this UNet does not
    /// implement (the message names the field).
    pub fn plan(&self) -> Result<UNetPlan, String> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err("block_out_channels must not be empty".into());
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(format!(
                "down_block_types ({}) and up_block_types ({}) must have one entry per block_out_channels entry ({n})",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        let down_attn = self
            .down_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnDownBlock2D" => Ok(true),
                "DownBlock2D" => Ok(false),
                other => Err(format!(
                    "down block type `{other}` is not supported (CrossAttnDownBlock2D, DownBlock2D)"
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let up_attn = self
            .up_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnUpBlock2D" => Ok(true),
                "UpBlock2D" => Ok(false),
                other => Err(format!(
                    "up block type `{other}` is not supported (CrossAttnUpBlock2D, UpBlock2D)"
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            other => {
                return Err(format!(
                    "mid_block_type {other:?} is not supported (UNetMidBlock2DCrossAttn)"
                ))
            }
        }
        if self.only_cross_attention != serde_json::Value::Bool(false) {
            return Err("only_cross_attention is not supported".into());
        }
        let unsupported: [(bool, &str); 13] = [
            (self.dual_cross_attention, "dual_cross_attention"),
            (self.class_embed_type.is_some(), "class_embed_type"),
            (self.num_class_embeds.is_some(), "num_class_embeds"),
            (
                self.resnet_time_scale_shift != "default",
                "resnet_time_scale_shift",
            ),
            (self.resnet_skip_time_act, "resnet_skip_time_act"),
            (
                self.time_embedding_type != "positional",
                "time_embedding_type",
            ),
            (self.time_embedding_dim.is_some(), "time_embedding_dim"),
            (
                self.time_embedding_act_fn.is_some(),
                "time_embedding_act_fn",
            ),
            (self.timestep_post_act.is_some(), "timestep_post_act"),
            (self.time_cond_proj_dim.is_some(), "time_cond_proj_dim"),
            (self.attention_type != "default", "attention_type"),
            (self.cross_attention_norm.is_some(), "cross_attention_norm"),
            (
                self.encoder_hid_dim.is_some() || self.encoder_hid_dim_type.is_some(),
                "encoder_hid_dim",
            ),
        ];
        if let Some((_, name)) = unsupported.iter().find(|(on, _)| *on) {
            return Err(format!(
                "`{name}` is set; this UNet option is not supported"
            ));
        }
        if self.reverse_transformer_layers_per_block.is_some() {
            return Err("reverse_transformer_layers_per_block is not supported".into());
        }
        if self.act_fn != "silu" && self.act_fn != "swish" {
            return Err(format!("act_fn `{}` is not supported (silu)", self.act_fn));
        }
        if self.conv_in_kernel != 3 || self.conv_out_kernel != 3 {
            return Err("conv_in_kernel and conv_out_kernel must be 3".into());
        }
        if self.downsample_padding > 1 {
            return Err(format!(
                "downsample_padding {} is not supported (0, 1)",
                self.downsample_padding
            ));
        }
        let groups = self
            .norm_num_groups
            .ok_or("norm_num_groups null is not supported")?;
        let layers = self.layers_per_block.expand(n, "layers_per_block")?;
        let heads = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .expand(n, "attention_head_dim")?;
        let transformer_layers = self
            .transformer_layers_per_block
            .expand(n, "transformer_layers_per_block")?;
        let cross_dim = self.cross_attention_dim.expand(n, "cross_attention_dim")?;
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if groups == 0 || c % groups != 0 {
                return Err(format!(
                    "block_out_channels[{i}] = {c} is not a multiple of norm_num_groups {groups}"
                ));
            }
            if heads[i] == 0 || c % heads[i] != 0 {
                return Err(format!(
                    "block_out_channels[{i}] = {c} is not a multiple of its head count {}",
                    heads[i]
                ));
            }
            if layers[i] == 0 {
                return Err(format!("layers_per_block[{i}] must be positive"));
            }
        }
        let text_time = match self.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => {
                let t = self
                    .addition_time_embed_dim
                    .ok_or("addition_embed_type text_time needs addition_time_embed_dim")?;
                let p = self.projection_class_embeddings_input_dim.ok_or(
                    "addition_embed_type text_time needs projection_class_embeddings_input_dim",
                )?;
                if p < 6 * t {
                    return Err(format!(
                        "projection_class_embeddings_input_dim {p} is smaller than the 6 time ids × {t}"
                    ));
                }
                Some((t, p))
            }
            Some(other) => {
                return Err(format!(
                    "addition_embed_type `{other}` is not supported (text_time)"
                ))
            }
        };
        Ok(UNetPlan {
            channels: self.block_out_channels.clone(),
            down_attn,
            up_attn,
            layers,
            heads,
            transformer_layers,
            cross_dim,
            groups,
            text_time,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_block_values_expand() {
        assert_eq!(PerBlock::One(2).expand(3, "x").unwrap(), vec![2, 2, 2]);
        assert!(PerBlock::Many(vec![1, 2]).expand(3, "x").is_err());
    }
}
