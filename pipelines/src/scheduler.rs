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
//! Unsupported configuration values are rejected at construction, never silently approximated. Each
//! sampler lives in its own file (`scheduler/dpm.rs`, `scheduler/scm.rs`) and is re-exported here, so
//! `pipelines::scheduler::{FlowDpmSolver, ScmScheduler, …}` stay the public paths.

mod dpm;
mod scm;

use candle_core::{DType, Tensor};

pub use dpm::{DpmSolverConfig, FlowDpmSolver};
pub use scm::{
    ScmConfig, ScmScheduler, ScmStepInput, SCM_INTERMEDIATE_TIMESTEPS, SCM_MAX_TIMESTEPS,
};

use super::PipelineError;

fn cfg_err(msg: String) -> PipelineError {
    PipelineError::Load(format!("scheduler config: {msg}"))
}

/// `num_inference_steps` must be in `1..=num_train_timesteps` for either sampler.
fn check_num_steps(
    num_inference_steps: usize,
    num_train_timesteps: usize,
) -> Result<(), PipelineError> {
    if num_inference_steps == 0 || num_inference_steps > num_train_timesteps {
        return Err(PipelineError::InvalidRequest(format!(
            "num_inference_steps must be in 1..={num_train_timesteps} (got {num_inference_steps})"
        )));
    }
    Ok(())
}

/// Scales every element of `x` by the f32 scalar `c` (one f32 rounding, like `0-dim f32 tensor * x`).
fn scale(x: &Tensor, c: f32) -> candle_core::Result<Tensor> {
    x.affine(f64::from(c), 0.0)
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

#[cfg(test)]
mod tests {
    use super::dpm::tests::sana_dpm;
    use super::*;

    #[test]
    fn tiny_fixture_configs_parse() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny");
        let dpm: DpmSolverConfig =
            crate::loader::read_json(&dir.join("sana/scheduler/scheduler_config.json")).unwrap();
        assert_eq!(dpm, sana_dpm());
        let scm: ScmConfig =
            crate::loader::read_json(&dir.join("sana_sprint/scheduler/scheduler_config.json"))
                .unwrap();
        assert_eq!(scm, ScmConfig::default());
    }
}
