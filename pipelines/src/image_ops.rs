//! Resolution binning, resize-and-crop and the final tensor → RGB conversion (spec §1.6).
//!
//! Mirrors diffusers' `PixArtImageProcessor`/`VaeImageProcessor` (`image_processor.py`):
//! * the aspect-ratio bin tables `ASPECT_RATIO_{4096,2048,1024,512}_BIN` (copied verbatim from
//!   `pipelines/sana/pipeline_sana.py`, `pipelines/pixart_alpha/pipeline_pixart_sigma.py` and
//!   `pipeline_pixart_alpha.py`; the table is chosen by the transformer's `sample_size` 128/64/32/16),
//! * `classify_height_width_bin` (nearest `h/w` key, first key on ties),
//! * `resize_and_crop_tensor` (`F.interpolate(bilinear, align_corners=False)` to cover, then centre crop),
//! * `postprocess(output_type="pil")`: `(x·0.5+0.5).clamp(0,1)` in the decoder's dtype, then f32 `×255`,
//!   numpy round (ties to even) and `uint8`.

use candle_core::{DType, Tensor};

use super::PipelineError;

/// `ASPECT_RATIO_4096_BIN` (diffusers, insertion order kept: ties resolve to the first key like Python's `min`).
pub const ASPECT_RATIO_4096_BIN: [(&str, u32, u32); 40] = [
    ("0.25", 2048, 8192),
    ("0.26", 2048, 7936),
    ("0.27", 2048, 7680),
    ("0.28", 2048, 7424),
    ("0.32", 2304, 7168),
    ("0.33", 2304, 6912),
    ("0.35", 2304, 6656),
    ("0.4", 2560, 6400),
    ("0.42", 2560, 6144),
    ("0.48", 2816, 5888),
    ("0.5", 2816, 5632),
    ("0.52", 2816, 5376),
    ("0.57", 3072, 5376),
    ("0.6", 3072, 5120),
    ("0.68", 3328, 4864),
    ("0.72", 3328, 4608),
    ("0.78", 3584, 4608),
    ("0.82", 3584, 4352),
    ("0.88", 3840, 4352),
    ("0.94", 3840, 4096),
    ("1.0", 4096, 4096),
    ("1.07", 4096, 3840),
    ("1.13", 4352, 3840),
    ("1.21", 4352, 3584),
    ("1.29", 4608, 3584),
    ("1.38", 4608, 3328),
    ("1.46", 4864, 3328),
    ("1.67", 5120, 3072),
    ("1.75", 5376, 3072),
    ("2.0", 5632, 2816),
    ("2.09", 5888, 2816),
    ("2.4", 6144, 2560),
    ("2.5", 6400, 2560),
    ("2.89", 6656, 2304),
    ("3.0", 6912, 2304),
    ("3.11", 7168, 2304),
    ("3.62", 7424, 2048),
    ("3.75", 7680, 2048),
    ("3.88", 7936, 2048),
    ("4.0", 8192, 2048),
];
/// `ASPECT_RATIO_2048_BIN` (diffusers, insertion order kept: ties resolve to the first key like Python's `min`).
pub const ASPECT_RATIO_2048_BIN: [(&str, u32, u32); 40] = [
    ("0.25", 1024, 4096),
    ("0.26", 1024, 3968),
    ("0.27", 1024, 3840),
    ("0.28", 1024, 3712),
    ("0.32", 1152, 3584),
    ("0.33", 1152, 3456),
    ("0.35", 1152, 3328),
    ("0.4", 1280, 3200),
    ("0.42", 1280, 3072),
    ("0.48", 1408, 2944),
    ("0.5", 1408, 2816),
    ("0.52", 1408, 2688),
    ("0.57", 1536, 2688),
    ("0.6", 1536, 2560),
    ("0.68", 1664, 2432),
    ("0.72", 1664, 2304),
    ("0.78", 1792, 2304),
    ("0.82", 1792, 2176),
    ("0.88", 1920, 2176),
    ("0.94", 1920, 2048),
    ("1.0", 2048, 2048),
    ("1.07", 2048, 1920),
    ("1.13", 2176, 1920),
    ("1.21", 2176, 1792),
    ("1.29", 2304, 1792),
    ("1.38", 2304, 1664),
    ("1.46", 2432, 1664),
    ("1.67", 2560, 1536),
    ("1.75", 2688, 1536),
    ("2.0", 2816, 1408),
    ("2.09", 2944, 1408),
    ("2.4", 3072, 1280),
    ("2.5", 3200, 1280),
    ("2.89", 3328, 1152),
    ("3.0", 3456, 1152),
    ("3.11", 3584, 1152),
    ("3.62", 3712, 1024),
    ("3.75", 3840, 1024),
    ("3.88", 3968, 1024),
    ("4.0", 4096, 1024),
];
/// `ASPECT_RATIO_1024_BIN` (diffusers, insertion order kept: ties resolve to the first key like Python's `min`).
pub const ASPECT_RATIO_1024_BIN: [(&str, u32, u32); 33] = [
    ("0.25", 512, 2048),
    ("0.28", 512, 1856),
    ("0.32", 576, 1792),
    ("0.33", 576, 1728),
    ("0.35", 576, 1664),
    ("0.4", 640, 1600),
    ("0.42", 640, 1536),
    ("0.48", 704, 1472),
    ("0.5", 704, 1408),
    ("0.52", 704, 1344),
    ("0.57", 768, 1344),
    ("0.6", 768, 1280),
    ("0.68", 832, 1216),
    ("0.72", 832, 1152),
    ("0.78", 896, 1152),
    ("0.82", 896, 1088),
    ("0.88", 960, 1088),
    ("0.94", 960, 1024),
    ("1.0", 1024, 1024),
    ("1.07", 1024, 960),
    ("1.13", 1088, 960),
    ("1.21", 1088, 896),
    ("1.29", 1152, 896),
    ("1.38", 1152, 832),
    ("1.46", 1216, 832),
    ("1.67", 1280, 768),
    ("1.75", 1344, 768),
    ("2.0", 1408, 704),
    ("2.09", 1472, 704),
    ("2.4", 1536, 640),
    ("2.5", 1600, 640),
    ("3.0", 1728, 576),
    ("4.0", 2048, 512),
];
/// `ASPECT_RATIO_512_BIN` (diffusers, insertion order kept: ties resolve to the first key like Python's `min`).
pub const ASPECT_RATIO_512_BIN: [(&str, u32, u32); 33] = [
    ("0.25", 256, 1024),
    ("0.28", 256, 928),
    ("0.32", 288, 896),
    ("0.33", 288, 864),
    ("0.35", 288, 832),
    ("0.4", 320, 800),
    ("0.42", 320, 768),
    ("0.48", 352, 736),
    ("0.5", 352, 704),
    ("0.52", 352, 672),
    ("0.57", 384, 672),
    ("0.6", 384, 640),
    ("0.68", 416, 608),
    ("0.72", 416, 576),
    ("0.78", 448, 576),
    ("0.82", 448, 544),
    ("0.88", 480, 544),
    ("0.94", 480, 512),
    ("1.0", 512, 512),
    ("1.07", 512, 480),
    ("1.13", 544, 480),
    ("1.21", 544, 448),
    ("1.29", 576, 448),
    ("1.38", 576, 416),
    ("1.46", 608, 416),
    ("1.67", 640, 384),
    ("1.75", 672, 384),
    ("2.0", 704, 352),
    ("2.09", 736, 352),
    ("2.4", 768, 320),
    ("2.5", 800, 320),
    ("3.0", 864, 288),
    ("4.0", 1024, 256),
];

