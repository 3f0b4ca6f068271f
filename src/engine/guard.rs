//! The anti-black-image guard: finite checks after every step and decode, the retry policy (roll
//! back, lower CFG, raise precision), the black-image test on final pixels, and the `ZTURBO_FAULT`
//! fault injection that lets tests prove each path.

use candle_core::{DType, Tensor};

/// CFG is multiplied by this on every rollback (the seed: 3.2 → 2.4 is one such step).
pub const CFG_BACKOFF: f32 = 0.75;
/// Retries with lowered CFG per step before raising precision.
pub const MAX_STEP_RETRIES: u32 = 3;
/// An image whose pixels all lie within this range (in [0, 1] units) carries no picture: 4/255 is
/// below what 8-bit output can show as a gradient once dithered, and far below any real photo's
/// range (even low-key images span > 0.2).
pub const BLACK_RANGE: f32 = 4.0 / 255.0;

/// True when every element is finite. One reduction and one scalar to the host: a NaN or ±inf
/// anywhere makes the sum non-finite.
pub fn all_finite(t: &Tensor) -> candle_core::Result<bool> {
    let s = t.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    Ok(s.is_finite())
}

/// Why an image is unusable, if it is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Blank {
    NonFinite,
    /// Near-constant: the range of all pixel values, in [0, 1] units.
    Flat(f32),
}

/// Checks one image (`[3, H, W]` in [0, 1]).
pub fn blank_image(img: &Tensor) -> candle_core::Result<Option<Blank>> {
    if !all_finite(img)? {
        return Ok(Some(Blank::NonFinite));
    }
    let flat = img.to_dtype(DType::F32)?.flatten_all()?;
    let range = (flat.max(0)? - flat.min(0)?)?.to_scalar::<f32>()?;
    Ok((range < BLACK_RANGE).then_some(Blank::Flat(range)))
}

/// Where a fault is injected.
#[derive(Debug, Clone, PartialEq)]
pub enum FaultSpec {
    /// NaN from the denoiser at `step` (1-based) on its first `attempts` attempts (`None` = all).
    DenoiserNan { step: usize, attempts: Option<u32> },
    /// NaN from the VAE on the first `attempts` decode attempts (`None` = all).
    VaeNan { attempts: Option<u32> },
    /// A constant (black) image from the VAE on the first `attempts` decodes (`None` = all):
    /// finite, so only the black-image check can catch it.
    VaeBlack { attempts: Option<u32> },
    /// Soak testing: every denoiser attempt and every decode is poisoned (NaN) with probability
    /// `rate`, and every decode comes out black with probability `rate / 2` — decided by a hash of
    /// (seed, the job's seed, where), so a run is reproducible.
    Random { rate: f64, seed: u64 },
}

/// The faults to inject in this process (`ZTURBO_FAULT`), for tests and soak runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultPlan {
    pub specs: Vec<FaultSpec>,
}

impl FaultPlan {
    /// Reads `ZTURBO_FAULT`; unset or empty = no faults.
    pub fn from_env() -> Result<Self, String> {
        match std::env::var("ZTURBO_FAULT") {
            Ok(s) if !s.trim().is_empty() => Self::parse(&s),
            _ => Ok(Self::default()),
        }
    }

    /// Syntax: `denoiser-nan@step=3,attempts=2`, `denoiser-nan@step=3,attempts=all`, `vae-nan`
    /// (first decode attempt), `vae-nan@attempts=all`, `vae-black` (first decode, a constant
    /// image), `random@rate=0.05,seed=1`; several separated by `;`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut specs = Vec::new();
        for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (kind, args) = part.split_once('@').unwrap_or((part, ""));
            let mut step = None;
            let mut attempts = Some(1);
            let mut rate = None;
            let mut seed = 0u64;
            for kv in args.split(',').map(str::trim).filter(|a| !a.is_empty()) {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| format!("ZTURBO_FAULT: `{kv}` is not key=value in `{part}`"))?;
                match k {
                    "step" => {
                        let n: usize = v
                            .parse()
                            .map_err(|_| format!("ZTURBO_FAULT: step `{v}` is not a number"))?;
                        if n == 0 {
                            return Err("ZTURBO_FAULT: steps are 1-based".into());
                        }
                        step = Some(n);
                    }
                    "attempts" => {
                        attempts = if v == "all" {
                            None
                        } else {
                            Some(v.parse().map_err(|_| {
                                format!("ZTURBO_FAULT: attempts `{v}` is not a number or `all`")
                            })?)
                        }
                    }
                    "rate" => {
                        let r: f64 = v
                            .parse()
                            .map_err(|_| format!("ZTURBO_FAULT: rate `{v}` is not a number"))?;
                        if !(0.0..=1.0).contains(&r) {
                            return Err(format!("ZTURBO_FAULT: rate {r} is not between 0 and 1"));
                        }
                        rate = Some(r);
                    }
                    "seed" => {
                        seed = v
                            .parse()
                            .map_err(|_| format!("ZTURBO_FAULT: seed `{v}` is not a number"))?
                    }
                    other => {
                        return Err(format!("ZTURBO_FAULT: unknown key `{other}` in `{part}`"))
                    }
                }
            }
            match kind {
                "denoiser-nan" => specs.push(FaultSpec::DenoiserNan {
                    step: step
                        .ok_or_else(|| format!("ZTURBO_FAULT: `{part}` needs step=N (1-based)"))?,
                    attempts,
                }),
                "vae-nan" => specs.push(FaultSpec::VaeNan { attempts }),
                "vae-black" => specs.push(FaultSpec::VaeBlack { attempts }),
                "random" => specs.push(FaultSpec::Random {
                    rate: rate.ok_or_else(|| format!("ZTURBO_FAULT: `{part}` needs rate=R"))?,
                    seed,
                }),
                other => {
                    return Err(format!(
                        "ZTURBO_FAULT: unknown fault `{other}` (denoiser-nan, vae-nan, vae-black, random)"
                    ))
                }
            }
        }
        Ok(Self { specs })
    }

    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// Should the denoiser output at `step` (1-based), attempt `attempt` (1-based), be poisoned?
    /// `salt` identifies the job (its seed) for the random faults.
    pub fn denoiser_nan(&self, step: usize, attempt: u32, salt: u64) -> bool {
        self.specs.iter().any(|s| match s {
            FaultSpec::DenoiserNan { step: at, attempts } => {
                *at == step && attempts.is_none_or(|n| attempt <= n)
            }
            FaultSpec::Random { rate, seed } => {
                chance(*seed, salt, 1, step as u64, attempt) < *rate
            }
            _ => false,
        })
    }

    /// Should decode attempt `attempt` (1-based, counted per job) be poisoned?
    pub fn vae_nan(&self, attempt: u32, salt: u64) -> bool {
        self.specs.iter().any(|s| match s {
            FaultSpec::VaeNan { attempts } => attempts.is_none_or(|n| attempt <= n),
            FaultSpec::Random { rate, seed } => chance(*seed, salt, 2, 0, attempt) < *rate,
            _ => false,
        })
    }

    /// Should decode attempt `attempt` (1-based, per job) come out as a constant image?
    pub fn vae_black(&self, attempt: u32, salt: u64) -> bool {
        self.specs.iter().any(|s| match s {
            FaultSpec::VaeBlack { attempts } => attempts.is_none_or(|n| attempt <= n),
            FaultSpec::Random { rate, seed } => chance(*seed, salt, 3, 0, attempt) < rate / 2.0,
            _ => false,
        })
    }
}

