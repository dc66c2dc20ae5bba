//! TrigFlow SCM sampler of the sprint pipeline: diffusers `SCMScheduler` (`schedulers/scheduling_scm.py`)
//! with the Sana-Sprint pipeline's input/output conversions (diffusers ≥ 0.34 fp32 semantics):
//! `[max, 1.3, 0]` for 2 steps, torch `linspace` otherwise. Noise is drawn by the caller (the pipeline
//! owns the per-request generator) and passed to `step`.

use candle_core::{DType, Tensor};
use serde::Deserialize;

use super::{cfg_err, check_num_steps, scale};
use crate::PipelineError;

/// `max_timesteps` default of `SanaSprintPipeline.__call__`: the literal 1.57080, which is not f32 π/2
/// (1.5707964) — the difference is visible in τ (spec §4.2), so keep the literal.
#[allow(clippy::approx_constant)]
pub const SCM_MAX_TIMESTEPS: f32 = 1.57080;
/// `intermediate_timesteps` default of `SanaSprintPipeline.__call__` (only valid for 2 steps).
pub const SCM_INTERMEDIATE_TIMESTEPS: f32 = 1.3;

/// Serde mirror of an `SCMScheduler` `scheduler_config.json` (diffusers `schedulers/scheduling_scm.py`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default)]
pub struct ScmConfig {
    pub num_train_timesteps: usize,
    pub prediction_type: String,
    pub sigma_data: f32,
}

impl Default for ScmConfig {
    fn default() -> Self {
        ScmConfig {
            num_train_timesteps: 1000,
            prediction_type: "trigflow".into(),
            sigma_data: 0.5,
        }
    }
}

/// Mirrors torch's CPU/CUDA `linspace` for float32 (halves computed from each end).
fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// TrigFlow SCM sampler of the sprint pipeline. One instance per request.
#[derive(Debug)]
pub struct ScmScheduler {
    timesteps: Vec<f32>,
    sigma_data: f32,
    step_index: usize,
}

/// Per-step scalars of the sprint pipeline's TrigFlow conversion (all f32).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScmStepInput {
    /// `τ = sin(s) / (cos(s) + sin(s))`, the timestep fed to the transformer.
    pub scm_timestep: f32,
    /// `c = sqrt(τ² + (1−τ)²)`.
    pub scale: f32,
}

impl ScmScheduler {
    /// `set_timesteps(num_inference_steps, max_timesteps=1.5708, intermediate_timesteps=1.3 if N == 2 else None)`.
    pub fn new(cfg: &ScmConfig, num_inference_steps: usize) -> Result<Self, PipelineError> {
        if cfg.prediction_type != "trigflow" {
            return Err(cfg_err(format!(
                "SCM prediction_type {:?} is not supported (trigflow only)",
                cfg.prediction_type
            )));
        }
        check_num_steps(num_inference_steps, cfg.num_train_timesteps)?;
        let timesteps = if num_inference_steps == 2 {
            vec![SCM_MAX_TIMESTEPS, SCM_INTERMEDIATE_TIMESTEPS, 0.0]
        } else {
            torch_linspace_f32(SCM_MAX_TIMESTEPS, 0.0, num_inference_steps + 1)
        };
        Ok(ScmScheduler {
            timesteps,
            sigma_data: cfg.sigma_data,
            step_index: 0,
        })
    }

    /// `N + 1` trigflow times `s`, the last one 0.
    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    pub fn sigma_data(&self) -> f32 {
        self.sigma_data
    }

    /// Number of denoising steps.
    pub fn num_steps(&self) -> usize {
        self.timesteps.len() - 1
    }

    /// Scalars of the next step.
    pub fn step_input(&self) -> ScmStepInput {
        let s = self.timesteps[self.step_index.min(self.timesteps.len() - 1)];
        let tau = s.sin() / (s.cos() + s.sin());
        let one_m = 1.0f32 - tau;
        ScmStepInput {
            scm_timestep: tau,
            scale: (tau * tau + one_m * one_m).sqrt(),
        }
    }

    /// The transformer input `(x / σ_d) · c` (f32).
    pub fn model_input(&self, sample: &Tensor, inp: ScmStepInput) -> Result<Tensor, PipelineError> {
        let x = sample.to_dtype(DType::F32)?;
        // x / σ_d as a true division (σ_d = 0.5 makes it exact, but keep torch's op for other values).
        let x = x.broadcast_div(&Tensor::new(self.sigma_data, x.device())?)?;
        Ok(scale(&x, inp.scale)?)
    }