/// The bin table diffusers picks for a transformer `sample_size` (any other value raises there).
pub fn aspect_ratio_bins(
    sample_size: usize,
) -> Result<&'static [(&'static str, u32, u32)], PipelineError> {
    match sample_size {
        128 => Ok(&ASPECT_RATIO_4096_BIN),
        64 => Ok(&ASPECT_RATIO_2048_BIN),
        32 => Ok(&ASPECT_RATIO_1024_BIN),
        16 => Ok(&ASPECT_RATIO_512_BIN),
        other => Err(PipelineError::Load(format!(
            "no aspect-ratio bins for transformer sample_size {other} (expected 128, 64, 32 or 16)"
        ))),
    }
}

/// `classify_height_width_bin(height, width, ratios)` → binned `(height, width)`.
pub fn classify_height_width_bin(height: u32, width: u32, bins: &[(&str, u32, u32)]) -> (u32, u32) {
    let ar = f64::from(height) / f64::from(width);
    let mut best: Option<(f64, u32, u32)> = None;
    for (key, h, w) in bins {
        // Keys are the decimal strings of the Python dict; float(key) is what diffusers compares.
        let k: f64 = key.parse().expect("bin keys are decimal literals");
        let d = (k - ar).abs();
        // Strict `<`: Python's min keeps the first of equal keys.
        if best.is_none_or(|(bd, _, _)| d < bd) {
            best = Some((d, *h, *w));
        }
    }
    best.map_or((height, width), |(_, h, w)| (h, w))
}

