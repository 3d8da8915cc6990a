//! Training data: images held in memory at the model's input size, random augmentation, and
//! batches as Burn tensors.
//!
//! Every image goes through the library's [`Recipe`] (the daemon's own resize and
//! normalisation), so an un-augmented training sample is bit-for-bit what the daemon feeds the
//! model.

use std::path::Path;

use anyhow::{Context, Result};
use burn::prelude::*;
use burn::tensor::TensorData;
use image::{Rgb, RgbImage};
use polypwatch::dataset::{Dataset, Sample};
use polypwatch::preprocess::Recipe;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::config::{AugmentConfig, TrainConfig};

/// One sample at the model's input size.
pub struct Item {
    /// Sample name (file stem).
    pub name: String,
    /// The recipe-resized image.
    pub image: RgbImage,
    /// The recipe-resized binary mask (0/1), row-major.
    pub mask: Vec<u8>,
}

/// Loads samples, resized with the recipe; `progress` is called after each image.
pub fn load_items(samples: &[Sample], recipe: &Recipe, progress: impl Fn()) -> Result<Vec<Item>> {
    samples
        .iter()
        .map(|s| {
            let (img, mask) = s.load().with_context(|| format!("sample {}", s.name))?;
            progress();
            Ok(Item {
                name: s.name.clone(),
                image: recipe.resize(&img),
                mask: recipe.resize_mask(&mask),
            })
        })
        .collect()
}

/// The training, validation and test sets named by a config.
pub struct Splits {
    /// Training names (the official training split minus validation).
    pub train: Vec<Sample>,
    /// Validation names, carved from the official training split with the config's seed.
    pub val: Vec<Sample>,
    /// Held-out test names.
    pub test: Vec<Sample>,
}

/// Reads the splits; the validation carve-out is a seeded shuffle of the training names.
pub fn splits(cfg: &TrainConfig) -> Result<Splits> {
    let root = &cfg.data.root;
    let train_all = Dataset::open_split(root, &cfg.split_path(&cfg.data.train_split))
        .context("opening the training split")?;
    let test = Dataset::open_split(root, &cfg.split_path(&cfg.data.test_split))
        .context("opening the test split")?;
    let mut names = train_all.samples;
    names.sort_by(|a, b| a.name.cmp(&b.name));
    names.shuffle(&mut StdRng::seed_from_u64(cfg.data.seed));
    let n_val = (names.len() as f64 * cfg.data.val_fraction).round() as usize;
    let val = names.split_off(names.len() - n_val);
    Ok(Splits {
        train: names,
        val,
        test: test.samples,
    })
}

/// Writes a list of sample names, one per line (the format split files use).
pub fn write_names(path: &Path, samples: &[Sample]) -> Result<()> {
    let text: String = samples.iter().map(|s| format!("{}\n", s.name)).collect();
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn sample_bilinear(img: &RgbImage, x: f32, y: f32) -> [f32; 3] {
    let (w, h) = img.dimensions();
    if x < -0.5 || y < -0.5 || x > w as f32 - 0.5 || y > h as f32 - 0.5 {
        return [0.0; 3];
    }
    let x = x.clamp(0.0, (w - 1) as f32);
    let y = y.clamp(0.0, (h - 1) as f32);
    let (x0, y0) = (x.floor() as u32, y.floor() as u32);
    let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
    let (fx, fy) = (x - x0 as f32, y - y0 as f32);
    let p = |xx, yy| img.get_pixel(xx, yy).0;
    let (a, b, c, d) = (p(x0, y0), p(x1, y0), p(x0, y1), p(x1, y1));
    std::array::from_fn(|k| {
        let top = a[k] as f32 * (1.0 - fx) + b[k] as f32 * fx;
        let bot = c[k] as f32 * (1.0 - fx) + d[k] as f32 * fx;
        top * (1.0 - fy) + bot * fy
    })
}

/// One random augmentation of an item: a single affine warp (zoom, rotation, flips, shift)
/// applied to image and mask alike, then colour jitter. Hand-written because it does in one pass
/// what would otherwise be four image copies, and warps the mask with the same transform.
///
/// The output is a `crop` x `crop` window (the whole image when `crop` equals its size) at a
/// random position.
pub fn augment(item: &Item, a: &AugmentConfig, crop: u32, rng: &mut StdRng) -> (RgbImage, Vec<u8>) {
    let (iw, ih) = item.image.dimensions();
    let (w, h) = (crop.min(iw), crop.min(ih));
    let scale = rng.random_range(a.scale[0]..=a.scale[1]);
    let angle = rng
        .random_range(-a.rotate_degrees..=a.rotate_degrees)
        .to_radians();
    let flip_x = a.hflip && rng.random_bool(0.5);
    let flip_y = a.vflip && rng.random_bool(0.5);
    // Random crop position plus the configured shift, both as offsets of the window centre.
    let slack_x = (iw - w) as f32 / 2.0;
    let slack_y = (ih - h) as f32 / 2.0;
    let shift_x =
        rng.random_range(-a.shift..=a.shift) * iw as f32 + rng.random_range(-slack_x..=slack_x);
    let shift_y =
        rng.random_range(-a.shift..=a.shift) * ih as f32 + rng.random_range(-slack_y..=slack_y);
    let jitter = |r: f32, rng: &mut StdRng| 1.0 + rng.random_range(-r..=r);
    let bright = jitter(a.brightness, rng);
    let contrast = jitter(a.contrast, rng);
    let sat = jitter(a.saturation, rng);

    let (cx, cy) = ((w as f32 - 1.0) / 2.0, (h as f32 - 1.0) / 2.0);
    let (scx, scy) = ((iw as f32 - 1.0) / 2.0, (ih as f32 - 1.0) / 2.0);
    let (sin, cos) = angle.sin_cos();
    let mut out = RgbImage::new(w, h);
    let mut mask = vec![0u8; (w * h) as usize];
    let mut pixels = vec![[0f32; 3]; (w * h) as usize];
    let mut mean_gray = 0.0f64;
    for v in 0..h {
        for u in 0..w {
            let mut px = u as f32 - cx;
            let mut py = v as f32 - cy;
            if flip_x {
                px = -px;
            }
            if flip_y {
                py = -py;
            }
            // Inverse map: output -> source.
            let sx = (cos * px + sin * py) / scale + scx + shift_x;
            let sy = (-sin * px + cos * py) / scale + scy + shift_y;
            let i = (v * w + u) as usize;
            let rgb = sample_bilinear(&item.image, sx, sy);
            mean_gray += (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) as f64;
            pixels[i] = rgb;
            let (mx, my) = (sx.round(), sy.round());
            if mx >= 0.0 && my >= 0.0 && (mx as u32) < iw && (my as u32) < ih {
                mask[i] = item.mask[(my as u32 * iw + mx as u32) as usize];
            }
        }
    }
    let mean_gray = (mean_gray / (w * h) as f64) as f32;
    for (i, p) in pixels.iter().enumerate() {
        let gray = 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2];
        let c: [u8; 3] = std::array::from_fn(|k| {
            let s = gray + (p[k] - gray) * sat;
            let s = (s - mean_gray) * contrast + mean_gray;
            (s * bright).round().clamp(0.0, 255.0) as u8
        });
        out.put_pixel(i as u32 % w, i as u32 / w, Rgb(c));
    }
    (out, mask)
}

