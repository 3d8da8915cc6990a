//! polypwatch: real-time polyp detection on a colonoscopy video feed.
//!
//! The library holds everything the daemon and the trainer share, one module per concern:
//! [`preprocess`] (the single image-to-tensor recipe), [`dataset`] (image/mask folders and
//! splits), [`metrics`] (Dice, IoU and friends), [`manifest`] (the model contract) and
//! [`model`] (running a verified model with tract).

#![warn(missing_docs)]

pub mod dataset;
pub mod evaluate;
pub mod manifest;
pub mod metrics;
pub mod model;
pub mod preprocess;

/// The version of tract this build runs models with (recorded in manifests at export).
pub const TRACT_VERSION: &str = "0.23.9";
