//! Component lifecycle, written once for every family. A [`Slot`] holds what a component is built
//! from (configs, weight files) and, while loaded, the built module; [`Parts`] holds a family's
//! three slots with the device and the precision policy, and implements [`Components`] — the
//! load / unload / dtype / bytes interface the engine drives — for any family. A family only says
//! how each of its modules is built ([`Module`]).

use candle_core::{DType, Device};

use super::weights::Weights;
use super::{Component, DenoiserResidency, ModelError, PrecisionPolicy};
use crate::memory::planner::ComponentBytes;
use crate::memory::VaeActivations;
use crate::nn::vae::{VaeConfig, VaeDecoder};
use crate::nn::vae_encoder::VaeEncoder;
use crate::ops::attention::QUERY_CHUNK_ROWS;
use crate::ops::conv::CONV_BAND_ELEMS;

/// A component's module as a family builds it.
pub trait Module: Sized + Send {
    /// What the module is built from (configs, weight files, settings); kept while unloaded.
    type Source: Send;

    /// Builds the module on `device` in the policy's dtypes for this component.
    fn build(
        src: &Self::Source,
        policy: &PrecisionPolicy,
        device: &Device,
    ) -> Result<Self, ModelError>;

    /// Exact weight bytes in the policy's dtype (from the safetensors headers).
    fn bytes(src: &Self::Source, policy: &PrecisionPolicy) -> u64;

    /// Bytes of the largest weight matrix dequantized into the policy's dtype just before its
    /// product (0 when nothing is stored quantized): it lives on top of the stored weights while
    /// the component runs.
    fn scratch_bytes(_src: &Self::Source, _policy: &PrecisionPolicy) -> u64 {
        0
    }

    /// Bytes of each repeated block, for a denoiser that can stream them (empty: cannot).
    fn block_bytes(_src: &Self::Source, _policy: &PrecisionPolicy) -> Vec<u64> {
        Vec::new()
    }

    /// Whether a built module has everything its source's settings ask for (a resident denoiser
    /// needs its blocks on the device).
    fn complete(&self, _src: &Self::Source) -> bool {
        true
    }

    /// Brings a built module up to its source's settings.
    fn finish(
        &mut self,
        _src: &Self::Source,
        _policy: &PrecisionPolicy,
        _device: &Device,
    ) -> Result<(), ModelError> {
        Ok(())
    }

    /// How the denoiser's weights are held while it runs (a no-op for modules that always run
    /// resident).
    fn set_residency(
        _src: &mut Self::Source,
        _module: Option<&mut Self>,
        _residency: DenoiserResidency,
    ) {
    }
}

/// One component: its source and, while loaded, its module.
pub struct Slot<M: Module> {
    source: M::Source,
    module: Option<M>,
}

impl<M: Module> Slot<M> {
    pub fn new(source: M::Source) -> Self {
        Self {
            source,
            module: None,
        }
    }

    pub fn source(&self) -> &M::Source {
        &self.source
    }

    /// The module, when loaded (whatever its completeness).
    pub fn get(&self) -> Option<&M> {
        self.module.as_ref()
    }

    /// The source and the module at once (a module's methods that read its source).
    pub fn split_mut(&mut self) -> (&mut M::Source, Option<&mut M>) {
        (&mut self.source, self.module.as_mut())
    }

    pub fn is_loaded(&self) -> bool {
        self.module
            .as_ref()
            .is_some_and(|m| m.complete(&self.source))
    }

    /// Builds the module (or completes it) when needed, and returns it.
    pub fn load(
        &mut self,
        policy: &PrecisionPolicy,
        device: &Device,
    ) -> Result<&mut M, ModelError> {
        let module = match self.module.take() {
            Some(m) => m,
            None => M::build(&self.source, policy, device)?,
        };
        let module = self.module.insert(module);
        if !module.complete(&self.source) {
            module.finish(&self.source, policy, device)?;
        }
        Ok(module)
    }

    pub fn unload(&mut self) {
        self.module = None;
    }
}

/// What the engine drives: each component's placement and dtype, whatever the family.
pub trait Components: Send {
    fn device(&self) -> &Device;
    /// The dtypes the components are built in now.
    fn policy(&self) -> PrecisionPolicy;
    /// Exact weight bytes per component in the policy's dtypes.
    fn bytes(&self) -> ComponentBytes;
    /// Loads a component onto the device (no-op when loaded).
    fn load(&mut self, component: Component) -> Result<(), ModelError>;
    /// Drops a component's device copy.
    fn unload(&mut self, component: Component);
    fn is_loaded(&self, component: Component) -> bool;
    /// Rebuilds a component in another dtype (guard fallbacks); takes effect at its next use.
    fn set_dtype(&mut self, component: Component, dtype: DType) -> Result<(), ModelError>;
    fn dtype(&self, component: Component) -> DType {
        self.policy().of(component)
    }
    fn set_denoiser_residency(&mut self, residency: DenoiserResidency);
    /// The VAE decoder (loaded on demand).
    fn vae(&mut self) -> Result<&VaeDecoder, ModelError>;
    /// The VAE encoder (loaded on demand: image to image and inpainting; dropped with the VAE).
    fn vae_encoder(&mut self) -> Result<&VaeEncoder, ModelError>;
    /// Drops the VAE encoder's device copy.
    fn unload_vae_encoder(&mut self);
    /// `vae/config.json` (scaling and shift of the latents).
    fn vae_config(&self) -> &VaeConfig;
}

