//! Memory planner: from the memory on offer, the components' weight bytes and the request, decides where each
//! component lives, whether the VAE decode is tiled and the largest batch that fits. Pure data in, plan out,
//! so every decision is unit-tested and can be logged and shown to the user as it was made.
//!
//! # Memory model
//!
//! A job has three phases, each with its own peak: **text encoding** (text encoder + its activations),
//! **denoising** (denoiser + its activations) and **decoding** (VAE + decode activations). What else is
//! loaded during a phase depends on the mode:
//!
//! | mode | text encoder | denoiser | VAE | phase peaks |
//! |---|---|---|---|---|
//! | `performance` | resident | resident | resident, full decode | all weights + each phase's activations |
//! | `balanced` | load-use-free | resident | resident, tiled when the full decode does not fit | te + den + vae + te acts; den + vae + den acts; den + vae + decode |
//! | `low` | load-use-free | block-streamed | load-use-free, always tiled | te + te acts; 2 × largest block + non-block weights + den acts; vae + tiled decode |
//!
//! In `balanced` the denoiser and VAE stay loaded between jobs, so from the second job on the text encoder
//! is loaded next to them; the text-encoding phase counts all three (only the very first job is cheaper).
//! In `low` the block stream holds two blocks (the one computing and the one prefetching) plus the weights
//! outside the blocks (embedders, final layer), estimated as `denoiser - blocks × largest_block`.
//! `auto` picks the first of performance, balanced, low whose peak plus the reserve fits in the memory
//! available (`min(budget, free)`), as ComfyUI's model management does. A fixed mode is a ceiling: when it
//! does not fit, the plan steps down to the next lower mode that does, and says so in its reasons.
//!
//! Activations (see [`ActivationModel`]): a transformer holds, per sequence, `bytes_per_token · tokens`
//! (projections, MLP) plus `bytes_per_score · heads · tokens²` (attention scores, when materialised).
//! The denoiser's sequence is the image tokens plus the caption; classifier-free guidance runs the
//! conditional and unconditional passes as one batch, doubling it. The VAE decode peaks either in the
//! full-resolution convolutions (`bytes_per_pixel` per output pixel) or in the mid-block attention
//! (one head over the latent pixels: `bytes_per_score · (latent pixels)²`). The VAE decodes one image at
//! a time, so its peak does not grow with the batch. Small constants (latents, embeddings, RoPE tables)
//! are left out: the reserve covers them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::activations::{ActivationModel, SequenceActivations};
use super::bytes::format_bytes;

const MIB: u64 = 1 << 20;

/// Largest batch [`max_batch`] will consider; far above any request limit, it only bounds the search.
pub const MAX_BATCH_SEARCH: u32 = 1024;

/// Default VAE tile for a tiled decode: 32 × 32 latents (256 px), 8 latents of overlap.
pub const DEFAULT_VAE_TILING: VaeTiling = VaeTiling::square(32, 8);
/// Fallback when even the default tile does not fit.
pub const SMALL_VAE_TILING: VaeTiling = VaeTiling::square(16, 4);

// ---- Modes and residency --------------------------------------------------------------------------------

/// How hard to trade speed for memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryMode {
    /// The fastest of the others that fits.
    #[default]
    Auto,
    /// Everything resident.
    Performance,
    /// Text encoder loaded per job and freed after encoding; VAE tiled when needed.
    Balanced,
    /// One component at a time; denoiser blocks streamed; VAE tiled.
    Low,
}

impl MemoryMode {
    pub const ALL: [MemoryMode; 4] = [
        MemoryMode::Auto,
        MemoryMode::Performance,
        MemoryMode::Balanced,
        MemoryMode::Low,
    ];
    /// The concrete modes, fastest first: the order `auto` tries them in.
    pub const CONCRETE: [MemoryMode; 3] = [
        MemoryMode::Performance,
        MemoryMode::Balanced,
        MemoryMode::Low,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MemoryMode::Auto => "auto",
            MemoryMode::Performance => "performance",
            MemoryMode::Balanced => "balanced",
            MemoryMode::Low => "low",
        }
    }

    /// Memory appetite: low 0, balanced 1, performance 2 (auto, unresolved, ranks as performance).
    pub fn rank(self) -> u8 {
        match self {
            MemoryMode::Low => 0,
            MemoryMode::Balanced => 1,
            MemoryMode::Performance | MemoryMode::Auto => 2,
        }
    }
}

impl fmt::Display for MemoryMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A memory mode name that is not one of the four.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown memory mode `{input}`; expected one of: auto, performance, balanced, low")]
pub struct UnknownMemoryMode {
    pub input: String,
}

impl FromStr for MemoryMode {
    type Err = UnknownMemoryMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim();
        MemoryMode::ALL
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(wanted))
            .ok_or_else(|| UnknownMemoryMode {
                input: s.to_owned(),
            })
    }
}

/// Where a component's weights live over a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Residency {
    /// Loaded once, kept between jobs.
    Resident,
    /// Loaded for its phase of each job, freed after it.
    LoadUseFree,
    /// Kept on the host; blocks are copied in one (plus one prefetched) at a time.
    BlockStreamed,
}

impl Residency {
    pub fn as_str(self) -> &'static str {
        match self {
            Residency::Resident => "resident",
            Residency::LoadUseFree => "load-use-free",
            Residency::BlockStreamed => "block-streamed",
        }
    }
}

impl fmt::Display for Residency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---- Inputs ---------------------------------------------------------------------------------------------

/// Weight bytes per component, from the safetensors headers (exact, in the dtype they will be loaded in).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentBytes {
    pub text_encoder: u64,
    pub denoiser: u64,
    /// Largest of the denoiser's repeated blocks (what the block stream must hold at once).
    pub denoiser_largest_block: u64,
    /// Number of repeated blocks (Z-Image: 30 layers + 2 noise + 2 context refiners); 0 = cannot stream.
    pub denoiser_blocks: usize,
    pub vae_decoder: u64,
    /// Weights kept quantized are dequantized one matrix at a time just before its product: the
    /// largest such matrix in the compute dtype (0 when nothing is quantized). It lives during the
    /// denoising (or text-encoding) phase on top of the stored weights.
    #[serde(default)]
    pub denoiser_scratch: u64,
    #[serde(default)]
    pub text_encoder_scratch: u64,
}

/// Everything the planner looks at (serialisable so a job record can keep what its plan was made from).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanInput {
    pub device_total: u64,
    /// Memory this pipeline may use now, **counting the weights it already holds as free** (a caller that
    /// has the denoiser loaded adds its bytes back to the device's free reading).
    pub device_free: u64,
    /// `--memory-budget`: a cap on top of free memory.
    pub budget: Option<u64>,
    /// Head-room kept free for fragmentation, the CUDA context and small tensors (see [`default_reserve`]).
    pub reserve: u64,
    pub components: ComponentBytes,
    pub activations: ActivationModel,
    pub width: u32,
    pub height: u32,
    pub batch: u32,
    /// Classifier-free guidance on: the denoiser runs conditional and unconditional as one batch.
    pub cfg_on: bool,
    pub mode: MemoryMode,
}

/// The reserve ComfyUI-style: 5 % of the device, at least 512 MiB.
pub fn default_reserve(device_total: u64) -> u64 {
    (device_total / 20).max(512 * MIB)
}

// ---- Output ---------------------------------------------------------------------------------------------

/// Tiled VAE decode: tiles of `tile_width_latent × tile_height_latent` latents, neighbours
/// overlapping by `overlap_latent` (at most half a tile on each axis). A tile as wide (or tall) as
/// the image makes bands: the decode recomputes fewer overlaps than square tiles of the same area.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VaeTiling {
    pub tile_width_latent: u32,
    pub tile_height_latent: u32,
    pub overlap_latent: u32,
}

