//! Training configuration (TOML). Unknown keys are errors that name the key.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::model::ModelConfig;

/// Where the data is and how it is split.
///
/// Either one source, named by `root`, `train_split`, `test_split` and `val_fraction` (the
/// configs of model 0.2.0 and before), or several `[[data.sources]]` with a sampling weight
/// each and `negative_share` of every batch drawn from the polyp-free ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Single-source form: the dataset folder with `images/` and `masks/` (relative paths: to
    /// the working directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<PathBuf>,
    /// Single-source form: split file of the training names (relative paths: to `root`);
    /// validation is carved out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_split: Option<PathBuf>,
    /// Single-source form: split file of the held-out test names (relative paths: to `root`).
    /// Never used for model selection; only `eval` reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_split: Option<PathBuf>,
    /// Single-source form: fraction of the training names held out for validation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_fraction: Option<f64>,
    /// Seed of the carve-outs, the initialisation and the augmentation.
    pub seed: u64,
    /// Several sources (instead of `root` and its splits).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceConfig>,
    /// Share of every training batch drawn from the `polyp_free` sources (0 without one).
    #[serde(default)]
    pub negative_share: f64,
}

/// One dataset of a multi-source configuration (`[[data.sources]]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Short name: prefixes the split files written into the run folder and the report rows.
    pub name: String,
    /// Folder with `images/` and `masks/` (relative: to the working directory).
    pub root: PathBuf,
    /// Split file of the names training and validation are drawn from (relative: to `root`);
    /// every image of the folder without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_split: Option<PathBuf>,
    /// Split file of the held-out test names (relative: to `root`); without one, a seeded
    /// `test_fraction` carve-out is the test set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_split: Option<PathBuf>,
    /// Fraction of the names held out for validation.
    #[serde(default)]
    pub val_fraction: f64,
    /// Fraction of the names held out for test (only without `test_split`).
    #[serde(default)]
    pub test_fraction: f64,
    /// Sampling weight: expected draws of each training image per epoch (polyp sources).
    #[serde(default = "one")]
    pub weight: f64,
    /// Every mask is empty: the source feeds the `negative_share` of each batch and is scored
    /// by frame specificity, not by mask overlap.
    #[serde(default)]
    pub polyp_free: bool,
    /// Polyp sources: also cut from each training image the largest square away from its
    /// mask (at least 96 input pixels a side) and add it to the polyp-free pool, so that
    /// "polyp-free" is not learnt as "another centre's look".
    #[serde(default)]
    pub free_crops: bool,
}

fn one() -> f64 {
    1.0
}

impl DataConfig {
    /// The sources, the single-source form turned into one source named `data`.
    pub fn sources(&self) -> Vec<SourceConfig> {
        if !self.sources.is_empty() {
            return self.sources.clone();
        }
        vec![SourceConfig {
            name: "data".into(),
            root: self.root.clone().unwrap_or_default(),
            train_split: self.train_split.clone(),
            test_split: self.test_split.clone(),
            val_fraction: self.val_fraction.unwrap_or(0.0),
            test_fraction: 0.0,
            weight: 1.0,
            polyp_free: false,
            free_crops: false,
        }]
    }

    /// Whether this is the single-source form.
    pub fn single(&self) -> bool {
        self.sources.is_empty()
    }

