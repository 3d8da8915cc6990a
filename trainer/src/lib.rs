//! polypwatch-train: trains DeepLabv3+ on Kvasir-SEG with Burn and exports verified ONNX models
//! with the manifest the polypwatch daemon checks.
//!
//! Laid out like Burn's examples: [`model`], [`data`], [`train`], [`eval`] and [`export`] in
//! separate files; preprocessing, datasets, metrics and the manifest come from the
//! `polypwatch-model` crate the daemon uses too, so that training and inference cannot drift
//! apart (and the trainer builds none of the daemon's device code).

pub mod bench;
pub mod config;
pub mod data;
pub mod eval;
pub mod export;
pub mod kernels;
pub mod model;
pub mod onnx;
pub mod operating;
pub mod plot;
pub mod quant;
pub mod train;