impl VaeTiling {
    pub const fn square(tile_latent: u32, overlap_latent: u32) -> Self {
        Self {
            tile_width_latent: tile_latent,
            tile_height_latent: tile_latent,
            overlap_latent,
        }
    }

    /// Tile size (width, height) and overlap (x, y) on a `w × h` latent: tiles no larger than the
    /// latent, overlaps no more than half a tile.
    pub fn on(&self, w: usize, h: usize) -> ((usize, usize), (usize, usize)) {
        let tw = (self.tile_width_latent as usize).max(1).min(w.max(1));
        let th = (self.tile_height_latent as usize).max(1).min(h.max(1));
        let o = self.overlap_latent as usize;
        ((tw, th), (o.min(tw / 2), o.min(th / 2)))
    }
}

impl fmt::Display for VaeTiling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}x{}/{}",
            self.tile_width_latent, self.tile_height_latent, self.overlap_latent
        )
    }
}

/// Estimated peak bytes of each phase of a job (weights loaded during it + its activations).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhasePeaks {
    pub text_encoding: u64,
    pub denoising: u64,
    pub decoding: u64,
}

impl PhasePeaks {
    pub fn max(&self) -> u64 {
        self.text_encoding.max(self.denoising).max(self.decoding)
    }

    /// Name of the phase that sets the peak.
    pub fn largest(&self) -> &'static str {
        let peak = self.max();
        if peak == self.denoising {
            "denoising"
        } else if peak == self.decoding {
            "decoding"
        } else {
            "text encoding"
        }
    }
}

/// The planner's decision for one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The mode used; never `auto`.
    pub mode: MemoryMode,
    pub requested_mode: MemoryMode,
    pub text_encoder: Residency,
    pub denoiser: Residency,
    pub vae: Residency,
    pub vae_tiling: Option<VaeTiling>,
    /// With a block-streamed denoiser: how many of its blocks (the first, in execution order) stay
    /// on the device for the whole job. Low mode entered because nothing faster fits fills the
    /// room left over with them, so fewer bytes cross the bus every step; `low` requested by the
    /// user streams every block (the smallest peak).
    #[serde(default)]
    pub resident_blocks: u32,
    /// Low mode runs the denoiser's batch (the CFG pair included) one item at a time, when the
    /// whole batch would make denoising the plan's peak phase; otherwise the batch runs whole.
    #[serde(default)]
    pub denoiser_one_at_a_time: bool,
    /// Largest phase peak, without the reserve.
    pub estimated_peak_bytes: u64,
    pub phase_peaks: PhasePeaks,
    /// `min(budget, free)`.
    pub available_bytes: u64,
    /// `estimated_peak_bytes + reserve <= available_bytes`.
    pub fits: bool,
    /// See [`max_batch`].
    pub max_batch: u32,
    /// Human-readable steps of the decision, for the log and the UI.
    pub reasons: Vec<String>,
}

impl Plan {
    /// One line for the log.
    pub fn summary(&self) -> String {
        let decode = match self.vae_tiling {
            Some(t) => format!("tiled {t}"),
            None => "full".to_owned(),
        };
        format!(
            "memory plan: mode {} (requested {}); text encoder {}, denoiser {}, vae {} (decode {}); \
             peak {} of {} available ({}); max batch {}",
            self.mode,
            self.requested_mode,
            self.text_encoder,
            self.denoiser,
            self.vae,
            decode,
            format_bytes(self.estimated_peak_bytes),
            format_bytes(self.available_bytes),
            if self.fits { "fits" } else { "does not fit" },
            self.max_batch,
        )
    }

    /// Whether a fixed requested mode did not fit and the plan runs a lower one (worth a notice in the UI).
    pub fn stepped_down(&self) -> bool {
        self.requested_mode != MemoryMode::Auto && self.mode != self.requested_mode
    }

    /// Logs the summary (info, or warn when it does not fit) and each reason at debug.
    pub fn log(&self) {
        if self.fits {
            tracing::info!(mode = %self.mode, peak = self.estimated_peak_bytes, "{}", self.summary());
        } else {
            tracing::warn!(mode = %self.mode, peak = self.estimated_peak_bytes, "{}", self.summary());
        }
        for reason in &self.reasons {
            tracing::info!("memory plan: {reason}");
        }
    }
}

// ---- Planning -------------------------------------------------------------------------------------------

/// Memory the plan may use: the budget caps free memory, never raises it.
pub fn available_bytes(input: &PlanInput) -> u64 {
    match input.budget {
        Some(budget) => budget.min(input.device_free),
        None => input.device_free,
    }
}

/// One concrete mode evaluated at one batch size.
#[derive(Debug, Clone, Copy)]
struct Estimate {
    mode: MemoryMode,
    text_encoder: Residency,
    denoiser: Residency,
    vae: Residency,
    tiling: Option<VaeTiling>,
    phases: PhasePeaks,
    fits: bool,
    /// Bytes the full decode would need in this mode's decode phase, when it chose tiles instead.
    full_decode_phase: Option<u64>,
    /// The denoiser runs its batch one item at a time (see [`Plan::denoiser_one_at_a_time`]).
    one_at_a_time: bool,
}

fn fits(peak: u64, input: &PlanInput) -> bool {
    let need = peak.saturating_add(input.reserve);
    // Saturated arithmetic ends at u64::MAX, which stands for "overflowed", never for a real fit.
    need < u64::MAX && need <= available_bytes(input)
}

/// Tile origins along one axis: stride `tile − overlap`, the last tile flush with the end (the
/// decoder uses the same function, so the plan's cost is what the decode does).
pub fn tile_starts(len: usize, tile: usize, overlap: usize) -> Vec<usize> {
    if len <= tile {
        return vec![0];
    }
    let stride = tile.saturating_sub(overlap).max(1);
    let mut starts: Vec<usize> = (0..)
        .map(|i| i * stride)
        .take_while(|s| s + tile < len)
        .collect();
    starts.push(len - tile);
    starts.dedup();
    starts
}

/// How many tiles [`tile_starts`] places along an axis, without building the list.
fn tile_count(len: u64, tile: u64, overlap: u64) -> u64 {
    if len <= tile {
        return 1;
    }
    let stride = tile.saturating_sub(overlap).max(1);
    (len - tile).div_ceil(stride) + 1
}

/// Latent cells a tiled decode runs through the VAE head (overlaps are decoded twice).
pub fn tiled_cells(lw: u64, lh: u64, t: VaeTiling) -> u64 {
    let ((tw, th), (ox, oy)) = t.on(lw as usize, lh as usize);
    let axis = |len: u64, tile: usize, overlap: usize| {
        tile_count(len, tile as u64, overlap as u64).saturating_mul(tile as u64)
    };
    axis(lw, tw, ox).saturating_mul(axis(lh, th, oy))
}

/// Overlap for a tiling whose smallest split side is `side` latents: a quarter of it, at most 8.
fn overlap_for(side: u64) -> u64 {
    (side / 4).min(8)
}

/// Tile sides worth trying along an axis of `len` latents: the whole axis, and for each tile count
/// n = 2, 3, … (up to 64) the smallest side (a multiple of 4, at least 16) that covers it with n
/// tiles. A side between two of these decodes more cells with as many tiles.
fn side_candidates(len: u64) -> Vec<u64> {
    let len = len.max(1);
    let mut sides = vec![len];
    for n in 2..=64u64 {
        let side = [8u64, 7, 6, 5, 4]
            .into_iter()
            .map(|o| {
                let covering = len.saturating_add((n - 1) * o).div_ceil(n);
                covering.div_ceil(4).saturating_mul(4).max(16)
            })
            .find(|&side| tile_count(len, side, overlap_for(side)) <= n)
            .unwrap_or(16);
        if side < len {
            sides.push(side);
        }
        if side <= 16 {
            break;
        }
    }
    sides.sort_unstable();
    sides.dedup();
    sides
}

