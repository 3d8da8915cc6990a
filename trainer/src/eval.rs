//! `polypwatch-train eval`: the study's Table 2 and Table 3 columns for train, validation and
//! test, computed with the library's metrics.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burn::prelude::*;
use polypwatch::metrics::SetScores;
use polypwatch::preprocess::Recipe;

use crate::config::TrainConfig;
use crate::data::{self, Set};
use crate::train::{self, Backend, RunDir};

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

/// Evaluates the run's model on its train, validation and test sets.
pub fn eval(
    run: &RunDir,
    weights: &str,
    data: Option<&Path>,
    backend: Backend,
    quiet: bool,
) -> Result<BTreeMap<String, SetScores>> {
    let cfg = run_config(run, data)?;
    let device: Device = backend.device()?;
    let model = train::load_model(&cfg, &weights_path(run, weights), &device)?;
    let recipe = Recipe::square(cfg.train.input_size);
    let single = cfg.data.single();
    let mut out = BTreeMap::new();
    for source in cfg.data.sources() {
        for set in [Set::Train, Set::Val, Set::Test] {
            let samples = data::open_run_split(&run.0, &cfg, &source, set)?;
            if samples.is_empty() {
                continue;
            }
            let name = if single {
                set.as_str().to_string()
            } else {
                format!("{} {}", source.name, set.as_str())
            };
            let items = train::load_with_bar(&name, &samples, &recipe, quiet)?;
            out.insert(name, train::evaluate(&model, &items, &recipe, &device));
        }
    }
    Ok(out)
}

/// Prints the table: set order train, validation, test, per source.
pub fn print_table(scores: &BTreeMap<String, SetScores>) {
    println!("{}", SetScores::TABLE_HEADER);
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
    for k in keys {
        println!("{}", scores[k].table_row(k));
    }
}
