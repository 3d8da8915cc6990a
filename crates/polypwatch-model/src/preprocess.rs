//! The one preprocessing recipe shared by the trainer and the daemon.
//!
//! Training and inference both call [`Recipe::tensor_from_rgb`], so the model sees exactly the
//! same pixels at inference time as it saw during evaluation. The recipe itself is stored in the
//! model manifest, so a model always carries the preprocessing it was trained with.

use std::path::{Path, PathBuf};

use image::{GrayImage, RgbImage, imageops::FilterType};
use serde::{Deserialize, Serialize};

/// Mask pixels strictly above this grey value count as polyp. JPEG masks carry grey edges.
pub const MASK_THRESHOLD: u8 = 127;

/// Errors raised while decoding or preparing an image.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    /// The file could not be read from disk.
    #[error("cannot read image {path}: {error}")]
    Read {
        /// The file that failed.
        path: PathBuf,
        /// The underlying I/O error.
        error: std::io::Error,
    },
    /// The bytes are not a decodable image (corrupt or truncated JPEG/PNG/TIFF).
    #[error("cannot decode image {what}: {error} (is the file a complete JPEG/PNG/TIFF?)")]
    Decode {
        /// The file or buffer that failed.
        what: String,
        /// The decoder's error.
        error: image::ImageError,
    },
    /// A JPEG whose data stops before its end-of-image marker: the decoder would fill the
    /// rest and the frame would be scored on invented pixels.
    #[error("image {what} is a truncated JPEG (no end-of-image marker); skipped")]
    Truncated {
        /// The file or buffer.
        what: String,
    },
    /// The recipe is unusable (for example a zero size or a zero standard deviation).
    #[error("invalid preprocessing recipe: {0}")]
    Recipe(String),
}

/// Resampling filter used to bring a frame to the model's input size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResizeFilter {
    /// Nearest neighbour.
    Nearest,
    /// Bilinear ("triangle") filter with a support that widens when downscaling (anti-aliased).
    Triangle,
}

impl ResizeFilter {
    fn to_image(self) -> FilterType {
        match self {
            ResizeFilter::Nearest => FilterType::Nearest,
            ResizeFilter::Triangle => FilterType::Triangle,
        }
    }
}

/// How a decoded RGB image becomes the model's input tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Model input height in pixels.
    pub height: u32,
    /// Model input width in pixels.
    pub width: u32,
    /// Resampling filter used for the resize.
    pub resize_filter: ResizeFilter,
    /// Per-channel mean (R, G, B) subtracted after scaling pixels to 0..1.
    #[serde(deserialize_with = "rgb")]
    pub mean: [f32; 3],
    /// Per-channel standard deviation (R, G, B) divided after the mean is subtracted.
    #[serde(deserialize_with = "rgb")]
    pub std: [f32; 3],
}

/// Exactly three numbers: serde's array impl would take the first three of a longer list.
fn rgb<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[f32; 3], D::Error> {
    let v = Vec::<f32>::deserialize(d)?;
    <[f32; 3]>::try_from(v.as_slice()).map_err(|_| {
        serde::de::Error::custom(format!("expected 3 values (R, G, B), found {}", v.len()))
    })
}

impl Recipe {
    /// The recipe our models use: ImageNet statistics, triangle filter, square input.
    pub fn square(size: u32) -> Self {
        Recipe {
            height: size,
            width: size,
            resize_filter: ResizeFilter::Triangle,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }

    /// Checks that the recipe can be applied.
    pub fn validate(&self) -> Result<(), PreprocessError> {
        if self.height == 0 || self.width == 0 {
            return Err(PreprocessError::Recipe(format!(
                "input size {}x{} must be non-zero",
                self.width, self.height
            )));
        }
        if self.mean.iter().any(|m| !m.is_finite()) {
            return Err(PreprocessError::Recipe(format!(
                "mean {:?} must be finite",
                self.mean
            )));
        }
        if self.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(PreprocessError::Recipe(format!(
                "std {:?} must be positive",
                self.std
            )));
        }
        Ok(())
    }

