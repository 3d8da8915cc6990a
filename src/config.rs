//! The daemon's TOML configuration. Every key is documented in `polypwatch.example.toml`;
//! unknown keys are rejected naming the key, and values are range-checked.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::alert::AlertConfig;
use crate::detect::DetectOverrides;
use crate::gpio::GpioConfig;
use crate::pixfmt::PixelFormat;

/// Errors raised while reading a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The TOML is malformed or has an unknown key or a wrong type.
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with the line.
        message: String,
    },
    /// A value is out of range.
    #[error("config {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Which key and why.
        message: String,
    },
    /// `polypwatch` with no arguments found no demo to run.
    #[error("no demo configuration found (looked for {looked}): run with --config FILE")]
    NoDemo {
        /// The paths tried, in order.
        looked: String,
    },
}

/// `[model]`: which model to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// The model manifest (relative paths: to the config file's folder).
    pub manifest: PathBuf,
}

/// `[source]`: where frames come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSection {
    /// `replay` (a folder of images or a list file) or `v4l2` (a camera).
    pub kind: SourceKind,
    /// Replay: folder of frames (sorted by name) or a text file listing one frame path per line
    /// (relative paths: to the config file's folder).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Frames per second: the replay's pace (0 = as fast as the pipeline takes them), or the
    /// rate asked of the camera.
    #[serde(default = "default_fps")]
    pub fps: f64,
    /// Replay: start over at the end.
    #[serde(default)]
    pub r#loop: bool,
    /// V4L2: the device, best its stable `/dev/v4l/by-id/...` link.
    #[serde(default)]
    pub device: Option<PathBuf>,
    /// V4L2: `mjpeg`, `yuyv`, `nv12`, `rgb24` or `bgr24`; absent: the first the device offers.
    #[serde(default)]
    pub format: Option<PixelFormat>,
    /// V4L2: requested width (the driver may pick the nearest it supports; both are logged).
    #[serde(default = "default_width")]
    pub width: u32,
    /// V4L2: requested height.
    #[serde(default = "default_height")]
    pub height: u32,
}

fn default_fps() -> f64 {
    25.0
}
fn default_width() -> u32 {
    1280
}
fn default_height() -> u32 {
    1024
}

/// Frame source kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// Images from disk.
    Replay,
    /// A V4L2 capture device.
    V4l2,
}

/// `[update]`: signed model updates installed in the field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateSection {
    /// State folder holding installed models (`models/`), `incoming/` and `rejected/`.
    pub state_dir: PathBuf,
    /// Public keys allowed to sign models, as written by `polypwatch-train keygen`
    /// (`ed25519:<base64>`).
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// Installed models kept in the store (at least 1): the current one and those `model
    /// rollback` reaches first; older ones are pruned after each install.
    #[serde(default = "default_keep_models")]
    pub keep_models: usize,
    /// Refused bundles kept in `rejected/` (newest first; 0 keeps none, the reason is still
    /// logged).
    #[serde(default = "default_keep_rejected")]
    pub keep_rejected: usize,
}

fn default_keep_models() -> usize {
    3
}

fn default_keep_rejected() -> usize {
    5
}

impl UpdateSection {
    /// A section with these folder and keys and the default counts.
    pub fn new(state_dir: PathBuf, trusted_keys: Vec<String>) -> Self {
        UpdateSection {
            state_dir,
            trusted_keys,
            keep_models: default_keep_models(),
            keep_rejected: default_keep_rejected(),
        }
    }
}

/// `[events]`: where alert events go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsSection {
    /// Write JSON-lines events to standard output.
    #[serde(default = "yes")]
    pub stdout: bool,
    /// Also append JSON-lines events to this file.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Log to the systemd journal: `auto` (when its socket exists), `on` or `off` (stderr).
    #[serde(default)]
    pub journald: Journald,
    /// Log level: error, warn, info, debug (debug shows candidate frames).
    #[serde(default = "default_level")]
    pub level: String,
}

fn yes() -> bool {
    true
}
fn default_level() -> String {
    "info".into()
}

/// Journal use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Journald {
    /// Use the journal when `/run/systemd/journal/socket` exists.
    #[default]
    Auto,
    /// Always the journal.
    On,
    /// Never: log to stderr.
    Off,
}

impl Default for EventsSection {
    fn default() -> Self {
        EventsSection {
            stdout: true,
            file: None,
            journald: Journald::Auto,
            level: default_level(),
        }
    }
}