/// Size diffusers resizes to before the centre crop: `ratio = max(h'/h, w'/w)`, `(int(h·ratio), int(w·ratio))`,
/// each side at least its target. The side that sets the ratio should come out exactly at its target, but
/// `orig·(new/orig)` can round to just under it in f64 (1856·(944/1856) = 943.99…, truncated to 943), which
/// left nothing to crop from (diffusers' Python slicing then silently returns a short image). Clamping keeps
/// the cover covering; every other size is unchanged.
pub fn cover_size(orig_h: usize, orig_w: usize, new_h: usize, new_w: usize) -> (usize, usize) {
    let ratio = (new_h as f64 / orig_h as f64).max(new_w as f64 / orig_w as f64);
    (
        ((orig_h as f64 * ratio) as usize).max(new_h),
        ((orig_w as f64 * ratio) as usize).max(new_w),
    )
}

/// `resize_and_crop_tensor(samples (B,C,H,W), new_width, new_height)`: bilinear (half-pixel centres, like
/// `F.interpolate(mode="bilinear", align_corners=False)`) to cover the target, then centre crop.
pub fn resize_and_crop(
    samples: &Tensor,
    new_height: usize,
    new_width: usize,
) -> Result<Tensor, PipelineError> {
    let (_, _, h, w) = samples.dims4()?;
    if h == new_height && w == new_width {
        return Ok(samples.clone());
    }
    let (rh, rw) = cover_size(h, w, new_height, new_width);
    let resized = samples.upsample_bilinear2d(rh, rw, false)?;
    // `cover_size` never returns less than the target, so these cannot underflow; checked all the same
    // so a violated invariant is an error of this request, not a panic of the model thread.
    let (Some(extra_y), Some(extra_x)) = (rh.checked_sub(new_height), rw.checked_sub(new_width))
    else {
        return Err(PipelineError::InvalidRequest(format!(
            "cannot crop {new_width}x{new_height} from {rw}x{rh}"
        )));
    };
    let (start_y, start_x) = (extra_y / 2, extra_x / 2);
    Ok(resized
        .narrow(2, start_y, new_height)?
        .narrow(3, start_x, new_width)?)
}

/// `postprocess(…, output_type="pil")`: `(B,3,H,W)` decoder output in [−1, 1] → RGB images. On CUDA one
/// kernel quantises on the device ([`crate::kernels::rgb_u8`]) and only the bytes are copied back.
pub fn to_rgb_images(samples: &Tensor) -> Result<Vec<image::RgbImage>, PipelineError> {
    let (b, c, h, w) = samples.dims4()?;
    if c != 3 {
        return Err(PipelineError::InvalidRequest(format!(
            "expected 3 image channels, got {c}"
        )));
    }
    #[cfg(feature = "cuda")]
    if crate::ops::fused(samples) {
        return u8_images(&crate::kernels::rgb_u8(&samples.contiguous()?, h, w, None)?);
    }
    // Denormalise in the decoder's dtype (bf16 in production), as diffusers does before `.float()`.
    let x = samples
        .affine(0.5, 0.0)?
        .affine(1.0, 0.5)?
        .clamp(0f32, 1f32)?;
    let x = x
        .to_dtype(DType::F32)?
        .permute((0, 2, 3, 1))?
        .contiguous()?;
    let data = x.flatten_all()?.to_vec1::<f32>()?;
    let per = h * w * 3;
    let mut out = Vec::with_capacity(b);
    for i in 0..b {
        let bytes: Vec<u8> = data[i * per..(i + 1) * per]
            .iter()
            .map(|v| quantize(*v))
            .collect();
        let img = image::RgbImage::from_raw(w as u32, h as u32, bytes)
            .expect("buffer length is exactly width·height·3 by construction");
        out.push(img);
    }
    Ok(out)
}

