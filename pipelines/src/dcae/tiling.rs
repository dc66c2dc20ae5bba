//! Tiled DC-AE decoding, reproducing diffusers' `AutoencoderDC.enable_tiling()` + `tiled_decode`.
//!
//! Upstream (diffusers 0.42.1 `autoencoder_dc.py`): tiles of `tile_sample_min / r` latents start every
//! `tile_sample_stride / r` latents (r = spatial compression ratio) and are decoded independently (so the
//! result differs from untiled decoding: attention is global inside a tile only). Each tile is blended
//! linearly over `tile_sample_min - tile_sample_stride` pixels with the (already blended) tile above
//! and the one to its left — upstream mutates tiles in place, so neighbours are the blended versions —
//! then cropped to the stride and concatenated. Latents no larger than one tile decode untiled,
//! exactly as `AutoencoderDC._decode` does.

use candle_core::{bail, Result, Tensor};

use super::DcAeDecoder;

/// `enable_tiling()` parameters, in output pixels. `Default` = diffusers' defaults (512 / 448).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DcAeTiling {
    pub tile_sample_min_height: usize,
    pub tile_sample_min_width: usize,
    pub tile_sample_stride_height: usize,
    pub tile_sample_stride_width: usize,
}

impl Default for DcAeTiling {
    fn default() -> Self {
        Self {
            tile_sample_min_height: 512,
            tile_sample_min_width: 512,
            tile_sample_stride_height: 448,
            tile_sample_stride_width: 448,
        }
    }
}

/// `blend_v` (dim 2) / `blend_h` (dim 3): the first `extent` rows/cols of `b` become
/// `a[-extent + y] · (1 - y/extent) + b[y] · (y/extent)`.
fn blend(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> Result<Tensor> {
    let extent = extent.min(a.dim(dim)?).min(b.dim(dim)?);
    if extent == 0 {
        return Ok(b.clone());
    }
    // Weights as torch gets them: Python float64 `y / extent`, rounded to the tensor dtype.
    let wb: Vec<f32> = (0..extent)
        .map(|y| (y as f64 / extent as f64) as f32)
        .collect();
    let wa: Vec<f32> = (0..extent)
        .map(|y| (1.0 - y as f64 / extent as f64) as f32)
        .collect();
    let mut shape = vec![1usize; b.rank()];
    shape[dim] = extent;
    let wb = Tensor::from_vec(wb, shape.as_slice(), b.device())?.to_dtype(b.dtype())?;
    let wa = Tensor::from_vec(wa, shape.as_slice(), b.device())?.to_dtype(b.dtype())?;
    let a_tail = a.narrow(dim, a.dim(dim)? - extent, extent)?;
    let head = (a_tail.broadcast_mul(&wa)? + b.narrow(dim, 0, extent)?.broadcast_mul(&wb)?)?;
    let rest = b.dim(dim)? - extent;
    if rest == 0 {
        return Ok(head);
    }
    Tensor::cat(&[&head, &b.narrow(dim, extent, rest)?], dim)
}

impl DcAeDecoder {
    /// `AutoencoderDC.decode` with tiling enabled: `z` `(B, latent, h, w)` already divided by
    /// `scaling_factor`; returns `(B, in_channels, h·r, w·r)`.
    pub fn decode_tiled(&self, z: &Tensor, tiling: &DcAeTiling) -> Result<Tensor> {
        let (_b, _c, height, width) = z.dims4()?;
        let r = self.config().spatial_compression_ratio();
        let tile_h = tiling.tile_sample_min_height / r;
        let tile_w = tiling.tile_sample_min_width / r;
        let stride_h = tiling.tile_sample_stride_height / r;
        let stride_w = tiling.tile_sample_stride_width / r;
        if width <= tile_w && height <= tile_h {
            return self.decode(z);
        }
        if stride_h == 0
            || stride_w == 0
            || tiling.tile_sample_stride_height > tiling.tile_sample_min_height
            || tiling.tile_sample_stride_width > tiling.tile_sample_min_width
        {
            bail!("DC-AE tiling {tiling:?}: strides must be ≥ {r} px and no larger than the tiles");
        }
        let blend_h = tiling.tile_sample_min_height - tiling.tile_sample_stride_height;
        let blend_w = tiling.tile_sample_min_width - tiling.tile_sample_stride_width;

        let mut rows: Vec<Vec<Tensor>> = Vec::new();
        for i in (0..height).step_by(stride_h) {
            let mut row = Vec::new();
            for j in (0..width).step_by(stride_w) {
                let tile =
                    z.narrow(2, i, tile_h.min(height - i))?
                        .narrow(3, j, tile_w.min(width - j))?;
                row.push(self.decode(&tile)?);
            }
            rows.push(row);
        }

        let mut result_rows = Vec::with_capacity(rows.len());
        for i in 0..rows.len() {
            let mut result_row = Vec::with_capacity(rows[i].len());
            for j in 0..rows[i].len() {
                let mut tile = rows[i][j].clone();
                if i > 0 {
                    tile = blend(&rows[i - 1][j], &tile, blend_h, 2)?;
                }
                if j > 0 {
                    tile = blend(&rows[i][j - 1], &tile, blend_w, 3)?;
                }
                rows[i][j] = tile.clone(); // upstream blends in place
                let th = tile.dim(2)?.min(tiling.tile_sample_stride_height);
                let tw = tile.dim(3)?.min(tiling.tile_sample_stride_width);
                result_row.push(tile.narrow(2, 0, th)?.narrow(3, 0, tw)?);
            }
            result_rows.push(Tensor::cat(&result_row, 3)?);
        }
        Tensor::cat(&result_rows, 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn blend_ramps_like_upstream() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::full(10f32, (1, 1, 6, 2), &dev)?;
        let b = Tensor::full(2f32, (1, 1, 5, 2), &dev)?;
        let out = blend(&a, &b, 4, 2)?;
        assert_eq!(out.dims(), &[1, 1, 5, 2]);
        let col: Vec<f32> = out.narrow(3, 0, 1)?.flatten_all()?.to_vec1()?;
        // y/4 ramp: 10·(1 - y/4) + 2·(y/4) for y < 4, then b untouched.
        assert_eq!(col, vec![10., 8., 6., 4., 2.]);
        // extent is clipped to the smaller tile.
        let small = Tensor::full(0f32, (1, 1, 2, 3), &dev)?;
        let out = blend(&small, &Tensor::full(4f32, (1, 1, 2, 3), &dev)?, 64, 3)?;
        let row: Vec<f32> = out.narrow(2, 0, 1)?.flatten_all()?.to_vec1()?;
        assert_eq!(row, vec![0., 4. / 3., 8. / 3.]);
        Ok(())
    }
}
