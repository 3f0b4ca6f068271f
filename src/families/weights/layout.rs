//! What a weight file is, told from its tensor names alone (never from `general.architecture`:
//! files in the wild differ), and how its names map onto the ones our models load — diffusers'
//! for the DiT and the VAE, transformers' for Qwen3. The maps are the inverses of what diffusers'
//! single-file loaders (`convert_z_image_transformer_checkpoint_to_diffusers`,
//! `convert_ldm_vae_checkpoint`) and llama.cpp's `convert_hf_to_gguf.py` do.

/// Which component a file is meant to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Transformer,
    TextEncoder,
    Vae,
}

impl Role {
    /// The CLI flag that takes such a file.
    pub fn flag(self) -> &'static str {
        match self {
            Self::Transformer => "--transformer",
            Self::TextEncoder => "--text-encoder",
            Self::Vae => "--vae",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::Transformer => "a Z-Image transformer (DiT)",
            Self::TextEncoder => "a Qwen3 text encoder",
            Self::Vae => "an AutoencoderKL VAE",
        }
    }
}

/// How a file names its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// diffusers `ZImageTransformer2DModel`.
    DiffusersDit,
    /// The original / ComfyUI names: fused `attention.qkv`, `attention.out`, `q_norm`/`k_norm`,
    /// `x_embedder`, `final_layer` (ComfyUI-GGUF files use them too).
    ComfyDit,
    /// transformers Qwen3 (`model.layers.N.self_attn.q_proj` …, with or without `model.`).
    HfQwen3,
    /// llama.cpp `qwen3` GGUF names (`token_embd`, `blk.N.attn_q` …).
    LlamaCppQwen3,
    /// diffusers `AutoencoderKL`.
    DiffusersVae,
    /// The original ldm / Flux names of `ae.safetensors` (`decoder.up.N.block.M`, `mid.attn_1` …).
    LdmVae,
}

impl Layout {
    pub fn role(self) -> Role {
        match self {
            Self::DiffusersDit | Self::ComfyDit => Role::Transformer,
            Self::HfQwen3 | Self::LlamaCppQwen3 => Role::TextEncoder,
            Self::DiffusersVae | Self::LdmVae => Role::Vae,
        }
    }

    /// For listings and logs.
    pub fn label(self) -> &'static str {
        match self {
            Self::DiffusersDit => "diffusers transformer",
            Self::ComfyDit => "ComfyUI transformer",
            Self::HfQwen3 => "transformers Qwen3",
            Self::LlamaCppQwen3 => "llama.cpp Qwen3",
            Self::DiffusersVae => "diffusers VAE",
            Self::LdmVae => "ldm/Flux VAE",
        }
    }
}

/// What the names say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detected {
    /// One of ours, with the prefix every tensor carries (`model.diffusion_model.` …).
    Known {
        layout: Layout,
        prefix: String,
    },
    /// A model of another kind, and a tensor that shows it.
    Foreign {
        what: &'static str,
        tensor: String,
    },
    Unknown,
}

const DIT_PREFIXES: &[&str] = &["model.diffusion_model.", "diffusion_model.", "transformer."];
const VAE_PREFIXES: &[&str] = &["first_stage_model.", "vae."];

fn strip<'a>(name: &'a str, prefixes: &'static [&'static str]) -> (&'a str, &'static str) {
    for p in prefixes {
        if let Some(rest) = name.strip_prefix(p) {
            return (rest, p);
        }
    }
    (name, "")
}

fn known(layout: Layout, prefix: &str) -> Detected {
    Detected::Known {
        layout,
        prefix: prefix.to_string(),
    }
}

fn find<'a, I>(names: &I, pred: impl Fn(&str) -> bool) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a str> + Clone,
{
    names.clone().into_iter().find(|n| pred(n))
}

fn detect_dit<'a, I: IntoIterator<Item = &'a str> + Clone>(names: &I) -> Option<Detected> {
    if let Some(n) = find(names, |n| {
        let (s, _) = strip(n, DIT_PREFIXES);
        s.ends_with(".attention.qkv.weight")
            && (s.starts_with("layers.") || s.starts_with("noise_refiner."))
    }) {
        let prefix = strip(n, DIT_PREFIXES).1;
        if find(names, |m| m == format!("{prefix}cap_embedder.1.weight")).is_some() {
            return Some(known(Layout::ComfyDit, prefix));
        }
    }
    find(names, |n| {
        let (s, _) = strip(n, DIT_PREFIXES);
        s.starts_with("all_x_embedder.") || s.starts_with("noise_refiner.0.attention.to_q.")
    })
    .map(|n| known(Layout::DiffusersDit, strip(n, DIT_PREFIXES).1))
}

