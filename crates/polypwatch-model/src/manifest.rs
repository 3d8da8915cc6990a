//! The model manifest: the contract between the trainer that writes a model and the daemon
//! that runs it.
//!
//! A manifest is a TOML file beside the `.onnx`. It records how frames must be preprocessed,
//! what the output means, the decision threshold and the sha256 of the model file, so that a
//! model never runs with the wrong recipe and a damaged file is never loaded.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::detect::DetectConfig;
use crate::frames::OperatingPoint;
use crate::metrics::SetScores;
use crate::preprocess::Recipe;

/// The manifest format this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// Errors raised while reading or checking a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The manifest or model file could not be read.
    #[error("cannot read {path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The manifest is not valid TOML for this format (unknown key, wrong type, ...).
    #[error("invalid manifest {path}: {message}")]
    Parse {
        /// The manifest.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// The manifest was written by a newer or older, incompatible trainer.
    #[error(
        "manifest {path} has format_version {found}, this polypwatch reads {FORMAT_VERSION}: upgrade polypwatch or re-export the model"
    )]
    Version {
        /// The manifest.
        path: PathBuf,
        /// The version found.
        found: u32,
    },
    /// A field has a value the daemon cannot use.
    #[error("manifest {path}: {message}")]
    Invalid {
        /// The manifest.
        path: PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The model file is shorter than the manifest says (an interrupted copy).
    #[error("model file {path} is truncated: {actual} of {expected} bytes; copy it again")]
    Truncated {
        /// The model file.
        path: PathBuf,
        /// Bytes the manifest records.
        expected: u64,
        /// Bytes on disk.
        actual: u64,
    },
    /// The model file is not the one the manifest describes (damaged, truncated or swapped).
    #[error(
        "model file {path} has sha256 {actual} but its manifest expects {expected}: the file is damaged or does not belong to this manifest; reinstall the model"
    )]
    Sha256Mismatch {
        /// The model file.
        path: PathBuf,
        /// sha256 from the manifest.
        expected: String,
        /// sha256 of the file on disk.
        actual: String,
    },
}

/// Identity of the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelInfo {
    /// Short name, e.g. `polypwatch-edge`.
    pub name: String,
    /// Version string shown in logs and events.
    pub version: String,
    /// Architecture description, e.g. `deeplabv3plus-resnet18-w0.5-os16`.
    pub architecture: String,
    /// The ONNX file, relative to the manifest's folder.
    pub onnx: String,
    /// Lower-case hex sha256 of the ONNX file.
    pub sha256: String,
    /// Numeric precision of the weights and activations: `f32` or `int8`.
    pub precision: String,
    /// Size of the ONNX file in bytes, so a truncated copy is named as such.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

/// A frame shipped with the model and the mask the model must produce for it, checked before
/// a field update goes live. Both files sit beside the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelfTest {
    /// Image file (PNG at the model's input size).
    pub image: String,
    /// Its sha256.
    pub image_sha256: String,
    /// Expected mask (PNG, 0 or 255).
    pub mask: String,
    /// Its sha256.
    pub mask_sha256: String,
    /// Smallest IoU between the expected mask and the model's that passes.
    pub min_iou: f64,
}

/// Layout of the model input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputInfo {
    /// Channel order of the input planes; always `RGB`.
    pub channel_order: String,
    /// Tensor layout; always `NCHW` with N = 1.
    pub layout: String,
}

/// Meaning of the model output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputInfo {
    /// What each output value is: `logit` (apply a sigmoid for the polyp probability).
    pub meaning: String,
    /// Probability at or above which a pixel is polyp.
    pub threshold: f32,
}

/// Where the model came from, so that anyone can reproduce it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// Training data set.
    pub training_data: String,
    /// Training split and validation carve-out.
    pub split: String,
    /// Git commit of the trainer that produced the weights.
    pub trainer_commit: String,
    /// Version of tract the exported file was verified with.
    pub tract_version: String,
    /// Export time (RFC 3339, UTC).
    pub created: String,
    /// Training command and configuration file.
    #[serde(default)]
    pub command: String,
}

/// A model manifest, as stored next to the `.onnx`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Manifest format version ([`FORMAT_VERSION`]).
    pub format_version: u32,
    /// Identity of the model.
    pub model: ModelInfo,
    /// Input layout.
    pub input: InputInfo,
    /// Preprocessing recipe (size, resize filter, normalisation).
    pub preprocess: Recipe,
    /// Output meaning and decision threshold.
    pub output: OutputInfo,
    /// Where the model came from.
    pub provenance: Provenance,
    /// Self-test frame for field updates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selftest: Option<SelfTest>,
    /// The operating point chosen on validation data (`[detect]`): the daemon's detect
    /// settings unless its config overrides a key. Absent in manifests before 0.3.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect: Option<OperatingPoint>,
    /// Measured metrics per set (`train`, `validation`, `test`), if evaluated.
    #[serde(default)]
    pub metrics: BTreeMap<String, SetScores>,
}

