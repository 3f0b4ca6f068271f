//! Where the DiT's repeated blocks come from during a forward: all resident on the device, or
//! streamed from the host one at a time (the next one prefetched on a thread) with the first few
//! kept on the device — the low-memory plans.

use candle_core::Tensor;

use super::config::DitConfig;
use super::dit::Block;
use crate::families::lora::{self, HasLins, LoraPart, LoraSet};
use crate::families::weights::stage::{SharedStager, StagedBlock};
use crate::families::weights::Loader;
use crate::ops::linear::{Lin, LoraMode};

/// How the forward obtains its repeated blocks: all resident, or loaded one by one.
pub trait BlockSource {
    /// Called for `noise_refiner`, `context_refiner` and `layers` blocks in execution order;
    /// `f` runs the block. Implementations may load the block just before and drop it after.
    fn with_block(
        &mut self,
        group: BlockGroup,
        index: usize,
        f: &mut dyn FnMut(&Block) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockGroup {
    NoiseRefiner,
    ContextRefiner,
    Layers,
}

impl BlockGroup {
    pub fn prefix(self) -> &'static str {
        match self {
            Self::NoiseRefiner => "noise_refiner",
            Self::ContextRefiner => "context_refiner",
            Self::Layers => "layers",
        }
    }
}

/// All blocks resident on the device.
pub struct ResidentBlocks {
    pub noise_refiner: Vec<Block>,
    pub context_refiner: Vec<Block>,
    pub layers: Vec<Block>,
}

impl ResidentBlocks {
    pub fn load(cfg: &DitConfig, vb: &Loader) -> candle_core::Result<Self> {
        let group = |g: BlockGroup, n: usize, modulated: bool| {
            (0..n)
                .map(|i| Block::new(cfg, modulated, vb.pp(g.prefix()).pp(i)))
                .collect::<candle_core::Result<Vec<_>>>()
        };
        Ok(Self {
            noise_refiner: group(BlockGroup::NoiseRefiner, cfg.n_refiner_layers, true)?,
            context_refiner: group(BlockGroup::ContextRefiner, cfg.n_refiner_layers, false)?,
            layers: group(BlockGroup::Layers, cfg.n_layers, true)?,
        })
    }
}

impl BlockSource for ResidentBlocks {
    fn with_block(
        &mut self,
        group: BlockGroup,
        index: usize,
        f: &mut dyn FnMut(&Block) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let list = match group {
            BlockGroup::NoiseRefiner => &self.noise_refiner,
            BlockGroup::ContextRefiner => &self.context_refiner,
            BlockGroup::Layers => &self.layers,
        };
        match list.get(index) {
            Some(b) => f(b),
            None => candle_core::bail!("no block {}.{index}", group.prefix()),
        }
    }
}

/// Every block of the model in execution order: noise refiner, context refiner, main layers.
fn execution_order(cfg: &DitConfig) -> Vec<(BlockGroup, usize)> {
    [
        (BlockGroup::NoiseRefiner, cfg.n_refiner_layers),
        (BlockGroup::ContextRefiner, cfg.n_refiner_layers),
        (BlockGroup::Layers, cfg.n_layers),
    ]
    .into_iter()
    .flat_map(|(g, n)| (0..n).map(move |i| (g, i)))
    .collect()
}

/// The first blocks in execution order, kept on the device for a whole job while the rest stream
/// (the low-memory plan when memory is left over: fewer bytes cross the bus every step).
pub struct KeptBlocks {
    blocks: Vec<(BlockGroup, usize, Block)>,
}

impl KeptBlocks {
    pub fn load(cfg: &DitConfig, vb: &Loader, n: usize) -> candle_core::Result<Self> {
        let blocks = execution_order(cfg)
            .into_iter()
            .take(n)
            .map(|(g, i)| {
                let b = Block::new(
                    cfg,
                    g != BlockGroup::ContextRefiner,
                    vb.pp(g.prefix()).pp(i),
                )?;
                Ok((g, i, b))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { blocks })
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    fn get(&self, group: BlockGroup, index: usize) -> Option<&Block> {
        self.blocks
            .iter()
            .find(|(g, i, _)| *g == group && *i == index)
            .map(|(_, _, b)| b)
    }
}

/// A block on its way: built on a helper thread, or (on CUDA) uploading on the copy stream.
enum Pending {
    Built(std::thread::JoinHandle<candle_core::Result<Block>>),
    Staged(std::thread::JoinHandle<candle_core::Result<Box<dyn StagedBlock>>>),
}

/// Blocks loaded from the host mapping just before use and dropped after; the next block is
/// read on a helper thread while the current one computes — on CUDA through pinned memory and a
/// copy stream ([`crate::families::weights::stage`]). Blocks in `kept` are used in place.
pub struct StreamedBlocks<'a> {
    pub cfg: &'a DitConfig,
    pub vb: Loader,
    kept: Option<&'a KeptBlocks>,
    lora: StreamLora,
    prefetched: Option<(BlockGroup, usize, Pending)>,
    stager: Option<SharedStager>,
}

impl<'a> StreamedBlocks<'a> {
    pub fn new(cfg: &'a DitConfig, vb: Loader) -> Self {
        Self {
            cfg,
            vb,
            kept: None,
            lora: None,
            prefetched: None,
            stager: None,
        }
    }