fn detect_qwen3<'a, I: IntoIterator<Item = &'a str> + Clone>(names: &I) -> Option<Detected> {
    if find(names, |n| {
        n.starts_with("blk.") && n.contains(".attn_q_norm.")
    })
    .is_some()
    {
        return Some(known(Layout::LlamaCppQwen3, ""));
    }
    find(names, |n| {
        (n.starts_with("model.layers.") || n.starts_with("layers."))
            && n.ends_with(".self_attn.q_norm.weight")
    })
    .map(|_| known(Layout::HfQwen3, ""))
}

fn detect_vae<'a, I: IntoIterator<Item = &'a str> + Clone>(names: &I) -> Option<Detected> {
    if let Some(n) = find(names, |n| {
        let (s, _) = strip(n, VAE_PREFIXES);
        s.starts_with("decoder.mid.block_1.") || s.starts_with("decoder.up.0.block.")
    }) {
        return Some(known(Layout::LdmVae, strip(n, VAE_PREFIXES).1));
    }
    find(names, |n| {
        let (s, _) = strip(n, VAE_PREFIXES);
        s.starts_with("decoder.mid_block.") || s.starts_with("decoder.up_blocks.")
    })
    .map(|n| known(Layout::DiffusersVae, strip(n, VAE_PREFIXES).1))
}

/// Tells what a file meant to be `role` holds, looking for that role's layouts first (a
/// checkpoint bundling several components is read for the one asked for).
pub fn detect_as<'a, I>(role: Role, names: I) -> Detected
where
    I: IntoIterator<Item = &'a str> + Clone,
{
    let first = match role {
        Role::Transformer => detect_dit(&names),
        Role::TextEncoder => detect_qwen3(&names),
        Role::Vae => detect_vae(&names),
    };
    first.unwrap_or_else(|| detect(names))
}

/// Tells what a file holds from its tensor names.
pub fn detect<'a, I>(names: I) -> Detected
where
    I: IntoIterator<Item = &'a str> + Clone,
{
    if let Some(d) = detect_dit(&names)
        .or_else(|| detect_qwen3(&names))
        .or_else(|| detect_vae(&names))
    {
        return d;
    }
    // Other models people keep next to these files.
    type Test<'t> = &'t dyn Fn(&str) -> bool;
    let foreign: &[(&str, Test)] = &[
        ("a Flux transformer", &|n| {
            strip(n, DIT_PREFIXES).0.starts_with("double_blocks.")
        }),
        ("a Stable Diffusion UNet (ldm names)", &|n| {
            strip(n, DIT_PREFIXES).0.starts_with("input_blocks.")
        }),
        ("a diffusers UNet", &|n| {
            n.starts_with("down_blocks.") && n.contains(".resnets.")
        }),
        ("a diffusers transformer of another family", &|n| {
            strip(n, DIT_PREFIXES).0.starts_with("transformer_blocks.")
        }),
        ("a CLIP text encoder", &|n| {
            n.contains("text_model.encoder.layers.")
        }),
        ("a T5 text encoder", &|n| {
            n.contains("encoder.block.0.layer.")
        }),
        (
            "a llama.cpp language model that is not Qwen3 (no q/k norms)",
            &|n| n.starts_with("blk.") && n.contains(".attn_q."),
        ),
        (
            "a transformers language model that is not Qwen3 (no q/k norms)",
            &|n| n.contains("layers.0.self_attn.q_proj."),
        ),
        (
            "a Lumina/NextDiT transformer without Z-Image's caption embedder",
            &|n| strip(n, DIT_PREFIXES).0.ends_with(".attention.qkv.weight"),
        ),
    ];
    for (what, pred) in foreign {
        if let Some(n) = find(&names, pred) {
            return Detected::Foreign {
                what,
                tensor: n.to_string(),
            };
        }
    }
    Detected::Unknown
}

