//! DC-AE decoder building blocks other than attention: channel RMSNorm, activations, `ResBlock`,
//! `DCUpBlock2d` and `GLUMBConv`.
//!
//! Mirrors diffusers 0.42.1 `models/autoencoders/autoencoder_dc.py` (`ResBlock`, `DCUpBlock2d`),
//! `models/transformers/sana_transformer.py` (`GLUMBConv`) and `models/normalization.py` (`RMSNorm`
//! with weight + bias, eps 1e-5). The whole decoder runs channels-last `(B, H, W, C)` (diffusers is NCHW;
//! the maths is the same, and on CUDA no layout copies are made between blocks): dense 3×3 convs through
//! [`Conv2dLayer`], channel norms as row norms, 1×1 convs as GEMMs on `(pixels, C)`. Weights are kept as stored
//! (`[out, in, kh, kw]`) and reshaped in `forward`, so loading through the shape-only
//! `param_count` VarBuilder allocates nothing.

use candle_core::{bail, Result, Tensor};
use candle_nn::VarBuilder;

use crate::ops::{
    glu_depthwise, pixel_shuffle2_nhwc, rms_norm_rows, up_shortcut_add, upsample_nearest2x_nhwc,
    Conv2dLayer, DepthwiseWeight, RowAct,
};

/// eps of every `RMSNorm` in the DC-AE decoder (`get_normalization`, `GLUMBConv`, `norm_out`).
pub const RMS_EPS: f32 = 1e-5;

/// `(B, C, H, W) -> (B, H, W, C)`, contiguous.
pub fn to_channels_last(x: &Tensor) -> Result<Tensor> {
    x.permute((0, 2, 3, 1))?.contiguous()
}

/// `(B, H, W, C) -> (B, C, H, W)`, contiguous.
pub fn to_channels_first(x: &Tensor) -> Result<Tensor> {
    x.permute((0, 3, 1, 2))?.contiguous()
}

pub use crate::ops::repeat_interleave_last;

/// A 1×1 convolution applied channels-last: `x` is `(..., Cin)`, `weight` `(Cout, Cin, 1, 1)`.
pub fn conv1x1_channels_last(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (cout, cin, kh, kw) = weight.dims4()?;
    if kh != 1 || kw != 1 {
        bail!(
            "conv1x1_channels_last: weight {:?} is not 1x1",
            weight.dims()
        );
    }
    let mut out_dims = x.dims().to_vec();
    let last = out_dims.len() - 1;
    out_dims[last] = cout;
    let rows = x.elem_count() / cin;
    let w = weight.reshape((cout, cin))?;
    let y = x.reshape((rows, cin))?.matmul(&w.t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    y.reshape(out_dims)
}

/// Only `rms_norm` is implemented: it is what every published DC-AE decoder config uses.
pub fn check_norm_type(norm_type: &str) -> Result<()> {
    if norm_type != "rms_norm" {
        bail!("DC-AE decoder norm type {norm_type:?} is not supported (only \"rms_norm\")");
    }
    Ok(())
}

/// diffusers `get_activation` (`models/activations.py::ACT2CLS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    Relu,
    /// `nn.GELU()` default: exact erf form.
    Gelu,
    Mish,
}

impl Activation {
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "silu" | "swish" => Self::Silu,
            "relu" => Self::Relu,
            "gelu" => Self::Gelu,
            "mish" => Self::Mish,
            other => bail!("activation {other:?} is not one of silu, swish, relu, gelu, mish"),
        })
    }

    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu => x.silu(),
            Self::Relu => x.relu(),
            Self::Gelu => x.gelu_erf(),
            // x · tanh(softplus(x)); exp overflow gives softplus = inf and tanh(inf) = 1, i.e. x.
            Self::Mish => x.mul(&((x.exp()? + 1.0)?.log()?.tanh()?)),
        }
    }
}

/// diffusers `RMSNorm(C, eps=1e-5, elementwise_affine=True, bias=True)` over the last (channel) dim.
#[derive(Debug, Clone)]
pub struct ChannelRmsNorm {
    weight: Tensor,
    bias: Tensor,
}

impl ChannelRmsNorm {
    pub fn load(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
        })
    }

    /// `x`: `(..., C)` channels-last.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_fused(x, None, RowAct::Identity)
    }

    /// The norm, plus `residual`, then `act`: one kernel on CUDA.
    pub fn forward_fused(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        act: RowAct,
    ) -> Result<Tensor> {
        rms_norm_rows(x, &self.weight, &self.bias, residual, RMS_EPS, act)
    }
}

fn conv3x3(vb: VarBuilder, cin: usize, cout: usize, bias: bool) -> Result<Conv2dLayer> {
    Conv2dLayer::load(vb, cin, cout, 3, bias)
}