/// `[snapshots]`: overlay images saved for every alert, for audit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotsSection {
    /// Folder for snapshots; none disables them.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Disk quota of the folder in MiB; the oldest snapshots are deleted first.
    #[serde(default = "default_quota")]
    pub quota_mib: u64,
}

fn default_quota() -> u64 {
    256
}

impl SnapshotsSection {
    /// The quota in bytes (a quota too large for 64 bits is no limit, not a wrapped tiny one).
    pub fn quota_bytes(&self) -> u64 {
        self.quota_mib.saturating_mul(1 << 20)
    }
}

impl Default for SnapshotsSection {
    fn default() -> Self {
        SnapshotsSection {
            dir: None,
            quota_mib: default_quota(),
        }
    }
}

/// `[runtime]`: threads and pacing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSection {
    /// Seconds without a processed frame after which the watchdog stops being fed.
    #[serde(default = "default_stall")]
    pub stall_secs: f64,
    /// Interval between STATUS= updates to systemd, in seconds.
    #[serde(default = "default_status")]
    pub status_secs: f64,
    /// Threads tract may use for one inference (read at start; a reload keeps the old value).
    #[serde(default = "default_threads")]
    pub threads: usize,
}

fn default_threads() -> usize {
    1
}

fn default_stall() -> f64 {
    5.0
}
fn default_status() -> f64 {
    5.0
}

impl Default for RuntimeSection {
    fn default() -> Self {
        RuntimeSection {
            stall_secs: default_stall(),
            status_secs: default_status(),
            threads: default_threads(),
        }
    }
}

/// The whole daemon configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Model.
    pub model: ModelSection,
    /// Frame source.
    pub source: SourceSection,
    /// Detection.
    #[serde(default)]
    pub detect: DetectOverrides,
    /// Alert hysteresis.
    #[serde(default)]
    pub alert: AlertConfig,
    /// Event sinks.
    #[serde(default)]
    pub events: EventsSection,
    /// Snapshots.
    #[serde(default)]
    pub snapshots: SnapshotsSection,
    /// Runtime.
    #[serde(default)]
    pub runtime: RuntimeSection,
    /// Alert GPIO line; absent: none.
    #[serde(default)]
    pub gpio: Option<GpioConfig>,
    /// Field updates; absent: the `[model]` manifest only.
    #[serde(default)]
    pub update: Option<UpdateSection>,
}

