//! polypwatch: real-time polyp detection on a colonoscopy video feed, the daemon's library.
//!
//! The workspace has three crates by audience: this one (the daemon: devices, the frame loop,
//! alerts, field updates), `polypwatch-model` (the contract shared with the trainer) and
//! `polypwatch-accel` (our rewrites of tract's plan). The model crate's modules and the accel
//! crate are re-exported here under the paths the daemon has always used.
//!
//! The daemon's modules:
//! - [`config`]: the daemon's TOML, validated.
//! - [`capture`]: frame sources (replay from disk, the one frame lister) and [`camera`], the
//!   V4L2 source; [`pixfmt`]: the pixel formats capture cards deliver, converted to RGB.
//! - [`service`]: the pipeline: the capture hand-off, the frame loop, reload, the alert route
//!   and systemd health.
//! - [`alert`]: the alert state machine; [`alert_eval`]: alerts scored on labelled clips;
//!   [`clip`]: such clips made from still images.
//! - [`gpio`]: the alert line; [`sink`]: the journal, the event stream and snapshots.
//! - [`store`]: field updates: signed models installed, verified, rolled back.
//! - [`bench`](mod@bench): per-stage latency of the pipeline; [`timing`]: per-frame stage
//!   times and their summary.
//!
//! From `polypwatch-model`: [`preprocess`], [`dataset`], [`metrics`], [`detect`], [`frames`],
//! [`manifest`], [`model`], [`evaluate`], [`selftest`], [`signing`], [`files`] and
//! [`TRACT_VERSION`]; from `polypwatch-accel`: [`accel`].

#![deny(missing_docs)]

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
