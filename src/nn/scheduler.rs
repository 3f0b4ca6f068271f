//! Noise schedules read from `scheduler/scheduler_config.json`: flow-matching Euler (Z-Image) and
//! Euler discrete (SD-Turbo). Both reduce to one sampler step `x += (σ_next − σ)·d`, so the engine's
//! loop is family-agnostic; the arithmetic follows diffusers in f32 so sigmas match bit for bit.

use candle_core::Tensor;
use serde::Deserialize;

/// The schedule of one run: `sigmas` has one more entry than `timesteps` (the final 0).
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub timesteps: Vec<f32>,
    pub sigmas: Vec<f32>,
    /// What the initial unit-variance noise is multiplied by.
    pub init_noise_sigma: f32,
    pub kind: NoiseKind,
}

/// How clean latents and noise combine at noise level σ, and how image-to-image strength picks
/// the first step (each as its diffusers pipeline does it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NoiseKind {
    /// Flow matching (`FlowMatchEulerDiscreteScheduler.scale_noise`): `σ·noise + (1 − σ)·x0`.
    /// `ZImageImg2ImgPipeline.get_timesteps` skips `int(N − min(N·strength, N))` steps.
    Flow,
    /// Variance exploding (`EulerDiscreteScheduler.add_noise`): `x0 + σ·noise`.
    /// `StableDiffusionImg2ImgPipeline.get_timesteps` keeps `min(int(N·strength), N)` steps.
    VarianceExploding,
}

/// How many of `n` steps image-to-image at `strength` (in [0, 1]) skips, in the arithmetic of the
/// family's diffusers pipeline (Python floats: f64). Skipping all of them means no step runs.
pub fn skipped_steps(kind: NoiseKind, n: usize, strength: f64) -> usize {
    match kind {
        NoiseKind::Flow => {
            let init = (n as f64 * strength).min(n as f64);
            (n as f64 - init).max(0.0) as usize
        }
        NoiseKind::VarianceExploding => {
            let init = ((n as f64 * strength) as usize).min(n);
            n - init
        }
    }
}

/// How many of `n` steps image-to-image at `strength` runs.
pub fn steps_run(kind: NoiseKind, n: usize, strength: f64) -> usize {
    n - skipped_steps(kind, n, strength).min(n)
}

impl Schedule {
    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }

    /// How many leading steps image-to-image at `strength` skips (see [`skipped_steps`]).
    pub fn skipped_steps(&self, strength: f64) -> usize {
        skipped_steps(self.kind, self.steps(), strength)
    }

    /// The schedule from step `start` on (diffusers' `set_begin_index`): the loop runs the rest.
    pub fn from_step(&self, start: usize) -> Schedule {
        let start = start.min(self.steps());
        Schedule {
            timesteps: self.timesteps[start..].to_vec(),
            sigmas: self.sigmas[start..].to_vec(),
            init_noise_sigma: self.init_noise_sigma,
            kind: self.kind,
        }
    }

    /// Clean latents `x0` noised to level `sigma` with `noise` (same shape), f32 as diffusers
    /// computes it.
    pub fn add_noise(
        &self,
        x0: &Tensor,
        noise: &Tensor,
        sigma: f32,
    ) -> candle_core::Result<Tensor> {
        match self.kind {
            NoiseKind::Flow => (noise * sigma as f64)? + (x0 * (1.0f32 - sigma) as f64)?,
            NoiseKind::VarianceExploding => x0 + (noise * sigma as f64)?,
        }
    }
}

/// `FlowMatchEulerDiscreteScheduler` config (unknown fields ignored, diffusers' defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct FlowMatchConfig {
    #[serde(default = "d_1000")]
    pub num_train_timesteps: u32,
    #[serde(default = "d_1")]
    pub shift: f32,
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(default = "d_base_shift")]
    pub base_shift: f32,
    #[serde(default = "d_max_shift")]
    pub max_shift: f32,
    #[serde(default = "d_256")]
    pub base_image_seq_len: u32,
    #[serde(default = "d_4096")]
    pub max_image_seq_len: u32,
    #[serde(default)]
    pub invert_sigmas: bool,
    #[serde(default)]
    pub shift_terminal: Option<f32>,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
    #[serde(default = "d_exponential")]
    pub time_shift_type: String,
    #[serde(default)]
    pub stochastic_sampling: bool,
}

