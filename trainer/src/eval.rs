//! `polypwatch-train eval`: the study's Table 2 and Table 3 columns for train, validation and
//! test, computed with the library's metrics.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burn::prelude::*;
use polypwatch::dataset::Dataset;
use polypwatch::metrics::SetScores;
use polypwatch::preprocess::Recipe;

use crate::config::TrainConfig;
use crate::train::{self, Backend, RunDir};

/// Loads a run's configuration, with an optional data-root override.
pub fn run_config(run: &RunDir, data: Option<&Path>) -> Result<TrainConfig> {
    let mut cfg = TrainConfig::load(&run.config())
        .with_context(|| format!("{} is not a training run folder", run.0.display()))?;
    if let Some(d) = data {
        cfg.data.root = d.to_path_buf();
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
    let root = &cfg.data.root;
    let sets = [
        ("train", run.0.join("train.txt")),
        ("validation", run.0.join("val.txt")),
        ("test", cfg.split_path(&cfg.data.test_split)),
    ];
    let mut out = BTreeMap::new();
    for (name, split) in sets {
        let ds = Dataset::open_split(root, &split)?;
        let items = train::load_with_bar(name, &ds.samples, &recipe, quiet)?;
        out.insert(
            name.to_string(),
            train::evaluate(&model, &items, &recipe, &device),
        );
    }
    Ok(out)
}

/// Prints the table in set order train, validation, test.
pub fn print_table(scores: &BTreeMap<String, SetScores>) {
    println!("{}", SetScores::TABLE_HEADER);
    for set in ["train", "validation", "test"] {
        if let Some(s) = scores.get(set) {
            println!("{}", s.table_row(set));
        }
    }
}
