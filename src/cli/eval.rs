//! `polypwatch eval`: score a model on an image/mask folder.

use std::path::PathBuf;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use polypwatch::dataset::Dataset;
use polypwatch::evaluate;
use polypwatch::frames::{self, EvalReport};
use polypwatch::metrics::SetScores;

use super::load_model;

/// Arguments of `eval`.
#[derive(clap::Args)]
pub struct Args {
    /// The model's manifest.
    #[arg(long)]
    pub model: PathBuf,
    /// Dataset folder.
    #[arg(long)]
    pub data: PathBuf,
    /// Split file naming the images to use (default: all).
    #[arg(long)]
    pub split: Option<PathBuf>,
    /// Also write the scores as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Runs the subcommand.
pub fn run(args: Args) -> Result<()> {
    let (model, data, quiet) = (&args.model, &args.data, args.quiet);
    let (split, json) = (args.split.as_deref(), args.json.as_deref());
    let seg = load_model(model)?;
    let ds = Dataset::open_maybe_split(data, split)?;
    let pb = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(ds.len() as u64)
    };
    pb.set_style(ProgressStyle::with_template(
        "eval [{bar:30}] {pos}/{len} {msg} eta {eta}",
    )?);
    let detect = seg.manifest().detect_config();
    let ev = evaluate::evaluate_frames(&seg, &ds.samples, &detect, |s, _| {
        pb.set_message(s.name.clone());
        pb.inc(1);
    })?;
    pb.finish_and_clear();
    let report = ev.finish();
    let set = split
        .and_then(|s| s.file_stem())
        .map_or("all".into(), |s| s.to_string_lossy().into_owned());
    if report.masks.images > 0 {
        println!("{}", SetScores::TABLE_HEADER);
        println!("{}", report.masks.table_row(&set));
    } else {
        println!("{set}: no polyp image (all masks empty): mask metrics do not apply");
    }
    println!(
        "frames at pixel_threshold {} min_area {} alert_score {}:",
        detect
            .pixel_threshold
            .unwrap_or(seg.manifest().output.threshold),
        detect.min_area,
        detect.alert_score
    );
    println!("{}", EvalReport::FRAME_HEADER);
    println!("{}", report.frame_row(&set));
    if let Some(j) = json {
        let (polyp, free) = ev.scores();
        let mut v = serde_json::to_value(report.masks)?;
        v["polyp_images"] = report.masks.images.into();
        v["frames"] = serde_json::to_value(report.frames)?;
        v["sensitivity"] = serde_json::to_value(report.sensitivity)?;
        v["specificity"] = serde_json::to_value(report.specificity)?;
        v["false_positives_per_1000"] = serde_json::to_value(report.false_positives_per_1000)?;
        v["auroc"] = serde_json::to_value(report.auroc)?;
        v["detect"] = serde_json::to_value(&detect)?;
        v["roc"] = serde_json::to_value(frames::roc_curve(polyp, free))?;
        std::fs::write(j, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", j.display()))?;
    }
    Ok(())
}
