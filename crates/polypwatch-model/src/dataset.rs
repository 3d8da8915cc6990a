//! Image/mask folders and split files.
//!
//! A dataset is a folder with `images/` and `masks/`, paired by file stem (extensions may
//! differ), plus optional split files listing one name per line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use image::{GrayImage, RgbImage};

use crate::preprocess::{self, PreprocessError};

/// File extensions accepted for images and masks.
pub const EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "tif", "tiff", "bmp"];

/// Errors raised while opening a dataset or reading one of its samples.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A required folder is missing.
    #[error("dataset folder {0} not found: a dataset needs images/ and masks/ side by side")]
    MissingDir(PathBuf),
    /// A folder could not be listed.
    #[error("cannot list {path}: {error}")]
    List {
        /// The folder.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// An image has no mask of the same stem.
    #[error("image {image} has no mask named {stem}.* in {masks_dir}")]
    MissingMask {
        /// The image without mask.
        image: PathBuf,
        /// Its stem.
        stem: String,
        /// Where the mask was looked for.
        masks_dir: PathBuf,
    },
    /// The split file could not be read.
    #[error("cannot read split file {path}: {error}")]
    SplitRead {
        /// The split file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// A split names an image that is not in the dataset.
    #[error("split file {split} line {line}: no image named {name:?} in {images_dir}")]
    UnknownName {
        /// The split file.
        split: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The name as written.
        name: String,
        /// Where it was looked for.
        images_dir: PathBuf,
    },
    /// The split selects no images.
    #[error("split file {0} lists no names")]
    EmptySplit(PathBuf),
    /// The folder holds no image.
    #[error("no images (jpg, jpeg, png, tif, tiff, bmp) in {0}")]
    Empty(PathBuf),
    /// Image and mask differ in size.
    #[error("mask {mask} is {mask_w}x{mask_h} but its image {image} is {img_w}x{img_h}")]
    SizeMismatch {
        /// The image.
        image: PathBuf,
        /// The mask.
        mask: PathBuf,
        /// Image width.
        img_w: u32,
        /// Image height.
        img_h: u32,
        /// Mask width.
        mask_w: u32,
        /// Mask height.
        mask_h: u32,
    },
    /// A file failed to read or decode.
    #[error(transparent)]
    Image(#[from] PreprocessError),
}

/// One image and its mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// The shared file stem, e.g. `cju0qkwl35piu0993l0dewei2`.
    pub name: String,
    /// Path of the image file.
    pub image: PathBuf,
    /// Path of the mask file.
    pub mask: PathBuf,
}

impl Sample {
    /// Reads the image and its mask, checking that their sizes agree.
    pub fn load(&self) -> Result<(RgbImage, GrayImage), DatasetError> {
        let img = preprocess::load_rgb(&self.image)?;
        let mask = preprocess::load_gray(&self.mask)?;
        if img.dimensions() != mask.dimensions() {
            return Err(DatasetError::SizeMismatch {
                image: self.image.clone(),
                mask: self.mask.clone(),
                img_w: img.width(),
                img_h: img.height(),
                mask_w: mask.width(),
                mask_h: mask.height(),
            });
        }
        Ok((img, mask))
    }
}

/// A set of image/mask pairs, sorted by name.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The dataset root (holding `images/` and `masks/`).
    pub root: PathBuf,
    /// The pairs, sorted by name.
    pub samples: Vec<Sample>,
}

fn list_by_stem(dir: &Path) -> Result<BTreeMap<String, PathBuf>, DatasetError> {
    if !dir.is_dir() {
        return Err(DatasetError::MissingDir(dir.to_path_buf()));
    }
    let entries = std::fs::read_dir(dir).map_err(|source| DatasetError::List {
        path: dir.to_path_buf(),
        error: source,
    })?;
    let mut out = BTreeMap::new();
    for entry in entries {
        let path = entry
            .map_err(|source| DatasetError::List {
                path: dir.to_path_buf(),
                error: source,
            })?
            .path();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase());
        if let (Some(ext), Some(stem)) = (ext, path.file_stem().and_then(|s| s.to_str()))
            && EXTENSIONS.contains(&ext.as_str())
        {
            out.insert(stem.to_string(), path.clone());
        }
    }
    Ok(out)
}

/// Strips a known image extension from a split entry, if present.
fn split_stem(name: &str) -> &str {
    match name.rsplit_once('.') {
        Some((stem, ext)) if EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str()) => stem,
        _ => name,
    }
}

/// Reads a split file: one name per line, blank lines and `#` comments ignored.
pub fn read_split(path: &Path) -> Result<Vec<(usize, String)>, DatasetError> {
    let text = std::fs::read_to_string(path).map_err(|source| DatasetError::SplitRead {
        path: path.to_path_buf(),
        error: source,
    })?;
    let names: Vec<(usize, String)> = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .map(|(i, l)| (i, split_stem(l).to_string()))
        .collect();
    if names.is_empty() {
        return Err(DatasetError::EmptySplit(path.to_path_buf()));
    }
    Ok(names)
}