    fn validate(&self) -> Result<()> {
        let legacy = self.root.is_some()
            || self.train_split.is_some()
            || self.test_split.is_some()
            || self.val_fraction.is_some();
        if legacy && !self.sources.is_empty() {
            bail!(
                "[data] root/train_split/test_split/val_fraction and [[data.sources]] exclude each other: move them into a [[data.sources]] table"
            );
        }
        if self.sources.is_empty() {
            for (k, missing) in [
                ("root", self.root.is_none()),
                ("train_split", self.train_split.is_none()),
                ("test_split", self.test_split.is_none()),
                ("val_fraction", self.val_fraction.is_none()),
            ] {
                if missing {
                    bail!(
                        "[data] {k} is missing: give root, train_split, test_split and val_fraction, or [[data.sources]] tables"
                    );
                }
            }
            if self.negative_share != 0.0 {
                bail!(
                    "[data] negative_share needs [[data.sources]] with a polyp_free = true source"
                );
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for s in self.sources() {
            let n = &s.name;
            if n.is_empty()
                || !n
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                bail!("[[data.sources]] name = {n:?} must be letters, digits, '-' or '_'");
            }
            if !names.insert(n.clone()) {
                bail!("[[data.sources]] name = {n:?} appears twice");
            }
            let held = s.val_fraction + s.test_fraction;
            if !(0.0..0.9).contains(&s.val_fraction)
                || !(0.0..0.9).contains(&s.test_fraction)
                || held >= 0.9
            {
                bail!(
                    "source {n}: val_fraction = {} and test_fraction = {} must be >= 0 and hold out less than 0.9 together",
                    s.val_fraction,
                    s.test_fraction
                );
            }
            if s.test_split.is_some() && s.test_fraction > 0.0 {
                bail!("source {n}: give test_split or test_fraction, not both");
            }
            if s.free_crops && s.polyp_free {
                bail!("source {n}: free_crops is for polyp sources (polyp_free = false)");
            }
            if s.free_crops && self.negative_share == 0.0 {
                bail!("source {n}: free_crops needs [data] negative_share > 0");
            }
            if !(s.weight >= 0.0 && s.weight <= 100.0) {
                bail!("source {n}: weight = {} must be in [0, 100]", s.weight);
            }
        }
        let has_neg = self.sources.iter().any(|s| s.polyp_free || s.free_crops);
        if !self.sources.is_empty() && !self.sources.iter().any(|s| !s.polyp_free && s.weight > 0.0)
        {
            bail!(
                "[[data.sources]]: at least one polyp source (polyp_free = false) needs weight > 0"
            );
        }
        if !(0.0..0.9).contains(&self.negative_share) {
            bail!(
                "[data] negative_share = {} must be in [0, 0.9)",
                self.negative_share
            );
        }
        if has_neg != (self.negative_share > 0.0) {
            bail!(
                "[data] negative_share = {} but {} polyp_free or free_crops source: set both or neither",
                self.negative_share,
                if has_neg { "a" } else { "no" }
            );
        }
        Ok(())
    }
}

/// Optimisation schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Evaluation and inference size (square, multiple of 16).
    pub input_size: u32,
    /// Side of the square training crops (multiple of 16, at most `input_size`); training on
    /// crops is cheaper, and the network is fully convolutional. Defaults to `input_size`.
    #[serde(default)]
    pub crop: Option<u32>,
    /// Number of epochs.
    pub epochs: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Initial learning rate of Adam.
    pub lr: f64,
    /// Power of the polynomial decay over all steps (0 = constant).
    pub poly_power: f64,
    /// From this epoch on (0-based), the base learning rate becomes `lr_after_drop`.
    #[serde(default)]
    pub lr_drop_epoch: Option<usize>,
    /// Base learning rate after `lr_drop_epoch`.
    #[serde(default)]
    pub lr_after_drop: Option<f64>,
    /// Linear warm-up steps at the start.
    #[serde(default)]
    pub warmup_steps: usize,
    /// L2 weight decay (Adam), 0 for none.
    #[serde(default)]
    pub weight_decay: f64,
    /// Weights to start from instead of a random initialisation: a `.bpk` of this same
    /// architecture, e.g. an earlier run's `best.bpk` (fine-tuning, a warm restart of the
    /// schedule), or an f32 `.onnx` exported from it (see [`crate::import`]). Relative to the
    /// working directory, like the data roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<std::path::PathBuf>,
    /// Batch norm on its running statistics in training too, not each batch's (for
    /// fine-tuning from `init`; see `kernels::set_batch_norm_frozen`). Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub freeze_bn: bool,
    /// Weight of the binary cross-entropy term of the loss.
    pub bce_weight: f64,
    /// Weight of the soft Dice term of the loss.
    pub dice_weight: f64,
    /// Makes the Dice term a Tversky one: the share of its penalty on missed polyp pixels
    /// (false negatives), the rest on false positives. Above 0.5 it favours recall, e.g. on
    /// small polyps. Absent: 0.5, soft Dice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tversky_beta: Option<f64>,
}

