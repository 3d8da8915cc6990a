//! Training data: images held in memory at the model's input size, random augmentation, and
//! batches as Burn tensors.
//!
//! Every image goes through the library's [`Recipe`] (the daemon's own resize and
//! normalisation), so an un-augmented training sample is bit-for-bit what the daemon feeds the
//! model.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burn::prelude::*;
use burn::tensor::TensorData;
use image::{Rgb, RgbImage};
use polypwatch_model::dataset::{Dataset, Sample};
use polypwatch_model::preprocess::Recipe;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::config::{AugmentConfig, SourceConfig, TrainConfig};

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
    load_items_with_crops(samples, recipe, None, progress).map(|(items, _)| items)
}

/// Smallest side, in input pixels, of a polyp-free crop cut from a polyp image.
pub const FREE_CROP_MIN_SIDE: u32 = 96;

/// Loads samples like [`load_items`]; with `free_crops` (a minimum side in input pixels), also
/// cuts from each image the largest square away from its mask and returns it, at the input
/// size, as a polyp-free item (`<name>#free`).
pub fn load_items_with_crops(
    samples: &[Sample],
    recipe: &Recipe,
    free_crops: Option<u32>,
    progress: impl Fn(),
) -> Result<(Vec<Item>, Vec<Item>)> {
    let mut items = Vec::with_capacity(samples.len());
    let mut crops = Vec::new();
    for s in samples {
        let (img, mask) = s.load().with_context(|| format!("sample {}", s.name))?;
        progress();
        let item = Item {
            name: s.name.clone(),
            image: recipe.resize(&img),
            mask: recipe.resize_mask(&mask),
        };
        if let Some(min_side) = free_crops
            && let Some((x, y, side)) = free_square(&item.mask, recipe.width, recipe.height)
            && side >= min_side
        {
            // The square in the original image's coordinates (the recipe stretches both axes).
            let (sx, sy) = (
                img.width() as f32 / recipe.width as f32,
                img.height() as f32 / recipe.height as f32,
            );
            let crop = image::imageops::crop_imm(
                &img,
                (x as f32 * sx) as u32,
                (y as f32 * sy) as u32,
                ((side as f32 * sx) as u32).max(1),
                ((side as f32 * sy) as u32).max(1),
            )
            .to_image();
            crops.push(Item {
                name: format!("{}#free", s.name),
                image: recipe.resize(&crop),
                mask: vec![0; (recipe.width * recipe.height) as usize],
            });
        }
        items.push(item);
    }
    Ok((items, crops))
}

/// The largest square of a `w` x `h` binary mask that holds no polyp pixel, as `(x, y, side)`
/// (the classic dynamic programme over bottom-right corners).
pub fn free_square(mask: &[u8], w: u32, h: u32) -> Option<(u32, u32, u32)> {
    let (w, h) = (w as usize, h as usize);
    let mut side = vec![0u32; w * h];
    let mut best: Option<(u32, u32, u32)> = None;
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            if mask[i] > 0 {
                continue;
            }
            side[i] = if x == 0 || y == 0 {
                1
            } else {
                1 + side[i - 1].min(side[i - w]).min(side[i - w - 1])
            };
            let s = side[i];
            if best.is_none_or(|b| s > b.2) {
                best = Some((x as u32 + 1 - s, y as u32 + 1 - s, s));
            }
        }
    }
    best
}

/// The training, validation and test names of one source.
pub struct SourceSplit {
    /// The source as configured.
    pub source: SourceConfig,
    /// Training names.
    pub train: Vec<Sample>,
    /// Validation names, carved from the training names with the config's seed.
    pub val: Vec<Sample>,
    /// Held-out test names: the source's `test_split`, or a seeded carve-out.
    pub test: Vec<Sample>,
}