/// Lower-case hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, ManifestError> {
    let io = |source| ManifestError::Io {
        path: path.to_path_buf(),
        error: source,
    };
    let mut f = crate::files::open_regular(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

impl Manifest {
    /// Parses and validates a manifest file (the model file is not touched).
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let text = crate::files::read_text(path, crate::files::TEXT_CAP).map_err(|source| {
            ManifestError::Io {
                path: path.to_path_buf(),
                error: source,
            }
        })?;
        let m = Self::parse(&text, path)?;
        Ok(m)
    }

    /// Parses and validates manifest text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ManifestError> {
        // Read the version first so an incompatible manifest gets the version message, not a
        // confusing complaint about a field that format changed.
        #[derive(Deserialize)]
        struct Probe {
            format_version: Option<u32>,
        }
        if let Ok(Probe {
            format_version: Some(v),
        }) = toml::from_str::<Probe>(text)
            && v != FORMAT_VERSION
        {
            return Err(ManifestError::Version {
                path: path.to_path_buf(),
                found: v,
            });
        }
        let m: Manifest = toml::from_str(text).map_err(|e| ManifestError::Parse {
            path: path.to_path_buf(),
            message: crate::files::toml_message(&e, text),
        })?;
        m.validate(path)?;
        Ok(m)
    }

    fn validate(&self, path: &Path) -> Result<(), ManifestError> {
        let bad = |message: String| ManifestError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        self.preprocess
            .validate()
            .map_err(|e| bad(format!("[preprocess] {e}")))?;
        if self.input.channel_order != "RGB" {
            return Err(bad(format!(
                "[input] channel_order = {:?}; only \"RGB\" is supported",
                self.input.channel_order
            )));
        }
        if self.input.layout != "NCHW" {
            return Err(bad(format!(
                "[input] layout = {:?}; only \"NCHW\" is supported",
                self.input.layout
            )));
        }
        if self.output.meaning != "logit" {
            return Err(bad(format!(
                "[output] meaning = {:?}; only \"logit\" is supported",
                self.output.meaning
            )));
        }
        let t = self.output.threshold;
        if !(t > 0.0 && t < 1.0) {
            return Err(bad(format!(
                "[output] threshold = {t} must lie strictly between 0 and 1"
            )));
        }
        if self.model.sha256.len() != 64
            || !self.model.sha256.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(bad(format!(
                "[model] sha256 = {:?} is not 64 hex digits",
                self.model.sha256
            )));
        }
        if !matches!(self.model.precision.as_str(), "f32" | "int8") {
            return Err(bad(format!(
                "[model] precision = {:?}; expected \"f32\" or \"int8\"",
                self.model.precision
            )));
        }
        if let Some(p) = &self.detect {
            p.detect_config(&DetectConfig::default())
                .validate()
                .map_err(bad)?;
        }
        let mut files = vec![("[model] onnx", &self.model.onnx)];
        if let Some(t) = &self.selftest {
            files.push(("[selftest] image", &t.image));
            files.push(("[selftest] mask", &t.mask));
            if !(t.min_iou > 0.0 && t.min_iou <= 1.0) {
                return Err(bad(format!(
                    "[selftest] min_iou = {} must be in (0, 1]",
                    t.min_iou
                )));
            }
        }
        for (key, name) in files {
            let p = Path::new(name);
            if p.is_absolute() || p.components().count() != 1 || name.starts_with('.') {
                return Err(bad(format!(
                    "{key} = {name:?} must be a file name in the manifest's folder"
                )));
            }
        }
        Ok(())
    }

    /// The detect settings this model brings: its operating point, else the built-in defaults
    /// with its `[output] threshold`.
    pub fn detect_config(&self) -> DetectConfig {
        crate::detect::DetectOverrides::default()
            .resolve(self.detect.as_ref(), self.output.threshold)
            .map(|r| r.cfg)
            // validate() checked the point; the defaults fit any valid point.
            .unwrap_or_default()
    }

    /// The ONNX file this manifest describes, next to the manifest at `manifest_path`.
    pub fn onnx_path(&self, manifest_path: &Path) -> PathBuf {
        manifest_path
            .parent()
            .unwrap_or(Path::new("."))
            .join(&self.model.onnx)
    }

    /// Checks the model file's sha256 against the manifest.
    pub fn verify_sha256(&self, manifest_path: &Path) -> Result<PathBuf, ManifestError> {
        let onnx = self.onnx_path(manifest_path);
        if let Some(expected) = self.model.bytes {
            let actual = std::fs::metadata(&onnx)
                .map_err(|source| ManifestError::Io {
                    path: onnx.clone(),
                    error: source,
                })?
                .len();
            if actual < expected {
                return Err(ManifestError::Truncated {
                    path: onnx,
                    expected,
                    actual,
                });
            }
        }
        let actual = sha256_file(&onnx)?;
        if !actual.eq_ignore_ascii_case(&self.model.sha256) {
            return Err(ManifestError::Sha256Mismatch {
                path: onnx,
                expected: self.model.sha256.clone(),
                actual,
            });
        }
        Ok(onnx)
    }

    /// Writes the manifest as TOML.
    pub fn save(&self, path: &Path) -> Result<(), ManifestError> {
        let text = toml::to_string_pretty(self).expect("a manifest always serialises");
        std::fs::write(path, text).map_err(|source| ManifestError::Io {
            path: path.to_path_buf(),
            error: source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            model: ModelInfo {
                name: "test".into(),
                version: "0.0.1".into(),
                architecture: "deeplabv3plus-test".into(),
                onnx: "m.onnx".into(),
                sha256: "0".repeat(64),
                precision: "f32".into(),
                bytes: None,
            },
            input: InputInfo {
                channel_order: "RGB".into(),
                layout: "NCHW".into(),
            },
            preprocess: Recipe::square(64),
            output: OutputInfo {
                meaning: "logit".into(),
                threshold: 0.5,
            },
            provenance: Provenance::default(),
            selftest: None,
            detect: None,
            metrics: BTreeMap::new(),
        }
    }

    #[test]
    fn round_trips_through_toml() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.toml");
        let m = sample();
        m.save(&p).unwrap();
        assert_eq!(Manifest::load(&p).unwrap(), m);
    }

    #[test]
    fn unknown_key_is_named() {
        let m = sample();
        let text = toml::to_string(&m)
            .unwrap()
            .replace("[output]", "[output]\nthreshhold = 0.4");
        let err = Manifest::parse(&text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("threshhold"), "{err}");
    }

    #[test]
    fn preprocess_statistics_are_three_finite_numbers() {
        let text = toml::to_string(&sample()).unwrap();
        let std_line = text.lines().find(|l| l.starts_with("std = ")).unwrap();
        let mean_line = text.lines().find(|l| l.starts_with("mean = ")).unwrap();
        for (bad, want) in [
            (
                text.replace(std_line, "std = [0.2, 0.2, 0.2, 0.2, 0.2, 0.2]"),
                "expected 3 values (R, G, B), found 6",
            ),
            (text.replace(mean_line, "mean = [nan, 0.5, 0.5]"), "finite"),
        ] {
            let err = Manifest::parse(&bad, Path::new("x.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn a_key_at_a_line_start_is_reported_on_its_own_line() {
        let text = toml::to_string(&sample())
            .unwrap()
            .replace("[output]\n", "[output]\nthreshhold = 0.4\n");
        let line = text
            .lines()
            .position(|l| l.starts_with("threshhold"))
            .unwrap()
            + 1;
        let err = Manifest::parse(&text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("(line {line})")), "{err}");
    }

    #[test]
    fn a_fifo_manifest_is_refused_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.toml");
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let err = Manifest::load(&p).unwrap_err().to_string();
        assert!(err.contains("FIFO"), "{err}");
    }

    #[test]
    fn other_format_version_is_refused() {
        let text = toml::to_string(&sample())
            .unwrap()
            .replace("format_version = 1", "format_version = 9");
        let err = Manifest::parse(&text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("format_version 9"), "{err}");
    }

    #[test]
    fn bad_threshold_and_path_escape_are_refused() {
        let mut m = sample();
        m.output.threshold = 1.5;
        let text = toml::to_string(&m).unwrap();
        assert!(Manifest::parse(&text, Path::new("x")).is_err());
        let mut m = sample();
        m.model.onnx = "../elsewhere.onnx".into();
        let text = toml::to_string(&m).unwrap();
        let err = Manifest::parse(&text, Path::new("x"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("manifest's folder"), "{err}");
    }

    #[test]
    fn sha256_mismatch_is_reported() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("m.onnx"), b"abc").unwrap();
        let mut m = sample();
        let mp = d.path().join("m.toml");
        // sha256("abc")
        m.model.sha256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".into();
        assert!(m.verify_sha256(&mp).is_ok());
        std::fs::write(d.path().join("m.onnx"), b"abd").unwrap();
        let err = m.verify_sha256(&mp).unwrap_err().to_string();
        assert!(err.contains("sha256") && err.contains("m.onnx"), "{err}");
    }
}
