//! polypwatch: real-time polyp detection on a colonoscopy video feed.
//!
//! The library holds the daemon's logic and everything the trainer shares with it, one module
//! per concern: [`preprocess`] (the single image-to-tensor recipe), [`dataset`] (image/mask
//! folders and splits), [`metrics`] (Dice, IoU and friends), [`manifest`] (the model contract),
//! [`model`] (running a verified model with tract), [`evaluate`], [`config`] (the daemon's
//! TOML), [`capture`] (frame sources), [`detect`] (components and frame scores), [`alert`] (the
//! alert state machine), [`sink`] (journal, event stream, snapshots) and [`service`] (the
//! pipeline, signals and systemd).

#![warn(missing_docs)]

pub mod alert;
pub mod alert_eval;
pub mod bench;
pub mod camera;
pub mod capture;
pub mod clip;
pub mod config;
pub mod gpio;
pub mod pixfmt;
pub mod service;
pub mod sink;
pub mod store;
pub mod timing;

/// Our rewrites of tract's plan, a crate of their own (`crates/polypwatch-accel`).
pub use polypwatch_accel as accel;
/// The model contract shared with the trainer (`crates/polypwatch-model`), under the paths the
/// daemon has always used.
pub use polypwatch_model::{
    TRACT_VERSION, dataset, detect, evaluate, files, frames, manifest, metrics, model, preprocess,
    selftest, signing,
};
