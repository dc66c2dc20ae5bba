//! Where the pipelines' standard-normal draws come from ([`NoiseSource`]): the per-request seeded
//! generator that reproduces torch's CUDA `randn` ([`seeded_noise`]), or pre-recorded draws handed out
//! in order ([`InjectedNoise`]: parity tests, `worker generate --latents`). The pipelines make one call
//! per tensor in diffusers' order.

use std::collections::VecDeque;

use candle_core::{DType, Device, Tensor};

use crate::rng::TorchCudaGenerator;
use crate::PipelineError;

/// Where standard-normal draws come from, one call per tensor in diffusers' order.
pub trait NoiseSource {
    /// An f32 tensor of `shape` on `device` (`torch.randn(shape, generator=g, dtype=float32)`).
    fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor, PipelineError>;
}

impl NoiseSource for TorchCudaGenerator {
    fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor, PipelineError> {
        Ok(self.randn_tensor(shape, device)?)
    }
}

/// The per-request seeded generator for `device`: on a CUDA device (with the `cuda` feature) the draws are
/// made by the GPU kernel of [`crate::rng_cuda`], bit-identical to torch's; elsewhere by the CPU port
/// [`TorchCudaGenerator`] (H100 launch geometry).
pub fn seeded_noise(seed: u64, device: &Device) -> Result<Box<dyn NoiseSource>, PipelineError> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        return Ok(Box::new(crate::rng_cuda::CudaTorchGenerator::new(
            seed, dev,
        )?));
    }
    let _ = device;
    Ok(Box::new(TorchCudaGenerator::new(seed)))
}

/// Pre-recorded draws handed out in order (parity tests, `worker generate --latents`).
#[derive(Debug, Default)]
pub struct InjectedNoise {
    queue: VecDeque<Tensor>,
}

impl InjectedNoise {
    pub fn new(draws: impl IntoIterator<Item = Tensor>) -> Self {
        InjectedNoise {
            queue: draws.into_iter().collect(),
        }
    }

    /// Draws not consumed yet.
    pub fn remaining(&self) -> usize {
        self.queue.len()
    }
}

impl NoiseSource for InjectedNoise {
    fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor, PipelineError> {
        let t = self.queue.pop_front().ok_or_else(|| {
            PipelineError::InvalidRequest(format!("no injected noise left for shape {shape:?}"))
        })?;
        if t.dims() != shape {
            return Err(PipelineError::InvalidRequest(format!(
                "injected noise has shape {:?}, the pipeline draws {shape:?}",
                t.dims()
            )));
        }
        Ok(t.to_dtype(DType::F32)?.to_device(device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injected_noise_checks_shape_and_order() {
        let dev = Device::Cpu;
        let a = Tensor::zeros((1, 2), DType::F32, &dev).unwrap();
        let b = Tensor::ones((1, 3), DType::F32, &dev).unwrap();
        let mut src = InjectedNoise::new([a, b]);
        assert_eq!(src.randn(&[1, 2], &dev).unwrap().dims(), &[1, 2]);
        assert!(
            src.randn(&[1, 2], &dev).is_err(),
            "second draw has another shape"
        );
        assert!(src.randn(&[1, 3], &dev).is_err(), "queue is empty");
    }
}
