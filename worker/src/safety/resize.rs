//! Pillow-identical resampling of 8-bit RGB images (`PIL.Image.resize` with BOX, BILINEAR or BICUBIC).
//!
//! Both safety checkers were trained and calibrated on inputs prepared by transformers' PIL image
//! processors, so the resize has to reproduce Pillow's output bytes, not just "a bilinear resize":
//! Pillow widens the filter support by the downscale factor (antialiasing), resamples in two separable
//! passes with an intermediate u8 image (horizontal on only the rows the vertical pass needs, then
//! vertical — or vertical first for images whose height shrinks much more than their width, since
//! Pillow 13, see [`vertical_pass_first`]), and accumulates in 22-bit fixed point with its own
//! coefficient rounding and clipping. This file mirrors
//! `src/libImaging/Resample.c` (`precompute_coeffs`, `normalize_coeffs_8bpc`,
//! `ImagingResample{Horizontal,Vertical}_8bpc`, `ImagingResampleInner`) step by step, including the
//! C truncation casts, so outputs match Pillow byte for byte.

use image::RgbImage;

/// Pillow's resampling filters that the preprocessors use (`resample` in `preprocessor_config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `Image.BOX` (4).
    Box,
    /// `Image.BILINEAR` (2): triangle filter, support 1.
    Bilinear,
    /// `Image.BICUBIC` (3): Keys cubic with a = -0.5, support 2.
    Bicubic,
}

