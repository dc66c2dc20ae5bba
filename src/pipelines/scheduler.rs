//! Samplers of the two pipelines, configured from `scheduler/scheduler_config.json` (spec §4).
//!
//! * [`FlowDpmSolver`] — diffusers `DPMSolverMultistepScheduler` restricted to what Sana uses:
//!   `dpmsolver++`, order ≤ 2, `midpoint`/`heun`, `flow_prediction` on flow sigmas with `flow_shift`,
//!   `final_sigmas_type="zero"`, `lower_order_final`. Tables are built in f64 and stored in f32 exactly as
//!   numpy/torch do (`set_timesteps`); the per-step scalar coefficients are computed in f32 one torch
//!   0-dim op at a time (`step`, `dpm_solver_first_order_update`, `multistep_dpm_solver_second_order_update`),
//!   so a CPU f32 run matches diffusers to the last ulp up to libm differences in `log`/`exp`.
//! * [`ScmScheduler`] — diffusers `SCMScheduler` (TrigFlow) with the Sana-Sprint pipeline's input/output
//!   conversions (diffusers ≥ 0.34 fp32 semantics): `[max, 1.3, 0]` for 2 steps, torch `linspace` otherwise.
//!   Noise is drawn by the caller (the pipeline owns the per-request generator) and passed to `step`.
//!
//! Unsupported configuration values are rejected at construction, never silently approximated.

use candle_core::{DType, Tensor};
use serde::Deserialize;

use super::PipelineError;

/// `max_timesteps` default of `SanaSprintPipeline.__call__`: the literal 1.57080, which is not f32 π/2
/// (1.5707964) — the difference is visible in τ (spec §4.2), so keep the literal.
#[allow(clippy::approx_constant)]
pub const SCM_MAX_TIMESTEPS: f32 = 1.57080;
/// `intermediate_timesteps` default of `SanaSprintPipeline.__call__` (only valid for 2 steps).
pub const SCM_INTERMEDIATE_TIMESTEPS: f32 = 1.3;

fn cfg_err(msg: String) -> PipelineError {
    PipelineError::Load(format!("scheduler config: {msg}"))
}

/// Serde mirror of a `DPMSolverMultistepScheduler` `scheduler_config.json` (diffusers
/// `schedulers/scheduling_dpmsolver_multistep.py::__init__` defaults). Fields Sana never sets to a
/// non-default value and that the flow-sigma path ignores (betas, `timestep_spacing`, …) are not mirrored.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default)]
pub struct DpmSolverConfig {
    pub num_train_timesteps: usize,
    pub solver_order: usize,
    pub prediction_type: String,
    pub thresholding: bool,
    pub algorithm_type: String,
    pub solver_type: String,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub use_lu_lambdas: bool,
    pub use_flow_sigmas: bool,
    pub flow_shift: f64,
    pub final_sigmas_type: String,
    pub variance_type: Option<String>,
    pub use_dynamic_shifting: bool,
}

impl Default for DpmSolverConfig {
    fn default() -> Self {
        DpmSolverConfig {
            num_train_timesteps: 1000,
            solver_order: 2,
            prediction_type: "epsilon".into(),
            thresholding: false,
            algorithm_type: "dpmsolver++".into(),
            solver_type: "midpoint".into(),
            lower_order_final: true,
            euler_at_final: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            flow_shift: 1.0,
            final_sigmas_type: "zero".into(),
            variance_type: None,
            use_dynamic_shifting: false,
        }
    }
}

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

/// Mirrors numpy `linspace(start, stop, num)` (endpoint included) in f64, bit for bit.
fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = stop;
    v
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

/// Scales every element of `x` by the f32 scalar `c` (one f32 rounding, like `0-dim f32 tensor * x`).
fn scale(x: &Tensor, c: f32) -> candle_core::Result<Tensor> {
    x.affine(f64::from(c), 0.0)
}

/// Flow-matching DPM-Solver++ (2M) of the base pipeline. One instance per request.
#[derive(Debug)]
pub struct FlowDpmSolver {
    order: usize,
    heun: bool,
    sigmas: Vec<f32>,
    timesteps: Vec<i64>,
    /// Converted model outputs (x0 predictions) of the previous and current step.
    prev_x0: Option<Tensor>,
    lower_order_nums: usize,
    step_index: usize,
}