fn d_1000() -> u32 {
    1000
}
fn d_1() -> f32 {
    1.0
}
fn d_base_shift() -> f32 {
    0.5
}
fn d_max_shift() -> f32 {
    1.15
}
fn d_256() -> u32 {
    256
}
fn d_4096() -> u32 {
    4096
}
fn d_exponential() -> String {
    "exponential".into()
}

impl FlowMatchConfig {
    /// Rejects options whose sampler we do not implement, naming the file.
    /// Refuses the options this schedule does not reproduce (the message names the field).
    pub fn validate(&self) -> Result<(), String> {
        let unsupported = [
            (self.use_karras_sigmas, "use_karras_sigmas"),
            (self.use_exponential_sigmas, "use_exponential_sigmas"),
            (self.use_beta_sigmas, "use_beta_sigmas"),
            (self.invert_sigmas, "invert_sigmas"),
            (self.stochastic_sampling, "stochastic_sampling"),
        ];
        if let Some((_, name)) = unsupported.iter().find(|(on, _)| *on) {
            return Err(format!("scheduler option `{name}: true` is not supported"));
        }
        if self.time_shift_type != "exponential" && self.time_shift_type != "linear" {
            return Err(format!(
                "time_shift_type `{}` is not supported (exponential, linear)",
                self.time_shift_type
            ));
        }
        if self.num_train_timesteps == 0 {
            return Err("num_train_timesteps must be positive".into());
        }
        Ok(())
    }

    /// diffusers' `calculate_shift`: the dynamic-shift `mu` for an image of `image_seq_len` tokens.
    pub fn mu(&self, image_seq_len: usize) -> f32 {
        let m = (self.max_shift - self.base_shift)
            / (self.max_image_seq_len as f32 - self.base_image_seq_len as f32);
        let b = self.base_shift - m * self.base_image_seq_len as f32;
        image_seq_len as f32 * m + b
    }

    /// The Z-Image pipeline's schedule: `sigmas = linspace(1, 1/N, N)`, shifted, `t = σ·1000`,
    /// then a terminal σ = 0.
    pub fn schedule(&self, steps: usize, image_seq_len: usize) -> Schedule {
        let n = steps.max(1);
        // numpy linspace in f64, then `.astype(float32)` as `set_timesteps` does.
        let start = 1.0f64;
        let stop = 1.0f64 / n as f64;
        let mut sigmas: Vec<f32> = (0..n)
            .map(|i| {
                if n == 1 {
                    start as f32
                } else if i == n - 1 {
                    stop as f32
                } else {
                    (start + i as f64 * ((stop - start) / (n - 1) as f64)) as f32
                }
            })
            .collect();
        if self.use_dynamic_shifting {
            let mu = self.mu(image_seq_len);
            let e = if self.time_shift_type == "linear" {
                mu
            } else {
                mu.exp()
            };
            for s in &mut sigmas {
                *s = e / (e + (1.0 / *s - 1.0));
            }
        } else {
            let shift = self.shift;
            for s in &mut sigmas {
                *s = shift * *s / (1.0 + (shift - 1.0) * *s);
            }
        }
        if let Some(term) = self.shift_terminal {
            if let Some(&last) = sigmas.last() {
                let scale = (1.0 - last) / (1.0 - term);
                for s in &mut sigmas {
                    *s = 1.0 - (1.0 - *s) / scale;
                }
            }
        }
        let timesteps = sigmas
            .iter()
            .map(|s| s * self.num_train_timesteps as f32)
            .collect();
        sigmas.push(0.0);
        Schedule {
            timesteps,
            sigmas,
            init_noise_sigma: 1.0,
            kind: NoiseKind::Flow,
        }
    }
}

/// `EulerDiscreteScheduler` config (SD-Turbo, SDXL-Turbo; unknown fields ignored, diffusers'
/// defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct EulerDiscreteConfig {
    #[serde(default = "d_1000")]
    pub num_train_timesteps: u32,
    #[serde(default = "d_beta_start")]
    pub beta_start: f64,
    #[serde(default = "d_beta_end")]
    pub beta_end: f64,
    #[serde(default = "d_linear")]
    pub beta_schedule: String,
    #[serde(default = "d_epsilon")]
    pub prediction_type: String,
    #[serde(default = "d_linspace")]
    pub timestep_spacing: String,
    #[serde(default)]
    pub steps_offset: u32,
    #[serde(default = "d_linear")]
    pub interpolation_type: String,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    #[serde(default = "d_zero")]
    pub final_sigmas_type: String,
    #[serde(default = "d_discrete")]
    pub timestep_type: String,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
}

