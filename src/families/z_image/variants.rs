//! Quantized variants of catalog models: where `zturbo pull NAME --variant V` fetches them (the
//! GGUF repositories people already use), how big they are, the smallest GPU each fits —
//! computed by the planner from the real model's tensor shapes — and which of them are on disk.

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::DType;

use crate::families::weights::quantize::type_for_canonical;
use crate::families::weights::{self, DownloadProgress, Role};
use crate::families::{ComponentFiles, ModelError};
use crate::memory::planner::{self, ComponentBytes, MemoryMode, PlanInput};

/// One downloadable variant of a catalog model.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Variant {
    /// `q8_0`, `q4_k_m` … (what `--variant` takes; matched case-insensitively in file names).
    pub name: &'static str,
    /// The hub repository of the transformer GGUF files.
    pub transformer_repo: &'static str,
    /// The hub repository of the text encoder GGUF files.
    pub text_encoder_repo: &'static str,
    /// The text encoder's quantization in that repository (`q8_0`, `q4_k_m` …).
    pub text_encoder_quant: &'static str,
    /// The block type of most of the transformer's matrices (for the size estimate).
    #[serde(skip)]
    pub main_type: GgmlDType,
    #[serde(skip)]
    pub text_encoder_type: GgmlDType,
}

/// Where the Z-Image-Turbo GGUF files come from: jayn7's conversions (the ones ComfyUI-GGUF's
/// issue tracker points to; ComfyUI names, `lumina2`) and unsloth's Qwen3-4B quantizations
/// (llama.cpp names). stable-diffusion.cpp's author publishes the same kind of files at
/// `leejet/Z-Image-Turbo-GGUF`; any of them also works with `--transformer`.
pub const Z_IMAGE_DIT_REPO: &str = "jayn7/Z-Image-Turbo-GGUF";
pub const QWEN3_4B_REPO: &str = "unsloth/Qwen3-4B-GGUF";

pub const Z_IMAGE_TURBO_VARIANTS: &[Variant] = &[
    Variant {
        name: "q8_0",
        transformer_repo: Z_IMAGE_DIT_REPO,
        text_encoder_repo: QWEN3_4B_REPO,
        text_encoder_quant: "q8_0",
        main_type: GgmlDType::Q8_0,
        text_encoder_type: GgmlDType::Q8_0,
    },
    Variant {
        name: "q6_k",
        transformer_repo: Z_IMAGE_DIT_REPO,
        text_encoder_repo: QWEN3_4B_REPO,
        text_encoder_quant: "q6_k",
        main_type: GgmlDType::Q6K,
        text_encoder_type: GgmlDType::Q6K,
    },
    Variant {
        name: "q5_k_m",
        transformer_repo: Z_IMAGE_DIT_REPO,
        text_encoder_repo: QWEN3_4B_REPO,
        text_encoder_quant: "q5_k_m",
        main_type: GgmlDType::Q5K,
        text_encoder_type: GgmlDType::Q5K,
    },
    Variant {
        name: "q4_k_m",
        transformer_repo: Z_IMAGE_DIT_REPO,
        text_encoder_repo: QWEN3_4B_REPO,
        text_encoder_quant: "q4_k_m",
        main_type: GgmlDType::Q4K,
        text_encoder_type: GgmlDType::Q4K,
    },
    Variant {
        name: "q3_k_m",
        transformer_repo: Z_IMAGE_DIT_REPO,
        text_encoder_repo: QWEN3_4B_REPO,
        // Below 4 bits the text encoder's embeddings degrade first; keep it at Q4_K_M.
        text_encoder_quant: "q4_k_m",
        main_type: GgmlDType::Q3K,
        text_encoder_type: GgmlDType::Q4K,
    },
];

/// The variants of a catalog model (only Z-Image-Turbo has GGUF variants).
pub fn of(model: &str) -> &'static [Variant] {
    if model.eq_ignore_ascii_case("z-image-turbo")
        || model.eq_ignore_ascii_case("Tongyi-MAI/Z-Image-Turbo")
    {
        Z_IMAGE_TURBO_VARIANTS
    } else {
        &[]
    }
}