/// The cheapest tiling (fewest decoded cells, then fewest tiles, then wide tiles) whose decode
/// phase, next to `loaded` bytes of weights, stays within `limit`. Tile sides from
/// [`side_candidates`] — the whole side makes bands; overlap a quarter of the smallest split side,
/// at most 8 latents (the default tiling's). With no tiling under the limit, the smallest-memory
/// one.
fn choose_tiling(input: &PlanInput, loaded: u64, limit: u64) -> (VaeTiling, u64) {
    let vae = &input.activations.vae;
    let (lw, lh) = input.activations.latent_size(input.width, input.height);
    let phase = |t: VaeTiling| loaded.saturating_add(vae.tiled_decode_bytes(lw, lh, t));
    let (ws, hs) = (side_candidates(lw), side_candidates(lh));
    let as_u32 = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    let split = |side: u64, len: u64| if side < len { side } else { u64::MAX };
    let best = ws
        .iter()
        .flat_map(|&w| hs.iter().map(move |&h| (w, h)))
        .filter(|&(w, h)| w < lw || h < lh)
        .map(|(w, h)| VaeTiling {
            tile_width_latent: as_u32(w),
            tile_height_latent: as_u32(h),
            overlap_latent: as_u32(overlap_for(split(w, lw).min(split(h, lh)))),
        })
        .filter(|&t| phase(t) <= limit)
        .min_by_key(|&t| {
            let ((tw, th), (ox, oy)) = t.on(lw as usize, lh as usize);
            let tiles = tile_count(lw, tw as u64, ox as u64)
                .saturating_mul(tile_count(lh, th as u64, oy as u64));
            // Wide tiles last: a band of whole rows is contiguous in memory.
            (
                tiled_cells(lw, lh, t),
                tiles,
                std::cmp::Reverse(t.tile_width_latent),
            )
        });
    match best {
        Some(t) => (t, phase(t)),
        None => (SMALL_VAE_TILING, phase(SMALL_VAE_TILING)),
    }
}

/// What a phase may peak at and still fit: available memory less the reserve.
fn room(input: &PlanInput) -> u64 {
    available_bytes(input).saturating_sub(input.reserve)
}

fn estimate(input: &PlanInput, mode: MemoryMode, batch: u32) -> Estimate {
    let c = &input.components;
    let a = &input.activations;
    let batch = u64::from(batch.max(1));
    let passes = if input.cfg_on { 2 } else { 1 };
    // One prompt (plus its negative under CFG, encoded after it) serves the whole batch.
    let te_act = a
        .text_encoder
        .bytes(u64::from(a.text_tokens), 1)
        .saturating_add(c.text_encoder_scratch);
    let den_act = a
        .denoiser
        .bytes(a.denoiser_tokens(input.width, input.height), batch * passes)
        .saturating_add(c.denoiser_scratch);
    let (lw, lh) = a.latent_size(input.width, input.height);
    let full_decode = a.vae.decode_bytes(lw, lh);

    match mode {
        MemoryMode::Performance | MemoryMode::Auto => {
            let all = c
                .text_encoder
                .saturating_add(c.denoiser)
                .saturating_add(c.vae_decoder);
            let phases = PhasePeaks {
                text_encoding: all.saturating_add(te_act),
                denoising: all.saturating_add(den_act),
                decoding: all.saturating_add(full_decode),
            };
            Estimate {
                mode: MemoryMode::Performance,
                text_encoder: Residency::Resident,
                denoiser: Residency::Resident,
                vae: Residency::Resident,
                tiling: None,
                fits: fits(phases.max(), input),
                phases,
                full_decode_phase: None,
                one_at_a_time: false,
            }
        }
        MemoryMode::Balanced => {
            let kept = c.denoiser.saturating_add(c.vae_decoder);
            let full_phase = kept.saturating_add(full_decode);
            let (tiling, decoding, full_decode_phase) = if fits(full_phase, input) {
                (None, full_phase, None)
            } else {
                let (t, phase) = choose_tiling(input, kept, room(input));
                (Some(t), phase, Some(full_phase))
            };
            let phases = PhasePeaks {
                text_encoding: kept.saturating_add(c.text_encoder).saturating_add(te_act),
                denoising: kept.saturating_add(den_act),
                decoding,
            };
            Estimate {
                mode: MemoryMode::Balanced,
                text_encoder: Residency::LoadUseFree,
                denoiser: Residency::Resident,
                vae: Residency::Resident,
                tiling,
                fits: fits(phases.max(), input),
                phases,
                full_decode_phase,
                one_at_a_time: false,
            }
        }
        MemoryMode::Low => {
            let (denoiser, den_weights) = streamed_denoiser(c);
            let text_encoding = c.text_encoder.saturating_add(te_act);
            // Families with a low-memory execution keep attention chunks small there, and run the
            // batch (the CFG pair included) one item at a time when the whole batch would make
            // denoising the mode's peak: like tiling, micro-batching costs time (every block's
            // weights are read once per item), so it is only worth what it takes off the peak.
            // One at a time, the other items' hidden states wait between blocks (a quarter of the
            // per-token activations: residual, the item's output and the concatenation, of 16
            // token-wide copies).
            let (den_act, one_at_a_time) = match a.low_memory_scores {
                Some(cap) => {
                    let tokens = a.denoiser_tokens(input.width, input.height);
                    let items = batch * passes;
                    let low = SequenceActivations {
                        max_scores: cap,
                        ..a.denoiser
                    };
                    let whole = low.bytes(tokens, items).saturating_add(c.denoiser_scratch);
                    if items <= 1 || den_weights.saturating_add(whole) <= text_encoding {
                        (whole, false)
                    } else {
                        let waiting = (items - 1)
                            .saturating_mul(a.denoiser.bytes_per_token.saturating_mul(tokens) / 4);
                        let one = low.bytes(tokens, 1).saturating_add(c.denoiser_scratch);
                        (one.saturating_add(waiting), true)
                    }
                }
                None => (den_act, false),
            };
            let denoising = den_weights.saturating_add(den_act);
            // Tile only when the whole decode would set low mode's peak: tiles recompute their
            // overlaps, and a decode under the other phases' peak costs no memory that matters.
            let full_phase = c.vae_decoder.saturating_add(full_decode);
            let (tiling, decoding, full_decode_phase) =
                if full_phase <= text_encoding.max(denoising) {
                    (None, full_phase, None)
                } else {
                    // The cheapest tiling that keeps the decode under the other phases' peak; if
                    // none does, the cheapest that fits at all.
                    let under = text_encoding.max(denoising);
                    let (t, phase) = match choose_tiling(input, c.vae_decoder, under) {
                        (t, p) if p <= under => (t, p),
                        _ => choose_tiling(input, c.vae_decoder, room(input)),
                    };
                    (Some(t), phase, Some(full_phase))
                };
            let phases = PhasePeaks {
                text_encoding,
                denoising,
                decoding,
            };
            Estimate {
                mode: MemoryMode::Low,
                text_encoder: Residency::LoadUseFree,
                denoiser,
                vae: Residency::LoadUseFree,
                tiling,
                fits: fits(phases.max(), input),
                phases,
                full_decode_phase,
                one_at_a_time,
            }
        }
    }
}

/// Denoiser weights on the device while streaming: two blocks (computing + prefetching) and everything
/// outside the blocks. Without block sizes it cannot stream and loads whole for its phase.
fn streamed_denoiser(c: &ComponentBytes) -> (Residency, u64) {
    if c.denoiser_blocks == 0 || c.denoiser_largest_block == 0 {
        return (Residency::LoadUseFree, c.denoiser);
    }
    let blocks = u64::try_from(c.denoiser_blocks).unwrap_or(u64::MAX);
    let outside = c
        .denoiser
        .saturating_sub(blocks.saturating_mul(c.denoiser_largest_block));
    let streamed = c
        .denoiser_largest_block
        .saturating_mul(2)
        .saturating_add(outside);
    (Residency::BlockStreamed, streamed.min(c.denoiser))
}