impl Filter {
    /// Maps a PIL resample id (`PIL.Image.Resampling`) to a filter; `None` for the ones not mirrored here
    /// (NEAREST 0, LANCZOS 1, HAMMING 5), which no supported checkpoint uses.
    pub fn from_pil(id: i64) -> Option<Self> {
        match id {
            2 => Some(Self::Bilinear),
            3 => Some(Self::Bicubic),
            4 => Some(Self::Box),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Self::Box => 0.5,
            Self::Bilinear => 1.0,
            Self::Bicubic => 2.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        match self {
            Self::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Self::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Self::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// `PRECISION_BITS` of Resample.c: 32 - 8 bits of result - 2 bits of overflow headroom.
const PRECISION_BITS: u32 = 22;

/// Fixed-point coefficients of one pass: for output index `i`, input `start[i]..start[i]+len[i]` with
/// weights `kk[i*ksize..][..len[i]]`.
struct Coeffs {
    ksize: usize,
    start: Vec<usize>,
    len: Vec<usize>,
    kk: Vec<i32>,
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc` for the box `(0, in_size)`.
fn precompute(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
    // `(double)(in1 - in0) / outSize` with float box edges: exact for image sizes.
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut start = Vec::with_capacity(out_size);
    let mut len = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // `(int)` truncates toward zero, then clamps (a negative xmin becomes 0 either way).
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64)
            .min(in_size as i64)
            .max(xmin as i64) as usize
            - xmin;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            let w = filter.eval(((x + xmin) as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for (x, kx) in k.iter().enumerate().take(xmax) {
            let v = if ww != 0.0 { kx / ww } else { *kx };
            let scaled = v * f64::from(1u32 << PRECISION_BITS);
            kk[xx * ksize + x] = if v < 0.0 {
                (-0.5 + scaled) as i32
            } else {
                (0.5 + scaled) as i32
            };
        }
        start.push(xmin);
        len.push(xmax);
    }
    Coeffs {
        ksize,
        start,
        len,
        kk,
    }
}

/// `clip8`: drop the fixed-point fraction (arithmetic shift) and saturate to 0..=255.
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Rounding bias every accumulator starts from (`1 << (PRECISION_BITS - 1)`).
const HALF: i64 = 1 << (PRECISION_BITS - 1);

/// Horizontal pass over rows `row0..row0+rows` of `src` (RGB, `src_w` wide) into a `c.start.len()`-wide image.
fn horizontal(src: &[u8], src_w: usize, row0: usize, rows: usize, c: &Coeffs) -> Vec<u8> {
    let out_w = c.start.len();
    let mut out = vec![0u8; out_w * rows * 3];
    for yy in 0..rows {
        let line = &src[(yy + row0) * src_w * 3..(yy + row0 + 1) * src_w * 3];
        for xx in 0..out_w {
            let k = &c.kk[xx * c.ksize..xx * c.ksize + c.len[xx]];
            let mut acc = [HALF; 3];
            for (x, &w) in k.iter().enumerate() {
                let p = &line[(x + c.start[xx]) * 3..(x + c.start[xx]) * 3 + 3];
                for ch in 0..3 {
                    acc[ch] += i64::from(p[ch]) * i64::from(w);
                }
            }
            let o = &mut out[(yy * out_w + xx) * 3..(yy * out_w + xx) * 3 + 3];
            for ch in 0..3 {
                o[ch] = clip8(acc[ch]);
            }
        }
    }
    out
}

/// Vertical pass of a `w`-wide RGB image; `c.start` indexes rows of `src` after `shift` is subtracted.
fn vertical(src: &[u8], w: usize, c: &Coeffs, shift: usize) -> Vec<u8> {
    let out_h = c.start.len();
    let mut out = vec![0u8; w * out_h * 3];
    for yy in 0..out_h {
        let k = &c.kk[yy * c.ksize..yy * c.ksize + c.len[yy]];
        let y0 = c.start[yy] - shift;
        for xx in 0..w {
            let mut acc = [HALF; 3];
            for (y, &wt) in k.iter().enumerate() {
                let p = &src[((y + y0) * w + xx) * 3..((y + y0) * w + xx) * 3 + 3];
                for ch in 0..3 {
                    acc[ch] += i64::from(p[ch]) * i64::from(wt);
                }
            }
            let o = &mut out[(yy * w + xx) * 3..(yy * w + xx) * 3 + 3];
            for ch in 0..3 {
                o[ch] = clip8(acc[ch]);
            }
        }
    }
    out
}

/// `img.resize((width, height), filter)` exactly as Pillow computes it for an RGB image.
///
/// Returns `None` when either the source or the target has a zero dimension (Pillow raises there too).
pub fn resize(img: &RgbImage, width: u32, height: u32, filter: Filter) -> Option<RgbImage> {
    let vertical_first = vertical_pass_first(img.width(), img.height(), width, height);
    resize_in_order(img, width, height, filter, vertical_first)
}

/// Pillow 13's pass order (`ImagingResampleInner`, python-pillow/Pillow#9549, read from the 13.0.0
/// wheel's machine code and confirmed byte-exact on 96 probe resizes): the vertical pass runs first when
/// the height shrinks by more than twice as many pixels as the width does. Pillow ≤ 12 always ran the
/// horizontal pass first; the order only changes the rounding of the intermediate u8 image.
pub fn vertical_pass_first(in_w: u32, in_h: u32, out_w: u32, out_h: u32) -> bool {
    let shrink_h = i64::from(in_h) - i64::from(out_h);
    let shrink_w = i64::from(in_w) - i64::from(out_w);
    shrink_h > 0 && shrink_h > 2 * shrink_w
}

/// [`resize`] with an explicit pass order (the order changes the intermediate u8 rounding).
pub fn resize_in_order(
    img: &RgbImage,
    width: u32,
    height: u32,
    filter: Filter,
    vertical_first: bool,
) -> Option<RgbImage> {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    if in_w == 0 || in_h == 0 || out_w == 0 || out_h == 0 {
        return None;
    }
    if (in_w, in_h) == (out_w, out_h) {
        return Some(img.clone());
    }
    let src = img.as_raw();
    let (need_h, need_v) = (out_w != in_w, out_h != in_h);
    let out = if vertical_first {
        let tmp = if need_v {
            vertical(src, in_w, &precompute(in_h, out_h, filter), 0)
        } else {
            src.to_vec()
        };
        if need_h {
            horizontal(&tmp, in_w, 0, out_h, &precompute(in_w, out_w, filter))
        } else {
            tmp
        }
    } else {
        let vert = precompute(in_h, out_h, filter);
        // Rows of the source the vertical pass reads: the horizontal pass only produces those.
        let first_row = vert.start[0];
        let last_row = vert.start[out_h - 1] + vert.len[out_h - 1];
        let (tmp, shift) = if need_h {
            let horiz = precompute(in_w, out_w, filter);
            (
                horizontal(src, in_w, first_row, last_row - first_row, &horiz),
                first_row,
            )
        } else {
            (src.to_vec(), 0)
        };
        if need_v {
            vertical(&tmp, out_w, &vert, shift)
        } else {
            tmp
        }
    };
    RgbImage::from_raw(width, height, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 7 % 256) as u8,
                (y * 13 % 256) as u8,
                ((x * y) % 256) as u8,
            ])
        })
    }

    #[test]
    fn constant_image_stays_constant() {
        // Normalised weights of every filter sum to 1 (up to fixed-point rounding), so flat colour survives.
        let img = RgbImage::from_pixel(97, 61, image::Rgb([200, 3, 128]));
        for f in [Filter::Box, Filter::Bilinear, Filter::Bicubic] {
            for (w, h) in [(224, 224), (31, 17), (97, 224), (224, 61)] {
                let out = resize(&img, w, h, f).expect("non-empty sizes");
                assert_eq!(out.dimensions(), (w, h));
                assert!(out.pixels().all(|p| p.0 == [200, 3, 128]), "{f:?} {w}x{h}");
            }
        }
    }

    #[test]
    fn same_size_is_a_copy_and_empty_is_rejected() {
        let img = gradient(40, 30);
        assert_eq!(resize(&img, 40, 30, Filter::Bicubic).as_ref(), Some(&img));
        assert!(resize(&img, 0, 30, Filter::Bilinear).is_none());
    }

    #[test]
    fn integer_box_downscale_is_block_mean() {
        // BOX at an exact 2x factor averages 2x2 blocks, rounded half up by the fixed-point bias.
        let img = gradient(8, 6);
        let out = resize(&img, 4, 3, Filter::Box).expect("non-empty sizes");
        for (x, y, p) in out.enumerate_pixels() {
            for ch in 0..3 {
                let s: u32 = (0..2)
                    .flat_map(|dy| (0..2).map(move |dx| (dx, dy)))
                    .map(|(dx, dy)| u32::from(img.get_pixel(2 * x + dx, 2 * y + dy)[ch]))
                    .sum();
                // Two rounded passes may differ from one exact rounding by one level.
                let exact = (s as f64 / 4.0).round() as i32;
                assert!(
                    (i32::from(p[ch]) - exact).abs() <= 1,
                    "({x},{y}) ch{ch}: {} vs {exact}",
                    p[ch]
                );
            }
        }
    }

    #[test]
    fn bicubic_overshoot_is_clipped_like_pillow() {
        // A hard 0/255 edge upscaled with bicubic rings below 0 and above 255: Pillow saturates.
        // Expected row printed by Pillow 13.0.0: `Image.fromarray(a).resize((16, 1), Image.BICUBIC)`.
        let img = RgbImage::from_fn(4, 1, |x, _| {
            if x < 2 {
                image::Rgb([0; 3])
            } else {
                image::Rgb([255; 3])
            }
        });
        let out = resize(&img, 16, 1, Filter::Bicubic).expect("non-empty sizes");
        let row: Vec<u8> = out.pixels().map(|p| p[0]).collect();
        assert_eq!(
            row,
            [0, 0, 0, 0, 0, 0, 21, 88, 167, 234, 255, 255, 255, 255, 255, 255]
        );
    }

    #[test]
    fn bilinear_downscale_matches_pillow_bytes() {
        // 13x9 pattern -> 5x4 BILINEAR (antialiased support 2.6 x 2.25); bytes printed by Pillow 13.0.0 for
        // `g[y, x] = [(x*37 + y*11) % 256, (y*53 + x*5) % 256, (x*y*29) % 256]`. Exact match (0 levels).
        let g = RgbImage::from_fn(13, 9, |x, y| {
            image::Rgb([
                ((x * 37 + y * 11) % 256) as u8,
                ((y * 53 + x * 5) % 256) as u8,
                ((x * y * 29) % 256) as u8,
            ])
        });
        let out = resize(&g, 5, 4, Filter::Bilinear).expect("non-empty sizes");
        let expected: [u8; 60] = [
            48, 49, 26, 133, 61, 73, 151, 74, 97, 73, 87, 69, 158, 99, 51, 70, 150, 76, 155, 162,
            123, 150, 175, 112, 95, 157, 101, 180, 144, 121, 96, 84, 91, 178, 96, 121, 101, 109,
            136, 121, 92, 111, 200, 78, 134, 118, 129, 128, 172, 141, 135, 78, 154, 135, 143, 167,
            90, 166, 179, 160,
        ];
        assert_eq!(out.as_raw().as_slice(), expected.as_slice());
    }

    #[test]
    fn tall_downscale_runs_vertical_pass_first_like_pillow_13() {
        // 7x23 -> 5x4 BICUBIC: height shrinks 19 px > 2 x 2 px, so Pillow 13 resamples vertically first;
        // the horizontal-first order gives different bytes. Expected printed by Pillow 13.0.0 for
        // `g[y, x] = [(x*71 + y*23) % 256, (y*97 + x*13) % 256, (x*y*31 + 7) % 256]`.
        assert!(vertical_pass_first(7, 23, 5, 4));
        assert!(!vertical_pass_first(1024, 1024, 224, 224));
        assert!(
            !vertical_pass_first(64, 128, 120, 150),
            "height grows: horizontal first"
        );
        let g = RgbImage::from_fn(7, 23, |x, y| {
            image::Rgb([
                ((x * 71 + y * 23) % 256) as u8,
                ((y * 97 + x * 13) % 256) as u8,
                ((x * y * 31 + 7) % 256) as u8,
            ])
        });
        let expected: [u8; 60] = [
            82, 114, 31, 152, 132, 117, 97, 126, 123, 122, 119, 138, 151, 110, 119, 170, 120, 48,
            107, 135, 157, 132, 134, 144, 122, 134, 149, 97, 131, 116, 108, 134, 47, 162, 128, 147,
            103, 127, 122, 116, 131, 138, 141, 139, 126, 176, 126, 38, 110, 114, 124, 144, 128,
            128, 143, 113, 127, 85, 132, 115,
        ];
        let out = resize(&g, 5, 4, Filter::Bicubic).expect("non-empty sizes");
        assert_eq!(out.as_raw().as_slice(), expected.as_slice());
        let other = resize_in_order(&g, 5, 4, Filter::Bicubic, false).expect("non-empty sizes");
        assert_ne!(
            other.as_raw().as_slice(),
            expected.as_slice(),
            "probe must distinguish the orders"
        );
    }
}