/// A family's three components with the device and the precision policy.
pub struct Parts<T: Module, D: Module> {
    device: Device,
    policy: PrecisionPolicy,
    /// The residual dtype the policy started with (restored when the denoiser leaves f32).
    base_residual: DType,
    pub text_encoder: Slot<T>,
    pub denoiser: Slot<D>,
    pub vae: Slot<VaeDecoder>,
    /// Built from the VAE's source when an input image is encoded.
    vae_encoder: Option<VaeEncoder>,
}

impl<T: Module, D: Module> Parts<T, D> {
    pub fn new(
        device: &Device,
        policy: PrecisionPolicy,
        text_encoder: T::Source,
        denoiser: D::Source,
        vae: VaeSource,
    ) -> Self {
        Self {
            device: device.clone(),
            policy,
            base_residual: policy.residual,
            text_encoder: Slot::new(text_encoder),
            denoiser: Slot::new(denoiser),
            vae: Slot::new(vae),
            vae_encoder: None,
        }
    }

    /// The text encoder, loaded.
    pub fn text_encoder(&mut self) -> Result<&mut T, ModelError> {
        self.text_encoder.load(&self.policy, &self.device)
    }

    /// The denoiser, loaded, with its source.
    pub fn denoiser(&mut self) -> Result<(&mut D::Source, &mut D), ModelError> {
        self.denoiser.load(&self.policy, &self.device)?;
        match self.denoiser.split_mut() {
            (src, Some(m)) => Ok((src, m)),
            (_, None) => Err(ModelError::Invalid("denoiser not loaded".into())),
        }
    }
}

impl<T: Module, D: Module> Components for Parts<T, D> {
    fn device(&self) -> &Device {
        &self.device
    }

    fn policy(&self) -> PrecisionPolicy {
        self.policy
    }

    fn bytes(&self) -> ComponentBytes {
        let blocks = D::block_bytes(self.denoiser.source(), &self.policy);
        ComponentBytes {
            text_encoder: T::bytes(self.text_encoder.source(), &self.policy),
            denoiser: D::bytes(self.denoiser.source(), &self.policy),
            denoiser_largest_block: blocks.iter().copied().max().unwrap_or(0),
            denoiser_blocks: blocks.len(),
            vae_decoder: VaeDecoder::bytes(self.vae.source(), &self.policy),
            denoiser_scratch: D::scratch_bytes(self.denoiser.source(), &self.policy),
            text_encoder_scratch: T::scratch_bytes(self.text_encoder.source(), &self.policy),
        }
    }

    fn load(&mut self, component: Component) -> Result<(), ModelError> {
        let (p, dev) = (&self.policy, &self.device);
        match component {
            Component::TextEncoder => self.text_encoder.load(p, dev).map(drop),
            Component::Denoiser => self.denoiser.load(p, dev).map(drop),
            Component::Vae => self.vae.load(p, dev).map(drop),
        }
    }

    fn unload(&mut self, component: Component) {
        match component {
            Component::TextEncoder => self.text_encoder.unload(),
            Component::Denoiser => self.denoiser.unload(),
            Component::Vae => {
                self.vae.unload();
                self.vae_encoder = None;
            }
        }
    }

    fn is_loaded(&self, component: Component) -> bool {
        match component {
            Component::TextEncoder => self.text_encoder.is_loaded(),
            Component::Denoiser => self.denoiser.is_loaded(),
            Component::Vae => self.vae.is_loaded(),
        }
    }

    fn set_dtype(&mut self, component: Component, dtype: DType) -> Result<(), ModelError> {
        let was_loaded = self.is_loaded(component);
        self.policy.set(component, dtype, self.base_residual);
        self.unload(component);
        if was_loaded {
            self.load(component)?;
        }
        Ok(())
    }

    fn set_denoiser_residency(&mut self, residency: DenoiserResidency) {
        let (src, module) = self.denoiser.split_mut();
        D::set_residency(src, module, residency);
    }

    fn vae(&mut self) -> Result<&VaeDecoder, ModelError> {
        Ok(self.vae.load(&self.policy, &self.device)?)
    }

    fn vae_encoder(&mut self) -> Result<&VaeEncoder, ModelError> {
        let enc = match self.vae_encoder.take() {
            Some(e) => e,
            None => {
                let src = self.vae.source();
                let vb = src.weights.var_builder(self.policy.vae, &self.device);
                VaeEncoder::new(&src.cfg, vb).map_err(|e| src.weights.context(e))?
            }
        };
        Ok(self.vae_encoder.insert(enc))
    }