/// How many denoiser blocks a block-streamed plan keeps on the device: when low mode was not asked
/// for (it is where `auto` or a step-down landed), as many as the room above its denoising phase
/// holds; their bytes join that phase. Zero for every other plan.
fn keep_blocks(input: &PlanInput, chosen: &mut Estimate) -> u32 {
    let c = &input.components;
    if !chosen.fits
        || chosen.denoiser != Residency::BlockStreamed
        || input.mode == MemoryMode::Low
        || c.denoiser_largest_block == 0
    {
        return 0;
    }
    let spare = room(input).saturating_sub(chosen.phases.denoising);
    let blocks = u64::try_from(c.denoiser_blocks).unwrap_or(u64::MAX);
    let kept = (spare / c.denoiser_largest_block).min(blocks);
    chosen.phases.denoising = chosen
        .phases
        .denoising
        .saturating_add(kept.saturating_mul(c.denoiser_largest_block));
    u32::try_from(kept).unwrap_or(u32::MAX)
}

/// The concrete modes a request may run in, fastest first: a fixed mode is a ceiling, never a floor.
fn candidates(requested: MemoryMode) -> &'static [MemoryMode] {
    match requested {
        MemoryMode::Auto | MemoryMode::Performance => &MemoryMode::CONCRETE,
        MemoryMode::Balanced => &[MemoryMode::Balanced, MemoryMode::Low],
        MemoryMode::Low => &[MemoryMode::Low],
    }
}

/// Evaluates the candidates until one fits; all tried estimates come back for the reasons.
fn resolve(input: &PlanInput, batch: u32) -> (Estimate, Vec<Estimate>) {
    let mut tried = Vec::with_capacity(3);
    for &mode in candidates(input.mode) {
        let e = estimate(input, mode, batch);
        tried.push(e);
        if e.fits {
            return (e, tried);
        }
    }
    // Nothing fits: the last (leanest) candidate, marked as not fitting.
    let chosen = match tried.last() {
        Some(&e) => e,
        None => estimate(input, MemoryMode::Low, batch),
    };
    (chosen, tried)
}

/// Decides residency, VAE tiling and the batch limit for `input`. Never panics, whatever the numbers.
///
/// `auto` takes the fastest mode that fits. A fixed mode is a ceiling: when it does not fit, the plan
/// steps down to the next lower mode that does (`mode != requested_mode`, see [`Plan::stepped_down`]) so
/// the server can tell the user instead of running out of memory mid-job.
pub fn plan(input: &PlanInput) -> Plan {
    let batch = input.batch.max(1);
    let (mut chosen, tried) = resolve(input, batch);
    let available = available_bytes(input);
    let mut reasons = Vec::new();

    reasons.push(match input.budget {
        Some(budget) if budget < input.device_free => format!(
            "available {}: budget {} (device free {}, total {})",
            format_bytes(available),
            format_bytes(budget),
            format_bytes(input.device_free),
            format_bytes(input.device_total),
        ),
        Some(budget) => format!(
            "available {}: device free (budget {} is above it; total {})",
            format_bytes(available),
            format_bytes(budget),
            format_bytes(input.device_total),
        ),
        None => format!(
            "available {}: device free (total {})",
            format_bytes(available),
            format_bytes(input.device_total),
        ),
    });
    reasons.push(format!(
        "request {}x{} batch {}{}; reserve {}",
        input.width,
        input.height,
        batch,
        if input.cfg_on {
            " with CFG (2 passes)"
        } else {
            ""
        },
        format_bytes(input.reserve),
    ));
    if input.batch == 0 {
        reasons.push("batch 0 planned as 1".to_owned());
    }
    for e in &tried {
        reasons.push(format!(
            "{}: peak {} ({}; text encoding {}, denoising {}, decoding {}) + reserve {} {} {}",
            e.mode,
            format_bytes(e.phases.max()),
            e.phases.largest(),
            format_bytes(e.phases.text_encoding),
            format_bytes(e.phases.denoising),
            format_bytes(e.phases.decoding),
            if e.fits { "fits" } else { "exceeds" },
            if e.fits { "in" } else { "available" },
            format_bytes(available),
        ));
    }
    if chosen.fits {
        match input.mode {
            MemoryMode::Auto => reasons.push(format!("auto chose {}", chosen.mode)),
            requested if requested != chosen.mode => reasons.push(format!(
                "{requested} does not fit; stepped down to {}",
                chosen.mode
            )),
            _ => {}
        }
    }
    let resident_blocks = keep_blocks(input, &mut chosen);
    if resident_blocks > 0 {
        reasons.push(format!(
            "{resident_blocks} of {} denoiser blocks stay on the device ({}), the rest stream",
            input.components.denoiser_blocks,
            format_bytes(u64::from(resident_blocks) * input.components.denoiser_largest_block),
        ));
    }
    if chosen.one_at_a_time {
        reasons.push(format!(
            "denoiser runs the batch one item at a time: whole, denoising would need more than text encoding's {}",
            format_bytes(chosen.phases.text_encoding),
        ));
    }
    if let Some(t) = chosen.tiling {
        let why = match chosen.full_decode_phase {
            Some(full) => format!(
                "the full decode phase would need {}",
                format_bytes(full.saturating_add(input.reserve))
            ),
            None => "tiled".to_owned(),
        };
        let scale = u64::from(input.activations.vae.scale);
        reasons.push(format!(
            "VAE decode tiled: {}x{} latents ({}x{} px), overlap {}; {}",
            t.tile_width_latent,
            t.tile_height_latent,
            u64::from(t.tile_width_latent) * scale,
            u64::from(t.tile_height_latent) * scale,
            t.overlap_latent,
            why,
        ));
    }
    if chosen.mode == MemoryMode::Low && chosen.denoiser == Residency::LoadUseFree {
        reasons.push("denoiser block sizes unknown: loaded whole instead of streamed".to_owned());
    }
    if !chosen.fits {
        let need = chosen.phases.max().saturating_add(input.reserve);
        reasons.push(format!(
            "{}: {} mode needs {} with the reserve, {} more than available ({} phase)",
            if tried.len() > 1 {
                "no mode fits"
            } else {
                "does not fit"
            },
            chosen.mode,
            format_bytes(need),
            format_bytes(need.saturating_sub(available)),
            chosen.phases.largest(),
        ));
    }

    Plan {
        mode: chosen.mode,
        requested_mode: input.mode,
        text_encoder: chosen.text_encoder,
        denoiser: chosen.denoiser,
        vae: chosen.vae,
        vae_tiling: chosen.tiling,
        resident_blocks,
        denoiser_one_at_a_time: chosen.one_at_a_time,
        estimated_peak_bytes: chosen.phases.max(),
        phase_peaks: chosen.phases,
        available_bytes: available,
        fits: chosen.fits,
        max_batch: max_batch(input),
        reasons,
    }
}

/// One way to hold a model's weights — the bf16 folder, a GGUF or fp8 variant of its denoiser … —
/// as the planner sees it: the components' stored bytes and the request to plan for.
#[derive(Debug, Clone)]
pub struct WeightOption {
    /// `bf16`, `q8_0` …, for the reasons.
    pub label: String,
    /// Its denoiser keeps quantized weights (dequantized per product).
    pub quantized: bool,
    pub input: PlanInput,
}

/// What [`choose_weights`] decided, with its reasons.
#[derive(Debug, Clone)]
pub struct WeightChoice {
    pub index: usize,
    pub plan: Plan,
    pub reasons: Vec<String>,
}