fn d_beta_start() -> f64 {
    0.0001
}
fn d_beta_end() -> f64 {
    0.02
}
fn d_epsilon() -> String {
    "epsilon".into()
}
fn d_linspace() -> String {
    "linspace".into()
}
fn d_linear() -> String {
    "linear".into()
}
fn d_zero() -> String {
    "zero".into()
}
fn d_discrete() -> String {
    "discrete".into()
}

/// Noise parameterisation of an ε/v model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
}

impl EulerDiscreteConfig {
    /// Rejects options whose sampler we do not implement, naming the file; returns what the
    /// model predicts.
    /// The prediction type, or why this config is not reproduced (the message names the field).
    pub fn validate(&self) -> Result<Prediction, String> {
        let unsupported = [
            (self.use_karras_sigmas, "use_karras_sigmas"),
            (self.use_exponential_sigmas, "use_exponential_sigmas"),
            (self.use_beta_sigmas, "use_beta_sigmas"),
            (self.rescale_betas_zero_snr, "rescale_betas_zero_snr"),
        ];
        if let Some((_, name)) = unsupported.iter().find(|(on, _)| *on) {
            return Err(format!("scheduler option `{name}: true` is not supported"));
        }
        if self.interpolation_type != "linear" {
            return Err(format!(
                "interpolation_type `{}` is not supported (linear)",
                self.interpolation_type
            ));
        }
        if self.final_sigmas_type != "zero" {
            return Err(format!(
                "final_sigmas_type `{}` is not supported (zero)",
                self.final_sigmas_type
            ));
        }
        if self.timestep_type != "discrete" {
            return Err(format!(
                "timestep_type `{}` is not supported (discrete)",
                self.timestep_type
            ));
        }
        if !["linspace", "leading", "trailing"].contains(&self.timestep_spacing.as_str()) {
            return Err(format!(
                "timestep_spacing `{}` is not supported (linspace, leading, trailing)",
                self.timestep_spacing
            ));
        }
        if self.num_train_timesteps < 2 {
            return Err("num_train_timesteps must be at least 2".into());
        }
        match &self.trained_betas {
            Some(b) if b.len() != self.num_train_timesteps as usize => {
                return Err(format!(
                    "trained_betas has {} entries, num_train_timesteps is {}",
                    b.len(),
                    self.num_train_timesteps
                ))
            }
            Some(_) => {}
            None => {
                if !["linear", "scaled_linear"].contains(&self.beta_schedule.as_str()) {
                    return Err(format!(
                        "beta_schedule `{}` is not supported (linear, scaled_linear)",
                        self.beta_schedule
                    ));
                }
            }
        }
        match self.prediction_type.as_str() {
            "epsilon" => Ok(Prediction::Epsilon),
            "v_prediction" => Ok(Prediction::VPrediction),
            other => Err(format!(
                "prediction_type `{other}` is not supported (epsilon, v_prediction)"
            )),
        }
    }

    /// ᾱ_t in f32, computed like diffusers on the CPU: betas and `1 − β` in f32, the cumulative
    /// product accumulated in f64 (PyTorch's CPU `cumprod` accumulates in `acc_type<float>` =
    /// double) and rounded to f32 at every entry.
    pub fn alphas_cumprod(&self) -> Vec<f32> {
        let n = self.num_train_timesteps as usize;
        let betas: Vec<f32> = if let Some(b) = &self.trained_betas {
            b.iter().map(|&x| x as f32).collect()
        } else if self.beta_schedule == "scaled_linear" {
            let (s, e) = (self.beta_start.sqrt() as f32, self.beta_end.sqrt() as f32);
            torch_linspace_f32(s, e, n)
                .into_iter()
                .map(|x| x * x)
                .collect()
        } else {
            torch_linspace_f32(self.beta_start as f32, self.beta_end as f32, n)
        };
        let mut acc = 1.0f64;
        betas
            .iter()
            .map(|b| {
                acc *= f64::from(1.0f32 - b);
                acc as f32
            })
            .collect()
    }