/// Where a canonical tensor comes from in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    /// The name our models load.
    pub name: String,
    /// A block of rows of the stored tensor: (part, parts) — part `i` of `parts` equal slices.
    pub rows: Option<(usize, usize)>,
    /// The stored tensor is a 1×1 convolution `[c, c, 1, 1]` loaded as a matrix `[c, c]`.
    pub squeeze_conv: bool,
}

impl Mapped {
    fn plain(name: String) -> Self {
        Self {
            name,
            rows: None,
            squeeze_conv: false,
        }
    }
}

/// Stored tensors a layout carries that no model of ours loads (fp8 scales are read with their
/// weights).
pub fn ignored(layout: Layout, name: &str) -> bool {
    let fp8_side = name == "scaled_fp8"
        || name.ends_with(".scale_weight")
        || name.ends_with(".scale_input")
        || name.ends_with(".weight_scale")
        || name.ends_with(".input_scale")
        || name.ends_with(".comfy_quant");
    fp8_side
        || match layout {
            Layout::ComfyDit | Layout::DiffusersDit => name == "norm_final.weight",
            Layout::LlamaCppQwen3 => name == "output.weight" || name == "rope_freqs.weight",
            Layout::HfQwen3 => name.starts_with("lm_head."),
            Layout::DiffusersVae | Layout::LdmVae => false,
        }
}

/// Maps one stored name (prefix already stripped) to the canonical tensors it provides.
/// `vae_up_blocks` is the number of decoder up blocks (ldm numbers them in reverse).
pub fn map_name(layout: Layout, name: &str, vae_up_blocks: usize) -> Vec<Mapped> {
    match layout {
        Layout::DiffusersDit | Layout::DiffusersVae => vec![Mapped::plain(name.to_string())],
        Layout::ComfyDit => {
            if let Some(base) = name.strip_suffix(".attention.qkv.weight") {
                return ["to_q", "to_k", "to_v"]
                    .iter()
                    .enumerate()
                    .map(|(i, p)| Mapped {
                        name: format!("{base}.attention.{p}.weight"),
                        rows: Some((i, 3)),
                        squeeze_conv: false,
                    })
                    .collect();
            }
            let mut n = name.to_string();
            if let Some(rest) = n.strip_prefix("final_layer.") {
                n = format!("all_final_layer.2-1.{rest}");
            } else if let Some(rest) = n.strip_prefix("x_embedder.") {
                n = format!("all_x_embedder.2-1.{rest}");
            }
            for (a, b) in [
                (".attention.out.", ".attention.to_out.0."),
                (".attention.k_norm.", ".attention.norm_k."),
                (".attention.q_norm.", ".attention.norm_q."),
            ] {
                n = n.replace(a, b);
            }
            vec![Mapped::plain(n)]
        }
        Layout::HfQwen3 => {
            let n = if name.starts_with("model.") {
                name.to_string()
            } else {
                format!("model.{name}")
            };
            vec![Mapped::plain(n)]
        }
        Layout::LlamaCppQwen3 => match llama_to_hf(name) {
            Some(n) => vec![Mapped::plain(n)],
            None => vec![Mapped::plain(name.to_string())],
        },
        Layout::LdmVae => {
            let (n, squeeze) = ldm_to_diffusers(name, vae_up_blocks);
            vec![Mapped {
                name: n,
                rows: None,
                squeeze_conv: squeeze,
            }]
        }
    }
}

