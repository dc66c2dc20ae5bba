//! Flow-matching DPM-Solver++ (2M) of the base pipeline: diffusers `DPMSolverMultistepScheduler`
//! (`schedulers/scheduling_dpmsolver_multistep.py`) restricted to what Sana uses — `dpmsolver++`, order ≤ 2,
//! `midpoint`/`heun`, `flow_prediction` on flow sigmas with `flow_shift`, `final_sigmas_type="zero"`,
//! `lower_order_final`. Tables are built in f64 and stored in f32 exactly as numpy/torch do
//! (`set_timesteps`); the per-step scalar coefficients are computed in f32 one torch 0-dim op at a time.

use candle_core::{DType, Tensor};
use serde::Deserialize;

use super::{cfg_err, check_num_steps, scale};
use crate::PipelineError;

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
        check_num_steps(num_inference_steps, cfg.num_train_timesteps)?;
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

#[cfg(test)]
pub(in crate::scheduler) mod tests {
    use super::*;
    use candle_core::Device;

    pub(in crate::scheduler) fn sana_dpm() -> DpmSolverConfig {
        serde_json::from_str(
            r#"{"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++", "solver_order": 2,
                "solver_type": "midpoint", "prediction_type": "flow_prediction", "use_flow_sigmas": true,
                "flow_shift": 3.0, "final_sigmas_type": "zero", "lower_order_final": true,
                "euler_at_final": false, "num_train_timesteps": 1000, "timestep_spacing": "linspace"}"#,
        )
        .unwrap()
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
}
