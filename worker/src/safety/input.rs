//! The model input both checkers build the same way: [`Processor`] output as an f32 `(B, 3, S, S)` host
//! tensor (the `pixel_values` transformers' image processors return), checked against the model's
//! `image_size`, then moved to the checker's device and dtype for the forward.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;

use super::processor::{ClassDefaults, Processor};
use super::SafetyError;

/// A checker's preprocessor plus the input size, device and dtype of its model.
pub(crate) struct ModelInput {
    processor: Processor,
    image_size: usize,
    device: Device,
    dtype: DType,
}

impl ModelInput {
    /// Parses `preprocessor_config.json` text (missing keys take the processor class's `defaults`); the
    /// device and dtype are those of the model's weights `vb`.
    pub(crate) fn new(
        preprocessor_json: &str,
        defaults: ClassDefaults,
        image_size: usize,
        vb: &VarBuilder,
    ) -> Result<Self, SafetyError> {
        let processor =
            Processor::from_json(preprocessor_json, defaults).map_err(SafetyError::Load)?;
        Ok(Self {
            processor,
            image_size,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// `pixel_values` `(B, 3, S, S)` f32 on the host, exactly as the transformers processor makes them.
    pub(crate) fn pixel_values(&self, images: &[RgbImage]) -> Result<Tensor, SafetyError> {
        let (data, (h, w)) = self
            .processor
            .pixel_values(images)
            .map_err(SafetyError::Input)?;
        if (h, w) != (self.image_size, self.image_size) {
            // The position table has (image_size/patch)² + 1 entries; other sizes need interpolation
            // transformers only does on request.
            return Err(SafetyError::Input(format!(
                "processor yields {w}x{h}, the model expects {0}x{0}",
                self.image_size
            )));
        }
        Ok(Tensor::from_vec(
            data,
            (images.len(), 3, h, w),
            &Device::Cpu,
        )?)
    }

    /// `pixel_values` on the model's device in its dtype.
    pub(crate) fn to_model(&self, pixel_values: &Tensor) -> Result<Tensor, SafetyError> {
        Ok(pixel_values.to_device(&self.device)?.to_dtype(self.dtype)?)
    }
}