/// Picks the weights to load among `options` (best quality first, e.g. bf16 before q8_0 before
/// q4_k). A plan that keeps the denoiser resident beats one that streams it, which beats one that
/// does not fit: quantized weights held resident are preferred over bf16 weights streamed block by
/// block (streaming copies every block every step). Within a class, unquantized and then larger
/// (higher quality) weights win. `None` without options.
pub fn choose_weights(options: &[WeightOption]) -> Option<WeightChoice> {
    let plans: Vec<Plan> = options.iter().map(|o| plan(&o.input)).collect();
    let class = |p: &Plan| match (p.fits, p.denoiser) {
        (true, Residency::Resident) => 0,
        (true, _) => 1,
        (false, _) => 2,
    };
    let index = (0..options.len()).min_by_key(|&i| {
        (
            class(&plans[i]),
            options[i].quantized,
            std::cmp::Reverse(options[i].input.components.denoiser),
        )
    })?;
    let mut reasons: Vec<String> = options
        .iter()
        .zip(&plans)
        .map(|(o, p)| {
            format!(
                "{}: denoiser {} stored, {} mode, denoiser {}, peak {}{}",
                o.label,
                format_bytes(o.input.components.denoiser),
                p.mode,
                p.denoiser,
                format_bytes(p.estimated_peak_bytes),
                if p.fits { "" } else { " (does not fit)" }
            )
        })
        .collect();
    let chosen = &plans[index];
    let why = match class(chosen) {
        0 if options[index].quantized => {
            match (0..options.len()).find(|&i| !options[i].quantized) {
                Some(u) => format!(
                    "{} keeps the denoiser resident where {} would {}",
                    options[index].label,
                    options[u].label,
                    if plans[u].fits {
                        "stream it block by block"
                    } else {
                        "not fit"
                    }
                ),
                None => format!("{} keeps the denoiser resident", options[index].label),
            }
        }
        0 => format!(
            "{} fits with the denoiser resident: the best quality that does",
            options[index].label
        ),
        1 => format!(
            "no option keeps the denoiser resident; {} streams it",
            options[index].label
        ),
        _ => format!(
            "nothing fits; {} comes closest in the leanest mode",
            options[index].label
        ),
    };
    reasons.push(format!("weights: chose {} ({why})", options[index].label));
    Some(WeightChoice {
        index,
        plan: plans[index].clone(),
        reasons,
    })
}

/// Largest batch (≥ 1 if anything fits, else 0) at the input's resolution that [`plan`] can serve for the
/// requested mode, in whichever mode it resolves to for that batch: for `auto` (and `performance`, its
/// ceiling being the top) the leanest mode usually sets the limit, since only the denoiser's activations
/// grow with the batch. Taking the best over the allowed modes keeps the limit monotone in memory, which
/// the UI relies on; [`max_batch_in_mode`] gives one mode's own limit.
pub fn max_batch(input: &PlanInput) -> u32 {
    candidates(input.mode)
        .iter()
        .map(|&m| max_batch_in_mode(input, m))
        .max()
        .unwrap_or(0)
}