    /// Resizes an RGB image to the model input size with the recipe's filter.
    pub fn resize(&self, img: &RgbImage) -> RgbImage {
        if img.dimensions() == (self.width, self.height) {
            return img.clone();
        }
        match self.resize_filter {
            ResizeFilter::Triangle => resize_triangle(img, self.width, self.height),
            ResizeFilter::Nearest => {
                image::imageops::resize(img, self.width, self.height, FilterType::Nearest)
            }
        }
    }

    /// Resizes a mask to the model input size and binarises it (1 = polyp, 0 = background).
    ///
    /// Masks are resized with the same filter as images, then thresholded at [`MASK_THRESHOLD`],
    /// so that a mask's boundary lands where the image's boundary lands.
    pub fn resize_mask(&self, mask: &GrayImage) -> Vec<u8> {
        let resized;
        let m = if mask.dimensions() == (self.width, self.height) {
            mask
        } else {
            resized = image::imageops::resize(
                mask,
                self.width,
                self.height,
                self.resize_filter.to_image(),
            );
            &resized
        };
        binarize(m)
    }

    /// Writes an already-resized RGB image into `out` as normalised planar CHW floats.
    ///
    /// `out` must hold `3 * height * width` values; this is the model's input layout.
    pub fn normalize_into(&self, img: &RgbImage, out: &mut [f32]) {
        let plane = (self.width * self.height) as usize;
        assert_eq!(img.dimensions(), (self.width, self.height), "resize first");
        assert_eq!(out.len(), 3 * plane, "output buffer must hold 3*H*W floats");
        let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * self.std[c]));
        let offset: [f32; 3] = std::array::from_fn(|c| self.mean[c] / self.std[c]);
        for (i, px) in img.pixels().enumerate() {
            for c in 0..3 {
                out[c * plane + i] = px.0[c] as f32 * scale[c] - offset[c];
            }
        }
    }

    /// Resize then normalise: the full path from a decoded frame to the model input (CHW).
    pub fn tensor_from_rgb(&self, img: &RgbImage) -> Vec<f32> {
        let resized = self.resize(img);
        let mut out = vec![0.0; 3 * (self.width * self.height) as usize];
        self.normalize_into(&resized, &mut out);
        out
    }
}

/// One output index of a resampling axis: the first input index it reads and the weights.
struct Taps {
    first: usize,
    weights: Vec<f32>,
}

/// The triangle filter's taps along one axis, computed exactly as the `image` crate's
/// resampler computes them (support widened by the downscaling ratio, weights normalised).
fn triangle_taps(len_in: u32, len_out: u32) -> Vec<Taps> {
    let ratio = len_in as f32 / len_out as f32;
    let sratio = if ratio < 1.0 { 1.0 } else { ratio };
    let support = sratio;
    (0..len_out)
        .map(|o| {
            let centre = (o as f32 + 0.5) * ratio;
            let left = ((centre - support).floor() as i64).clamp(0, i64::from(len_in) - 1);
            let right = ((centre + support).ceil() as i64).clamp(left + 1, i64::from(len_in));
            let centre = centre - 0.5;
            let mut weights: Vec<f32> = (left..right)
                .map(|i| {
                    let x = ((i as f32 - centre) / sratio).abs();
                    if x < 1.0 { 1.0 - x } else { 0.0 }
                })
                .collect();
            let mut sum = 0.0;
            for w in &weights {
                sum += w;
            }
            for w in &mut weights {
                *w /= sum;
            }
            Taps {
                first: left as usize,
                weights,
            }
        })
        .collect()
}