impl FlowDpmSolver {
    /// `set_timesteps(num_inference_steps)` on a scheduler built from `cfg`.
    pub fn new(cfg: &DpmSolverConfig, num_inference_steps: usize) -> Result<Self, PipelineError> {
        if cfg.algorithm_type != "dpmsolver++" {
            return Err(cfg_err(format!(
                "algorithm_type {:?} is not supported (dpmsolver++ only)",
                cfg.algorithm_type
            )));
        }
        if cfg.prediction_type != "flow_prediction" || !cfg.use_flow_sigmas {
            return Err(cfg_err(format!(
                "only flow_prediction with use_flow_sigmas is supported (got {:?}, use_flow_sigmas={})",
                cfg.prediction_type, cfg.use_flow_sigmas
            )));
        }
        if !(1..=2).contains(&cfg.solver_order) {
            return Err(cfg_err(format!(
                "solver_order {} is not supported (1 or 2)",
                cfg.solver_order
            )));
        }
        let heun = match cfg.solver_type.as_str() {
            "midpoint" => false,
            "heun" => true,
            other => return Err(cfg_err(format!("solver_type {other:?} is not supported"))),
        };
        if cfg.final_sigmas_type != "zero" {
            return Err(cfg_err(format!(
                "final_sigmas_type {:?} is not supported (zero only)",
                cfg.final_sigmas_type
            )));
        }
        if cfg.thresholding
            || cfg.use_karras_sigmas
            || cfg.use_exponential_sigmas
            || cfg.use_beta_sigmas
            || cfg.use_lu_lambdas
        {
            return Err(cfg_err(
                "thresholding and karras/exponential/beta/lu sigmas are not supported".into(),
            ));
        }
        if num_inference_steps == 0 || num_inference_steps > cfg.num_train_timesteps {
            return Err(PipelineError::InvalidRequest(format!(
                "num_inference_steps must be in 1..={} (got {num_inference_steps})",
                cfg.num_train_timesteps
            )));
        }
        let n = num_inference_steps;
        let train = cfg.num_train_timesteps as f64;
        let shift = cfg.flow_shift;
        // alphas = linspace(1, 1/T, N+1); sigmas = 1 - alphas; flip(shift*s / (1 + (shift-1)*s))[:-1]
        let alphas = np_linspace(1.0, 1.0 / train, n + 1);
        let shifted: Vec<f64> = alphas
            .iter()
            .map(|a| {
                let s = 1.0 - a;
                shift * s / (1.0 + (shift - 1.0) * s)
            })
            .rev()
            .take(n)
            .collect();
        // timesteps = (sigmas * T) in f64, then torch .to(int64) (truncation toward zero).
        let timesteps: Vec<i64> = shifted.iter().map(|s| (s * train) as i64).collect();
        let mut sigmas: Vec<f32> = shifted.iter().map(|s| *s as f32).collect();
        sigmas.push(0.0);
        Ok(FlowDpmSolver {
            order: cfg.solver_order,
            heun,
            sigmas,
            timesteps,
            prev_x0: None,
            lower_order_nums: 0,
            step_index: 0,
        })
    }

    /// Integer timesteps fed (as f32) to the transformer, one per step.
    pub fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }

    /// `N + 1` sigmas, the last one 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// Index of the next step (0-based).
    pub fn step_index(&self) -> usize {
        self.step_index
    }

    /// `(α, σ, λ)` of sigma index `i` in f32 as torch computes them (`λ = +inf` for σ = 0).
    fn alpha_sigma_lambda(&self, i: usize) -> (f32, f32, f32) {
        let sigma = self.sigmas[i];
        let alpha = 1.0f32 - sigma;
        (alpha, sigma, alpha.ln() - sigma.ln())
    }

    /// One `step(model_output, t, sample)`: `model_output` is the (guided) flow velocity, `sample` the f32
    /// latents. Returns the next latents (f32); the last step returns the x0 prediction.
    pub fn step(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
    ) -> Result<Tensor, PipelineError> {
        let i = self.step_index;
        let n = self.timesteps.len();
        if i >= n {
            return Err(PipelineError::InvalidRequest(format!(
                "scheduler stepped past its {n} steps"
            )));
        }
        let model_output = model_output.to_dtype(DType::F32)?;
        let sample = sample.to_dtype(DType::F32)?;
        // diffusers: last step is first order if euler_at_final, (lower_order_final and N < 15), or
        // final_sigmas_type == "zero" — the only final type accepted here, so always.
        let lower_order_final = i == n - 1;
        // convert_model_output (flow_prediction): x0 = sample - sigma_t * v
        let x0 = (&sample - scale(&model_output, self.sigmas[i])?)?;

        let (alpha_t, sigma_t, lambda_t) = self.alpha_sigma_lambda(i + 1);
        let (_, sigma_s0, lambda_s0) = self.alpha_sigma_lambda(i);
        let h = lambda_t - lambda_s0;
        let exp_m1 = (-h).exp() - 1.0f32;
        let c_sample = sigma_t / sigma_s0;
        let c_d0 = alpha_t * exp_m1;
        let first_order = self.order == 1 || self.lower_order_nums < 1 || lower_order_final;
        let prev = match (&self.prev_x0, first_order) {
            (Some(m1), false) => {
                let (_, _, lambda_s1) = self.alpha_sigma_lambda(i - 1);
                let h0 = lambda_s0 - lambda_s1;
                let r0 = h0 / h;
                // D1 = (1/r0) * (m0 - m1)
                let d1 = scale(&(&x0 - m1)?, 1.0f32 / r0)?;
                let a = (scale(&sample, c_sample)? - scale(&x0, c_d0)?)?;
                if self.heun {
                    let c_d1 = alpha_t * (exp_m1 / h + 1.0f32);
                    (a + scale(&d1, c_d1)?)?
                } else {
                    (a - scale(&d1, 0.5f32 * c_d0)?)?
                }
            }
            _ => (scale(&sample, c_sample)? - scale(&x0, c_d0)?)?,
        };
        self.prev_x0 = Some(x0);
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
        }
        self.step_index += 1;
        Ok(prev)
    }
}