impl Dataset {
    /// Opens every image/mask pair of the folder.
    pub fn open(root: &Path) -> Result<Self, DatasetError> {
        let images_dir = root.join("images");
        let masks_dir = root.join("masks");
        let images = list_by_stem(&images_dir)?;
        let masks = list_by_stem(&masks_dir)?;
        if images.is_empty() {
            return Err(DatasetError::Empty(images_dir));
        }
        let mut samples = Vec::with_capacity(images.len());
        for (stem, image) in images {
            let mask = masks
                .get(&stem)
                .ok_or_else(|| DatasetError::MissingMask {
                    image: image.clone(),
                    stem: stem.clone(),
                    masks_dir: masks_dir.clone(),
                })?
                .clone();
            samples.push(Sample {
                name: stem,
                image,
                mask,
            });
        }
        Ok(Dataset {
            root: root.to_path_buf(),
            samples,
        })
    }

    /// Opens the folder and keeps only the names of `split` (in the split file's order).
    ///
    /// Only the listed images need masks, so a split can select a labelled subset.
    pub fn open_split(root: &Path, split: &Path) -> Result<Self, DatasetError> {
        let images_dir = root.join("images");
        let masks_dir = root.join("masks");
        let images = list_by_stem(&images_dir)?;
        let masks = list_by_stem(&masks_dir)?;
        let mut samples = Vec::new();
        for (line, name) in read_split(split)? {
            let image = images
                .get(&name)
                .ok_or_else(|| DatasetError::UnknownName {
                    split: split.to_path_buf(),
                    line,
                    name: name.clone(),
                    images_dir: images_dir.clone(),
                })?
                .clone();
            let mask = masks
                .get(&name)
                .ok_or_else(|| DatasetError::MissingMask {
                    image: image.clone(),
                    stem: name.clone(),
                    masks_dir: masks_dir.clone(),
                })?
                .clone();
            samples.push(Sample { name, image, mask });
        }
        Ok(Dataset {
            root: root.to_path_buf(),
            samples,
        })
    }

    /// Opens with a split when one is given, else the whole folder.
    pub fn open_maybe_split(root: &Path, split: Option<&Path>) -> Result<Self, DatasetError> {
        match split {
            Some(s) => Self::open_split(root, s),
            None => Self::open(root),
        }
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether the dataset holds no pair.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Luma, Rgb};

    fn make(dir: &Path, images: &[&str], masks: &[&str]) {
        std::fs::create_dir_all(dir.join("images")).unwrap();
        std::fs::create_dir_all(dir.join("masks")).unwrap();
        for name in images {
            RgbImage::from_pixel(8, 6, Rgb([10, 20, 30]))
                .save(dir.join("images").join(name))
                .unwrap();
        }
        for name in masks {
            GrayImage::from_pixel(8, 6, Luma([255]))
                .save(dir.join("masks").join(name))
                .unwrap();
        }
    }

    #[test]
    fn pairs_by_stem_across_extensions() {
        let d = tempfile::tempdir().unwrap();
        make(d.path(), &["a.jpg", "b.png"], &["a.png", "b.tif"]);
        let ds = Dataset::open(d.path()).unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.samples[0].name, "a");
        assert!(ds.samples[1].mask.ends_with("b.tif"));
        let (img, mask) = ds.samples[0].load().unwrap();
        assert_eq!(img.dimensions(), mask.dimensions());
    }

    #[test]
    fn missing_mask_names_the_image() {
        let d = tempfile::tempdir().unwrap();
        make(d.path(), &["a.jpg", "lonely.jpg"], &["a.png"]);
        let err = Dataset::open(d.path()).unwrap_err().to_string();
        assert!(err.contains("lonely.jpg"), "{err}");
    }

    #[test]
    fn split_with_and_without_extensions() {
        let d = tempfile::tempdir().unwrap();
        make(
            d.path(),
            &["a.jpg", "b.jpg", "c.jpg"],
            &["a.jpg", "b.jpg", "c.jpg"],
        );
        let split = d.path().join("s.txt");
        std::fs::write(&split, "c.jpg\n\n# comment\na\n").unwrap();
        let ds = Dataset::open_split(d.path(), &split).unwrap();
        let names: Vec<_> = ds.samples.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["c", "a"]);
    }

    #[test]
    fn unknown_split_name_is_reported_with_line() {
        let d = tempfile::tempdir().unwrap();
        make(d.path(), &["a.jpg"], &["a.jpg"]);
        let split = d.path().join("s.txt");
        std::fs::write(&split, "a\nghost\n").unwrap();
        let err = Dataset::open_split(d.path(), &split)
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2") && err.contains("ghost"), "{err}");
    }

    #[test]
    fn missing_split_file_and_folder_are_clear() {
        let d = tempfile::tempdir().unwrap();
        let err = Dataset::open(d.path()).unwrap_err().to_string();
        assert!(err.contains("images"), "{err}");
        make(d.path(), &["a.jpg"], &["a.jpg"]);
        let err = Dataset::open_split(d.path(), &d.path().join("nope.txt"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope.txt"), "{err}");
    }

    #[test]
    fn size_mismatch_and_corrupt_files_name_the_file() {
        let d = tempfile::tempdir().unwrap();
        make(d.path(), &["a.jpg", "b.jpg"], &["b.jpg"]);
        GrayImage::new(3, 3)
            .save(d.path().join("masks").join("a.png"))
            .unwrap();
        let ds = Dataset::open(d.path()).unwrap();
        let err = ds.samples[0].load().unwrap_err().to_string();
        assert!(err.contains("a.png") && err.contains("3x3"), "{err}");
        std::fs::write(d.path().join("images").join("b.jpg"), b"\xff\xd8junk").unwrap();
        let err = ds.samples[1].load().unwrap_err().to_string();
        assert!(err.contains("b.jpg"), "{err}");
    }
}
