//! Fused-op entry points shared by the Sana transformer and the DC-AE decoder.
//!
//! Each op is one function so a fused CUDA kernel can later replace the body without touching the
//! model code (sana-port-spec §6.2). The bodies here are the portable reference path: plain candle ops,
//! correct on every device, used by the CPU parity tests. Layout is channels-last `(B, H, W, C)`.

use candle_core::{DType, Result, Tensor, D};

/// Depthwise 2-D convolution, stride 1, "same" zero padding (`k / 2`), channels-last.
///
/// `x`: `(B, H, W, C)`; `weight`: `(C, 1, k, k)` as stored by PyTorch for `groups = C`;
/// `bias`: `(C)`. Returns `(B, H, W, C)`. Mirrors `nn.Conv2d(C, C, k, padding=k//2, groups=C)`.
///
/// candle's own grouped conv runs one convolution per group (unusable at 11 200 groups), so this
/// sums `k·k` shifted, per-channel-scaled views instead: exact in f32, `k²` elementwise passes.
pub fn depthwise_conv2d_nhwc(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (_b, h, w, c) = x.dims4()?;
    let (wc, one, kh, kw) = weight.dims4()?;
    if wc != c || one != 1 || kh != kw || kh % 2 == 0 {
        candle_core::bail!(
            "depthwise_conv2d_nhwc: weight {:?} does not fit {c} channels",
            weight.dims()
        );
    }
    let pad = kh / 2;
    let xp = x.pad_with_zeros(1, pad, pad)?.pad_with_zeros(2, pad, pad)?;
    // (C, 1, k, k) -> (k, k, C): one C-vector per tap, broadcast over (B, H, W).
    let taps = weight
        .to_dtype(x.dtype())?
        .squeeze(1)?
        .permute((1, 2, 0))?
        .contiguous()?;
    let mut acc: Option<Tensor> = None;
    for i in 0..kh {
        for j in 0..kw {
            let tap = taps.get(i)?.get(j)?; // (C)
            let term = xp.narrow(1, i, h)?.narrow(2, j, w)?.broadcast_mul(&tap)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
    }
    let out = acc.expect("kernel has at least one tap");
    match bias {
        Some(b) => out.broadcast_add(&b.to_dtype(x.dtype())?),
        None => Ok(out),
    }
}

/// ReLU linear attention as diffusers computes it (`SanaLinearAttnProcessor2_0`,
/// `SanaMultiscaleAttnProcessor2_0`), in f32 whatever the input dtype.
///
/// `q`, `k`, `v`: `(B, G, N, d)` (G heads or groups, N tokens). Returns `(B, G, N, d)` in f32:
/// `out_i = (Σ_j v_j relu(k_j)ᵀ) relu(q_i) / (Σ_j relu(k_j)ᵀ relu(q_i) + eps)`, with `eps = 1e-15`
/// in both upstream processors. The ReLU is applied here; pass the raw projections.
pub fn relu_linear_attention(q: &Tensor, k: &Tensor, v: &Tensor, eps: f64) -> Result<Tensor> {
    let q = q.to_dtype(DType::F32)?.relu()?;
    let k = k.to_dtype(DType::F32)?.relu()?;
    let v = v.to_dtype(DType::F32)?;
    // diffusers pads v with a row of ones so one GEMM yields numerator and denominator.
    let ones = Tensor::ones(v.dims(), DType::F32, v.device())?.narrow(D::Minus1, 0, 1)?;
    let v_pad = Tensor::cat(&[&v, &ones], D::Minus1)?; // (B, G, N, d+1)
    let kv = k
        .transpose(2, 3)?
        .contiguous()?
        .matmul(&v_pad.contiguous()?)?; // (B, G, d, d+1)
    let o = q.contiguous()?.matmul(&kv)?; // (B, G, N, d+1)
    let d = v.dim(D::Minus1)?;
    let num = o.narrow(D::Minus1, 0, d)?;
    let den = (o.narrow(D::Minus1, d, 1)? + eps)?;
    num.broadcast_div(&den)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn depthwise_matches_candle_grouped_conv() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, w, c) = (2, 5, 7, 6);
        let x = Tensor::randn(0f32, 1., (b, h, w, c), &dev)?;
        for k in [3usize, 5] {
            let wt = Tensor::randn(0f32, 1., (c, 1, k, k), &dev)?;
            let bias = Tensor::randn(0f32, 1., c, &dev)?;
            let ours = depthwise_conv2d_nhwc(&x, &wt, Some(&bias))?;
            let nchw = x.permute((0, 3, 1, 2))?.contiguous()?;
            let reference = nchw
                .conv2d(&wt, k / 2, 1, 1, c)?
                .broadcast_add(&bias.reshape((1, c, 1, 1))?)?
                .permute((0, 2, 3, 1))?;
            let diff = (ours - reference)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-5, "k={k}: max abs diff {diff}");
        }
        Ok(())
    }

    #[test]
    fn linear_attention_matches_explicit_sum() -> Result<()> {
        let dev = Device::Cpu;
        let (q, k, v) = (
            Tensor::randn(0f32, 1., (1, 2, 4, 3), &dev)?,
            Tensor::randn(0f32, 1., (1, 2, 4, 3), &dev)?,
            Tensor::randn(0f32, 1., (1, 2, 4, 3), &dev)?,
        );
        let (qv, kv, vv) = (
            q.relu()?.squeeze(0)?.to_vec3::<f32>()?,
            k.relu()?.squeeze(0)?.to_vec3::<f32>()?,
            v.squeeze(0)?.to_vec3::<f32>()?,
        );
        let full = relu_linear_attention(&q, &k, &v, 1e-15)?
            .squeeze(0)?
            .to_vec3::<f32>()?;
        for g in 0..2 {
            for i in 0..4 {
                let scores: Vec<f32> = (0..4)
                    .map(|j| (0..3).map(|c| qv[g][i][c] * kv[g][j][c]).sum())
                    .collect();
                let den: f32 = scores.iter().sum::<f32>() + 1e-15;
                for c in 0..3 {
                    let num: f32 = (0..4).map(|j| scores[j] * vv[g][j][c]).sum();
                    let want = num / den;
                    assert!((full[g][i][c] - want).abs() < 1e-4 * (1.0 + want.abs()));
                }
            }
        }
        Ok(())
    }
}
