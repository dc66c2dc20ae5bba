//! Image preprocessing of the two checkers: a mirror of transformers' PIL-backend image processors
//! (`ViTImageProcessor`, `CLIPImageProcessor`/`CLIPFeatureExtractor`) driven by `preprocessor_config.json`.
//!
//! Order and numerics follow transformers 5 `PilBackend._preprocess` and `image_transforms.py`:
//! resize (Pillow, see [`super::resize`]) → centre crop (`top = (h - ch) // 2`) → rescale
//! (`f32(f64(u8) * rescale_factor)`) → normalise (`(x - f32(mean)) / f32(std)` in f32). Output is
//! `pixel_values` laid out `(B, 3, H, W)`, channel-first like the processors return.

use image::RgbImage;
use serde::Deserialize;

use super::resize::{resize, Filter};

/// `size` / `crop_size` as they appear in the wild: a bare int (legacy feature extractors) or a dict.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum SizeSpec {
    Int(u32),
    Dict {
        height: Option<u32>,
        width: Option<u32>,
        shortest_edge: Option<u32>,
    },
}

/// Mirror of the `preprocessor_config.json` fields that change the pixels (transformers
/// `image_processing_base.py`); absent fields take the processor class defaults, see [`ClassDefaults`].
#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    do_resize: Option<bool>,
    size: Option<SizeSpec>,
    resample: Option<i64>,
    do_center_crop: Option<bool>,
    crop_size: Option<SizeSpec>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<Vec<f32>>,
    image_std: Option<Vec<f32>>,
}

/// Class attributes of the transformers processor the checkpoint names (used when the JSON omits a key).
#[derive(Debug, Clone, Copy)]
pub struct ClassDefaults {
    /// A bare-int `size` means `{height: n, width: n}` (ViT) rather than `{shortest_edge: n}` (CLIP).
    pub int_size_is_square: bool,
    pub size: ResizeTarget,
    pub resample: Filter,
    pub do_center_crop: bool,
    pub crop: (u32, u32),
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl ClassDefaults {
    /// `ViTImageProcessor`: 224×224 bilinear, IMAGENET_STANDARD mean/std 0.5, no crop.
    pub const VIT: Self = Self {
        int_size_is_square: true,
        size: ResizeTarget::Exact {
            height: 224,
            width: 224,
        },
        resample: Filter::Bilinear,
        do_center_crop: false,
        crop: (224, 224),
        mean: [0.5; 3],
        std: [0.5; 3],
    };
    /// `CLIPImageProcessor`: shortest edge 224 bicubic, centre crop 224, OPENAI_CLIP mean/std.
    pub const CLIP: Self = Self {
        int_size_is_square: false,
        size: ResizeTarget::ShortestEdge(224),
        resample: Filter::Bicubic,
        do_center_crop: true,
        crop: (224, 224),
        mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
        std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
    };
}

/// Where `resize` sends an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTarget {
    Exact {
        height: u32,
        width: u32,
    },
    /// Scale so the short side is `n`; the long side is `int(n * long / short)` (truncated, as Python does).
    ShortestEdge(u32),
}

impl ResizeTarget {
    /// Output `(width, height)` for an input of `(w, h)`; transformers `get_resize_output_image_size`.
    pub fn output_size(self, w: u32, h: u32) -> (u32, u32) {
        match self {
            Self::Exact { height, width } => (width, height),
            Self::ShortestEdge(n) => {
                let (short, long) = if w <= h { (w, h) } else { (h, w) };
                let new_long = (f64::from(n) * f64::from(long) / f64::from(short)) as u32;
                if w <= h {
                    (n, new_long)
                } else {
                    (new_long, n)
                }
            }
        }
    }
}

/// A resolved image processor.
#[derive(Debug, Clone)]
pub struct Processor {
    resize: Option<(ResizeTarget, Filter)>,
    /// `(height, width)` of the centre crop.
    crop: Option<(u32, u32)>,
    rescale: Option<f64>,
    normalize: Option<([f32; 3], [f32; 3])>,
}