/// Output size (pixels per image) above which [`resize_crop_to_rgb`] resizes on the host row by row
/// instead of through tensors: 4096². Below it the tensor path runs on the decoder's device (on a GPU, no
/// host work); above it the tensor path's full-size temporaries (about 59 bytes per output pixel on the CPU:
/// the resized image, denormalised copies, the channels-last f32 copy and its host vector) would dominate.
pub const STREAM_RESIZE_ABOVE_PIXELS: usize = 4096 * 4096;

/// `resize_and_crop` + `to_rgb_images`: `(B,3,H,W)` decoder output in [−1, 1] → RGB images of exactly
/// `new_width × new_height` (no resize when the sizes match).
///
/// Outputs above [`STREAM_RESIZE_ABOVE_PIXELS`] take the streaming path: the decoded image (generation
/// size, a few MB) is copied to the host once and each output pixel is interpolated, denormalised and
/// quantised straight into the `u8` image, so the memory of a request is its output bytes (3 per pixel)
/// plus the decoded image. Same arithmetic as candle's CPU `upsample_bilinear2d` (f64, rounded to the
/// decoder's dtype) and the same denormalisation in that dtype: on the CPU the two paths give identical
/// bytes (tested); from a bf16 CUDA decode the interpolation is the CPU's, not the CUDA kernel's.
pub fn resize_crop_to_rgb(
    samples: &Tensor,
    new_height: usize,
    new_width: usize,
) -> Result<Vec<image::RgbImage>, PipelineError> {
    #[cfg(feature = "cuda")]
    if crate::ops::fused(samples) {
        let (_, _, h, w) = samples.dims4()?;
        let cover = if h == new_height && w == new_width {
            None
        } else {
            let (rh, rw) = cover_size(h, w, new_height, new_width);
            Some((rh, rw, (rh - new_height) / 2, (rw - new_width) / 2))
        };
        return u8_images(&crate::kernels::rgb_u8(
            &samples.contiguous()?,
            new_height,
            new_width,
            cover,
        )?);
    }
    if new_height * new_width > STREAM_RESIZE_ABOVE_PIXELS {
        return stream_resize_crop_to_rgb(samples, new_height, new_width);
    }
    to_rgb_images(&resize_and_crop(samples, new_height, new_width)?)
}

/// `(B, H, W, 3)` u8 (on any device) → RGB images.
#[cfg(feature = "cuda")]
fn u8_images(rgb: &Tensor) -> Result<Vec<image::RgbImage>, PipelineError> {
    let (b, h, w, _) = rgb.dims4()?;
    let data = rgb.flatten_all()?.to_vec1::<u8>()?;
    let per = h * w * 3;
    Ok(data
        .chunks_exact(per.max(1))
        .take(b)
        .map(|px| {
            image::RgbImage::from_raw(w as u32, h as u32, px.to_vec())
                .expect("buffer length is exactly width·height·3 by construction")
        })
        .collect())
}