pub fn find(model: &str, variant: &str) -> Result<&'static Variant, ModelError> {
    of(model)
        .iter()
        .find(|v| v.name.eq_ignore_ascii_case(variant))
        .ok_or_else(|| {
            let known: Vec<&str> = of(model).iter().map(|v| v.name).collect();
            ModelError::Invalid(if known.is_empty() {
                format!("`{model}` has no quantized variants")
            } else {
                format!(
                    "unknown variant `{variant}` of {model} (known: {})",
                    known.join(", ")
                )
            })
        })
}

/// Whether a repository file is the GGUF of `quant` (`z_image_turbo-Q4_K_M.gguf`,
/// `Qwen3-4B-Q8_0.gguf` …): the quant name as a separate token of the file name.
pub fn file_matches(file: &str, quant: &str) -> bool {
    let name = file.rsplit('/').next().unwrap_or(file).to_ascii_lowercase();
    let Some(stem) = name.strip_suffix(".gguf") else {
        return false;
    };
    let q = quant.to_ascii_lowercase();
    stem.match_indices(&q).any(|(i, _)| {
        let before = stem[..i].chars().last();
        let after = stem[i + q.len()..].chars().next();
        before.is_none_or(|c| !c.is_ascii_alphanumeric())
            && after.is_none_or(|c| !c.is_ascii_alphanumeric() && c != '_')
    })
}

/// The shortest matching GGUF file name among a repository's files.
pub fn pick_file<'a>(files: &'a [String], quant: &str) -> Option<&'a String> {
    files
        .iter()
        .filter(|f| file_matches(f, quant))
        .min_by_key(|f| f.len())
}

/// What a pulled variant is made of.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub configs: PathBuf,
    pub files: ComponentFiles,
}

/// `zturbo pull z-image-turbo --variant V`: the model's configs, tokenizer and VAE from its own
/// repository, the transformer and text encoder GGUF files from the variant's repositories.
pub fn pull(
    repo: &str,
    variant: &Variant,
    progress: &mut dyn DownloadProgress,
) -> Result<Pulled, ModelError> {
    let names = weights::repo_files(repo)?;
    let mut wanted: Vec<String> = weights::select_files(&names)
        .into_iter()
        .filter(|f| !f.ends_with(".safetensors") && !f.ends_with(".safetensors.index.json"))
        .collect();
    // The VAE is small: take its weights from the model's own repository.
    wanted.extend(
        weights::select_files(&names)
            .into_iter()
            .filter(|f| f.starts_with("vae/") && f.ends_with(".safetensors")),
    );
    let paths = weights::pull_files(repo, &wanted, progress)?;
    let configs = wanted
        .iter()
        .zip(&paths)
        .find(|(f, _)| *f == "model_index.json")
        .and_then(|(_, p)| p.parent().map(Path::to_path_buf))
        .ok_or_else(|| ModelError::Download(format!("{repo}: model_index.json was not fetched")))?;
    let mut one = |repo: &str, quant: &str| -> Result<PathBuf, ModelError> {
        let files = weights::repo_files(repo)?;
        let file = pick_file(&files, quant).ok_or_else(|| {
            let ggufs: Vec<&str> = files
                .iter()
                .filter(|f| f.ends_with(".gguf"))
                .map(String::as_str)
                .collect();
            ModelError::Download(format!(
                "{repo} has no {quant} GGUF file (it has: {})",
                ggufs.join(", ")
            ))
        })?;
        let mut p = weights::pull_files(repo, std::slice::from_ref(file), progress)?;
        p.pop()
            .ok_or_else(|| ModelError::Download(format!("{repo}/{file} was not fetched")))
    };
    let transformer = one(variant.transformer_repo, variant.name)?;
    let text_encoder = one(variant.text_encoder_repo, variant.text_encoder_quant)?;
    Ok(Pulled {
        configs,
        files: ComponentFiles {
            transformer: Some(transformer),
            text_encoder: Some(text_encoder),
            vae: None,
        },
    })
}

