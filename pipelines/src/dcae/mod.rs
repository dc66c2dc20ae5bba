//! DC-AE (`AutoencoderDC`) decoder: latents `(B, latent, h, w)` → images `(B, 3, h·r, w·r)`.
//!
//! Owns the decoder half of diffusers' `AutoencoderDC` (diffusers 0.42.1
//! `models/autoencoders/autoencoder_dc.py::Decoder`, `AutoencoderDC.decode`, `tiled_decode`); the
//! encoder is never loaded. Weights are read with the checkpoint's own names under `decoder.`
//! (sana-port-spec §3.2), so a missing or misshapen weight fails at load with its name.
//!
//! Contract: [`DcAeDecoder::decode`] takes latents *already divided by* `scaling_factor` (the pipeline
//! does that, in the model dtype, as diffusers does) and returns the raw decoder output, roughly in
//! `[-1, 1]`; post-processing (clamp, `(x+1)/2`, resize) belongs to the pipeline.
//! [`DcAeDecoder::decode_tiled`] reproduces `enable_tiling()` decoding.

mod attention;
mod blocks;
mod config;
#[cfg(test)]
mod tests;
mod tiling;

use candle_core::{bail, DType, Result, Tensor};
use candle_nn::VarBuilder;

use crate::ops::{Conv2dLayer, RowAct};

pub use attention::{EfficientVitBlock, MultiscaleLinearAttention};
pub use blocks::{Activation, ChannelRmsNorm, DcUpBlock2d, GluMbConv, ResBlock};
pub use config::{DcAeConfig, PerStage};
pub use tiling::DcAeTiling;

/// One layer of an up-stage.
#[derive(Debug, Clone)]
enum StageLayer {
    Res(ResBlock),
    Vit(EfficientVitBlock),
}

impl StageLayer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Res(b) => b.forward(x),
            Self::Vit(b) => b.forward(x),
        }
    }
}

/// `decoder.up_blocks.{i}`: an `nn.Sequential` of an optional `DCUpBlock2d` (index 0) then the layers.
#[derive(Debug, Clone)]
struct UpStage {
    upsample: Option<DcUpBlock2d>,
    layers: Vec<StageLayer>,
}

impl UpStage {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = match &self.upsample {
            Some(up) => up.forward(x)?,
            None => x.clone(),
        };
        for layer in &self.layers {
            h = layer.forward(&h)?;
        }
        Ok(h)
    }
}

/// `decoder.conv_out`: a plain 3×3 conv, or a shortcut-free `DCUpBlock2d` when stage 0 has no layers.
#[derive(Debug, Clone)]
enum ConvOut {
    Conv(Conv2dLayer),
    Up(DcUpBlock2d),
}

/// The `AutoencoderDC` decoder.
#[derive(Debug, Clone)]
pub struct DcAeDecoder {
    conv_in: Conv2dLayer,
    /// `Some(block_out_channels[-1] / latent_channels)` when `decoder_in_shortcut`.
    in_shortcut_repeats: Option<usize>,
    /// Indexed like diffusers' `up_blocks`; executed from the last to the first.
    up_blocks: Vec<UpStage>,
    norm_out: ChannelRmsNorm,
    conv_act: Activation,
    conv_out: ConvOut,
    cfg: DcAeConfig,
    dtype: DType,
}