    /// TrigFlow output `((1−2τ)·x_in + (1−2τ+2τ²)·v) / c · σ_d` in f32 from the transformer velocity `v`.
    pub fn trigflow_output(
        &self,
        model_input: &Tensor,
        v: &Tensor,
        inp: ScmStepInput,
    ) -> Result<Tensor, PipelineError> {
        let tau = inp.scm_timestep;
        let a = 1.0f32 - 2.0f32 * tau;
        let b = (1.0f32 - 2.0f32 * tau) + 2.0f32 * (tau * tau);
        let v = v.to_dtype(DType::F32)?;
        let num = (scale(model_input, a)? + scale(&v, b)?)?;
        let f = num.broadcast_div(&Tensor::new(inp.scale, num.device())?)?;
        Ok(scale(&f, self.sigma_data)?)
    }

    /// `SCMScheduler.step`: returns `(prev_sample, pred_x0)`. `noise` is a standard-normal draw of the
    /// sample's shape (scaled by σ_d here); diffusers draws it at every step, the last one included.
    pub fn step(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
        noise: &Tensor,
    ) -> Result<(Tensor, Tensor), PipelineError> {
        let i = self.step_index;
        if i + 1 >= self.timesteps.len() {
            return Err(PipelineError::InvalidRequest(format!(
                "scheduler stepped past its {} steps",
                self.num_steps()
            )));
        }
        let s = self.timesteps[i];
        let t = self.timesteps[i + 1];
        let sample = sample.to_dtype(DType::F32)?;
        let x0 = (scale(&sample, s.cos())? - scale(model_output, s.sin())?)?;
        let noise = scale(&noise.to_dtype(DType::F32)?, self.sigma_data)?;
        let prev = (scale(&x0, t.cos())? + scale(&noise, t.sin())?)?;
        self.step_index += 1;
        Ok((prev, x0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn scm_timesteps() {
        let cfg = ScmConfig::default();
        assert_eq!(
            ScmScheduler::new(&cfg, 2).unwrap().timesteps(),
            &[SCM_MAX_TIMESTEPS, 1.3, 0.0]
        );
        // torch.linspace(1.5708, 0, 5) as float32 bits (torch 2.11 CPU).
        let bits: Vec<u32> = ScmScheduler::new(&cfg, 4)
            .unwrap()
            .timesteps()
            .iter()
            .map(|t| t.to_bits())
            .collect();
        assert_eq!(
            bits,
            vec![1070141433, 1066847227, 1061752825, 1053364217, 0]
        );
        let t = ScmScheduler::new(&cfg, 1).unwrap();
        assert_eq!(t.timesteps(), &[SCM_MAX_TIMESTEPS, 0.0]);
    }

    #[test]
    fn scm_step_input_matches_spec() {
        let mut s = ScmScheduler::new(&ScmConfig::default(), 2).unwrap();
        let inp = s.step_input();
        // Spec §4.2: τ = 1.0000036 for s = f32(1.5708); 0.78271 for 1.3.
        assert!(
            (inp.scm_timestep - 1.0000036).abs() < 2e-7,
            "{}",
            inp.scm_timestep
        );
        let dev = Device::Cpu;
        let x = Tensor::new(&[1.0f32, 2.0], &dev).unwrap();
        let z = Tensor::new(&[0.5f32, -0.5], &dev).unwrap();
        let (prev, x0) = s.step(&x, &x, &z).unwrap();
        let (c, si) = (SCM_MAX_TIMESTEPS.cos(), SCM_MAX_TIMESTEPS.sin());
        let want_x0: Vec<f32> = [1.0f32, 2.0].iter().map(|v| c * v - si * v).collect();
        assert_eq!(x0.to_vec1::<f32>().unwrap(), want_x0);
        let want_prev: Vec<f32> = want_x0
            .iter()
            .zip([0.5f32, -0.5])
            .map(|(x, z)| 1.3f32.cos() * x + 1.3f32.sin() * (z * 0.5))
            .collect();
        assert_eq!(prev.to_vec1::<f32>().unwrap(), want_prev);
        assert!((s.step_input().scm_timestep - 0.78271).abs() < 1e-5);
    }
}