/// A file of `repo` in the Hugging Face cache whose name matches `quant`, without the network.
fn cached_gguf(repo: &str, quant: &str) -> Option<PathBuf> {
    let cache = hf_hub::Cache::from_env();
    let folder = cache
        .path()
        .join(format!("models--{}", repo.replace('/', "--")))
        .join("snapshots");
    let mut found: Vec<PathBuf> = std::fs::read_dir(folder)
        .ok()?
        .flatten()
        .flat_map(|snap| {
            std::fs::read_dir(snap.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .is_some_and(|n| file_matches(&n.to_string_lossy(), quant))
        })
        .collect();
    found.sort_by_key(|p| p.as_os_str().len());
    found.into_iter().next()
}

/// The variants of `model` whose files are all on disk (configs folder from `configs`).
pub fn local(model: &str) -> Vec<(&'static Variant, ComponentFiles)> {
    of(model)
        .iter()
        .filter_map(|v| {
            let t = cached_gguf(v.transformer_repo, v.name)?;
            let te = cached_gguf(v.text_encoder_repo, v.text_encoder_quant)?;
            Some((
                v,
                ComponentFiles {
                    transformer: Some(t),
                    text_encoder: Some(te),
                    vae: None,
                },
            ))
        })
        .collect()
}

/// Stored bytes of the real Z-Image-Turbo with its transformer and text encoder quantized as
/// `variant` (`None`: the bf16 release), in the layout the planner needs. The tensor shapes are
/// the real model's (from our own module definitions), the types what the files use for each
/// tensor (F32 for 1-D, embedders and final layer, the variant's type for matrices).
pub fn z_image_turbo_bytes(variant: Option<&Variant>) -> Result<ComponentBytes, ModelError> {
    use super::blocks::ResidentBlocks;
    use super::config::DitConfig;
    use super::dit::{Dit, DitPrecision};
    use super::synthetic::SyntheticShape;
    use super::text_encoder::TextEncoder;
    let shape = SyntheticShape::real();
    let record = |f: &dyn Fn(weights::Loader) -> candle_core::Result<()>| {
        let rec = weights::Recording::default();
        let _ = f(rec.loader(DType::F32));
        rec.tensors()
    };
    let dit_cfg: DitConfig = serde_json::from_value(shape.dit.clone())
        .map_err(|e| ModelError::Invalid(format!("the real DiT shape: {e}")))?;
    let te_cfg = candle_transformers::models::z_image::text_encoder::TextEncoderConfig::z_image();
    let dit = record(&|ld| {
        let p = DitPrecision {
            compute: DType::F32,
            residual: DType::F32,
        };
        Dit::new(dit_cfg.clone(), ld.clone(), p)?;
        ResidentBlocks::load(&dit_cfg, &ld)?;
        Ok(())
    });
    let te = record(&|ld| TextEncoder::new(&te_cfg, ld).map(|_| ()));
    // f16 compute (the mixed policy a GPU runs): dense weights at 2 bytes, quantized at their size.
    let bytes = |name: &str, dims: &[usize], role: Role, ty: Option<GgmlDType>| -> (u64, u64) {
        let n: u64 = dims.iter().product::<usize>() as u64;
        match ty {
            None => (n * 2, 0),
            Some(t) => {
                let ty = type_for_canonical(name, dims, t, role);
                match ty {
                    GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => (n * 2, 0),
                    q => (n / q.block_size() as u64 * q.type_size() as u64, n * 2),
                }
            }
        }
    };
    let dit_type = variant.map(|v| v.main_type);
    let te_type = variant.map(|v| v.text_encoder_type);
    let mut denoiser = 0;
    let mut scratch = 0;
    let mut blocks: std::collections::BTreeMap<String, u64> = Default::default();
    for (name, dims) in &dit {
        let (b, s) = bytes(name, dims, Role::Transformer, dit_type);
        denoiser += b;
        scratch = scratch.max(s);
        let parts: Vec<&str> = name.splitn(3, '.').collect();
        if parts.len() == 3 && ["layers", "noise_refiner", "context_refiner"].contains(&parts[0]) {
            *blocks
                .entry(format!("{}.{}", parts[0], parts[1]))
                .or_default() += b;
        }
    }
    let mut text_encoder = 0;
    let mut te_scratch = 0;
    for (name, dims) in &te {
        let (b, s) = bytes(name, dims, Role::TextEncoder, te_type);
        text_encoder += b;
        te_scratch = te_scratch.max(s);
    }
    // The AutoencoderKL decoder (block_out_channels 128…512, 3 resnets per up block): 49.5 M
    // parameters, kept in f16.
    let vae_decoder = 49_490_000 * 2;
    Ok(ComponentBytes {
        text_encoder,
        denoiser,
        denoiser_largest_block: blocks.values().copied().max().unwrap_or(0),
        denoiser_blocks: blocks.len(),
        vae_decoder,
        denoiser_scratch: scratch,
        text_encoder_scratch: te_scratch,
    })
}

/// Card sizes the Models panel speaks of (GiB).
pub const CARDS_GIB: &[u64] = &[4, 6, 8, 10, 12, 16, 20, 24, 32, 48, 80];

/// The smallest card (GiB) on which the planner fits a default Z-Image-Turbo job (1024², CFG on)
/// with these weights, and the memory mode it would run in there. A CUDA context and desktop
/// take ≈ 400 MiB of every card.
pub fn smallest_card(components: ComponentBytes) -> Option<(u64, MemoryMode)> {
    const GIB: u64 = 1 << 30;
    CARDS_GIB.iter().find_map(|&g| {
        let total = g * GIB;
        let input = PlanInput {
            device_total: total,
            device_free: total.saturating_sub(400 << 20),
            budget: None,
            reserve: planner::default_reserve(total),
            components,
            activations: super::activations::turbo(),
            width: 1024,
            height: 1024,
            batch: 1,
            cfg_on: true,
            mode: MemoryMode::Auto,
        };
        let p = planner::plan(&input);
        p.fits.then_some((g, p.mode))
    })
}

/// A variant as the Models panel lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VariantListing {
    pub name: &'static str,
    pub transformer_repo: &'static str,
    pub text_encoder_repo: &'static str,
    /// Transformer + text encoder + VAE: the files' sizes when pulled, else the estimate.
    pub size_bytes: u64,
    pub estimated: bool,
    pub on_disk: bool,
    /// Smallest GPU (GiB) the planner fits a 1024² job with CFG on, and the mode it runs in there.
    pub smallest_card_gib: Option<u64>,
    pub smallest_card_mode: Option<MemoryMode>,
    /// `zturbo pull <model> --variant <name>`.
    pub pull: String,
}