/// Largest batch that fits in `mode` itself (0 when batch 1 does not); `auto` means [`max_batch`].
pub fn max_batch_in_mode(input: &PlanInput, mode: MemoryMode) -> u32 {
    if mode == MemoryMode::Auto {
        return max_batch(&PlanInput {
            mode,
            ..input.clone()
        });
    }
    let ok = |b: u32| estimate(input, mode, b).fits;
    if !ok(1) {
        return 0;
    }
    // Peaks grow with the batch, so the fitting batches are a prefix: binary search its end.
    let (mut lo, mut hi) = (1u32, MAX_BATCH_SEARCH);
    if ok(hi) {
        return hi;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if ok(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    // A realistic input for the planner's decisions: Z-Image-Turbo's own activation formulas.
    use crate::families::z_image::activations as z_image;

    /// CUDA context + display already holding memory when the server starts (an assumption, typical of a
    /// desktop NVIDIA card: 300–500 MiB).
    const DRIVER_OVERHEAD: u64 = 400 * MIB;

    /// Z-Image-Turbo in bf16, sizes from the brief (safetensors totals on the hub). One main layer is
    /// attention 4·3840² + SwiGLU 3·3840·10240 + adaLN 256·4·3840 ≈ 178 M parameters ≈ 356 MB; there are
    /// 30 layers + 2 noise refiners + 2 context refiners.
    fn z_image_components() -> ComponentBytes {
        ComponentBytes {
            text_encoder: 8_000_000_000,
            denoiser: 12_300_000_000,
            denoiser_largest_block: 356_000_000,
            denoiser_blocks: 34,
            vae_decoder: 330_000_000,
            ..Default::default()
        }
    }

    /// An `gib`-GiB card (how "8 GB" cards are actually sized) with the driver's share already taken.
    fn device(gib: f64, width: u32, height: u32) -> PlanInput {
        let total = (gib * GIB as f64) as u64;
        PlanInput {
            device_total: total,
            device_free: total.saturating_sub(DRIVER_OVERHEAD),
            budget: None,
            reserve: default_reserve(total),
            components: z_image_components(),
            activations: z_image::turbo(),
            width,
            height,
            batch: 1,
            cfg_on: true,
            mode: MemoryMode::Auto,
        }
    }

    /// Activations as they would be with fused (flash) attention: no score matrices in the denoiser.
    fn flash_attention() -> ActivationModel {
        let mut a = z_image::turbo();
        a.denoiser.bytes_per_score = 0;
        a
    }

    #[test]
    fn auto_prefers_quantized_resident_over_bf16_streamed() {
        // Z-Image-Turbo at 1024², CFG on, on a 12 GiB card: bf16 (12.3 GB denoiser) has to stream
        // its blocks; Q8_0 (≈ 6.5 GB stored, ≈ 190 MB dequantized scratch) stays resident.
        let bf16 = z_image_components();
        let q8 = ComponentBytes {
            text_encoder: 4_300_000_000,
            denoiser: 6_500_000_000,
            denoiser_largest_block: 189_000_000,
            denoiser_scratch: 10240 * 3840 * 2,
            text_encoder_scratch: 9728 * 2560 * 2,
            ..bf16
        };
        let input = |c: ComponentBytes, total: u64| PlanInput {
            device_total: total,
            device_free: total - DRIVER_OVERHEAD,
            budget: None,
            reserve: default_reserve(total),
            components: c,
            activations: z_image::turbo(),
            width: 1024,
            height: 1024,
            batch: 1,
            cfg_on: true,
            mode: MemoryMode::Auto,
        };
        let options = |total: u64| {
            vec![
                WeightOption {
                    label: "bf16".into(),
                    quantized: false,
                    input: input(bf16, total),
                },
                WeightOption {
                    label: "q8_0".into(),
                    quantized: true,
                    input: input(q8, total),
                },
            ]
        };
        let c = choose_weights(&options(12 * GIB)).unwrap();
        assert_eq!(c.index, 1, "{:?}", c.reasons);
        assert_eq!(c.plan.denoiser, Residency::Resident);
        assert!(
            c.reasons.last().unwrap().contains("would stream it"),
            "{:?}",
            c.reasons
        );
        // Where bf16 fits resident (a 48 GiB card), its quality wins.
        let c = choose_weights(&options(48 * GIB)).unwrap();
        assert_eq!(c.index, 0, "{:?}", c.reasons);
        // Scratch counts: a quantized denoiser's dequantized matrix joins its phase.
        let p = plan(&input(q8, 48 * GIB));
        let mut no_scratch = q8;
        no_scratch.denoiser_scratch = 0;
        let p0 = plan(&input(no_scratch, 48 * GIB));
        assert_eq!(
            p.phase_peaks.denoising - p0.phase_peaks.denoising,
            q8.denoiser_scratch
        );
    }

    #[test]
    fn real_model_on_common_cards() {
        // (card GiB, mode auto picks, fits)
        let cases = [
            // Even alone the 8.0 GB text encoder plus its reserve exceeds an 8 GiB card.
            (8.0, MemoryMode::Low, false),
            (12.0, MemoryMode::Low, true),
            (16.0, MemoryMode::Low, true),
            // Between the two: the text encoder loaded for encoding only.
            (22.0, MemoryMode::Balanced, true),
            // 19.2 GiB of weights, ≈ 1.5 GiB of denoiser activations with CFG, 1.2 GiB reserve.
            (24.0, MemoryMode::Performance, true),
            (80.0, MemoryMode::Performance, true),
        ];
        for (gib, mode, fits) in cases {
            let p = plan(&device(gib, 1024, 1024));
            assert_eq!(p.mode, mode, "{gib} GiB: {}", p.summary());
            assert_eq!(p.fits, fits, "{gib} GiB: {}", p.summary());
            assert_eq!(p.requested_mode, MemoryMode::Auto);
            assert_eq!(p.max_batch > 0, fits, "{gib} GiB: {}", p.summary());
            assert!(p.reasons.iter().any(|r| r.starts_with("available")));
            if !fits {
                let last = p.reasons.last().map(String::as_str).unwrap_or("");
                assert!(last.starts_with("no mode fits: low mode needs"), "{last}");
                assert!(last.contains("more than available"), "{last}");
                assert!(last.contains("text encoding"), "{last}");
            }
        }
    }

    #[test]
    fn tile_count_agrees_with_tile_starts() {
        for len in 1..200u64 {
            for tile in [16u64, 20, 28, 32, 48, 64] {
                for overlap in [4u64, 7, 8] {
                    assert_eq!(
                        tile_count(len, tile, overlap),
                        tile_starts(len as usize, tile as usize, overlap as usize).len() as u64,
                        "len {len} tile {tile} overlap {overlap}"
                    );
                }
            }
        }
        // Side candidates: the whole axis, then ever smaller sides, none below 16; bounded.
        let c = side_candidates(48);
        assert!(c.contains(&48) && c.contains(&28), "{c:?}");
        assert!(c.iter().all(|&s| s >= 16));
        assert!(side_candidates(u64::from(u32::MAX)).len() <= 64);
    }

    #[test]
    fn low_mode_runs_the_batch_one_item_at_a_time_only_when_that_lowers_the_peak() {
        // The real model's CFG pair at 1024²: the 8 GB text encoder sets low mode's peak, so the
        // pair runs whole (micro-batching would cost time and save nothing).
        let mut input = device(80.0, 1024, 1024);
        input.mode = MemoryMode::Low;
        let p = plan(&input);
        assert!(!p.denoiser_one_at_a_time, "{:?}", p.reasons);
        assert!(p.phase_peaks.denoising <= p.phase_peaks.text_encoding);
        assert!(!p.reasons.iter().any(|r| r.contains("one item at a time")));
        // A batch whose whole activations outgrow the text encoder's phase runs one item at a
        // time, and the estimate counts one item plus the others' waiting hidden states.
        input.batch = 8;
        let q = plan(&input);
        assert!(q.denoiser_one_at_a_time, "{:?}", q.reasons);
        assert!(q.reasons.iter().any(|r| r.contains("one item at a time")));
        let a = &input.activations;
        let tokens = a.denoiser_tokens(1024, 1024);
        let low = SequenceActivations {
            max_scores: a.low_memory_scores.unwrap_or(u64::MAX),
            ..a.denoiser
        };
        let (den_weights, whole) = (
            streamed_denoiser(&input.components).1,
            low.bytes(tokens, 16),
        );
        assert!(den_weights + whole > q.phase_peaks.text_encoding);
        let waiting = 15 * (a.denoiser.bytes_per_token * tokens / 4);
        assert_eq!(
            q.phase_peaks.denoising,
            den_weights + low.bytes(tokens, 1) + waiting
        );
        // Without CFG and with one image there is nothing to split.
        input.batch = 1;
        input.cfg_on = false;
        assert!(!plan(&input).denoiser_one_at_a_time);
        // Modes other than low never split the batch.
        for mode in [MemoryMode::Performance, MemoryMode::Balanced] {
            let r = plan(&PlanInput {
                mode,
                batch: 8,
                ..device(80.0, 1024, 1024)
            });
            assert!(!r.denoiser_one_at_a_time);
        }
    }

    #[test]
    fn low_mode_reached_by_auto_keeps_the_blocks_that_fit() {
        let c = z_image_components();
        // 12 and 16 GiB cards land in low mode: the room above its denoising phase keeps blocks
        // resident, as many as fit (on 16 GiB all 34: only the text encoder did not fit beside
        // the denoiser), and the phase still fits with the reserve.
        for (gib, all) in [(12.0, false), (16.0, true)] {
            let input = device(gib, 1024, 1024);
            let p = plan(&input);
            assert_eq!(
                (p.mode, p.denoiser),
                (MemoryMode::Low, Residency::BlockStreamed)
            );
            assert!(p.fits, "{}", p.summary());
            let k = u64::from(p.resident_blocks);
            let room = available_bytes(&input) - input.reserve;
            assert!(p.phase_peaks.denoising <= room);
            if all {
                assert_eq!(k, 34);
            } else {
                assert!(k > 0 && k < 34, "{gib} GiB keeps {k}");
                assert!(p.phase_peaks.denoising + c.denoiser_largest_block > room);
            }
            let mut streamed_only = input.clone();
            streamed_only.mode = MemoryMode::Low;
            let q = plan(&streamed_only);
            assert_eq!(q.resident_blocks, 0, "requested low streams every block");
            assert_eq!(
                p.phase_peaks.denoising,
                q.phase_peaks.denoising + k * c.denoiser_largest_block
            );
            assert!(p.reasons.iter().any(|r| r.contains("denoiser blocks stay")));
        }
        // Modes that keep the denoiser whole never report kept blocks.
        for gib in [22.0, 80.0] {
            assert_eq!(plan(&device(gib, 1024, 1024)).resident_blocks, 0);
        }
    }

    #[test]
    fn residency_follows_the_mode() {
        let p = plan(&device(80.0, 1024, 1024));
        assert_eq!(
            (p.text_encoder, p.denoiser, p.vae, p.vae_tiling),
            (
                Residency::Resident,
                Residency::Resident,
                Residency::Resident,
                None
            )
        );
        let p = plan(&device(22.0, 1024, 1024));
        assert_eq!(
            (p.text_encoder, p.denoiser, p.vae),
            (
                Residency::LoadUseFree,
                Residency::Resident,
                Residency::Resident
            )
        );
        assert_eq!(
            p.vae_tiling, None,
            "full decode fits on 22 GiB: {:?}",
            p.reasons
        );
        // Low mode: the whole 1024² decode (≈ 2.3 GiB with the VAE) stays under the 7.5 GiB
        // text-encoding phase, so it is not tiled; at 2048² (≈ 8.4 GiB) it would set the peak.
        let p = plan(&device(12.0, 1024, 1024));
        assert_eq!(
            (p.text_encoder, p.denoiser, p.vae, p.vae_tiling),
            (
                Residency::LoadUseFree,
                Residency::BlockStreamed,
                Residency::LoadUseFree,
                None
            )
        );
        // The cheapest tiling that keeps the decode under the text-encoding peak. The best square
        // one, 2 × 2 tiles of 136 latents, decodes 13 % more cells than the whole image (32-latent
        // tiles: 89 % more); bands as wide as the image do better still.
        let p = plan(&device(12.0, 2048, 2048));
        let t = p.vae_tiling.expect("tiled");
        assert!(
            p.phase_peaks.decoding <= p.phase_peaks.text_encoding,
            "{:?}",
            p.reasons
        );
        let whole = 256 * 256;
        let square = tiled_cells(256, 256, VaeTiling::square(136, 8));
        assert_eq!(square, 272 * 272);
        assert!(
            tiled_cells(256, 256, t) <= square && tiled_cells(256, 256, t) > whole,
            "{t}"
        );
        assert!(tiled_cells(256, 256, t) < tiled_cells(256, 256, DEFAULT_VAE_TILING));
    }

    #[test]
    fn phase_peaks_add_up_by_hand() {
        let input = device(80.0, 1024, 1024);
        let a = &input.activations;
        let c = &input.components;
        let p = plan(&input);
        let all = c.text_encoder + c.denoiser + c.vae_decoder;
        let tokens = 4096 + 512;
        // CFG: two sequences through the denoiser.
        // Scores are chunked: at most 64 Mi of them (2 copies × bf16) exist at once.
        let den =
            2 * a.denoiser.bytes_per_token * tokens + 4 * (2 * 30 * tokens * tokens).min(64 << 20);
        assert_eq!(p.phase_peaks.denoising, all + den);
        // Feature maps per output pixel, plus one banded im2col buffer.
        assert_eq!(
            p.phase_peaks.decoding,
            all + 1_024 * 2 * 1024 * 1024 + (16 << 20) * 2
        );
        assert_eq!(p.estimated_peak_bytes, p.phase_peaks.max());

        let mut low = input.clone();
        low.mode = MemoryMode::Low;
        let p = plan(&low);
        // Two blocks in flight plus the 196 MB outside the 34 blocks; the CFG pair runs whole (the
        // text encoder's phase is larger) with scores capped at 8 Mi.
        let streamed = 2 * 356_000_000 + (12_300_000_000 - 34 * 356_000_000);
        let pair =
            2 * a.denoiser.bytes_per_token * tokens + 4 * (2 * 30 * tokens * tokens).min(8 << 20);
        assert_eq!(p.phase_peaks.denoising, streamed + pair);
        assert!(!p.denoiser_one_at_a_time);
        assert_eq!(
            p.phase_peaks.text_encoding,
            c.text_encoder + a.text_encoder.bytes(512, 1)
        );
    }

    #[test]
    fn more_memory_never_picks_a_lower_mode_or_a_smaller_batch() {
        for (w, h) in [(512, 512), (1024, 1024), (1280, 768), (1536, 1536)] {
            for (cfg_on, mode) in [false, true]
                .into_iter()
                .flat_map(|c| MemoryMode::ALL.map(|m| (c, m)))
            {
                let mut last = (0u8, false, 0u32);
                for quarter_gib in 4..=4 * 96 {
                    let mut input = device(f64::from(quarter_gib) / 4.0, w, h);
                    input.cfg_on = cfg_on;
                    input.mode = mode;
                    let p = plan(&input);
                    let now = (p.mode.rank(), p.fits, p.max_batch);
                    assert!(
                        now.0 >= last.0,
                        "{w}x{h} at {quarter_gib}/4 GiB: {now:?} < {last:?}"
                    );
                    assert!(
                        now.1 >= last.1,
                        "{w}x{h} at {quarter_gib}/4 GiB: fits regressed"
                    );
                    assert!(
                        now.2 >= last.2,
                        "{w}x{h} at {quarter_gib}/4 GiB: max batch fell"
                    );
                    last = now;
                }
            }
        }
    }

    #[test]
    fn bigger_images_never_pick_a_higher_mode() {
        for gib in [8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 80.0, 141.0] {
            for activations in [z_image::turbo(), flash_attention()] {
                let mut last = (u8::MAX, true);
                for side in (256..=4096).step_by(64) {
                    let mut input = device(gib, side, side * 3 / 4);
                    input.activations = activations;
                    let p = plan(&input);
                    let now = (p.mode.rank(), p.fits);
                    assert!(now.0 <= last.0, "{gib} GiB at {side}px: mode rose");
                    assert!(now.1 <= last.1, "{gib} GiB at {side}px: fits came back");
                    last = now;
                }
            }
        }
    }

    #[test]
    fn budget_caps_free_memory_but_never_raises_it() {
        let mut input = device(80.0, 1024, 1024);
        input.budget = Some(12 * GIB);
        input.reserve = default_reserve(12 * GIB);
        let p = plan(&input);
        assert_eq!(p.available_bytes, 12 * GIB);
        assert_eq!(p.mode, MemoryMode::Low);
        assert!(p.reasons[0].contains("budget"), "{}", p.reasons[0]);

        let mut input = device(12.0, 1024, 1024);
        input.budget = Some(80 * GIB);
        let p = plan(&input);
        assert_eq!(p.available_bytes, input.device_free);
        assert_eq!(p.mode, MemoryMode::Low);
    }

    #[test]
    fn max_batch_is_the_edge_of_fitting() {
        for gib in [12.0, 24.0, 80.0] {
            let input = device(gib, 1024, 1024);
            let max = max_batch(&input);
            assert!(max >= 1, "{gib} GiB");
            let at = |b: u32| {
                plan(&PlanInput {
                    batch: b,
                    ..input.clone()
                })
            };
            assert!(at(max).fits, "{gib} GiB batch {max}");
            assert!(!at(max + 1).fits, "{gib} GiB batch {}", max + 1);
            // A fixed mode's limit never exceeds auto's, which may drop to a lower mode for big batches.
            for mode in MemoryMode::CONCRETE {
                assert!(max_batch_in_mode(&input, mode) <= max);
            }
        }
        assert_eq!(max_batch(&device(8.0, 1024, 1024)), 0);
    }

    #[test]
    fn a_batch_that_needs_a_lower_mode_gets_one() {
        let mut input = device(22.0, 1024, 1024);
        assert_eq!(plan(&input).mode, MemoryMode::Balanced);
        input.batch = max_batch_in_mode(&input, MemoryMode::Balanced) + 1;
        let p = plan(&input);
        assert_eq!(p.mode, MemoryMode::Low);
        assert!(p.fits);
    }

    #[test]
    fn balanced_tiles_when_the_full_decode_would_not_fit() {
        // With fused attention the denoiser is cheap and the decode's full-resolution feature maps
        // (2 KiB per output pixel, 8 GiB at 2048²) become balanced mode's peak. Give it just enough
        // for its other phases: the decode must be tiled.
        let mut input = device(24.0, 2048, 2048);
        input.activations = flash_attention();
        let c = input.components;
        let kept = c.denoiser + c.vae_decoder;
        let te_phase = kept + c.text_encoder + input.activations.text_encoder.bytes(512, 1);
        input.budget = Some(te_phase + input.reserve + 64 * MIB);
        let p = plan(&input);
        assert_eq!(p.mode, MemoryMode::Balanced, "{:?}", p.reasons);
        assert!(p.vae_tiling.is_some(), "{:?}", p.reasons);
        assert!(p.fits);
        assert!(
            p.reasons
                .iter()
                .any(|r| r.contains("full decode phase would need")),
            "{:?}",
            p.reasons
        );
        // The same model at 1024² decodes in one piece.
        input.width = 1024;
        input.height = 1024;
        assert_eq!(plan(&input).vae_tiling, None);
    }

    #[test]
    fn performance_never_tiles_and_low_tiles_when_the_decode_would_set_its_peak() {
        for side in [256, 1024, 2048] {
            for mode in [MemoryMode::Performance, MemoryMode::Low] {
                // A card big enough that performance never steps down.
                let mut input = device(1024.0, side, side);
                input.mode = mode;
                let p = plan(&input);
                assert_eq!(p.mode, mode);
                // Low mode's other peak is the 8 GB text encoder; only 2048²'s decode exceeds it.
                assert_eq!(
                    p.vae_tiling.is_some(),
                    mode == MemoryMode::Low && side == 2048,
                    "{side} {mode}: {:?}",
                    p.reasons
                );
            }
        }
    }

    #[test]
    fn tiles_shrink_when_the_default_tile_does_not_fit() {
        let mut input = device(80.0, 1024, 1024);
        input.mode = MemoryMode::Low;
        // Room for the VAE, the accumulator and a 16-latent tile, not a 32-latent one.
        let a = input.activations.vae;
        let small = input.components.vae_decoder + a.tiled_decode_bytes(128, 128, SMALL_VAE_TILING);
        input.components.text_encoder = 0;
        input.components.denoiser = 0;
        input.components.denoiser_largest_block = 0;
        // Nothing else needs memory, so only the room left decides the tile.
        input.activations.denoiser.bytes_per_token = 0;
        input.activations.denoiser.bytes_per_score = 0;
        input.activations.text_encoder.bytes_per_token = 0;
        input.activations.text_encoder.bytes_per_score = 0;
        input.budget = Some(small + input.reserve);
        let p = plan(&input);
        assert_eq!(p.vae_tiling, Some(SMALL_VAE_TILING), "{:?}", p.reasons);
        assert!(p.fits, "{:?}", p.reasons);
    }

    #[test]
    fn a_fixed_mode_that_does_not_fit_steps_down() {
        let mut input = device(12.0, 1024, 1024);
        input.mode = MemoryMode::Performance;
        let p = plan(&input);
        assert_eq!(
            (p.mode, p.requested_mode),
            (MemoryMode::Low, MemoryMode::Performance)
        );
        assert!(p.fits && p.stepped_down());
        assert!(
            p.reasons
                .iter()
                .any(|r| r == "performance does not fit; stepped down to low"),
            "{:?}",
            p.reasons
        );
        assert!(max_batch_in_mode(&input, MemoryMode::Performance) == 0);

        // A fixed mode is a ceiling, never a floor: low stays low on a big card.
        input = device(80.0, 1024, 1024);
        input.mode = MemoryMode::Low;
        let p = plan(&input);
        assert_eq!(p.mode, MemoryMode::Low);
        assert!(!p.stepped_down());
        assert_eq!(p.max_batch, max_batch_in_mode(&input, MemoryMode::Low));

        // Low alone cannot step anywhere: it reports the shortfall.
        input = device(8.0, 1024, 1024);
        input.mode = MemoryMode::Low;
        let p = plan(&input);
        assert!(!p.fits);
        let last = p.reasons.last().cloned().unwrap_or_default();
        assert!(last.starts_with("does not fit: low mode needs"), "{last}");
    }

    #[test]
    fn unknown_block_sizes_load_the_denoiser_whole() {
        let mut input = device(24.0, 1024, 1024);
        input.mode = MemoryMode::Low;
        input.components.denoiser_blocks = 0;
        let p = plan(&input);
        assert_eq!(p.denoiser, Residency::LoadUseFree);
        assert!(p.phase_peaks.denoising > input.components.denoiser);
    }

    #[test]
    fn zero_and_absurd_inputs_do_not_panic() {
        let zero = PlanInput {
            device_total: 0,
            device_free: 0,
            budget: Some(0),
            reserve: 0,
            components: ComponentBytes::default(),
            activations: z_image::turbo(),
            width: 0,
            height: 0,
            batch: 0,
            cfg_on: false,
            mode: MemoryMode::Auto,
        };
        let p = plan(&zero);
        // Even an empty image runs the caption through both transformers: nothing fits in 0 bytes.
        assert!(!p.fits);
        assert_eq!(p.max_batch, 0);
        assert_eq!(p.mode, MemoryMode::Low);

        let mut zero_arch = zero.clone();
        zero_arch.activations = z_image::model(&z_image::ZImageArch {
            dim: 0,
            heads: 0,
            ffn_hidden: 0,
            patch_size: 0,
            cap_tokens: 0,
            text_hidden: 0,
            text_heads: 0,
            text_ffn_hidden: 0,
            vae_block_out_channels: vec![],
            vae_scale: 0,
            elem_bytes: 0,
            vae_elem_bytes: 0,
        });
        zero_arch.width = 1024;
        zero_arch.height = 1024;
        let _ = plan(&zero_arch);

        let absurd = PlanInput {
            device_total: u64::MAX,
            device_free: u64::MAX,
            budget: None,
            reserve: u64::MAX,
            components: ComponentBytes {
                text_encoder: u64::MAX,
                denoiser: u64::MAX,
                denoiser_largest_block: u64::MAX,
                denoiser_blocks: usize::MAX,
                vae_decoder: u64::MAX,
                ..Default::default()
            },
            activations: z_image::turbo(),
            width: u32::MAX,
            height: u32::MAX,
            batch: u32::MAX,
            cfg_on: true,
            mode: MemoryMode::Auto,
        };
        let p = plan(&absurd);
        assert!(!p.fits);
        assert_eq!(p.max_batch, 0);
        assert_eq!(p.estimated_peak_bytes, u64::MAX);
        for mode in MemoryMode::ALL {
            let _ = plan(&PlanInput {
                mode,
                ..absurd.clone()
            });
            let _ = plan(&PlanInput {
                mode,
                ..zero.clone()
            });
        }
        // A huge card with a tiny job: the batch search stops at its cap.
        let p = plan(&device(1e9, 64, 64));
        assert!(p.fits);
        assert_eq!(p.max_batch, MAX_BATCH_SEARCH);
    }

    #[test]
    fn plan_serialises_for_the_job_record() {
        let p = plan(&device(12.0, 2048, 2048));
        let json = serde_json::to_value(&p).expect("plan serialises");
        assert_eq!(json["mode"], "low");
        assert_eq!(json["requested_mode"], "auto");
        assert_eq!(json["denoiser"], "block_streamed");
        for side in ["tile_width_latent", "tile_height_latent"] {
            assert!(json["vae_tiling"][side].as_u64().is_some_and(|t| t >= 16));
        }
        assert_eq!(json["vae_tiling"]["overlap_latent"], 8);
        assert!(json["reasons"].as_array().is_some_and(|r| !r.is_empty()));
        assert!(p
            .summary()
            .starts_with("memory plan: mode low (requested auto)"));
        let p = plan(&device(12.0, 1024, 1024));
        let json = serde_json::to_value(&p).expect("plan serialises");
        assert!(json["vae_tiling"].is_null());
    }

    #[test]
    fn memory_modes_parse_and_print() {
        for mode in MemoryMode::ALL {
            assert_eq!(mode.to_string().parse::<MemoryMode>(), Ok(mode));
            let json = serde_json::to_string(&mode).expect("serialises");
            assert_eq!(json, format!("\"{mode}\""));
        }
        assert_eq!(" Balanced ".parse::<MemoryMode>(), Ok(MemoryMode::Balanced));
        let err = "turbo".parse::<MemoryMode>().expect_err("not a mode");
        let msg = err.to_string();
        assert!(
            msg.contains("`turbo`") && msg.contains("auto, performance, balanced, low"),
            "{msg}"
        );
        assert_eq!(MemoryMode::default(), MemoryMode::Auto);
    }

    /// The table for the report: `cargo test plan_table -- --nocapture`.
    #[test]
    fn plan_table() {
        println!("| card | mode | fits | peak | phase | available | tiling | max batch (auto) | max batch (chosen mode) |");
        println!("|---|---|---|---|---|---|---|---|---|");
        for gib in [8.0, 12.0, 16.0, 24.0, 80.0] {
            let input = device(gib, 1024, 1024);
            let p = plan(&input);
            println!(
                "| {gib} GiB | {} | {} | {} | {} | {} | {} | {} | {} |",
                p.mode,
                p.fits,
                format_bytes(p.estimated_peak_bytes),
                p.phase_peaks.largest(),
                format_bytes(p.available_bytes),
                p.vae_tiling
                    .map(|t| t.to_string())
                    .unwrap_or_else(|| "-".into()),
                p.max_batch,
                max_batch_in_mode(&input, p.mode),
            );
        }
        for r in plan(&device(24.0, 1024, 1024)).reasons {
            println!("  {r}");
        }
        let short = plan(&device(8.0, 1024, 1024));
        println!("{}", short.summary());
        println!(
            "  {}",
            short.reasons.last().map(String::as_str).unwrap_or("")
        );
    }
}