    /// Applies a job's LoRAs to every streamed block.
    pub fn with_lora(mut self, lora: StreamLora) -> Self {
        self.lora = lora;
        self
    }

    /// Uses the blocks of `kept` from the device instead of streaming them.
    pub fn with_kept(mut self, kept: &'a KeptBlocks) -> Self {
        self.kept = Some(kept);
        self
    }

    /// Uploads blocks through `stager` (pinned staging and a copy stream on CUDA).
    pub fn with_stager(mut self, stager: Option<SharedStager>) -> Self {
        self.stager = stager;
        self
    }

    fn is_kept(&self, group: BlockGroup, index: usize) -> bool {
        self.kept.is_some_and(|k| k.get(group, index).is_some())
    }

    /// The next block after `(group, index)` that has to be streamed.
    fn next_streamed(&self, group: BlockGroup, index: usize) -> Option<(BlockGroup, usize)> {
        let mut at = self.next_of(group, index);
        while let Some((g, i)) = at {
            if !self.is_kept(g, i) {
                break;
            }
            at = self.next_of(g, i);
        }
        at
    }

    fn next_of(&self, group: BlockGroup, index: usize) -> Option<(BlockGroup, usize)> {
        let n = |g: BlockGroup| match g {
            BlockGroup::NoiseRefiner | BlockGroup::ContextRefiner => self.cfg.n_refiner_layers,
            BlockGroup::Layers => self.cfg.n_layers,
        };
        if index + 1 < n(group) {
            return Some((group, index + 1));
        }
        let order = [
            BlockGroup::NoiseRefiner,
            BlockGroup::ContextRefiner,
            BlockGroup::Layers,
        ];
        let pos = order.iter().position(|g| *g == group)?;
        order[pos + 1..]
            .iter()
            .find(|g| n(**g) > 0)
            .map(|g| (*g, 0))
    }

    /// The staging work for one block (the tensor names under its prefix).
    fn stage_job(
        &self,
        group: BlockGroup,
        index: usize,
    ) -> Option<impl FnOnce() -> candle_core::Result<Box<dyn StagedBlock>> + Send + 'static> {
        let stager = self.stager.clone()?;
        let weights = self.vb.weights()?.clone();
        let prefix = format!("{}.{index}.", group.prefix());
        Some(move || {
            let names = weights.names_under(&prefix);
            let mut s = stager.lock().map_err(|_| {
                candle_core::Error::Msg("the block stager's lock was poisoned".into())
            })?;
            s.stage(&weights, &names)
        })
    }

    fn spawn(&self, group: BlockGroup, index: usize) -> Pending {
        if let Some(job) = self.stage_job(group, index) {
            return Pending::Staged(std::thread::spawn(job));
        }
        let cfg = self.cfg.clone();
        let vb = self.vb.pp(group.prefix()).pp(index);
        let modulated = group != BlockGroup::ContextRefiner;
        Pending::Built(std::thread::spawn(move || Block::new(&cfg, modulated, vb)))
    }