/// The bf16 release and each variant, with sizes and smallest cards.
pub fn listings(model: &str) -> Vec<VariantListing> {
    let local = local(model);
    let mut out = Vec::new();
    if of(model).is_empty() {
        return out;
    }
    let estimate = |v: Option<&Variant>| {
        z_image_turbo_bytes(v)
            .map(|c| (c, c.text_encoder + c.denoiser + c.vae_decoder))
            .ok()
    };
    let Some((bf16, bf16_size)) = estimate(None) else {
        return out;
    };
    let card = smallest_card(bf16);
    out.push(VariantListing {
        name: "bf16",
        transformer_repo: "Tongyi-MAI/Z-Image-Turbo",
        text_encoder_repo: "Tongyi-MAI/Z-Image-Turbo",
        size_bytes: bf16_size,
        estimated: true,
        on_disk: weights::hf_cache_snapshot("Tongyi-MAI/Z-Image-Turbo").is_some(),
        smallest_card_gib: card.map(|c| c.0),
        smallest_card_mode: card.map(|c| c.1),
        pull: format!("zturbo pull {model}"),
    });
    for v in of(model) {
        let Some((c, est)) = estimate(Some(v)) else {
            continue;
        };
        let on_disk = local.iter().find(|(l, _)| l.name == v.name);
        let size = on_disk
            .and_then(|(_, f)| {
                let t = std::fs::metadata(f.transformer.as_ref()?).ok()?.len();
                let te = std::fs::metadata(f.text_encoder.as_ref()?).ok()?.len();
                Some(t + te + c.vae_decoder)
            })
            .unwrap_or(est);
        let card = smallest_card(c);
        out.push(VariantListing {
            name: v.name,
            transformer_repo: v.transformer_repo,
            text_encoder_repo: v.text_encoder_repo,
            size_bytes: size,
            estimated: on_disk.is_none(),
            on_disk: on_disk.is_some(),
            smallest_card_gib: card.map(|c| c.0),
            smallest_card_mode: card.map(|c| c.1),
            pull: format!("zturbo pull {model} --variant {}", v.name),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_match_their_quant_only() {
        assert!(file_matches("z_image_turbo-Q4_K_M.gguf", "q4_k_m"));
        assert!(file_matches("Qwen3-4B-Q8_0.gguf", "q8_0"));
        assert!(file_matches("sub/z-image-turbo-q6_k.gguf", "Q6_K"));
        assert!(!file_matches("z_image_turbo-Q4_K_M.gguf", "q4_k"));
        assert!(!file_matches("z_image_turbo-Q4_K_S.gguf", "q4_k_m"));
        assert!(!file_matches("Qwen3-4B-Q8_0.safetensors", "q8_0"));
        let files: Vec<String> = [
            "a/Qwen3-4B-Q8_0.gguf",
            "Qwen3-4B-Q8_0.gguf",
            "Qwen3-4B-Q6_K.gguf",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(pick_file(&files, "q8_0").unwrap(), "Qwen3-4B-Q8_0.gguf");
    }

    #[test]
    fn sizes_and_cards_follow_the_bits() {
        // Real shapes: the DiT has 6.15 B parameters, Qwen3-4B (without its last layer, which
        // hidden_states[-2] never uses) about 3.9 B.
        let bf16 = z_image_turbo_bytes(None).unwrap();
        assert!(
            (12.0e9..12.6e9).contains(&(bf16.denoiser as f64)),
            "{}",
            bf16.denoiser
        );
        assert!(
            (7.2e9..8.2e9).contains(&(bf16.text_encoder as f64)),
            "{}",
            bf16.text_encoder
        );
        assert_eq!(bf16.denoiser_blocks, 34);
        let q8 = z_image_turbo_bytes(Some(find("z-image-turbo", "q8_0").unwrap())).unwrap();
        let q4 = z_image_turbo_bytes(Some(find("z-image-turbo", "q4_k_m").unwrap())).unwrap();
        // Q8_0 is 8.5 bits a weight, Q4_K 4.5: a little over half and a little over a quarter.
        let r8 = q8.denoiser as f64 / bf16.denoiser as f64;
        let r4 = q4.denoiser as f64 / bf16.denoiser as f64;
        assert!((0.53..0.56).contains(&r8), "{r8}");
        assert!((0.28..0.31).contains(&r4), "{r4}");
        assert!(q8.denoiser_scratch > 0 && bf16.denoiser_scratch == 0);
        let (c16, m16) = smallest_card(bf16).unwrap();
        let (c8, m8) = smallest_card(q8).unwrap();
        let (c4, m4) = smallest_card(q4).unwrap();
        for (n, c, card, mode) in [
            ("bf16", bf16, c16, m16),
            ("q8_0", q8, c8, m8),
            ("q4_k_m", q4, c4, m4),
        ] {
            eprintln!(
                "{n}: denoiser {:.2} GB, text encoder {:.2} GB, smallest card {card} GiB ({mode})",
                c.denoiser as f64 / 1e9,
                c.text_encoder as f64 / 1e9
            );
        }
        assert!(c4 <= c8 && c8 <= c16, "{c4} {c8} {c16}");
        // The target: Q4_K fits an 8 GB card.
        assert!(c4 <= 8, "q4_k_m needs {c4} GiB ({m4})");
        assert!(find("z-image-turbo", "q9").is_err());
    }
}