const LLAMA_LAYER: &[(&str, &str)] = &[
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("attn_q_norm.weight", "self_attn.q_norm.weight"),
    ("attn_k_norm.weight", "self_attn.k_norm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

fn llama_to_hf(name: &str) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (i, tail) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let (_, hf) = LLAMA_LAYER.iter().find(|(l, _)| *l == tail)?;
    Some(format!("model.layers.{i}.{hf}"))
}

fn hf_to_llama(name: &str) -> Option<String> {
    match name {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (i, tail) = rest.split_once('.')?;
    let (l, _) = LLAMA_LAYER.iter().find(|(_, h)| *h == tail)?;
    Some(format!("blk.{i}.{l}"))
}

/// ldm → diffusers VAE names; the bool says a 1×1 convolution becomes a linear weight.
fn ldm_to_diffusers(name: &str, up_blocks: usize) -> (String, bool) {
    let mut n = name.to_string();
    let attn = n.contains(".mid.attn_1.");
    for (a, b) in [
        (".mid.block_1.", ".mid_block.resnets.0."),
        (".mid.block_2.", ".mid_block.resnets.1."),
        (".mid.attn_1.norm.", ".mid_block.attentions.0.group_norm."),
        (".mid.attn_1.q.", ".mid_block.attentions.0.to_q."),
        (".mid.attn_1.k.", ".mid_block.attentions.0.to_k."),
        (".mid.attn_1.v.", ".mid_block.attentions.0.to_v."),
        (".mid.attn_1.proj_out.", ".mid_block.attentions.0.to_out.0."),
        (".norm_out.", ".conv_norm_out."),
        (".nin_shortcut.", ".conv_shortcut."),
    ] {
        n = n.replace(a, b);
    }
    let block = |rest: &str, sampler: (&str, &str)| {
        rest.replacen("block.", "resnets.", 1)
            .replacen(sampler.0, sampler.1, 1)
    };
    if let Some(rest) = n.strip_prefix("encoder.down.") {
        if let Some((i, tail)) = rest.split_once('.') {
            n = format!(
                "encoder.down_blocks.{i}.{}",
                block(tail, ("downsample.", "downsamplers.0."))
            );
        }
    } else if let Some(rest) = n.strip_prefix("decoder.up.") {
        if let Some((i, tail)) = rest.split_once('.') {
            if let Ok(i) = i.parse::<usize>() {
                let j = up_blocks.saturating_sub(1).saturating_sub(i);
                n = format!(
                    "decoder.up_blocks.{j}.{}",
                    block(tail, ("upsample.", "upsamplers.0."))
                );
            }
        }
    }
    let squeeze = attn && n.ends_with(".weight") && !n.contains("group_norm");
    (n, squeeze)
}

fn diffusers_to_ldm(name: &str, up_blocks: usize) -> String {
    let mut n = name.to_string();
    for (a, b) in [
        (".mid_block.resnets.0.", ".mid.block_1."),
        (".mid_block.resnets.1.", ".mid.block_2."),
        (".mid_block.attentions.0.group_norm.", ".mid.attn_1.norm."),
        (".mid_block.attentions.0.to_q.", ".mid.attn_1.q."),
        (".mid_block.attentions.0.to_k.", ".mid.attn_1.k."),
        (".mid_block.attentions.0.to_v.", ".mid.attn_1.v."),
        (".mid_block.attentions.0.to_out.0.", ".mid.attn_1.proj_out."),
        (".conv_norm_out.", ".norm_out."),
        (".conv_shortcut.", ".nin_shortcut."),
    ] {
        n = n.replace(a, b);
    }
    if let Some(rest) = n.strip_prefix("encoder.down_blocks.") {
        if let Some((i, tail)) = rest.split_once('.') {
            let tail = tail.replacen("resnets.", "block.", 1).replacen(
                "downsamplers.0.",
                "downsample.",
                1,
            );
            n = format!("encoder.down.{i}.{tail}");
        }
    } else if let Some(rest) = n.strip_prefix("decoder.up_blocks.") {
        if let Some((i, tail)) = rest.split_once('.') {
            if let Ok(i) = i.parse::<usize>() {
                let tail = tail.replacen("resnets.", "block.", 1).replacen(
                    "upsamplers.0.",
                    "upsample.",
                    1,
                );
                n = format!(
                    "decoder.up.{}.{tail}",
                    up_blocks.saturating_sub(1).saturating_sub(i)
                );
            }
        }
    }
    n
}

/// The name a canonical tensor has in a file of `layout` (for messages about missing tensors).
pub fn stored_name(layout: Layout, prefix: &str, canonical: &str, vae_up_blocks: usize) -> String {
    let inner = match layout {
        Layout::DiffusersDit | Layout::DiffusersVae => canonical.to_string(),
        Layout::ComfyDit => comfy_name(canonical),
        Layout::HfQwen3 => canonical.to_string(),
        Layout::LlamaCppQwen3 => hf_to_llama(canonical).unwrap_or_else(|| canonical.to_string()),
        Layout::LdmVae => diffusers_to_ldm(canonical, vae_up_blocks),
    };
    format!("{prefix}{inner}")
}

/// diffusers Z-Image DiT name → ComfyUI name (what `zturbo quantize` writes).
pub fn comfy_name(canonical: &str) -> String {
    let mut n = canonical.to_string();
    for (a, b) in [
        (".attention.to_q.weight", ".attention.qkv.weight"),
        (".attention.to_k.weight", ".attention.qkv.weight"),
        (".attention.to_v.weight", ".attention.qkv.weight"),
        (".attention.to_out.0.", ".attention.out."),
        (".attention.norm_k.", ".attention.k_norm."),
        (".attention.norm_q.", ".attention.q_norm."),
    ] {
        n = n.replace(a, b);
    }
    if let Some(rest) = n.strip_prefix("all_final_layer.2-1.") {
        n = format!("final_layer.{rest}");
    } else if let Some(rest) = n.strip_prefix("all_x_embedder.2-1.") {
        n = format!("x_embedder.{rest}");
    }
    n
}

/// transformers Qwen3 name → llama.cpp name (what `zturbo quantize` writes), `None` for tensors
/// llama.cpp files do not carry.
pub fn llama_cpp_name(canonical: &str) -> Option<String> {
    let with_model = if canonical.starts_with("model.") {
        canonical.to_string()
    } else {
        format!("model.{canonical}")
    };
    hf_to_llama(&with_model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_each_layout_and_prefix() {
        let comfy = [
            "model.diffusion_model.layers.0.attention.qkv.weight",
            "model.diffusion_model.cap_embedder.1.weight",
        ];
        assert_eq!(
            detect(comfy.iter().copied()),
            Detected::Known {
                layout: Layout::ComfyDit,
                prefix: "model.diffusion_model.".into()
            }
        );
        let gguf = ["blk.0.attn_q_norm.weight", "token_embd.weight"];
        assert!(matches!(
            detect(gguf.iter().copied()),
            Detected::Known {
                layout: Layout::LlamaCppQwen3,
                ..
            }
        ));
        let ae = ["decoder.mid.block_1.conv1.weight", "encoder.conv_in.weight"];
        assert!(matches!(
            detect(ae.iter().copied()),
            Detected::Known {
                layout: Layout::LdmVae,
                ..
            }
        ));
        let flux = ["double_blocks.0.img_attn.qkv.weight"];
        assert!(matches!(
            detect(flux.iter().copied()),
            Detected::Foreign {
                what: "a Flux transformer",
                ..
            }
        ));
    }

    #[test]
    fn names_round_trip() {
        // diffusers' conversion (single_file_utils.py) applied to the ComfyUI names.
        assert_eq!(
            map_name(Layout::ComfyDit, "final_layer.adaLN_modulation.1.weight", 0)[0].name,
            "all_final_layer.2-1.adaLN_modulation.1.weight"
        );
        let qkv = map_name(Layout::ComfyDit, "layers.3.attention.qkv.weight", 0);
        assert_eq!(qkv.len(), 3);
        assert_eq!(qkv[1].name, "layers.3.attention.to_k.weight");
        assert_eq!(qkv[1].rows, Some((1, 3)));
        for n in [
            "layers.3.attention.to_out.0.weight",
            "noise_refiner.0.attention.norm_q.weight",
            "all_x_embedder.2-1.bias",
        ] {
            assert_eq!(map_name(Layout::ComfyDit, &comfy_name(n), 0)[0].name, n);
        }
        for n in [
            "model.layers.7.mlp.down_proj.weight",
            "model.layers.0.self_attn.k_norm.weight",
            "model.embed_tokens.weight",
        ] {
            let l = llama_cpp_name(n).unwrap();
            assert_eq!(map_name(Layout::LlamaCppQwen3, &l, 0)[0].name, n);
        }
        for n in [
            "decoder.up_blocks.0.resnets.2.conv_shortcut.weight",
            "decoder.up_blocks.3.upsamplers.0.conv.bias",
            "decoder.mid_block.attentions.0.to_out.0.weight",
            "encoder.down_blocks.1.downsamplers.0.conv.weight",
            "decoder.conv_norm_out.weight",
        ] {
            let l = diffusers_to_ldm(n, 4);
            assert_eq!(ldm_to_diffusers(&l, 4).0, n, "{l}");
        }
        assert_eq!(
            diffusers_to_ldm("decoder.up_blocks.0.resnets.1.conv1.weight", 4),
            "decoder.up.3.block.1.conv1.weight"
        );
    }
}