/// The streaming path of [`resize_crop_to_rgb`], for any size.
pub fn stream_resize_crop_to_rgb(
    samples: &Tensor,
    new_height: usize,
    new_width: usize,
) -> Result<Vec<image::RgbImage>, PipelineError> {
    let (b, c, h, w) = samples.dims4()?;
    if c != 3 {
        return Err(PipelineError::InvalidRequest(format!(
            "expected 3 image channels, got {c}"
        )));
    }
    let dtype = samples.dtype();
    // Rounds an f64 to the decoder's dtype (what candle's `T::from_f64` does), as f32.
    let round: fn(f64) -> f32 = match dtype {
        DType::BF16 => |v| half::bf16::from_f64(v).to_f32(),
        DType::F16 => |v| half::f16::from_f64(v).to_f32(),
        _ => |v| v as f32,
    };
    // `(x·0.5 + 0.0)·1.0 + 0.5` then clamp, each step rounded to the dtype as candle's `affine` does.
    let denorm: fn(f32) -> f32 = match dtype {
        DType::BF16 => |x| {
            let h = half::bf16::from_f32;
            let y = h(h(x).to_f32() * 0.5).to_f32();
            h(y + 0.5).to_f32().clamp(0.0, 1.0)
        },
        DType::F16 => |x| {
            let h = half::f16::from_f32;
            let y = h(h(x).to_f32() * 0.5).to_f32();
            h(y + 0.5).to_f32().clamp(0.0, 1.0)
        },
        _ => |x| (x * 0.5 + 0.5).clamp(0.0, 1.0),
    };
    let src: Vec<f32> = samples.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let (rh, rw) = if h == new_height && w == new_width {
        (h, w)
    } else {
        cover_size(h, w, new_height, new_width)
    };
    let (Some(extra_y), Some(extra_x)) = (rh.checked_sub(new_height), rw.checked_sub(new_width))
    else {
        return Err(PipelineError::InvalidRequest(format!(
            "cannot crop {new_width}x{new_height} from {rw}x{rh}"
        )));
    };
    let (start_y, start_x) = (extra_y / 2, extra_x / 2);
    // Source index pairs and weights of each kept output row/column (candle's CPU formula).
    let taps = |n_in: usize, n_out: usize, start: usize, len: usize| -> Vec<(usize, usize, f64)> {
        let scale = n_in as f64 / n_out as f64;
        (start..start + len)
            .map(|o| {
                if n_in == n_out {
                    return (o, o, 0.0);
                }
                let s = (scale * (o as f64 + 0.5) - 0.5).max(0.0);
                let i0 = s.floor() as usize;
                (i0, (i0 + 1).min(n_in - 1), (s - i0 as f64).clamp(0.0, 1.0))
            })
            .collect()
    };
    let rows = taps(h, rh, start_y, new_height);
    let cols = taps(w, rw, start_x, new_width);
    let plane = h * w;
    let mut out = Vec::with_capacity(b);
    for i in 0..b {
        let img = &src[i * 3 * plane..(i + 1) * 3 * plane];
        let mut bytes = vec![0u8; new_height * new_width * 3];
        for (y, &(h0, h1, wh)) in rows.iter().enumerate() {
            let line = &mut bytes[y * new_width * 3..(y + 1) * new_width * 3];
            for (x, &(w0, w1, ww)) in cols.iter().enumerate() {
                for ch in 0..3 {
                    let p = &img[ch * plane..(ch + 1) * plane];
                    let v00 = f64::from(p[h0 * w + w0]);
                    let v10 = f64::from(p[h0 * w + w1]);
                    let v01 = f64::from(p[h1 * w + w0]);
                    let v11 = f64::from(p[h1 * w + w1]);
                    let top = v00 * (1.0 - ww) + v10 * ww;
                    let bottom = v01 * (1.0 - ww) + v11 * ww;
                    let v = round(top * (1.0 - wh) + bottom * wh);
                    line[x * 3 + ch] = quantize(denorm(v));
                }
            }
        }
        let img = image::RgbImage::from_raw(new_width as u32, new_height as u32, bytes)
            .expect("buffer length is exactly width·height·3 by construction");
        out.push(img);
    }
    Ok(out)
}

/// numpy's `(x * 255).round().astype("uint8")` for `x` in [0, 1] (round half to even).
fn quantize(x: f32) -> u8 {
    (x * 255.0).round_ties_even() as u8
}

