//! The subcommands, one module each: its arguments (`Args`, parsed by clap) and its body
//! (`run`). `main.rs` parses and dispatches.

pub mod bench;
pub mod check;
pub mod eval;
pub mod eval_alerts;
pub mod infer;
pub mod model;
pub mod run;

use std::path::Path;

use anyhow::{Context, Result};
use polypwatch::model::Segmenter;

/// A subcommand and its arguments.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Run the daemon.
    Run(run::Args),
    /// Segment images: writes a mask PNG and an overlay PNG per image, prints a JSON line each.
    Infer(infer::Args),
    /// Score a model on an image/mask folder (images/ and masks/).
    Eval(eval::Args),
    /// Replay labelled clips (frames + labels.csv) through the detector and the alert machine
    /// at a frame rate: time to alert and share under alert per polyp sequence, false alarms
    /// per minute and share under alert of the polyp-free frames.
    EvalAlerts(eval_alerts::Args),
    /// Per-stage latency (decode, preprocess, inference, post-process) and frames per second.
    Bench(bench::Args),
    /// Field updates: install signed models, list them, roll back.
    Model(model::Args),
    /// Check a configuration (and the model it names) without running.
    Check(check::Args),
}

impl Command {
    /// Runs the subcommand.
    pub fn run(self) -> Result<()> {
        match self {
            Command::Run(a) => run::run(a),
            Command::Infer(a) => infer::run(a),
            Command::Eval(a) => eval::run(a),
            Command::EvalAlerts(a) => eval_alerts::run(a),
            Command::Bench(a) => bench::run(a),
            Command::Model(a) => model::run(a),
            Command::Check(a) => check::run(a),
        }
    }
}

/// Loads a model for a desk command, naming it when it is refused.
fn load_model(path: &Path) -> Result<Segmenter> {
    Segmenter::load(path).with_context(|| format!("model {} refused", path.display()))
}
