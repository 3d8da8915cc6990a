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
pub mod dataset;
pub mod detect;
pub mod evaluate;
pub mod files;
pub mod frames;
pub mod gpio;
pub mod manifest;
pub mod metrics;
pub mod model;
pub mod pixfmt;
pub mod preprocess;
pub mod service;
pub mod signing;
pub mod sink;
pub mod store;
pub mod timing;

/// Our rewrites of tract's plan, a crate of their own (`crates/polypwatch-accel`).
pub use polypwatch_accel as accel;

/// The version of tract this build runs models with (recorded in manifests at export).
pub const TRACT_VERSION: &str = "0.23.9";