    /// Builds a block from its uploaded tensors (on the compute stream, after the upload).
    fn build_staged(
        &self,
        staged: Box<dyn StagedBlock>,
        group: BlockGroup,
        index: usize,
    ) -> candle_core::Result<Block> {
        let map = staged.finish()?;
        let weights = self
            .vb
            .weights()
            .ok_or_else(|| candle_core::Error::Msg("staged block without weights".into()))?;
        let ld = Loader::staged(map, weights, self.vb.dtype(), self.vb.device());
        Block::new(
            self.cfg,
            group != BlockGroup::ContextRefiner,
            ld.pp(group.prefix()).pp(index),
        )
    }

    fn join(&self, p: Pending, group: BlockGroup, index: usize) -> candle_core::Result<Block> {
        let panicked = || candle_core::Error::Msg("block loader thread panicked".into());
        let block = match p {
            Pending::Built(h) => h.join().map_err(|_| panicked())??,
            Pending::Staged(h) => {
                let staged = h.join().map_err(|_| panicked())??;
                self.build_staged(staged, group, index)?
            }
        };
        with_lora(block, &self.lora)
    }

    /// Loads a block now, on this thread.
    fn load_now(&self, group: BlockGroup, index: usize) -> candle_core::Result<Block> {
        let block = match self.stage_job(group, index) {
            Some(job) => self.build_staged(job()?, group, index)?,
            None => Block::new(
                self.cfg,
                group != BlockGroup::ContextRefiner,
                self.vb.pp(group.prefix()).pp(index),
            )?,
        };
        with_lora(block, &self.lora)
    }
}

impl BlockSource for StreamedBlocks<'_> {
    fn with_block(
        &mut self,
        group: BlockGroup,
        index: usize,
        f: &mut dyn FnMut(&Block) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        if let Some(block) = self.kept.and_then(|k| k.get(group, index)) {
            // Load the next streamed block while the kept ones compute.
            if self.prefetched.is_none() {
                if let Some((g, i)) = self.next_streamed(group, index) {
                    self.prefetched = Some((g, i, self.spawn(g, i)));
                }
            }
            return f(block);
        }
        let block = match self.prefetched.take() {
            Some((g, i, pending)) if g == group && i == index => self.join(pending, g, i)?,
            other => {
                if let Some((g, i, pending)) = other {
                    // A stale prefetch: finish it so its buffers are released in order.
                    let _ = self.join(pending, g, i);
                }
                self.load_now(group, index)?
            }
        };
        if let Some((g, i)) = self.next_streamed(group, index) {
            self.prefetched = Some((g, i, self.spawn(g, i)));
        }
        f(&block)
    }
}

impl HasLins for ResidentBlocks {
    fn lins_mut(&mut self) -> Vec<&mut Lin> {
        self.noise_refiner
            .iter_mut()
            .chain(self.context_refiner.iter_mut())
            .chain(self.layers.iter_mut())
            .flat_map(|b| b.lins_mut())
            .collect()
    }
    fn lins(&self) -> Vec<&Lin> {
        self.noise_refiner
            .iter()
            .chain(self.context_refiner.iter())
            .chain(self.layers.iter())
            .flat_map(|b| b.lins())
            .collect()
    }
}

impl HasLins for KeptBlocks {
    fn lins_mut(&mut self) -> Vec<&mut Lin> {
        self.blocks
            .iter_mut()
            .flat_map(|(_, _, b)| b.lins_mut())
            .collect()
    }
    fn lins(&self) -> Vec<&Lin> {
        self.blocks.iter().flat_map(|(_, _, b)| b.lins()).collect()
    }
}

/// A job's LoRAs for streamed blocks: applied to each block as it is built.
pub type StreamLora = Option<(std::sync::Arc<LoraSet>, LoraMode)>;

fn with_lora(mut block: Block, lora: &StreamLora) -> candle_core::Result<Block> {
    if let Some((set, mode)) = lora {
        lora::apply(&mut block, set, LoraPart::Denoiser, *mode)?;
    }
    Ok(block)
}