/// Reads every source's splits. Carve-outs are a seeded shuffle of the sorted names: test
/// from the end, then validation, so a source's carve-out does not depend on the others.
pub fn splits(cfg: &TrainConfig) -> Result<Vec<SourceSplit>> {
    cfg.data
        .sources()
        .into_iter()
        .map(|src| {
            let root = &src.root;
            let resolve = |p: &Path| {
                if p.is_absolute() {
                    p.to_path_buf()
                } else {
                    root.join(p)
                }
            };
            let all = match &src.train_split {
                Some(p) => Dataset::open_split(root, &resolve(p)),
                None => Dataset::open(root),
            }
            .with_context(|| format!("opening source {}", src.name))?;
            let mut names = all.samples;
            names.sort_by(|a, b| a.name.cmp(&b.name));
            names.shuffle(&mut StdRng::seed_from_u64(cfg.data.seed));
            let carve = |n: usize, f: f64| (n as f64 * f).round() as usize;
            let test = match &src.test_split {
                Some(p) => {
                    Dataset::open_split(root, &resolve(p))
                        .with_context(|| format!("opening the test split of source {}", src.name))?
                        .samples
                }
                None => {
                    let n = carve(names.len(), src.test_fraction);
                    names.split_off(names.len() - n)
                }
            };
            let n_val = carve(
                names.len() + test.len() * usize::from(src.test_split.is_none()),
                src.val_fraction,
            );
            let val = names.split_off(names.len() - n_val.min(names.len()));
            Ok(SourceSplit {
                source: src,
                train: names,
                val,
                test,
            })
        })
        .collect()
}

/// Which list of a source's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Set {
    /// Training names.
    Train,
    /// Validation names.
    Val,
    /// Test names.
    Test,
}

impl Set {
    /// The set's name in file names and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Set::Train => "train",
            Set::Val => "validation",
            Set::Test => "test",
        }
    }
}

/// The split file of `set` of `source` in a run folder: `<source>.<set>.txt`, or for the
/// single-source runs of 0.2.0 and before, `train.txt` / `val.txt` and the config's test split.
pub fn run_split(run: &Path, cfg: &TrainConfig, source: &SourceConfig, set: Set) -> PathBuf {
    let file = run.join(format!("{}.{}.txt", source.name, set.as_str()));
    if file.exists() || !cfg.data.single() {
        return file;
    }
    match (set, &source.test_split) {
        (Set::Train, _) => run.join("train.txt"),
        (Set::Val, _) => run.join("val.txt"),
        (Set::Test, Some(p)) if p.is_absolute() => p.clone(),
        (Set::Test, Some(p)) => source.root.join(p),
        (Set::Test, None) => file,
    }
}

/// Opens one written split of a run (see [`run_split`]).
pub fn open_run_split(
    run: &Path,
    cfg: &TrainConfig,
    source: &SourceConfig,
    set: Set,
) -> Result<Vec<Sample>> {
    let path = run_split(run, cfg, source, set);
    Ok(Dataset::open_split(&source.root, &path)
        .with_context(|| format!("source {} {} names", source.name, set.as_str()))?
        .samples)
}