    /// The inference timesteps as numpy computes them in `set_timesteps` (f64), before the cast
    /// to f32.
    fn timesteps_f64(&self, n: usize) -> Vec<f64> {
        let n_train = self.num_train_timesteps as usize;
        match self.timestep_spacing.as_str() {
            // np.linspace(0, n_train - 1, n)[::-1]: element j is j·step, the last exactly `stop`.
            "linspace" => {
                let stop = (n_train - 1) as f64;
                let step = if n > 1 { stop / (n - 1) as f64 } else { 0.0 };
                (0..n)
                    .rev()
                    .map(|j| {
                        if j == n - 1 && n > 1 {
                            stop
                        } else {
                            j as f64 * step
                        }
                    })
                    .collect()
            }
            // (arange(0, n) · (n_train // n)).round()[::-1] + steps_offset
            "leading" => {
                let ratio = n_train / n;
                (0..n)
                    .rev()
                    .map(|i| (i * ratio) as f64 + f64::from(self.steps_offset))
                    .collect()
            }
            // arange(n_train, 0, −n_train/n).round() − 1
            _ => {
                let ratio = n_train as f64 / n as f64;
                (0..n)
                    .map(|i| (n_train as f64 - i as f64 * ratio).round() - 1.0)
                    .collect()
            }
        }
    }

    /// The schedule `EulerDiscreteScheduler.set_timesteps(steps)` builds: timesteps, σ(t) by
    /// linear interpolation of `sqrt((1 − ᾱ)/ᾱ)` (f32 table, interpolated in f64 like
    /// `np.interp`), a final σ = 0, and `init_noise_sigma` (σ_max for "linspace"/"trailing",
    /// `sqrt(σ_max² + 1)` for "leading").
    pub fn schedule(&self, steps: usize) -> Schedule {
        let n_train = self.num_train_timesteps as usize;
        let n = steps.max(1);
        let timesteps: Vec<f32> = self
            .timesteps_f64(n)
            .into_iter()
            .map(|t| t as f32)
            .collect();
        let ac = self.alphas_cumprod();
        let table: Vec<f32> = ac.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect();
        let mut sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&t| {
                let t = f64::from(t).clamp(0.0, (n_train - 1) as f64);
                let lo = t.floor() as usize;
                if lo + 1 >= n_train {
                    return table[n_train - 1];
                }
                let (a, b) = (f64::from(table[lo]), f64::from(table[lo + 1]));
                ((b - a) * (t - lo as f64) + a) as f32
            })
            .collect();
        sigmas.push(0.0);
        let max_sigma = sigmas.iter().copied().fold(0.0f32, f32::max);
        let init_noise_sigma =
            if self.timestep_spacing == "linspace" || self.timestep_spacing == "trailing" {
                max_sigma
            } else {
                (max_sigma * max_sigma + 1.0).sqrt()
            };
        Schedule {
            timesteps,
            sigmas,
            init_noise_sigma,
            kind: NoiseKind::VarianceExploding,
        }
    }
}

/// `torch.linspace` in f32 as PyTorch's CPU kernel computes it: the first half counts up from
/// `start` (`start + step·i`), the second half down from `end` (`end − step·(n−1−i)`), each a fused
/// multiply-add (the compiled kernel contracts them; plain mul-then-add leaves 121 of SD's 1000
/// ᾱ values one ulp off the golden).
pub fn torch_linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 0 {
        return vec![];
    }
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - 1 - i) as f32, end)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn z_image_cfg() -> FlowMatchConfig {
        serde_json::from_str(
            r#"{"num_train_timesteps":1000,"use_dynamic_shifting":false,"shift":3.0}"#,
        )
        .unwrap()
    }

    #[test]
    fn z_image_eight_steps_match_diffusers() {
        // Values from the issue / diffusers 0.42.1 (`ZImagePipeline`, N = 8).
        let s = z_image_cfg().schedule(8, 64);
        let want = [1.0, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3, 0.0];
        for (a, b) in s.sigmas.iter().zip(want) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        assert_eq!(s.timesteps[0], 1000.0);
        assert_eq!(s.sigmas.len(), 9);
    }

    #[test]
    fn dynamic_shift_is_monotone() {
        let mut c = z_image_cfg();
        c.use_dynamic_shifting = true;
        let s = c.schedule(8, 4096);
        assert!(s.sigmas.windows(2).all(|w| w[0] >= w[1]));
    }
}
