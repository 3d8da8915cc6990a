//! polypwatch-train: trains DeepLabv3+ on Kvasir-SEG with Burn and exports verified ONNX models
//! with the manifest the polypwatch daemon checks.
//!
//! Laid out like Burn's examples: [`model`], [`data`], [`train`], [`eval`] and [`export`] in
//! separate files; preprocessing, datasets, metrics and the manifest come from the
//! `polypwatch-model` crate the daemon uses too, so that training and inference cannot drift
//! apart (and the trainer builds none of the daemon's device code).
//!
//! - [`config`]: the training configuration (TOML).
//! - [`model`]: DeepLabv3+ in Burn, each layer with its ONNX export beside its `forward`.
//! - [`data`]: images in memory at the input size, augmentation, batches.
//! - [`kernels`]: convolution and batch-norm training kernels for Burn's Flex CPU backend.
//! - [`train`]: the training loop, checkpoints and resume; [`plot`]: its curves as a PNG.
//! - [`eval`]: the study's tables for train, validation and test.
//! - [`import`]: an exported f32 ONNX as a run's starting weights, batch norm unfolded by
//!   calibration.
//! - [`export`]: ONNX and manifest, verified through tract; [`onnx`]: the ONNX graph writer;
//!   [`quant`]: the int8 variant; [`operating`]: the operating point measured as the daemon
//!   runs the model.
//! - [`bench`](mod@bench): training steps per second on a fixed batch.

#![deny(missing_docs)]

pub mod bench;
pub mod config;
pub mod data;
pub mod eval;
pub mod export;
pub mod import;
pub mod kernels;
pub mod model;
pub mod onnx;
pub mod operating;
pub mod plot;
pub mod quant;
pub mod train;