/// A batch as tensors: images `[N, 3, H, W]` and masks `[N, 1, H, W]` of 0/1, normalised with
/// the recipe's statistics (the images' own size is used, so crops work too).
pub fn batch(
    images: &[RgbImage],
    masks: &[&[u8]],
    recipe: &Recipe,
    device: &Device,
) -> (Tensor<4>, Tensor<4>) {
    let (w, h) = images[0].dimensions();
    let recipe = &Recipe {
        width: w,
        height: h,
        ..recipe.clone()
    };
    let (h, w) = (h as usize, w as usize);
    let n = images.len();
    let mut x = vec![0f32; n * 3 * h * w];
    for (img, chunk) in images.iter().zip(x.chunks_mut(3 * h * w)) {
        recipe.normalize_into(img, chunk);
    }
    let y: Vec<f32> = masks
        .iter()
        .flat_map(|m| m.iter().map(|&v| v as f32))
        .collect();
    (
        Tensor::from_data(TensorData::new(x, [n, 3, h, w]), device),
        Tensor::from_data(TensorData::new(y, [n, 1, h, w]), device),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item() -> Item {
        let image = RgbImage::from_fn(32, 32, |x, y| Rgb([(x * 8) as u8, (y * 8) as u8, 100]));
        let mask = (0..32 * 32).map(|i| u8::from(i % 32 < 16)).collect();
        Item {
            name: "t".into(),
            image,
            mask,
        }
    }

    fn no_augmentation() -> AugmentConfig {
        AugmentConfig {
            scale: [1.0, 1.0],
            rotate_degrees: 0.0,
            hflip: false,
            vflip: false,
            shift: 0.0,
            brightness: 0.0,
            contrast: 0.0,
            saturation: 0.0,
        }
    }

    #[test]
    fn identity_augmentation_returns_the_item() {
        let a = no_augmentation();
        let it = item();
        let (img, mask) = augment(&it, &a, 32, &mut StdRng::seed_from_u64(1));
        assert_eq!(img, it.image);
        assert_eq!(mask, it.mask);
    }

    #[test]
    fn flips_move_image_and_mask_together() {
        let a = AugmentConfig {
            hflip: true,
            ..no_augmentation()
        };
        let it = item();
        // Draw until a flip happens; the mask's left half must then be on the right.
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..20 {
            let (img, mask) = augment(&it, &a, 32, &mut rng);
            if mask[0] == 0 {
                assert_eq!(mask[31], 1);
                assert_eq!(img.get_pixel(0, 0).0[0], it.image.get_pixel(31, 0).0[0]);
                return;
            }
        }
        panic!("no flip in 20 draws");
    }
}
