//! The self-test a model carries: a frame and the mask the model gave it at export, recorded in
//! the manifest's `[selftest]` with their hashes. The trainer attaches it ([`attach_selftest`]);
//! the daemon's store runs it before a model goes live ([`run_selftest`]), so a model that does
//! not behave on the device as it did when exported is refused.

use std::path::{Path, PathBuf};

use crate::manifest::{self, ManifestError, SelfTest};
use crate::model::{ModelError, Segmenter, sigmoid};

/// Why a self-test could not be run or attached, or did not pass.
#[derive(Debug, thiserror::Error)]
pub enum SelfTestError {
    /// A self-test file is unreadable, or its size is not the model's output size.
    #[error("cannot read {path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// A self-test file cannot be written beside the manifest. (The daemon's store reports it
    /// as its own `InstallError::Store`, "model store ...".)
    #[error("cannot write self-test file {path}: {error}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The manifest is invalid, cannot be written, or a file does not match its hash.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// tract cannot load the model, or its shapes differ from the manifest.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The model does not reproduce the self-test mask.
    #[error(
        "self-test failed: mask IoU {iou:.4} with the expected mask, below {min}: the model does not behave as it did when exported"
    )]
    Failed {
        /// IoU measured.
        iou: f64,
        /// Threshold.
        min: f64,
    },
}

/// Mask of a model's logits at its threshold.
fn mask_of(logits: &[f32], threshold: f32) -> impl Iterator<Item = bool> + '_ {
    logits.iter().map(move |&l| sigmoid(l) >= threshold)
}

/// Runs the self-test of a loaded model whose manifest lies at `manifest_path`; returns the
/// IoU of its mask with the expected one.
pub fn run_selftest(
    seg: &Segmenter,
    manifest_path: &Path,
    t: &SelfTest,
) -> Result<f64, SelfTestError> {
    let dir = manifest_path.parent().unwrap_or(Path::new("."));
    for (name, sha) in [(&t.image, &t.image_sha256), (&t.mask, &t.mask_sha256)] {
        let p = dir.join(name);
        let actual = manifest::sha256_file(&p)?;
        if !actual.eq_ignore_ascii_case(sha) {
            return Err(ManifestError::Sha256Mismatch {
                path: p,
                expected: sha.clone(),
                actual,
            }
            .into());
        }
    }
    let load = |name: &str| {
        image::open(dir.join(name)).map_err(|e| SelfTestError::Io {
            path: dir.join(name),
            error: std::io::Error::other(e.to_string()),
        })
    };
    let img = load(&t.image)?.into_rgb8();
    let expected = load(&t.mask)?.into_luma8();
    let logits = seg.logits_for(&img)?;
    let r = &seg.manifest().preprocess;
    if expected.dimensions() != (r.width, r.height) {
        return Err(SelfTestError::Io {
            path: dir.join(&t.mask),
            error: std::io::Error::other(format!(
                "self-test mask is {:?}, the model's output is {}x{}",
                expected.dimensions(),
                r.width,
                r.height
            )),
        });
    }
    let (mut inter, mut union) = (0u64, 0u64);
    for (got, want) in mask_of(&logits, seg.manifest().output.threshold).zip(
        expected
            .as_raw()
            .iter()
            .map(|&v| v > crate::preprocess::MASK_THRESHOLD),
    ) {
        inter += (got && want) as u64;
        union += (got || want) as u64;
    }
    let iou = if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    };
    if iou < t.min_iou {
        return Err(SelfTestError::Failed {
            iou,
            min: t.min_iou,
        });
    }
    Ok(iou)
}

/// Adds a self-test to a manifest: runs the model on `image` (resized to the input size),
/// saves the frame and the mask beside the manifest and records their hashes. The manifest is
/// rewritten, so sign it afterwards.
pub fn attach_selftest(
    manifest_path: &Path,
    image: &image::RgbImage,
    min_iou: f64,
) -> Result<f64, SelfTestError> {
    let seg = Segmenter::load(manifest_path)?;
    let mut m = seg.manifest().clone();
    let r = &m.preprocess;
    let frame = image::imageops::resize(
        image,
        r.width,
        r.height,
        image::imageops::FilterType::Triangle,
    );
    let logits = seg.logits_for(&frame)?;
    let mask = image::GrayImage::from_raw(
        r.width,
        r.height,
        mask_of(&logits, m.output.threshold)
            .map(|b| if b { 255 } else { 0 })
            .collect(),
    )
    .expect("mask has the model's size");
    let stem = manifest_path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let dir = manifest_path.parent().unwrap_or(Path::new("."));
    let (img_name, mask_name) = (
        format!("{stem}.selftest.png"),
        format!("{stem}.selftest-mask.png"),
    );
    let save_err = |p: PathBuf| {
        move |e: image::ImageError| SelfTestError::Write {
            path: p,
            error: std::io::Error::other(e.to_string()),
        }
    };
    frame
        .save(dir.join(&img_name))
        .map_err(save_err(dir.join(&img_name)))?;
    mask.save(dir.join(&mask_name))
        .map_err(save_err(dir.join(&mask_name)))?;
    let t = SelfTest {
        image_sha256: manifest::sha256_file(&dir.join(&img_name))?,
        mask_sha256: manifest::sha256_file(&dir.join(&mask_name))?,
        image: img_name,
        mask: mask_name,
        min_iou,
    };
    m.selftest = Some(t.clone());
    m.save(manifest_path)?;
    // Check what was written, through the same path the device takes.
    let seg = Segmenter::load(manifest_path)?;
    run_selftest(&seg, manifest_path, &t)
}