impl DcAeDecoder {
    /// Loads from a VarBuilder over the whole VAE checkpoint (`vae/diffusion_pytorch_model.safetensors`);
    /// only keys under `decoder.` are read.
    pub fn load(vb: VarBuilder, cfg: &DcAeConfig) -> Result<Self> {
        let dtype = vb.dtype();
        let vb = vb.pp("decoder");
        let chans = &cfg.decoder_block_out_channels;
        let layers = &cfg.decoder_layers_per_block;
        let n = chans.len();
        if n == 0 || layers.len() != n || cfg.decoder_qkv_multiscales.len() != n {
            bail!(
                "DC-AE config: decoder_block_out_channels ({n}), decoder_layers_per_block ({}) and \
                 decoder_qkv_multiscales ({}) must have the same non-zero length",
                layers.len(),
                cfg.decoder_qkv_multiscales.len()
            );
        }
        let stage_str = |v: &PerStage, i: usize, what: &str| -> Result<String> {
            v.stage(i, n)
                .map(str::to_string)
                .map_err(|e| candle_core::Error::Msg(format!("DC-AE config {what}: {e}")))
        };
        let interpolate = match cfg.upsample_block_type.as_str() {
            "interpolate" => true,
            "pixel_shuffle" => false,
            other => {
                bail!("DC-AE upsample_block_type {other:?} is not interpolate or pixel_shuffle")
            }
        };
        let c_last = chans[n - 1];
        let conv_in = Conv2dLayer::load(vb.pp("conv_in"), cfg.latent_channels, c_last, 3, true)?;
        let in_shortcut_repeats = if cfg.decoder_in_shortcut {
            let r = c_last / cfg.latent_channels;
            if r * cfg.latent_channels != c_last {
                bail!(
                    "DC-AE in_shortcut: {c_last} channels is not a multiple of {} latents",
                    cfg.latent_channels
                );
            }
            Some(r)
        } else {
            None
        };

        let mut up_blocks = Vec::with_capacity(n);
        for (i, (&c, &num_layers)) in chans.iter().zip(layers).enumerate() {
            let svb = vb.pp("up_blocks").pp(i);
            let mut idx = 0;
            let upsample = if i < n - 1 && num_layers > 0 {
                idx = 1;
                Some(DcUpBlock2d::load(
                    svb.pp(0),
                    chans[i + 1],
                    c,
                    interpolate,
                    true,
                )?)
            } else {
                None
            };
            let block_type = stage_str(&cfg.decoder_block_types, i, "decoder_block_types")?;
            let norm_type = stage_str(&cfg.decoder_norm_types, i, "decoder_norm_types")?;
            let act =
                Activation::from_name(&stage_str(&cfg.decoder_act_fns, i, "decoder_act_fns")?)?;
            let mut stage_layers = Vec::with_capacity(num_layers);
            for l in 0..num_layers {
                let lvb = svb.pp(idx + l);
                stage_layers.push(match block_type.as_str() {
                    "ResBlock" => StageLayer::Res(ResBlock::load(lvb, c, &norm_type, act)?),
                    "EfficientViTBlock" => StageLayer::Vit(EfficientVitBlock::load(
                        lvb,
                        c,
                        cfg.attention_head_dim,
                        &cfg.decoder_qkv_multiscales[i],
                        &norm_type,
                    )?),
                    other => bail!("DC-AE block type {other:?} is not supported"),
                });
            }
            up_blocks.push(UpStage {
                upsample,
                layers: stage_layers,
            });
        }

        let channels = if layers[0] > 0 || n == 1 {
            chans[0]
        } else {
            chans[1]
        };
        let conv_out = if layers[0] > 0 {
            ConvOut::Conv(Conv2dLayer::load(
                vb.pp("conv_out"),
                channels,
                cfg.in_channels,
                3,
                true,
            )?)
        } else {
            ConvOut::Up(DcUpBlock2d::load(
                vb.pp("conv_out"),
                channels,
                cfg.in_channels,
                interpolate,
                false,
            )?)
        };
        Ok(Self {
            conv_in,
            in_shortcut_repeats,
            up_blocks,
            norm_out: ChannelRmsNorm::load(vb.pp("norm_out"), channels)?,
            conv_act: Activation::from_name(&cfg.decoder_conv_act_fn)?,
            conv_out,
            cfg: cfg.clone(),
            dtype,
        })
    }

    pub fn config(&self) -> &DcAeConfig {
        &self.cfg
    }

    /// The dtype of the weights; `decode` casts its input to it.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `conv_in` plus the `in_shortcut` repeat_interleave: the input of `up_blocks[-1]`, channels-last.
    fn decode_head(&self, z: &Tensor) -> Result<Tensor> {
        let z = blocks::to_channels_last(&z.to_dtype(self.dtype)?)?;
        let h = self.conv_in.forward(&z)?;
        match self.in_shortcut_repeats {
            Some(r) => h + blocks::repeat_interleave_last(&z, r)?,
            None => Ok(h),
        }
    }

    /// diffusers `Decoder.forward` on `z`: `(B, latent_channels, h, w)`, already divided by
    /// `scaling_factor`. Returns `(B, in_channels, h·r, w·r)` in the decoder dtype.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let (_b, c, _h, _w) = z.dims4()?;
        if c != self.cfg.latent_channels {
            bail!(
                "DC-AE decode: latents have {c} channels, config says {}",
                self.cfg.latent_channels
            );
        }
        let mut h = self.decode_head(z)?;
        for stage in self.up_blocks.iter().rev() {
            h = stage.forward(&h)?;
        }
        let h = match self.conv_act {
            Activation::Silu => self.norm_out.forward_fused(&h, None, RowAct::Silu)?,
            Activation::Relu => self.norm_out.forward_fused(&h, None, RowAct::Relu)?,
            act => act.apply(&self.norm_out.forward(&h)?)?,
        };
        let out = match &self.conv_out {
            ConvOut::Conv(conv) => conv.forward(&h)?,
            ConvOut::Up(up) => up.forward(&h)?,
        };
        blocks::to_channels_first(&out)
    }
}
