//! Training configuration (TOML). Unknown keys are errors that name the key.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::model::ModelConfig;

/// Where the data is and how the official training names are split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Dataset folder with `images/` and `masks/` (relative paths: to the working directory).
    pub root: PathBuf,
    /// Split file of the training names (relative paths: to `root`); validation is carved out.
    pub train_split: PathBuf,
    /// Split file of the held-out test names (relative paths: to `root`). Never used for
    /// model selection; only `eval` reads it.
    pub test_split: PathBuf,
    /// Fraction of the training names held out for validation.
    pub val_fraction: f64,
    /// Seed of the validation carve-out, the initialisation and the augmentation.
    pub seed: u64,
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
    /// Weight of the binary cross-entropy term of the loss.
    pub bce_weight: f64,
    /// Weight of the soft Dice term of the loss.
    pub dice_weight: f64,
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
        if t.lr_drop_epoch.is_some() != t.lr_after_drop.is_some() {
            bail!("[train] lr_drop_epoch and lr_after_drop go together");
        }
        if !(0.0..0.9).contains(&self.data.val_fraction) {
            bail!(
                "[data] val_fraction = {} must be in [0, 0.9)",
                self.data.val_fraction
            );
        }
        let a = &self.augment;
        if !(a.scale[0] > 0.0 && a.scale[0] <= a.scale[1]) {
            bail!(
                "[augment] scale = {:?} must be [min, max] with 0 < min <= max",
                a.scale
            );
        }
        Ok(())
    }

    /// A split path resolved against the dataset root.
    pub fn split_path(&self, split: &Path) -> PathBuf {
        if split.is_absolute() {
            split.to_path_buf()
        } else {
            self.data.root.join(split)
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

    const PRESETS: [&str; 2] = [
        include_str!("../configs/edge.toml"),
        include_str!("../configs/study.toml"),
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
    fn bad_values_are_refused() {
        let text = PRESETS[0].replace("input_size = ", "input_size = 1");
        assert!(TrainConfig::parse(&text).is_err());
    }
}