impl TrainSection {
    /// The Tversky term's false-negative share (0.5: soft Dice).
    pub fn tversky_beta(&self) -> f64 {
        self.tversky_beta.unwrap_or(0.5)
    }
}

/// Augmentation applied to training crops.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AugmentConfig {
    /// Random zoom range [min, max] (1 = none).
    pub scale: [f32; 2],
    /// Random rotation in degrees, uniform in [-r, r].
    pub rotate_degrees: f32,
    /// Random horizontal flips.
    pub hflip: bool,
    /// Random vertical flips.
    pub vflip: bool,
    /// Random shift of the crop centre, as a fraction of the image size.
    pub shift: f32,
    /// Brightness jitter: factor in [1 - b, 1 + b].
    pub brightness: f32,
    /// Contrast jitter: factor in [1 - c, 1 + c].
    pub contrast: f32,
    /// Saturation jitter: factor in [1 - s, 1 + s].
    pub saturation: f32,
}

/// A whole training configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Data location and split.
    pub data: DataConfig,
    /// Architecture.
    pub model: ModelConfig,
    /// Schedule.
    pub train: TrainSection,
    /// Augmentation.
    pub augment: AugmentConfig,
}

impl TrainConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read training config {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid training config {}", path.display()))
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Self> {
        let cfg: TrainConfig =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.message()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        self.model.validate().map_err(anyhow::Error::msg)?;
        let t = &self.train;
        if t.input_size < 32 || !t.input_size.is_multiple_of(16) {
            bail!(
                "[train] input_size = {} must be a multiple of 16, at least 32",
                t.input_size
            );
        }
        if let Some(c) = t.crop
            && (c < 32 || !c.is_multiple_of(16) || c > t.input_size)
        {
            bail!("[train] crop = {c} must be a multiple of 16 in 32..=input_size");
        }
        if t.batch_size < 2 {
            bail!(
                "[train] batch_size = {} must be at least 2 (batch norm)",
                t.batch_size
            );
        }
        if t.epochs == 0 {
            bail!("[train] epochs must be at least 1");
        }
        if !(t.lr > 0.0 && t.lr < 1.0) {
            bail!("[train] lr = {} must be in (0, 1)", t.lr);
        }
        if let Some(b) = t.tversky_beta
            && !(b > 0.0 && b < 1.0)
        {
            bail!("[train] tversky_beta = {b} must be in (0, 1) (0.5 is soft Dice)");
        }
        if t.lr_drop_epoch.is_some() != t.lr_after_drop.is_some() {
            bail!("[train] lr_drop_epoch and lr_after_drop go together");
        }
        self.data.validate()?;
        let a = &self.augment;
        if !(a.scale[0] > 0.0 && a.scale[0] <= a.scale[1]) {
            bail!(
                "[augment] scale = {:?} must be [min, max] with 0 < min <= max",
                a.scale
            );
        }
        Ok(())
    }

    /// Replaces the data root (`--data`): the single-source root, or the folder the
    /// sources' relative roots are taken from.
    pub fn set_data_root(&mut self, dir: &Path) {
        if self.data.single() {
            self.data.root = Some(dir.to_path_buf());
        } else {
            for s in &mut self.data.sources {
                if let Some(name) = s.root.file_name() {
                    s.root = dir.join(name);
                }
            }
        }
    }