/// Writes a list of sample names, one per line (the format split files use).
pub fn write_names(path: &Path, samples: &[Sample]) -> Result<()> {
    let text: String = samples.iter().map(|s| format!("{}\n", s.name)).collect();
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Polyp draws an epoch: `round(n w)` per group.
fn draws(groups: &[(std::ops::Range<usize>, f64)]) -> usize {
    groups
        .iter()
        .map(|(r, w)| (r.len() as f64 * w).round() as usize)
        .sum()
}

/// Draws the batches of an epoch: polyp images by their source's weight, and
/// `negative_share` of every batch from the polyp-free images.
///
/// Items are indices into one list; a polyp group of `n` images and weight `w` gives
/// `round(n w)` draws an epoch (whole copies, then a random subset), shuffled together, so a
/// single source of weight 1 draws exactly the shuffled order of the trainers before sources.
#[derive(Debug, Clone)]
pub struct Sampler {
    groups: Vec<(std::ops::Range<usize>, f64)>,
    negatives: std::ops::Range<usize>,
    pos_per_batch: usize,
    neg_per_batch: usize,
}

impl Sampler {
    /// A sampler over polyp `groups` (index range, weight) and the `negatives` range.
    pub fn new(
        groups: Vec<(std::ops::Range<usize>, f64)>,
        negatives: std::ops::Range<usize>,
        batch: usize,
        negative_share: f64,
    ) -> Self {
        let neg_per_batch = if negatives.is_empty() {
            0
        } else {
            ((batch as f64 * negative_share).round() as usize).clamp(1, batch - 1)
        };
        let draws = draws(&groups);
        Sampler {
            groups,
            negatives,
            // Fewer polyp draws than a batch holds (a `--max-images` smoke run) still makes
            // one smaller batch, not an epoch of none.
            pos_per_batch: (batch - neg_per_batch).min(draws).max(1),
            neg_per_batch,
        }
    }

    fn draws(&self) -> usize {
        draws(&self.groups)
    }

    /// Batches per epoch (the same every epoch, so the schedule is fixed).
    pub fn steps_per_epoch(&self) -> usize {
        self.draws() / self.pos_per_batch
    }

    /// The epoch's batches, drawn from `rng`.
    pub fn epoch(&self, rng: &mut StdRng) -> Vec<Vec<usize>> {
        let mut pool = Vec::with_capacity(self.draws());
        for (range, w) in &self.groups {
            let n = range.len();
            if n == 0 {
                continue;
            }
            let k = (n as f64 * w).round() as usize;
            for _ in 0..k / n {
                pool.extend(range.clone());
            }
            if !k.is_multiple_of(n) {
                let mut rest: Vec<usize> = range.clone().collect();
                rest.shuffle(rng);
                pool.extend(&rest[..k % n]);
            }
        }
        pool.shuffle(rng);
        let mut neg: Vec<usize> = self.negatives.clone().collect();
        let mut next = neg.len();
        pool.chunks_exact(self.pos_per_batch)
            .map(|pos| {
                let mut b = pos.to_vec();
                for _ in 0..self.neg_per_batch {
                    if next == neg.len() {
                        neg.shuffle(rng);
                        next = 0;
                    }
                    b.push(neg[next]);
                    next += 1;
                }
                b
            })
            .collect()
    }
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
    fn free_square_avoids_the_mask() {
        // 8x6 mask with a polyp in the left 3 columns: the free square is 5x5, on the right.
        let (w, h) = (8u32, 6u32);
        let mask: Vec<u8> = (0..w * h).map(|i| u8::from(i % w < 3)).collect();
        let (x, y, s) = free_square(&mask, w, h).unwrap();
        assert_eq!(s, 5);
        assert!(x >= 3 && x + s <= w && y + s <= h);
        for yy in y..y + s {
            for xx in x..x + s {
                assert_eq!(mask[(yy * w + xx) as usize], 0);
            }
        }
        assert_eq!(free_square(&[1, 1, 1, 1], 2, 2), None);
    }

    #[test]
    fn one_source_of_weight_one_is_a_shuffle() {
        let s = Sampler::new(vec![(0..20, 1.0)], 0..0, 4, 0.0);
        assert_eq!(s.steps_per_epoch(), 5);
        let mut rng = StdRng::seed_from_u64(7);
        let got: Vec<usize> = s.epoch(&mut rng).concat();
        let mut want: Vec<usize> = (0..20).collect();
        want.shuffle(&mut StdRng::seed_from_u64(7));
        assert_eq!(got, want);
    }

    #[test]
    fn weights_and_negative_share_shape_every_batch() {
        // 10 images at weight 2, 10 at weight 0.5, negatives 20..26; batch 4 with 1 negative.
        let s = Sampler::new(vec![(0..10, 2.0), (10..20, 0.5)], 20..26, 4, 0.25);
        assert_eq!(s.steps_per_epoch(), 25 / 3);
        let batches = s.epoch(&mut StdRng::seed_from_u64(1));
        assert_eq!(batches.len(), 8);
        for b in &batches {
            assert_eq!(b.len(), 4);
            assert!(b[..3].iter().all(|&i| i < 20));
            assert!((20..26).contains(&b[3]));
        }
        // 25 draws: every image of the first group twice, 5 of the second once (one draw of
        // the 25 is left over by the last incomplete batch).
        let mut count = [0usize; 20];
        for b in &batches {
            for &i in &b[..3] {
                count[i] += 1;
            }
        }
        let first: usize = count[..10].iter().sum();
        let second: usize = count[10..].iter().sum();
        assert!(
            first + second == 24 && (19..=20).contains(&first),
            "{count:?}"
        );
        assert!(count[10..].iter().all(|&c| c <= 1));
        // Negatives cycle through all of them before repeating.
        let negs: Vec<usize> = batches.iter().map(|b| b[3]).collect();
        let mut firsts = negs[..6].to_vec();
        firsts.sort();
        assert_eq!(firsts, (20..26).collect::<Vec<_>>());
    }

    #[test]
    fn fewer_polyp_images_than_a_batch_still_make_a_step() {
        // A smoke run: 4 polyp images, batches of 8 with 2 polyp-free frames.
        let s = Sampler::new(vec![(0..4, 1.0)], 4..10, 8, 0.25);
        assert_eq!(s.steps_per_epoch(), 1);
        let batches = s.epoch(&mut StdRng::seed_from_u64(3));
        assert_eq!(batches.len(), 1);
        let mut polyps = batches[0][..4].to_vec();
        polyps.sort();
        assert_eq!(polyps, vec![0, 1, 2, 3]);
        assert!(batches[0][4..].iter().all(|i| (4..10).contains(i)));
        assert_eq!(batches[0].len(), 6);
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