/// A uniform number in [0, 1) from a hash of where a fault could strike.
fn chance(seed: u64, salt: u64, kind: u64, step: u64, attempt: u32) -> f64 {
    let mut rng = crate::nn::rng::NoiseRng::new(
        seed ^ salt.rotate_left(17)
            ^ kind.rotate_left(41)
            ^ step.rotate_left(7)
            ^ u64::from(attempt),
    );
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Replaces a tensor's values by NaN (same shape, dtype and device).
pub fn poison(t: &Tensor) -> candle_core::Result<Tensor> {
    (t.zeros_like()? * f64::NAN)?.to_dtype(t.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn parses_the_documented_syntax() {
        let p = FaultPlan::parse("denoiser-nan@step=3,attempts=2; vae-nan").unwrap();
        assert_eq!(
            p.specs,
            vec![
                FaultSpec::DenoiserNan {
                    step: 3,
                    attempts: Some(2)
                },
                FaultSpec::VaeNan { attempts: Some(1) }
            ]
        );
        assert!(p.denoiser_nan(3, 1, 0) && p.denoiser_nan(3, 2, 0) && !p.denoiser_nan(3, 3, 0));
        assert!(!p.denoiser_nan(2, 1, 0));
        assert!(p.vae_nan(1, 0) && !p.vae_nan(2, 0));
        let all = FaultPlan::parse("denoiser-nan@step=1,attempts=all").unwrap();
        assert!(all.denoiser_nan(1, 99, 0));
        // Random faults strike at about their rate, reproducibly.
        let r = FaultPlan::parse("random@rate=0.1,seed=3").unwrap();
        let hits = (0..10_000u64).filter(|&j| r.denoiser_nan(1, 1, j)).count();
        assert!((800..1200).contains(&hits), "{hits}");
        assert_eq!(r.denoiser_nan(4, 2, 77), r.denoiser_nan(4, 2, 77));
        assert!(FaultPlan::parse("random@rate=2").is_err());
        assert!(FaultPlan::parse("random").is_err());
    }

    #[test]
    fn rejects_bad_specs_clearly() {
        for bad in [
            "denoiser-nan",
            "denoiser-nan@step=0",
            "denoiser-nan@step=x",
            "gpu-fire",
            "vae-nan@attempts=some",
            "denoiser-nan@step",
        ] {
            let e = FaultPlan::parse(bad).unwrap_err();
            assert!(e.starts_with("ZTURBO_FAULT"), "{bad}: {e}");
        }
        assert!(FaultPlan::parse("").unwrap().is_empty());
    }

    #[test]
    fn finite_check_sees_nan_and_inf() {
        let d = Device::Cpu;
        let ok = Tensor::new(&[1f32, -2.0, 3.0], &d).unwrap();
        assert!(all_finite(&ok).unwrap());
        assert!(!all_finite(&poison(&ok).unwrap()).unwrap());
        let inf = Tensor::new(&[1f32, f32::INFINITY], &d).unwrap();
        assert!(!all_finite(&inf).unwrap());
    }

    #[test]
    fn constant_image_is_blank_but_dark_texture_is_not() {
        let d = Device::Cpu;
        let black = Tensor::zeros((3, 32, 32), DType::F32, &d).unwrap();
        assert!(matches!(blank_image(&black).unwrap(), Some(Blank::Flat(_))));
        let grey = (Tensor::ones((3, 32, 32), DType::F32, &d).unwrap() * 0.5).unwrap();
        assert!(blank_image(&grey).unwrap().is_some());
        // A low-key image: mostly near black, with faint texture up to ~12 % brightness.
        let noise = (Tensor::rand(0f32, 0.12, (3, 32, 32), &d).unwrap() + 0.01).unwrap();
        assert_eq!(blank_image(&noise).unwrap(), None);
        let nan = poison(&black).unwrap();
        assert_eq!(blank_image(&nan).unwrap(), Some(Blank::NonFinite));
    }
}