    /// Learning rate at `epoch` (0-based) and global step `step` of `total_steps`.
    pub fn lr_at(&self, epoch: usize, step: usize, total_steps: usize) -> f64 {
        let t = &self.train;
        let base = match (t.lr_drop_epoch, t.lr_after_drop) {
            (Some(e), Some(lr)) if epoch >= e => lr,
            _ => t.lr,
        };
        let progress = (step as f64 / total_steps.max(1) as f64).min(1.0);
        let poly = (1.0 - progress).powf(t.poly_power);
        let warm = if step < t.warmup_steps {
            (step + 1) as f64 / t.warmup_steps as f64
        } else {
            1.0
        };
        base * poly * warm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRESETS: [&str; 7] = [
        include_str!("../configs/edge.toml"),
        include_str!("../configs/study.toml"),
        include_str!("../configs/edge-multi.toml"),
        include_str!("../configs/edge-multi-long.toml"),
        include_str!("../configs/edge-multi-ft.toml"),
        include_str!("../configs/edge-multi-ft-frozen.toml"),
        include_str!("../configs/edge-multi-w0625.toml"),
    ];

    #[test]
    fn presets_parse() {
        for p in PRESETS {
            TrainConfig::parse(p).unwrap();
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let text = PRESETS[0].replace("[augment]", "[augment]\nhue = 0.1");
        let err = format!("{:#}", TrainConfig::parse(&text).unwrap_err());
        assert!(err.contains("hue"), "{err}");
    }

    #[test]
    fn study_schedule_drops_after_epoch_20() {
        let cfg = TrainConfig::parse(PRESETS[1]).unwrap();
        assert!((cfg.lr_at(0, 0, 1000) - 1e-4).abs() < 1e-12);
        let before = cfg.lr_at(19, 500, 1000);
        let after = cfg.lr_at(20, 500, 1000);
        assert!((before - 1e-4 * 0.5f64.powf(0.9)).abs() < 1e-12);
        assert!((after - 1e-5 * 0.5f64.powf(0.9)).abs() < 1e-12);
    }

    #[test]
    fn single_source_form_is_one_source() {
        let cfg = TrainConfig::parse(PRESETS[0]).unwrap();
        let s = cfg.data.sources();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].root, Path::new("../shared/datasets/kvasir-seg"));
        assert_eq!(s[0].val_fraction, 0.1);
        assert!(!s[0].polyp_free);
    }

    #[test]
    fn multi_source_mistakes_name_the_key() {
        let multi = PRESETS[2];
        for (text, key) in [
            // Both forms at once.
            (
                multi.replace("seed = 42", "seed = 42\nroot = \"x\""),
                "[[data.sources]]",
            ),
            // A polyp-free source but no share of the batch for it.
            (multi.replace("negative_share = 0.25", ""), "negative_share"),
            (
                multi.replace("name = \"bkai\"", "name = \"kvasir\""),
                "twice",
            ),
            (
                multi.replace("test_fraction = 0.1\npolyp", "test_fraction = 0.85\npolyp"),
                "test_fraction",
            ),
            (
                multi.replace("polyp_free = true", "polyp_free = true\nhue = 1"),
                "hue",
            ),
            // The single-source form with a key missing.
            (
                PRESETS[0].replace("val_fraction = 0.1\n", ""),
                "val_fraction",
            ),
        ] {
            let err = format!("{:#}", TrainConfig::parse(&text).unwrap_err());
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn bad_values_are_refused() {
        let text = PRESETS[0].replace("input_size = ", "input_size = 1");
        assert!(TrainConfig::parse(&text).is_err());
        for (beta, ok) in [("0.7", true), ("1.0", false), ("0", false)] {
            let text =
                PRESETS[0].replace("[train]\n", &format!("[train]\ntversky_beta = {beta}\n"));
            let parsed = TrainConfig::parse(&text);
            assert_eq!(parsed.is_ok(), ok, "tversky_beta = {beta}: {parsed:?}");
            if let Err(e) = parsed {
                assert!(format!("{e:#}").contains("tversky_beta"), "{e:#}");
            }
        }
    }
}