/// Classifier-free guidance in f32: `u + g·(c − u)` on `(2n, …)` output ordered `[uncond; cond]`.
pub fn classifier_free_guidance(
    output: &Tensor,
    guidance_scale: f64,
) -> Result<Tensor, PipelineError> {
    let output = output.to_dtype(DType::F32)?;
    let n = output.dim(0)? / 2;
    let uncond = output.narrow(0, 0, n)?;
    let cond = output.narrow(0, n, n)?;
    Ok((&uncond + scale(&(&cond - &uncond)?, guidance_scale as f32)?)?)
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
        if num_inference_steps == 0 || num_inference_steps > cfg.num_train_timesteps {
            return Err(PipelineError::InvalidRequest(format!(
                "num_inference_steps must be in 1..={} (got {num_inference_steps})",
                cfg.num_train_timesteps
            )));
        }
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

    fn sana_dpm() -> DpmSolverConfig {
        serde_json::from_str(
            r#"{"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++", "solver_order": 2,
                "solver_type": "midpoint", "prediction_type": "flow_prediction", "use_flow_sigmas": true,
                "flow_shift": 3.0, "final_sigmas_type": "zero", "lower_order_final": true,
                "euler_at_final": false, "num_train_timesteps": 1000, "timestep_spacing": "linspace"}"#,
        )
        .unwrap()
    }

    #[test]
    fn tiny_fixture_configs_parse() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny");
        let dpm: DpmSolverConfig =
            crate::pipelines::loader::read_json(&dir.join("sana/scheduler/scheduler_config.json"))
                .unwrap();
        assert_eq!(dpm, sana_dpm());
        let scm: ScmConfig = crate::pipelines::loader::read_json(
            &dir.join("sana_sprint/scheduler/scheduler_config.json"),
        )
        .unwrap();
        assert_eq!(scm, ScmConfig::default());
    }

    #[test]
    fn dpm_rejects_unsupported_configs() {
        let mut c = sana_dpm();
        c.algorithm_type = "sde-dpmsolver++".into();
        assert!(FlowDpmSolver::new(&c, 18).is_err());
        let mut c = sana_dpm();
        c.final_sigmas_type = "sigma_min".into();
        assert!(FlowDpmSolver::new(&c, 18).is_err());
        assert!(FlowDpmSolver::new(&sana_dpm(), 0).is_err());
    }

    #[test]
    fn dpm_last_step_returns_x0_and_first_is_first_order() {
        let dev = Device::Cpu;
        let mut s = FlowDpmSolver::new(&sana_dpm(), 2).unwrap();
        let x = Tensor::new(&[1.0f32, -2.0, 0.5], &dev).unwrap();
        let v = Tensor::new(&[0.25f32, 1.0, -1.0], &dev).unwrap();
        let x1 = s.step(&v, &x).unwrap();
        // First order by hand in f32.
        let sig = s.sigmas().to_vec();
        let (a1, s0, s1) = (1.0 - sig[1], sig[0], sig[1]);
        let h = (a1.ln() - s1.ln()) - ((1.0 - s0).ln() - s0.ln());
        let want: Vec<f32> = [1.0f32, -2.0, 0.5]
            .iter()
            .zip([0.25f32, 1.0, -1.0])
            .map(|(x, v)| (s1 / s0) * x - (a1 * ((-h).exp() - 1.0)) * (x - s0 * v))
            .collect();
        assert_eq!(x1.to_vec1::<f32>().unwrap(), want);
        // Last step (σ = 0): exactly x0 = x - σ·v.
        let x2 = s.step(&v, &x1).unwrap().to_vec1::<f32>().unwrap();
        let want2: Vec<f32> = x1
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .zip([0.25f32, 1.0, -1.0])
            .map(|(x, v)| x - s1 * v)
            .collect();
        assert_eq!(x2, want2);
        assert!(s.step(&v, &x).is_err(), "a third step must fail");
    }

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
