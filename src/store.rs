//! Field updates: signed models installed into a state folder, verified before they go live,
//! with the previous model kept for rollback.
//!
//! ```text
//! <state_dir>/models/<name>-<version>-<precision>-<sha8>/   one installed model (manifest,
//!                                                          .sig, .onnx, self-test files)
//! <state_dir>/models/current  -> <one of them>             symlinks, swapped by rename(2)
//! <state_dir>/models/previous -> <one of them>
//! <state_dir>/incoming/    bundles dropped here are installed on SIGHUP
//! <state_dir>/rejected/    what failed, with reason.txt
//! ```
//!
//! An install copies the bundle into a staging folder (fsynced), verifies the copy (signature,
//! hashes, tract load and shapes, self-test frame), renames it into place and only then swaps
//! the `current` link, so power loss at any point leaves the old model active.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::config::UpdateSection;
use crate::manifest::{self, Manifest, ManifestError, SelfTest};
use crate::model::{ModelError, Segmenter, sigmoid};
use crate::signing::{PublicKey, SignError, SignatureFile};

/// Why a model bundle was refused.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A file of the bundle is missing or unreadable.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// No signature beside the manifest.
    #[error("{path} is not signed: no {path}.sig beside it (sign it with `polypwatch-train sign`)")]
    Unsigned {
        /// The manifest.
        path: PathBuf,
    },
    /// The signature is wrong or from an untrusted key.
    #[error("{path}: {source}")]
    Signature {
        /// The manifest.
        path: PathBuf,
        /// What is wrong with it.
        source: SignError,
    },
    /// The manifest is invalid or a file does not match its hash.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// tract cannot load the model, or its shapes differ from the manifest.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The manifest has no self-test.
    #[error("{path} has no [selftest]: add one with `polypwatch-train selftest` before signing")]
    NoSelfTest {
        /// The manifest.
        path: PathBuf,
    },
    /// The model does not reproduce the self-test mask.
    #[error(
        "self-test failed: mask IoU {iou:.4} with the expected mask, below {min}: the model does not behave as it did when exported"
    )]
    SelfTest {
        /// IoU measured.
        iou: f64,
        /// Threshold.
        min: f64,
    },
    /// The store itself cannot be written.
    #[error("model store {path}: {source}")]
    Store {
        /// The folder or file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A model that passed every check.
#[derive(Debug)]
pub struct Verified {
    /// The loaded model, ready to serve.
    pub segmenter: Segmenter,
    /// The key that signed it.
    pub key: PublicKey,
    /// Self-test IoU.
    pub selftest_iou: f64,
}

/// A bundle that was installed and made current.
#[derive(Debug, Clone)]
pub struct Installed {
    /// Its manifest in the store.
    pub manifest: PathBuf,
    /// `name version (precision)`.
    pub label: String,
    /// Fingerprint of the key that signed it.
    pub key: String,
    /// Self-test IoU.
    pub selftest_iou: f64,
}

/// One installed model, as `model list` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Its folder.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: PathBuf,
    /// `name version (precision)`, or why the manifest cannot be read.
    pub label: String,
    /// The active one.
    pub current: bool,
    /// The one `rollback` returns to.
    pub previous: bool,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Store {
        path: path.to_path_buf(),
        source,
    }
}

fn read(path: &Path) -> Result<Vec<u8>, InstallError> {
    fs::read(path).map_err(|source| InstallError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn sig_path(manifest: &Path) -> PathBuf {
    let mut s = manifest.as_os_str().to_owned();
    s.push(".sig");
    PathBuf::from(s)
}

/// The manifest file name every installed model folder uses.
const MANIFEST: &str = "manifest.toml";

/// Mask of a model's logits at its threshold.
fn mask_of(logits: &[f32], threshold: f32) -> impl Iterator<Item = bool> + '_ {
    logits.iter().map(move |&l| sigmoid(l) >= threshold)
}

/// Runs the self-test of a loaded model whose manifest lies at `manifest_path`.
pub fn run_selftest(
    seg: &Segmenter,
    manifest_path: &Path,
    t: &SelfTest,
) -> Result<f64, InstallError> {
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
        image::open(dir.join(name)).map_err(|e| InstallError::Io {
            path: dir.join(name),
            source: std::io::Error::other(e.to_string()),
        })
    };
    let img = load(&t.image)?.into_rgb8();
    let expected = load(&t.mask)?.into_luma8();
    let logits = seg.logits_for(&img)?;
    let r = &seg.manifest().preprocess;
    if expected.dimensions() != (r.width, r.height) {
        return Err(InstallError::Io {
            path: dir.join(&t.mask),
            source: std::io::Error::other(format!(
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
        return Err(InstallError::SelfTest {
            iou,
            min: t.min_iou,
        });
    }
    Ok(iou)
}

/// Verifies a model bundle where it lies: signature over the manifest's bytes, hashes, tract
/// load and shapes, and the self-test.
pub fn verify(manifest_path: &Path, keys: &[PublicKey]) -> Result<Verified, InstallError> {
    let bytes = read(manifest_path)?;
    let sig_file = sig_path(manifest_path);
    let sig_text = match fs::read_to_string(&sig_file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(InstallError::Unsigned {
                path: manifest_path.to_path_buf(),
            });
        }
        Err(source) => {
            return Err(InstallError::Io {
                path: sig_file,
                source,
            });
        }
    };
    let sig_err = |source| InstallError::Signature {
        path: manifest_path.to_path_buf(),
        source,
    };
    let key = SignatureFile::parse(&sig_text)
        .and_then(|s| s.verify(&bytes, keys))
        .map_err(sig_err)?;
    let text = String::from_utf8_lossy(&bytes);
    let m = Manifest::parse(&text, manifest_path)?;
    let Some(t) = m.selftest.clone() else {
        return Err(InstallError::NoSelfTest {
            path: manifest_path.to_path_buf(),
        });
    };
    let segmenter = Segmenter::load(manifest_path)?;
    let selftest_iou = run_selftest(&segmenter, manifest_path, &t)?;
    Ok(Verified {
        segmenter,
        key,
        selftest_iou,
    })
}

fn fsync_dir(dir: &Path) -> Result<(), InstallError> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dir))
}