/// diffusers `ResBlock(C, C, norm_type="rms_norm", act_fn)`: conv3×3(+b) → act → conv3×3 (no bias)
/// → channel RMSNorm (weight + bias) → + residual. Channels-last in and out.
#[derive(Debug, Clone)]
pub struct ResBlock {
    conv1: Conv2dLayer,
    conv2: Conv2dLayer,
    norm: ChannelRmsNorm,
    act: Activation,
}

impl ResBlock {
    pub fn load(vb: VarBuilder, channels: usize, norm_type: &str, act: Activation) -> Result<Self> {
        check_norm_type(norm_type)?;
        Ok(Self {
            conv1: conv3x3(vb.pp("conv1"), channels, channels, true)?,
            conv2: conv3x3(vb.pp("conv2"), channels, channels, false)?,
            norm: ChannelRmsNorm::load(vb.pp("norm"), channels)?,
            act,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = match self.act {
            // conv + bias + SiLU in one pass after cuDNN on CUDA.
            Activation::Silu => self.conv1.forward_act(x, true)?,
            act => act.apply(&self.conv1.forward(x)?)?,
        };
        let h = self.conv2.forward(&h)?;
        self.norm.forward_fused(&h, Some(x), RowAct::Identity)
    }
}

/// diffusers `DCUpBlock2d` (factor 2). `interpolate`: nearest ×2 then conv3×3 (Cin→Cout); otherwise
/// conv3×3 (Cin→4·Cout) then pixel_shuffle. `shortcut`: adds
/// `pixel_shuffle(repeat_interleave(x, 4·Cout/Cin, dim=1), 2)`. Channels-last in and out.
#[derive(Debug, Clone)]
pub struct DcUpBlock2d {
    conv: Conv2dLayer,
    interpolate: bool,
    /// `Some(repeats)` when the shortcut branch is on.
    shortcut_repeats: Option<usize>,
}

impl DcUpBlock2d {
    pub fn load(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        interpolate: bool,
        shortcut: bool,
    ) -> Result<Self> {
        let repeats = cout * 4 / cin;
        if shortcut && cin * repeats != cout * 4 {
            bail!(
                "DCUpBlock2d {cin}->{cout}: shortcut needs 4*out_channels divisible by in_channels"
            );
        }
        let conv_out = if interpolate { cout } else { cout * 4 };
        Ok(Self {
            conv: conv3x3(vb.pp("conv"), cin, conv_out, true)?,
            interpolate,
            shortcut_repeats: shortcut.then_some(repeats),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let main = if self.interpolate {
            self.conv.forward(&upsample_nearest2x_nhwc(x)?)?
        } else {
            pixel_shuffle2_nhwc(&self.conv.forward(x)?)?
        };
        match self.shortcut_repeats {
            Some(r) => up_shortcut_add(&main, x, r),
            None => Ok(main),
        }
    }
}

/// diffusers `GLUMBConv(C, C, expand_ratio=4, norm_type="rms_norm", residual_connection=True)`,
/// channels-last `(B, H, W, C)` in and out:
/// 1×1 C→2·4C (+b) → SiLU → depthwise 3×3 (+b) → `a · SiLU(gate)` → 1×1 4C→C (no bias) → RMSNorm → + x.
#[derive(Debug, Clone)]
pub struct GluMbConv {
    conv_inverted_w: Tensor,
    conv_inverted_b: Tensor,
    conv_depth_w: DepthwiseWeight,
    conv_depth_b: Tensor,
    conv_point_w: Tensor,
    norm: ChannelRmsNorm,
}

impl GluMbConv {
    pub fn load(vb: VarBuilder, channels: usize) -> Result<Self> {
        let hidden = 4 * channels; // int(expand_ratio * in_channels), expand_ratio = 4
        let inv = vb.pp("conv_inverted");
        let depth = vb.pp("conv_depth");
        Ok(Self {
            conv_inverted_w: inv.get((2 * hidden, channels, 1, 1), "weight")?,
            conv_inverted_b: inv.get(2 * hidden, "bias")?,
            conv_depth_w: DepthwiseWeight::new(depth.get((2 * hidden, 1, 3, 3), "weight")?),
            conv_depth_b: depth.get(2 * hidden, "bias")?,
            conv_point_w: vb
                .pp("conv_point")
                .get((channels, hidden, 1, 1), "weight")?,
            norm: ChannelRmsNorm::load(vb.pp("norm"), channels)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // 1×1 expansion (bias added inside the fused op) -> silu -> depthwise 3×3 + bias -> a · silu(gate).
        let h = conv1x1_channels_last(x, &self.conv_inverted_w, None)?;
        let h = glu_depthwise(
            &h,
            &self.conv_inverted_b,
            &self.conv_depth_w,
            &self.conv_depth_b,
        )?;
        let h = conv1x1_channels_last(&h, &self.conv_point_w, None)?;
        self.norm.forward_fused(&h, Some(x), RowAct::Identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    #[test]
    fn repeat_interleave_orders_like_torch() -> Result<()> {
        let x = Tensor::arange(0f32, 2., &Device::Cpu)?.reshape((1, 2, 1, 1))?;
        let y = repeat_interleave_last(&x.reshape((1, 1, 1, 2))?, 3)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(y, vec![0., 0., 0., 1., 1., 1.]);
        Ok(())
    }

    #[test]
    fn conv1x1_channels_last_matches_conv2d() -> Result<()> {
        let x = crate::rng::test_randn("dcae/blocks:276", 1.0, (2, 3, 4, 5))?;
        let w = crate::rng::test_randn("dcae/blocks:277", 1.0, (7, 5, 1, 1))?;
        let b = crate::rng::test_randn("dcae/blocks:278", 1.0, 7)?;
        let ours = conv1x1_channels_last(&x, &w, Some(&b))?;
        let nchw = to_channels_first(&x)?;
        let reference = nchw
            .conv2d(&w, 0, 1, 1, 1)?
            .broadcast_add(&b.reshape((1, 7, 1, 1))?)?;
        let diff = max_abs_diff(&to_channels_first(&ours)?, &reference)?;
        assert!(diff < 1e-5, "max abs diff {diff} (f32 rounding only)");
        Ok(())
    }

    #[test]
    fn channel_rms_norm_matches_formula() -> Result<()> {
        let x = crate::rng::test_randn("dcae/blocks:292", 2.0, (2, 4, 3, 3))?;
        let weight = crate::rng::test_randn("dcae/blocks:293", 1.0, 4)?;
        let bias = crate::rng::test_randn("dcae/blocks:294", 1.0, 4)?;
        let norm = ChannelRmsNorm {
            weight: weight.clone(),
            bias: bias.clone(),
        };
        let ours = to_channels_first(&norm.forward(&to_channels_last(&x)?)?)?;
        // diffusers: x * rsqrt(mean(x², channel) + eps) * w + b, channel = dim 1 here.
        let var = x.sqr()?.mean_keepdim(1)?;
        let reference = x
            .broadcast_div(&(var + RMS_EPS as f64)?.sqrt()?)?
            .broadcast_mul(&weight.reshape((1, 4, 1, 1))?)?
            .broadcast_add(&bias.reshape((1, 4, 1, 1))?)?;
        let diff = max_abs_diff(&ours, &reference)?;
        assert!(diff < 1e-5, "max abs diff {diff} (f32 rounding only)");
        Ok(())
    }

    #[test]
    fn up_block_shapes_and_shortcut() -> Result<()> {
        let dev = Device::Cpu;
        // Zero conv weights: the output is exactly the pixel-shuffled repeat_interleave shortcut.
        let vb = VarBuilder::zeros(DType::F32, &dev);
        let up = DcUpBlock2d::load(vb, 4, 2, true, true)?;
        let x = crate::rng::test_randn("dcae/blocks:317", 1.0, (1, 4, 3, 5))?;
        let y = to_channels_first(&up.forward(&to_channels_last(&x)?)?)?;
        assert_eq!(y.dims(), &[1, 2, 6, 10]);
        // repeats = 2·4/4 = 2; out channel o, pixel (2i+a, 2j+b) <- repeated channel 4o + 2a + b
        // <- input channel (4o + 2a + b) / 2.
        let xv = x.squeeze(0)?.to_vec3::<f32>()?;
        let yv = y.squeeze(0)?.to_vec3::<f32>()?;
        for (o, plane) in yv.iter().enumerate() {
            for (row, line) in plane.iter().enumerate() {
                for (col, &got) in line.iter().enumerate() {
                    let (i, a, j, b) = (row / 2, row % 2, col / 2, col % 2);
                    let src = (4 * o + 2 * a + b) / 2;
                    assert_eq!(got, xv[src][i][j], "channel {o} pixel ({row}, {col})");
                }
            }
        }
        assert!(DcUpBlock2d::load(VarBuilder::zeros(DType::F32, &dev), 3, 2, true, true).is_err());
        Ok(())
    }

    #[test]
    fn activations_by_name() -> Result<()> {
        let x = Tensor::new(&[-1f32, 0., 2.], &Device::Cpu)?;
        let relu = Activation::from_name("relu")?.apply(&x)?.to_vec1::<f32>()?;
        assert_eq!(relu, vec![0., 0., 2.]);
        let mish = Activation::from_name("mish")?.apply(&x)?.to_vec1::<f32>()?;
        // torch.nn.functional.mish([-1, 0, 2]) = [-0.3034, 0, 1.9440]
        assert!((mish[0] + 0.30340).abs() < 1e-4 && (mish[2] - 1.94396).abs() < 1e-4);
        assert!(Activation::from_name("relu6").is_err());
        Ok(())
    }
}