    fn unload_vae_encoder(&mut self) {
        self.vae_encoder = None;
    }

    fn vae_config(&self) -> &VaeConfig {
        &self.vae.source().cfg
    }
}

/// The AutoencoderKL decoder's source: `vae/config.json` and its weights.
pub struct VaeSource {
    pub cfg: VaeConfig,
    pub weights: Weights,
}

impl Module for VaeDecoder {
    type Source = VaeSource;

    fn build(
        src: &VaeSource,
        policy: &PrecisionPolicy,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let vb = src.weights.var_builder(policy.vae, device);
        VaeDecoder::new(&src.cfg, vb).map_err(|e| src.weights.context(e))
    }

    /// The decoder's share of the file (the encoder is never loaded).
    fn bytes(src: &VaeSource, policy: &PrecisionPolicy) -> u64 {
        src.weights.bytes_in("decoder.", policy.vae)
            + src.weights.bytes_in("post_quant_conv.", policy.vae)
    }
}

/// The AutoencoderKL decoder's memory formula with the forward code's caps: convolutions in row
/// bands of [`CONV_BAND_ELEMS`] im2col values, the mid block's attention in chunks of
/// [`QUERY_CHUNK_ROWS`] query rows. `block_out_channels` as in `vae/config.json`.
pub fn vae_activations(block_out_channels: &[u32], scale: u32, elem_bytes: u64) -> VaeActivations {
    VaeActivations::autoencoder_kl(
        block_out_channels,
        scale,
        elem_bytes,
        CONV_BAND_ELEMS as u64,
        QUERY_CHUNK_ROWS as u64,
    )
}

impl VaeSource {
    /// This decoder's [`vae_activations`].
    pub fn activations(&self, elem_bytes: u64) -> VaeActivations {
        let channels: Vec<u32> = self
            .cfg
            .block_out_channels
            .iter()
            .map(|&c| c as u32)
            .collect();
        vae_activations(&channels, self.cfg.scale_factor() as u32, elem_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A module that counts its builds and needs a second step when `needs_finish` is set.
    struct Counted {
        finished: bool,
    }

    struct CountedSource {
        builds: AtomicUsize,
        needs_finish: bool,
        residency: Option<DenoiserResidency>,
    }

    impl Module for Counted {
        type Source = CountedSource;
        fn build(src: &CountedSource, _: &PrecisionPolicy, _: &Device) -> Result<Self, ModelError> {
            src.builds.fetch_add(1, Ordering::Relaxed);
            Ok(Self { finished: false })
        }
        fn bytes(_: &CountedSource, policy: &PrecisionPolicy) -> u64 {
            policy.denoiser.size_in_bytes() as u64 * 100
        }
        fn block_bytes(_: &CountedSource, _: &PrecisionPolicy) -> Vec<u64> {
            vec![10, 30, 20]
        }
        fn complete(&self, src: &CountedSource) -> bool {
            !src.needs_finish || self.finished
        }
        fn finish(
            &mut self,
            _: &CountedSource,
            _: &PrecisionPolicy,
            _: &Device,
        ) -> Result<(), ModelError> {
            self.finished = true;
            Ok(())
        }
        fn set_residency(src: &mut CountedSource, module: Option<&mut Self>, r: DenoiserResidency) {
            src.residency = Some(r);
            if let Some(m) = module {
                m.finished = false;
            }
        }
    }

    fn source(needs_finish: bool) -> CountedSource {
        CountedSource {
            builds: AtomicUsize::new(0),
            needs_finish,
            residency: None,
        }
    }

    #[test]
    fn a_slot_builds_once_completes_and_unloads() {
        let (p, dev) = (PrecisionPolicy::F32, Device::Cpu);
        let mut slot = Slot::<Counted>::new(source(true));
        assert!(!slot.is_loaded());
        slot.load(&p, &dev).unwrap();
        slot.load(&p, &dev).unwrap();
        assert!(slot.is_loaded());
        assert_eq!(
            slot.source().builds.load(Ordering::Relaxed),
            1,
            "a loaded module is not rebuilt"
        );
        let (src, module) = slot.split_mut();
        Counted::set_residency(src, module, DenoiserResidency::Resident);
        assert!(!slot.is_loaded(), "incomplete after a residency change");
        slot.load(&p, &dev).unwrap();
        assert!(slot.is_loaded());
        assert_eq!(
            slot.source().builds.load(Ordering::Relaxed),
            1,
            "completed, not rebuilt"
        );
        slot.unload();
        assert!(!slot.is_loaded() && slot.get().is_none());
    }

    #[test]
    fn bytes_follow_the_policy_and_the_blocks() {
        let bytes = |p: PrecisionPolicy| {
            let b = Counted::bytes(&source(false), &p);
            let blocks = Counted::block_bytes(&source(false), &p);
            (b, blocks.iter().copied().max(), blocks.len())
        };
        assert_eq!(bytes(PrecisionPolicy::F32), (400, Some(30), 3));
        assert_eq!(bytes(PrecisionPolicy::MIXED).0, 200);
    }
}