fn copy_synced(from: &Path, to: &Path) -> Result<(), InstallError> {
    let data = read(from)?;
    let mut f = fs::File::create(to).map_err(io_err(to))?;
    f.write_all(&data).map_err(io_err(to))?;
    f.sync_all().map_err(io_err(to))
}

/// The state folder.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    keys: Vec<PublicKey>,
}

impl Store {
    /// Opens (and creates) the state folder's layout.
    pub fn open(cfg: &UpdateSection) -> Result<Self, InstallError> {
        let keys = cfg
            .trusted_keys
            .iter()
            .map(|k| PublicKey::parse(k))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| InstallError::Signature {
                path: "[update] trusted_keys".into(),
                source,
            })?;
        let s = Store {
            root: cfg.state_dir.clone(),
            keys,
        };
        for d in [s.models(), s.incoming(), s.rejected()] {
            fs::create_dir_all(&d).map_err(io_err(&d))?;
        }
        Ok(s)
    }

    fn models(&self) -> PathBuf {
        self.root.join("models")
    }
    /// Where bundles to install on SIGHUP are dropped.
    pub fn incoming(&self) -> PathBuf {
        self.root.join("incoming")
    }
    /// Where refused bundles are moved, each with a `reason.txt`.
    pub fn rejected(&self) -> PathBuf {
        self.root.join("rejected")
    }
    /// The trusted keys.
    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    fn link(&self, name: &str) -> Option<PathBuf> {
        let target = fs::read_link(self.models().join(name)).ok()?;
        let dir = self.models().join(target);
        dir.join(MANIFEST).is_file().then_some(dir)
    }

    /// The active installed model's manifest, if any (else the factory model serves).
    pub fn current(&self) -> Option<PathBuf> {
        self.link("current").map(|d| d.join(MANIFEST))
    }

    /// Points `name` at `dir` (a folder name in models/) with an atomic rename.
    fn set_link(&self, name: &str, dir: Option<&Path>) -> Result<(), InstallError> {
        let models = self.models();
        let link = models.join(name);
        match dir {
            Some(dir) => {
                let tmp = models.join(format!(".{name}.tmp-{}", std::process::id()));
                let _ = fs::remove_file(&tmp);
                let target = dir.file_name().map(PathBuf::from).unwrap_or_default();
                std::os::unix::fs::symlink(&target, &tmp).map_err(io_err(&tmp))?;
                fs::rename(&tmp, &link).map_err(io_err(&link))?;
            }
            None => match fs::remove_file(&link) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io_err(&link)(e));
                }
                _ => {}
            },
        }
        fsync_dir(&models)
    }

    /// Copies, verifies and activates a bundle (its manifest path; the `.sig`, `.onnx` and
    /// self-test files lie beside it). On failure the staged copy goes to `rejected/` with the
    /// reason, and the active model is untouched.
    pub fn install(&self, manifest_path: &Path) -> Result<Installed, InstallError> {
        let staging = self
            .models()
            .join(format!(".staging-{}-{}", std::process::id(), unix_ms()));
        fs::create_dir_all(&staging).map_err(io_err(&staging))?;
        let result = self.stage_and_verify(manifest_path, &staging);
        match result {
            Ok(v) => {
                let m = v.segmenter.manifest();
                let name = format!(
                    "{}-{}-{}-{}",
                    m.model.name,
                    m.model.version,
                    m.model.precision,
                    &m.model.sha256[..8]
                );
                let dir = self.models().join(sanitize(&name));
                if dir.join(MANIFEST).is_file() {
                    // Reinstalling the same model: keep the copy already verified in place.
                    let _ = fs::remove_dir_all(&staging);
                } else {
                    let _ = fs::remove_dir_all(&dir);
                    fs::rename(&staging, &dir).map_err(io_err(&dir))?;
                    fsync_dir(&self.models())?;
                }
                let old = self.link("current");
                if let Some(old) = old.filter(|o| o.file_name() != dir.file_name()) {
                    self.set_link("previous", Some(&old))?;
                }
                self.set_link("current", Some(&dir))?;
                Ok(Installed {
                    manifest: dir.join(MANIFEST),
                    label: format!(
                        "{} {} ({})",
                        m.model.name, m.model.version, m.model.precision
                    ),
                    key: v.key.id(),
                    selftest_iou: v.selftest_iou,
                })
            }
            Err(e) => {
                self.reject(&staging, manifest_path, &e);
                Err(e)
            }
        }
    }

    fn stage_and_verify(&self, src: &Path, staging: &Path) -> Result<Verified, InstallError> {
        let staged = staging.join(MANIFEST);
        copy_synced(src, &staged)?;
        let sig = sig_path(src);
        if sig.exists() {
            copy_synced(&sig, &sig_path(&staged))?;
        }
        // Copy what the manifest names, if it parses; verification says what is wrong.
        if let Ok(m) = Manifest::load(src) {
            let dir = src.parent().unwrap_or(Path::new("."));
            let mut names = vec![m.model.onnx.clone()];
            if let Some(t) = &m.selftest {
                names.extend([t.image.clone(), t.mask.clone()]);
            }
            for n in names {
                copy_synced(&dir.join(&n), &staging.join(&n))?;
            }
        }
        fsync_dir(staging)?;
        verify(&staged, &self.keys)
    }

    fn reject(&self, staging: &Path, src: &Path, e: &InstallError) {
        let stem = src
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dest = self
            .rejected()
            .join(format!("{}-{}", unix_ms(), sanitize(&stem)));
        let _ = fs::write(
            staging.join("reason.txt"),
            format!("{}\nfrom {}\n", e, src.display()),
        );
        if let Err(err) = fs::rename(staging, &dest) {
            log::warn!("cannot move {} aside: {err}", staging.display());
            let _ = fs::remove_dir_all(staging);
        }
    }

    /// Installs every bundle in `incoming/` (oldest name first) and empties it; what failed is
    /// in `rejected/`. Returns each manifest with its outcome; the last success is active.
    pub fn install_incoming(&self) -> Vec<(PathBuf, Result<Installed, InstallError>)> {
        let inc = self.incoming();
        let mut manifests: Vec<PathBuf> = fs::read_dir(&inc)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        manifests.sort();
        let mut out = Vec::new();
        for m in manifests {
            let result = self.install(&m);
            // The bundle now lives in models/ or rejected/.
            let mut files = vec![sig_path(&m)];
            if let Ok(man) = Manifest::load(&m) {
                files.push(inc.join(&man.model.onnx));
                if let Some(t) = &man.selftest {
                    files.extend([inc.join(&t.image), inc.join(&t.mask)]);
                }
            }
            files.push(m.clone());
            for f in files {
                let _ = fs::remove_file(f);
            }
            out.push((m, result));
        }
        out
    }

    /// Installed models, newest folder name last.
    pub fn list(&self) -> Vec<Entry> {
        let (cur, prev) = (self.link("current"), self.link("previous"));
        let mut v: Vec<Entry> = fs::read_dir(self.models())
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_type().is_ok_and(|t| t.is_dir())
                    && !e.file_name().to_string_lossy().starts_with('.')
            })
            .map(|e| {
                let dir = e.path();
                let manifest = dir.join(MANIFEST);
                let label = match Manifest::load(&manifest) {
                    Ok(m) => format!(
                        "{} {} ({})",
                        m.model.name, m.model.version, m.model.precision
                    ),
                    Err(e) => format!("unreadable: {e}"),
                };
                Entry {
                    current: cur.as_deref() == Some(dir.as_path()),
                    previous: prev.as_deref() == Some(dir.as_path()),
                    dir,
                    manifest,
                    label,
                }
            })
            .collect();
        v.sort_by(|a, b| a.dir.cmp(&b.dir));
        v
    }

    /// Makes the previous model current again (and the current one previous). With no
    /// previous model, the factory model takes over. Returns the manifest now active, if any.
    pub fn rollback(&self) -> Result<Option<PathBuf>, InstallError> {
        let (cur, prev) = (self.link("current"), self.link("previous"));
        match prev {
            Some(p) => {
                self.set_link("current", Some(&p))?;
                self.set_link("previous", cur.as_deref())?;
                Ok(Some(p.join(MANIFEST)))
            }
            None => {
                self.set_link("current", None)?;
                Ok(None)
            }
        }
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Milliseconds since the Unix epoch (0 if the clock is before it), for unique file names.
pub(crate) fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// Adds a self-test to a manifest: runs the model on `image` (resized to the input size),
/// saves the frame and the mask beside the manifest and records their hashes. The manifest is
/// rewritten, so sign it afterwards.
pub fn attach_selftest(
    manifest_path: &Path,
    image: &image::RgbImage,
    min_iou: f64,
) -> Result<f64, InstallError> {
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
        move |e: image::ImageError| InstallError::Store {
            path: p,
            source: std::io::Error::other(e.to_string()),
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