fn target(spec: &SizeSpec, int_is_square: bool, what: &str) -> Result<ResizeTarget, String> {
    match *spec {
        SizeSpec::Int(n) if int_is_square => Ok(ResizeTarget::Exact {
            height: n,
            width: n,
        }),
        SizeSpec::Int(n) => Ok(ResizeTarget::ShortestEdge(n)),
        SizeSpec::Dict {
            height: Some(height),
            width: Some(width),
            ..
        } => Ok(ResizeTarget::Exact { height, width }),
        SizeSpec::Dict {
            shortest_edge: Some(n),
            ..
        } => Ok(ResizeTarget::ShortestEdge(n)),
        SizeSpec::Dict { .. } => Err(format!("{what} needs height+width or shortest_edge")),
    }
}

fn triple(v: Option<Vec<f32>>, default: [f32; 3], what: &str) -> Result<[f32; 3], String> {
    match v {
        None => Ok(default),
        Some(v) if v.len() == 3 => Ok([v[0], v[1], v[2]]),
        // A single value is broadcast to every channel, as `normalize` does with a scalar.
        Some(v) if v.len() == 1 => Ok([v[0]; 3]),
        Some(v) => Err(format!("{what} has {} values, expected 3", v.len())),
    }
}

impl Processor {
    /// Parses `preprocessor_config.json` text; errors say which key is unusable.
    pub fn from_json(text: &str, d: ClassDefaults) -> Result<Self, String> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| format!("preprocessor_config.json: {e}"))?;
        let resize = if raw.do_resize.unwrap_or(true) {
            let size = match &raw.size {
                Some(s) => target(s, d.int_size_is_square, "size")?,
                None => d.size,
            };
            let filter = match raw.resample {
                Some(id) => Filter::from_pil(id)
                    .ok_or_else(|| format!("unsupported PIL resample filter {id}"))?,
                None => d.resample,
            };
            Some((size, filter))
        } else {
            None
        };
        let crop = if raw.do_center_crop.unwrap_or(d.do_center_crop) {
            match &raw.crop_size {
                // crop_size is always square-by-default in transformers (`get_size_dict(crop_size, param_name="crop_size")`).
                Some(s) => match target(s, true, "crop_size")? {
                    ResizeTarget::Exact { height, width } => Some((height, width)),
                    ResizeTarget::ShortestEdge(_) => {
                        return Err("crop_size needs height and width".into())
                    }
                },
                None => Some(d.crop),
            }
        } else {
            None
        };
        let rescale = raw
            .do_rescale
            .unwrap_or(true)
            .then(|| raw.rescale_factor.unwrap_or(1.0 / 255.0));
        let normalize = if raw.do_normalize.unwrap_or(true) {
            Some((
                triple(raw.image_mean, d.mean, "image_mean")?,
                triple(raw.image_std, d.std, "image_std")?,
            ))
        } else {
            None
        };
        Ok(Self {
            resize,
            crop,
            rescale,
            normalize,
        })
    }

    /// The processor's uint8 image before rescaling: resized and centre-cropped.
    pub fn resized(&self, img: &RgbImage) -> Result<RgbImage, String> {
        let img = match self.resize {
            Some((t, filter)) => {
                let (w, h) = t.output_size(img.width(), img.height());
                resize(img, w, h, filter).ok_or_else(|| {
                    format!("cannot resize {}x{} to {w}x{h}", img.width(), img.height())
                })?
            }
            None => img.clone(),
        };
        match self.crop {
            Some((ch, cw)) => {
                let (w, h) = img.dimensions();
                if ch > h || cw > w {
                    return Err(format!(
                        "centre crop {cw}x{ch} larger than the resized {w}x{h} image"
                    ));
                }
                let (top, left) = ((h - ch) / 2, (w - cw) / 2);
                Ok(image::imageops::crop_imm(&img, left, top, cw, ch).to_image())
            }
            None => Ok(img),
        }
    }

    /// `pixel_values` of a batch as a flat `(B, 3, H, W)` f32 buffer plus `(H, W)`; all images must end
    /// up the same size (always true with an exact resize or a crop).
    pub fn pixel_values(&self, images: &[RgbImage]) -> Result<(Vec<f32>, (usize, usize)), String> {
        let mut out = Vec::new();
        let mut hw = None;
        for img in images {
            let img = self.resized(img)?;
            let (w, h) = (img.width() as usize, img.height() as usize);
            match hw {
                None => hw = Some((h, w)),
                Some(prev) if prev != (h, w) => {
                    return Err(format!(
                        "preprocessed sizes differ in one batch: {prev:?} vs {:?}",
                        (h, w)
                    ))
                }
                Some(_) => {}
            }
            let raw = img.as_raw();
            for c in 0..3 {
                out.extend(raw.iter().skip(c).step_by(3).map(|&v| {
                    let x = match self.rescale {
                        Some(s) => (f64::from(v) * s) as f32,
                        None => f32::from(v),
                    };
                    match self.normalize {
                        Some((mean, std)) => (x - mean[c]) / std[c],
                        None => x,
                    }
                }));
            }
        }
        Ok((out, hw.unwrap_or((0, 0))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vit_config_resizes_exactly_and_normalises_to_minus_one_one() {
        let json = r#"{"do_normalize": true, "do_rescale": true, "do_resize": true, "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5], "resample": 2, "rescale_factor": 0.00392156862745098,
            "size": {"height": 224, "width": 224}}"#;
        let p = Processor::from_json(json, ClassDefaults::VIT).expect("valid config");
        let imgs = [RgbImage::from_pixel(300, 120, image::Rgb([0, 255, 51]))];
        let (px, hw) = p.pixel_values(&imgs).expect("one image");
        assert_eq!(hw, (224, 224));
        assert_eq!(px.len(), 3 * 224 * 224);
        // Channel planes: R=0 -> -1, G=255 -> 1, B=51 -> 0.2*2-1 = -0.6 (f32 rounding only, 1e-6).
        assert_eq!(px[0], -1.0);
        assert_eq!(px[224 * 224], 1.0);
        assert!((px[2 * 224 * 224] + 0.6).abs() < 1e-6);
    }

    #[test]
    fn clip_legacy_int_sizes_mean_shortest_edge_then_square_crop() {
        let json = r#"{"crop_size": 224, "do_center_crop": true, "do_normalize": true, "do_resize": true,
            "feature_extractor_type": "CLIPFeatureExtractor", "resample": 3, "size": 224}"#;
        let p = Processor::from_json(json, ClassDefaults::CLIP).expect("valid config");
        assert_eq!(
            p.resize,
            Some((ResizeTarget::ShortestEdge(224), Filter::Bicubic))
        );
        assert_eq!(p.crop, Some((224, 224)));
        // 1000x333 -> short side 224, long int(224*1000/333) = 672 -> crop 224.
        assert_eq!(
            ResizeTarget::ShortestEdge(224).output_size(1000, 333),
            (672, 224)
        );
        assert_eq!(
            ResizeTarget::ShortestEdge(224).output_size(333, 1000),
            (224, 672)
        );
        // Left half black, right half white: the crop keeps the middle, so both appear.
        let img = RgbImage::from_fn(1000, 333, |x, _| {
            image::Rgb([if x < 500 { 0 } else { 255 }; 3])
        });
        let cropped = p.resized(&img).expect("resizable");
        assert_eq!(cropped.dimensions(), (224, 224));
        assert_eq!(cropped.get_pixel(0, 0)[0], 0);
        assert_eq!(cropped.get_pixel(223, 0)[0], 255);
    }

    #[test]
    fn bad_configs_name_the_key() {
        let e = Processor::from_json(r#"{"resample": 0}"#, ClassDefaults::VIT)
            .expect_err("nearest unsupported");
        assert!(e.contains("resample"), "{e}");
        let e = Processor::from_json(r#"{"image_mean": [0.1, 0.2]}"#, ClassDefaults::VIT)
            .expect_err("2 values");
        assert!(e.contains("image_mean"), "{e}");
    }
}
