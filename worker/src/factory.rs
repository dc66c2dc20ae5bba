//! The production [`PipelineFactory`]: the Sana / Sana-Sprint pipelines of `sana_pipelines::sana`
//! and the NSFW checker of `crate::safety`, each from a Hub repo id (+ revision) or a local directory in
//! the diffusers layout. Only the pipelines of the served endpoints are loaded; the checker always is
//! (a worker whose checker cannot load refuses to start: no silent pass-through).

use candle_core::{DType, Device};

use super::model::{LoadedModels, PipelineFactory};
use crate::safety::{load_checker, SafetyCheckerVersion};
use fleet::job::EndpointKind;
use sana_pipelines::loader::ModelSource;
use sana_pipelines::sana::{load_pipelines, PipelinesConfig};
use sana_pipelines::PipelineError;

/// Where the models come from and where they run.
#[derive(Debug, Clone)]
pub struct SanaFactoryConfig {
    pub base: ModelSource,
    pub sprint: ModelSource,
    pub device: Device,
    /// bf16 on the GPU, f32 on the CPU (tests).
    pub dtype: DType,
    pub safety_version: SafetyCheckerVersion,
    /// `None` = the version's default Hub repo.
    pub safety_model: Option<ModelSource>,
}

/// Loads the real models on the model thread.
#[derive(Debug, Clone)]
pub struct SanaFactory {
    pub config: SanaFactoryConfig,
}

impl PipelineFactory for SanaFactory {
    fn load(&mut self, endpoints: &[EndpointKind]) -> Result<LoadedModels, PipelineError> {
        let c = &self.config;
        let serves = |k: EndpointKind| endpoints.contains(&k);
        let cfg = PipelinesConfig {
            base: serves(EndpointKind::Base).then(|| c.base.clone()),
            sprint: serves(EndpointKind::Sprint).then(|| c.sprint.clone()),
            device: c.device.clone(),
            dtype: c.dtype,
        };
        let mut pipelines = load_pipelines(&cfg)?;
        if c.device.is_cuda() {
            // Before the first job, not during it: kernel JIT, cuDNN algorithm choice and handle creation
            // happen here (issue 8 §4). The default request size (3840×2160, binned) and 1024² (the
            // most common custom size) are both warmed.
            for (w, h) in [
                (
                    fleet::job::DEFAULT_SIZE.width,
                    fleet::job::DEFAULT_SIZE.height,
                ),
                (1024, 1024),
            ] {
                for (kind, secs) in pipelines.warm_up(w, h)? {
                    tracing::info!(%kind, width = w, height = h, seconds = secs, "warm-up run");
                }
            }
        } else {
            // One small run per pipeline, so a worker reports ready (`/health`) only once its models have
            // generated an image on this device.
            for (kind, secs) in pipelines.warm_up(256, 256)? {
                tracing::info!(%kind, width = 256, height = 256, seconds = secs, "warm-up run");
            }
        }
        let source = c
            .safety_model
            .clone()
            .unwrap_or_else(|| c.safety_version.default_source());
        let safety = load_checker(c.safety_version, &source, &c.device, c.dtype)
            .map_err(|e| PipelineError::Load(format!("safety checker {}: {e}", source.id)))?;
        Ok(LoadedModels {
            pipelines: Box::new(pipelines),
            safety,
        })
    }
}