impl Config {
    /// Reads, parses and validates a file; relative paths are resolved against its folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = crate::files::read_text(path, crate::files::TEXT_CAP).map_err(|source| {
            ConfigError::Read {
                path: path.to_path_buf(),
                error: source,
            }
        })?;
        let mut cfg = Self::parse(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut cfg.model.manifest);
        if let Some(p) = &mut cfg.source.path {
            resolve(p);
        }
        if let Some(u) = &mut cfg.update {
            resolve(&mut u.state_dir);
        }
        if let Some(f) = &mut cfg.events.file {
            resolve(f);
        }
        if let Some(d) = &mut cfg.snapshots.dir {
            resolve(d);
        }
        Ok(cfg)
    }

    /// Parses and validates TOML text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: crate::files::toml_message(&e, text),
        })?;
        cfg.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        self.detect.validate()?;
        self.alert.validate()?;
        match self.source.kind {
            SourceKind::Replay if self.source.path.is_none() => {
                return Err(
                    "[source] kind = \"replay\" needs path = a folder of frames or a list file"
                        .into(),
                );
            }
            SourceKind::V4l2 if self.source.device.is_none() => {
                return Err("[source] kind = \"v4l2\" needs device = \"/dev/v4l/by-id/...\" (ls /dev/v4l/by-id)".into());
            }
            SourceKind::V4l2 if !(1.0..=240.0).contains(&self.source.fps) => {
                return Err(format!(
                    "[source] fps = {} must be in 1..=240 for a camera",
                    self.source.fps
                ));
            }
            SourceKind::V4l2
                if !(16..=8192).contains(&self.source.width)
                    || !(16..=8192).contains(&self.source.height) =>
            {
                return Err(format!(
                    "[source] width x height = {}x{} must be in 16..=8192",
                    self.source.width, self.source.height
                ));
            }
            _ => {}
        }
        if let Some(g) = &self.gpio {
            g.validate()?;
        }
        if let Some(u) = &self.update {
            for k in &u.trusted_keys {
                crate::signing::PublicKey::parse(k)
                    .map_err(|e| format!("[update] trusted_keys: {e}"))?;
            }
            if u.keep_models == 0 {
                return Err(
                    "[update] keep_models = 0 must be at least 1 (the current model is always kept)"
                        .into(),
                );
            }
        }
        // A tiny rate would make the replay's frame period overflow a Duration.
        if !(self.source.fps == 0.0 || (0.1..=1000.0).contains(&self.source.fps)) {
            return Err(format!(
                "[source] fps = {} must be 0 (as fast as frames come) or in 0.1..=1000",
                self.source.fps
            ));
        }
        if !["error", "warn", "info", "debug", "trace"].contains(&self.events.level.as_str()) {
            return Err(format!(
                "[events] level = {:?} must be one of error, warn, info, debug, trace",
                self.events.level
            ));
        }
        if !(self.runtime.stall_secs >= 0.5 && self.runtime.stall_secs <= 3600.0) {
            return Err(format!(
                "[runtime] stall_secs = {} must be in 0.5..=3600",
                self.runtime.stall_secs
            ));
        }
        if !(self.runtime.status_secs >= 0.1 && self.runtime.status_secs <= 3600.0) {
            return Err(format!(
                "[runtime] status_secs = {} must be in 0.1..=3600",
                self.runtime.status_secs
            ));
        }
        if !(1..=64).contains(&self.runtime.threads) {
            return Err(format!(
                "[runtime] threads = {} must be in 1..=64",
                self.runtime.threads
            ));
        }
        if self.snapshots.quota_mib == 0 {
            return Err("[snapshots] quota_mib must be at least 1 (remove dir to disable)".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../polypwatch.example.toml");

    #[test]
    fn a_huge_snapshot_quota_does_not_wrap() {
        let s = SnapshotsSection {
            dir: None,
            quota_mib: 1 << 50,
        };
        assert_eq!(s.quota_bytes(), u64::MAX);
        assert_eq!(SnapshotsSection::default().quota_bytes(), 256 << 20);
    }

    #[test]
    fn the_example_parses() {
        Config::parse(EXAMPLE, Path::new("polypwatch.example.toml")).unwrap();
    }

    #[test]
    fn the_board_config_parses() {
        let text = include_str!("../systemd/polypwatch.toml");
        let cfg = Config::parse(text, Path::new("polypwatch.toml")).unwrap();
        assert_eq!(cfg.source.kind, SourceKind::V4l2);
        assert!(cfg.update.is_some());
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let text = EXAMPLE.replace("[alert]", "[alert]\nraise_after = 3");
        let err = Config::parse(&text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("raise_after") && err.contains("line"), "{err}");
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let text = EXAMPLE.replace("raise_n = 3", "raise_n = 30");
        let err = Config::parse(&text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("raise_n"), "{err}");
        let text = EXAMPLE.replace("level = \"info\"", "level = \"loud\"");
        assert!(Config::parse(&text, Path::new("x.toml")).is_err());
        let text = EXAMPLE.replace("threads = 1", "threads = 0");
        let err = Config::parse(&text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("threads"), "{err}");
        // Passed before and panicked the capture thread (Duration overflow).
        for fps in ["1e-300", "0.01", "-1.0", "nan"] {
            let text = EXAMPLE.replace("fps = 25.0", &format!("fps = {fps}"));
            let err = Config::parse(&text, Path::new("x.toml"));
            assert!(
                err.as_ref().is_err_and(|e| e.to_string().contains("fps")),
                "{fps}: {err:?}"
            );
        }
    }

    #[test]
    fn update_counts_default_and_keep_models_zero_is_refused() {
        let board = include_str!("../systemd/polypwatch.toml");
        let u = Config::parse(board, Path::new("b.toml"))
            .unwrap()
            .update
            .unwrap();
        assert_eq!((u.keep_models, u.keep_rejected), (3, 5));
        let text = board.replace("[update]", "[update]\nkeep_models = 0");
        let err = Config::parse(&text, Path::new("b.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("keep_models = 0"), "{err}");
        let text = board.replace("[update]", "[update]\nkeep_models = 1\nkeep_rejected = 0");
        let u = Config::parse(&text, Path::new("b.toml"))
            .unwrap()
            .update
            .unwrap();
        assert_eq!((u.keep_models, u.keep_rejected), (1, 0));
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.toml");
        std::fs::write(&p, EXAMPLE).unwrap();
        let cfg = Config::load(&p).unwrap();
        assert!(cfg.model.manifest.starts_with(d.path()));
    }
}