/// `image::imageops::resize(img, width, height, FilterType::Triangle)`, byte for byte, in a
/// fraction of its time: the same taps, weights and summation order (columns of rows first,
/// then rows), but whole rows at a time instead of one pixel through a generic interface.
/// The trainer and the daemon both resize through here, so the pixels a model was trained on
/// are the pixels it sees.
pub fn resize_triangle(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 || width == 0 || height == 0 {
        return RgbImage::new(width, height);
    }
    let stride = 3 * w as usize;
    let src = img.as_raw();
    // Vertical pass into f32 rows of the input's width.
    let mut tmp = vec![0f32; height as usize * stride];
    for (row, taps) in tmp.chunks_exact_mut(stride).zip(triangle_taps(h, height)) {
        for (i, &wt) in taps.weights.iter().enumerate() {
            let line = &src[(taps.first + i) * stride..][..stride];
            for (t, &v) in row.iter_mut().zip(line) {
                *t += f32::from(v) * wt;
            }
        }
    }
    // Horizontal pass, rounding to bytes.
    let cols = triangle_taps(w, width);
    let mut out = RgbImage::new(width, height);
    for (line, row) in out
        .chunks_exact_mut(3 * width as usize)
        .zip(tmp.chunks_exact(stride))
    {
        for (px, taps) in line.chunks_exact_mut(3).zip(&cols) {
            let mut t = [0f32; 3];
            for (i, &wt) in taps.weights.iter().enumerate() {
                let at = 3 * (taps.first + i);
                for c in 0..3 {
                    t[c] += row[at + c] * wt;
                }
            }
            for c in 0..3 {
                // image clamps to 0..=255 and rounds half away from zero.
                px[c] = t[c].clamp(0.0, 255.0).round() as u8;
            }
        }
    }
    out
}

/// Binarises a grey mask at [`MASK_THRESHOLD`] into 0/1 bytes.
pub fn binarize(mask: &GrayImage) -> Vec<u8> {
    mask.as_raw()
        .iter()
        .map(|&v| u8::from(v > MASK_THRESHOLD))
        .collect()
}

/// Luma standard deviation (0-255) below which a frame has no detail to score: a capture
/// card's "no signal" screen, a covered lens, a flat test pattern. Colonoscopy frames measure
/// tens; a flat colour through JPEG stays under 2.
pub const BLANK_LUMA_STD: f32 = 3.0;

/// Whether a frame is blank (see [`BLANK_LUMA_STD`]), from a grid of at most 64x64 samples.
/// Such a frame scores ~0.9 over its whole area on a model that never saw one, and an alert
/// on it would never clear.
pub fn is_blank(img: &RgbImage) -> bool {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return true;
    }
    let (sx, sy) = (w.div_ceil(64), h.div_ceil(64));
    let (mut n, mut sum, mut sq) = (0f64, 0f64, 0f64);
    for y in (0..h).step_by(sy as usize) {
        for x in (0..w).step_by(sx as usize) {
            let [r, g, b] = img.get_pixel(x, y).0;
            let l = 0.299 * f64::from(r) + 0.587 * f64::from(g) + 0.114 * f64::from(b);
            n += 1.0;
            sum += l;
            sq += l * l;
        }
    }
    let var = (sq / n - (sum / n).powi(2)).max(0.0);
    (var.sqrt() as f32) < BLANK_LUMA_STD
}

/// Whether bytes that start like a JPEG end with its end-of-image marker (`FF D9`, zero
/// padding after it allowed, as some cameras send). Inside the entropy-coded data a `FF` byte is
/// always followed by `00` or a restart marker, so a cut-off file does not end in `FF D9` by
/// chance. Bytes that are not a JPEG pass.
pub fn jpeg_is_complete(bytes: &[u8]) -> bool {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return true;
    }
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    bytes[..end].ends_with(&[0xFF, 0xD9])
}

/// Largest frame side decoded: a small PNG can declare 23000x23000 pixels and grow to
/// gigabytes once converted to RGB.
pub const MAX_SIDE: u32 = 8192;

/// Decodes with the size limits above (and at most 256 MiB allocated by the decoder).
pub fn decode_limited(bytes: &[u8]) -> Result<image::DynamicImage, image::ImageError> {
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(256 << 20);
    let mut r = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format()?;
    r.limits(limits);
    r.decode()
}

/// Decodes an image from memory into RGB8, whatever its format and colour type; a truncated
/// JPEG is an error ([`PreprocessError::Truncated`]), and so is one larger than [`MAX_SIDE`].
pub fn decode_rgb(bytes: &[u8], what: &str) -> Result<RgbImage, PreprocessError> {
    if !jpeg_is_complete(bytes) {
        return Err(PreprocessError::Truncated {
            what: what.to_string(),
        });
    }
    decode_limited(bytes)
        .map(|i| i.to_rgb8())
        .map_err(|source| PreprocessError::Decode {
            what: what.to_string(),
            error: source,
        })
}

