//! `polypwatch-train eval`: the study's Table 2 and Table 3 columns for train, validation and
//! test, computed with the library's metrics.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burn::prelude::*;
use polypwatch_model::detect::DetectConfig;
use polypwatch_model::frames::{EvalReport, Evaluation};
use polypwatch_model::metrics::SetScores;
use polypwatch_model::model::sigmoid;
use polypwatch_model::preprocess::Recipe;

use crate::config::TrainConfig;
use crate::data::Set;
use crate::operating;
use crate::train::{self, Backend, RunDir, THRESHOLD};

/// Loads a run's configuration, with an optional data-root override.
pub fn run_config(run: &RunDir, data: Option<&Path>) -> Result<TrainConfig> {
    let mut cfg = TrainConfig::load(&run.config())
        .with_context(|| format!("{} is not a training run folder", run.0.display()))?;
    if let Some(d) = data {
        cfg.set_data_root(d);
    }
    Ok(cfg)
}

/// Resolves `best`, `last` or a path to a weights file of the run.
pub fn weights_path(run: &RunDir, weights: &str) -> PathBuf {
    match weights {
        "best" => run.best_model(),
        "last" => run.last().join("model.bpk"),
        p => PathBuf::from(p),
    }
}

/// Evaluates the run's model on every source's train, validation and test sets (and the
/// polyp-free crops of `free_crops` sources): mask metrics over the polyp images, frame
/// metrics under the daemon's default detect settings (an exported model's own operating
/// point is measured by `export`).
pub fn eval(
    run: &RunDir,
    weights: &str,
    data: Option<&Path>,
    backend: Backend,
    quiet: bool,
) -> Result<BTreeMap<String, EvalReport>> {
    let cfg = run_config(run, data)?;
    let device: Device = backend.device()?;
    let model = train::load_model(&cfg, &weights_path(run, weights), &device)?;
    let recipe = Recipe::square(cfg.train.input_size);
    let detect = DetectConfig::default();
    let mut out = BTreeMap::new();
    for set in [Set::Train, Set::Val, Set::Test] {
        for fs in operating::frame_sets(&run.0, &cfg, set, &recipe, quiet)? {
            let mut ev = Evaluation::default();
            let logits = train::predict_logits(&model, &fs.items, &recipe, &device);
            for (l, item) in logits.iter().zip(&fs.items) {
                let p: Vec<f32> = l.iter().map(|&v| sigmoid(v)).collect();
                ev.push(
                    &p,
                    (recipe.width, recipe.height),
                    &item.mask,
                    THRESHOLD,
                    &detect,
                );
            }
            // The single-source runs of 0.2.0 keep their set names.
            let name = fs
                .name
                .strip_prefix("data ")
                .unwrap_or(&fs.name)
                .to_string();
            out.insert(name, ev.finish());
        }
    }
    Ok(out)
}

fn ranked(scores: &BTreeMap<String, EvalReport>) -> Vec<&String> {
    let rank = |k: &str| {
        let set = k.rsplit(' ').next().unwrap_or(k);
        let source = k.strip_suffix(set).unwrap_or("").to_string();
        let order = ["train", "validation", "test"]
            .iter()
            .position(|s| *s == set);
        (source, order)
    };
    let mut keys: Vec<&String> = scores.keys().collect();
    keys.sort_by_key(|k| rank(k));
    keys
}

/// Prints the mask table (sets with polyp images), then the frame table; per source, set
/// order train, validation, test.
pub fn print_table(scores: &BTreeMap<String, EvalReport>) {
    println!("{}", SetScores::TABLE_HEADER);
    for k in ranked(scores) {
        if scores[k].masks.images > 0 {
            println!("{}", scores[k].masks.table_row(k));
        }
    }
    println!("\nframes at the default detect settings:");
    println!("{}", EvalReport::FRAME_HEADER);
    for k in ranked(scores) {
        println!("{}", scores[k].frame_row(k));
    }
}