/// Peak signal-to-noise ratio (dB) of two equally sized 8-bit RGB images; `inf` when identical.
pub fn psnr(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    assert_eq!(
        a.dimensions(),
        b.dimensions(),
        "PSNR of images of different sizes"
    );
    let n = a.as_raw().len() as f64;
    let mse = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum::<f64>()
        / n;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn bins_follow_diffusers() {
        let b1024 = aspect_ratio_bins(32).unwrap();
        assert_eq!(classify_height_width_bin(1024, 1024, b1024), (1024, 1024));
        // Spec §1.6: 3840×2160 (w×h) → "0.57" → 768×1344.
        assert_eq!(classify_height_width_bin(2160, 3840, b1024), (768, 1344));
        // Reference e2e fixture: 300×200 with the 512 table → 416×608.
        assert_eq!(
            classify_height_width_bin(200, 300, aspect_ratio_bins(16).unwrap()),
            (416, 608)
        );
        assert_eq!(
            aspect_ratio_bins(128).unwrap().len(),
            ASPECT_RATIO_4096_BIN.len()
        );
        assert!(aspect_ratio_bins(8).is_err());
        for table in [
            &ASPECT_RATIO_4096_BIN[..],
            &ASPECT_RATIO_2048_BIN,
            &ASPECT_RATIO_1024_BIN,
            &ASPECT_RATIO_512_BIN,
        ] {
            for (k, h, w) in table {
                assert!(k.parse::<f64>().is_ok() && *h > 0 && *w > 0);
            }
        }
    }

    #[test]
    fn cover_and_crop_match_spec_4k_path() {
        // Spec §1.6: 768×1344 → 2194×3840, crop rows 17..2177.
        assert_eq!(cover_size(768, 1344, 2160, 3840), (2194, 3840));
        let x = Tensor::arange(0f32, (768 * 1344) as f32, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 768, 1344))
            .unwrap();
        let y = resize_and_crop(&x, 2160, 3840).unwrap();
        assert_eq!(y.dims(), &[1, 1, 2160, 3840]);
    }

    #[test]
    fn bilinear_matches_torch_half_pixel() {
        // torch: F.interpolate([[1,2],[3,4]], size=(4,4), mode="bilinear", align_corners=False)
        let x = Tensor::new(&[[[[1f32, 2.], [3., 4.]]]], &Device::Cpu).unwrap();
        let y = resize_and_crop(&x, 4, 4)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want = [
            1.0, 1.25, 1.75, 2.0, 1.5, 1.75, 2.25, 2.5, 2.5, 2.75, 3.25, 3.5, 3.0, 3.25, 3.75, 4.0,
        ];
        assert_eq!(y, want);
        // Non-uniform cover: 2×2 → 3×2 target covers at 3×3 then crops column 0..2.
        let y = resize_and_crop(&x, 3, 2).unwrap();
        assert_eq!(y.dims(), &[1, 1, 3, 2]);
    }

    #[test]
    fn postprocess_rounds_half_to_even_and_clamps() {
        // Find f32 inputs whose ×255 is exactly k + 0.5 (numpy rounds those to even).
        let mut ties = Vec::new();
        for k in 0..255u32 {
            let x = (k as f32 + 0.5) / 255.0;
            if x * 255.0 == k as f32 + 0.5 {
                ties.push((x, k));
            }
        }
        assert!(ties.len() > 10, "need exact ties to test");
        for (x, k) in &ties {
            let want = if k % 2 == 0 { *k } else { k + 1 };
            assert_eq!(quantize(*x) as u32, want, "x={x} k={k}");
        }
        // Decoder range [-1, 1] → [0, 255], with clamping outside; layout (B,C,H,W) → pixels.
        let vals = [-1.5f32, -1.0, 0.0, 1.0, 1.0, 2.0];
        let x = Tensor::new(&vals[..], &Device::Cpu)
            .unwrap()
            .reshape((1, 3, 1, 2))
            .unwrap();
        let img = to_rgb_images(&x).unwrap().remove(0);
        assert_eq!(img.dimensions(), (2, 1));
        assert_eq!(img.get_pixel(0, 0).0, [0, 128, 255]);
        assert_eq!(img.get_pixel(1, 0).0, [0, 255, 255]);
    }

    /// Every custom size a request can ask for (a dense sweep of small sides and a stride over the rest,
    /// against every bin table): the cover holds the target, the ratio-setting side lands on its target, and
    /// no side exceeds `orig·ratio` by a pixel or more (diffusers' `int()`), so the crop is well defined.
    #[test]
    fn cover_size_always_covers_the_target() {
        let mut sides: Vec<usize> = (1..=1100).collect();
        sides.extend((1101..=14142).step_by(37));
        sides.extend([944, 14142, 14141, 8191, 4097, 2049]);
        let tables: [&[(&str, u32, u32)]; 4] = [
            &ASPECT_RATIO_4096_BIN,
            &ASPECT_RATIO_2048_BIN,
            &ASPECT_RATIO_1024_BIN,
            &ASPECT_RATIO_512_BIN,
        ];
        let mut checked = 0usize;
        for bins in tables {
            for &w in &sides {
                for &h in [1usize, 7, 256, 300, 512, 944, 1024, 2160, 3840, 14142].iter() {
                    for (tw, th) in [(w, h), (h, w)] {
                        let (bh, bw) = classify_height_width_bin(th as u32, tw as u32, bins);
                        let (bh, bw) = (bh as usize, bw as usize);
                        let (rh, rw) = cover_size(bh, bw, th, tw);
                        assert!(
                            rh >= th && rw >= tw,
                            "{tw}x{th} from {bw}x{bh}: cover {rw}x{rh}"
                        );
                        assert!(
                            rh == th || rw == tw,
                            "{tw}x{th} from {bw}x{bh}: cover {rw}x{rh}"
                        );
                        let ratio = (th as f64 / bh as f64).max(tw as f64 / bw as f64);
                        assert!((rh as f64) < bh as f64 * ratio + 1.0 || rh == th);
                        assert!((rw as f64) < bw as f64 * ratio + 1.0 || rw == tw);
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 100_000, "{checked}");
    }

    #[test]
    fn the_944_by_256_request_resizes_and_crops() {
        // The size of issue 10: binned to 1856x512 (1024 bins), whose cover used to be 943 wide.
        let (bh, bw) = classify_height_width_bin(256, 944, &ASPECT_RATIO_1024_BIN);
        assert_eq!((bh, bw), (512, 1856));
        let x = Tensor::zeros((1, 3, bh as usize, bw as usize), DType::F32, &Device::Cpu).unwrap();
        let y = resize_and_crop(&x, 256, 944).unwrap();
        assert_eq!(y.dims(), &[1, 3, 256, 944]);
    }

    #[test]
    fn streaming_resize_gives_the_tensor_paths_bytes() {
        // Values past ±1 exercise the clamp; sizes cover upscale, downscale, crop on either axis, no resize.
        let x = crate::rng::test_randn("image_ops:604", 0.8, (2, 3, 13, 19)).unwrap();
        for (nh, nw) in [(40, 31), (7, 11), (13, 19), (50, 100), (13, 40)] {
            let want = to_rgb_images(&resize_and_crop(&x, nh, nw).unwrap()).unwrap();
            let got = stream_resize_crop_to_rgb(&x, nh, nw).unwrap();
            assert_eq!(got.len(), 2);
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.dimensions(), (nw as u32, nh as u32));
                assert!(g.as_raw() == w.as_raw(), "{nh}x{nw}: bytes differ");
            }
        }
        // bf16: rounded to bf16 after interpolation and at each denormalisation step, as the tensor path.
        let xb = x.to_dtype(DType::BF16).unwrap();
        let want = to_rgb_images(&resize_and_crop(&xb, 40, 31).unwrap()).unwrap();
        let got = stream_resize_crop_to_rgb(&xb, 40, 31).unwrap();
        assert!(got[0].as_raw() == want[0].as_raw() && got[1].as_raw() == want[1].as_raw());
    }

    #[test]
    fn psnr_is_infinite_for_equal_and_finite_otherwise() {
        let a = image::RgbImage::from_pixel(4, 4, image::Rgb([10, 20, 30]));
        let mut b = a.clone();
        assert!(psnr(&a, &b).is_infinite());
        b.put_pixel(0, 0, image::Rgb([11, 20, 30]));
        let p = psnr(&a, &b);
        // MSE = 1/48 → 10·log10(255²·48) ≈ 64.94 dB.
        assert!((p - 64.94).abs() < 0.01, "{p}");
    }
}