/// Reads and decodes an image file into RGB8.
pub fn load_rgb(path: &Path) -> Result<RgbImage, PreprocessError> {
    let bytes = crate::files::read_regular(path, crate::files::FRAME_CAP).map_err(|source| {
        PreprocessError::Read {
            path: path.to_path_buf(),
            error: source,
        }
    })?;
    decode_rgb(&bytes, &path.display().to_string())
}

/// Reads and decodes a mask file into 8-bit grey.
pub fn load_gray(path: &Path) -> Result<GrayImage, PreprocessError> {
    let bytes = crate::files::read_regular(path, crate::files::FRAME_CAP).map_err(|source| {
        PreprocessError::Read {
            path: path.to_path_buf(),
            error: source,
        }
    })?;
    if !jpeg_is_complete(&bytes) {
        return Err(PreprocessError::Truncated {
            what: path.display().to_string(),
        });
    }
    decode_limited(&bytes)
        .map(|i| i.to_luma8())
        .map_err(|source| PreprocessError::Decode {
            what: path.display().to_string(),
            error: source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Luma, Rgb};

    #[test]
    fn flat_frames_are_blank_and_real_ones_are_not() {
        let flat = RgbImage::from_pixel(640, 480, Rgb([20, 40, 200]));
        assert!(is_blank(&flat));
        // Through JPEG: its noise does not make a flat frame look detailed.
        let mut jpg = std::io::Cursor::new(Vec::new());
        flat.write_to(&mut jpg, image::ImageFormat::Jpeg).unwrap();
        assert!(is_blank(&decode_rgb(jpg.get_ref(), "flat.jpg").unwrap()));
        let root = crate::workspace_root().join("tests/fixtures");
        for dir in ["kvasir-mini/images", "negatives-mini/images"] {
            for e in std::fs::read_dir(root.join(dir)).unwrap() {
                let p = e.unwrap().path();
                assert!(!is_blank(&load_rgb(&p).unwrap()), "{}", p.display());
            }
        }
        // A frame half black, half white is detail, not blank.
        let split = RgbImage::from_fn(64, 64, |x, _| Rgb([if x < 32 { 0 } else { 255 }; 3]));
        assert!(!is_blank(&split));
    }

    #[test]
    fn every_listed_extension_decodes() {
        let img = RgbImage::from_fn(16, 8, |x, y| Rgb([x as u8 * 9, y as u8 * 17, 40]));
        for (ext, fmt) in [
            ("png", image::ImageFormat::Png),
            ("jpg", image::ImageFormat::Jpeg),
            ("tif", image::ImageFormat::Tiff),
            ("bmp", image::ImageFormat::Bmp),
        ] {
            assert!(crate::dataset::EXTENSIONS.contains(&ext));
            let mut bytes = std::io::Cursor::new(Vec::new());
            img.write_to(&mut bytes, fmt).unwrap();
            let back = decode_rgb(bytes.get_ref(), ext).unwrap();
            assert_eq!(back.dimensions(), (16, 8), "{ext}");
        }
    }

    #[test]
    fn a_frame_declaring_a_huge_size_is_refused_before_it_is_decoded() {
        let p = crate::workspace_root().join("tests/fixtures/faults/declares-23000x23000.png");
        let e = load_rgb(&p).unwrap_err().to_string();
        assert!(
            e.contains("declares-23000x23000.png") && e.contains("limit"),
            "{e}"
        );
        let e = load_gray(&p).unwrap_err().to_string();
        assert!(e.contains("declares-23000x23000.png"), "{e}");
    }

    #[test]
    fn a_truncated_jpeg_is_refused() {
        // A real frame of the demo clip, cut at 25-90 % of its bytes (it decoded silently).
        let path = crate::workspace_root().join("demo/clip/frame_00090.jpg");
        let bytes = std::fs::read(&path).unwrap();
        assert!(decode_rgb(&bytes, "whole").is_ok());
        let mut padded = bytes.clone();
        padded.extend([0u8; 16]);
        assert!(decode_rgb(&padded, "padded").is_ok());
        for pct in [25, 50, 75, 90] {
            let cut = &bytes[..bytes.len() * pct / 100];
            let err = decode_rgb(cut, "cut").unwrap_err();
            assert!(
                matches!(err, PreprocessError::Truncated { .. }),
                "{pct} %: {err}"
            );
            assert!(err.to_string().contains("truncated JPEG"));
        }
    }

    #[test]
    fn normalize_matches_hand_computation() {
        let r = Recipe::square(2);
        let img = RgbImage::from_fn(2, 2, |x, y| Rgb([(x * 255) as u8, (y * 255) as u8, 51]));
        let t = r.tensor_from_rgb(&img);
        assert_eq!(t.len(), 12);
        // R plane, pixel (x=1, y=0): (1.0 - 0.485) / 0.229
        assert!((t[1] - (1.0 - 0.485) / 0.229).abs() < 1e-5);
        // G plane, pixel (x=0, y=1): (1.0 - 0.456) / 0.224
        assert!((t[4 + 2] - (1.0 - 0.456) / 0.224).abs() < 1e-5);
        // B plane, every pixel 0.2
        assert!((t[8] - (0.2 - 0.406) / 0.225).abs() < 1e-5);
    }

    #[test]
    fn resize_reaches_the_model_size() {
        let r = Recipe {
            height: 4,
            width: 6,
            ..Recipe::square(1)
        };
        let img = RgbImage::new(13, 7);
        assert_eq!(r.resize(&img).dimensions(), (6, 4));
        assert_eq!(r.tensor_from_rgb(&img).len(), 3 * 4 * 6);
    }

    #[test]
    fn triangle_resize_is_the_image_crates_to_the_byte() {
        let fixture = crate::workspace_root().join("tests/fixtures/kvasir-mini/images");
        let mut real: Vec<RgbImage> = std::fs::read_dir(&fixture)
            .unwrap()
            .take(2)
            .map(|e| load_rgb(&e.unwrap().path()).unwrap())
            .collect();
        // Synthetic images with edges and gradients, odd sizes, up- and downscaling.
        real.push(RgbImage::from_fn(1280, 1024, |x, y| {
            Rgb([(x * 7 + y) as u8, (x ^ y) as u8, ((x / 9) * (y / 5)) as u8])
        }));
        real.push(RgbImage::from_fn(37, 23, |x, y| {
            Rgb([
                (x * 40) as u8,
                (y * 11) as u8,
                if (x + y) % 3 == 0 { 255 } else { 0 },
            ])
        }));
        for img in &real {
            for (w, h) in [(256, 256), (97, 131), (300, 40), (1, 1), (64, 256)] {
                let ours = resize_triangle(img, w, h);
                let theirs = image::imageops::resize(img, w, h, FilterType::Triangle);
                assert!(ours == theirs, "{:?} -> {w}x{h}", img.dimensions());
            }
        }
    }

    #[test]
    fn masks_binarise_at_127() {
        let m = GrayImage::from_raw(4, 1, vec![0, 127, 128, 255]).unwrap();
        assert_eq!(binarize(&m), vec![0, 0, 1, 1]);
        let r = Recipe::square(4);
        let big = GrayImage::from_pixel(8, 8, Luma([200]));
        assert!(r.resize_mask(&big).iter().all(|&v| v == 1));
    }

    #[test]
    fn corrupt_bytes_are_a_decode_error() {
        let err = decode_rgb(b"\xff\xd8\xff\xe0 not really a jpeg", "frame 7").unwrap_err();
        assert!(err.to_string().contains("frame 7"), "{err}");
    }

    #[test]
    fn bad_recipes_are_rejected() {
        let mut r = Recipe::square(8);
        r.std[1] = 0.0;
        assert!(r.validate().is_err());
        assert!(Recipe::square(0).validate().is_err());
        assert!(Recipe::square(8).validate().is_ok());
    }
}
