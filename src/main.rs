use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use polypwatch::model::Segmenter;

/// polypwatch: real-time polyp detection on a colonoscopy video feed.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Verify a model (manifest, sha256, shapes) and print what it is.
    CheckModel {
        /// The model's manifest (.toml beside the .onnx).
        #[arg(long)]
        model: PathBuf,
    },
    /// Time model inference on a fixed frame.
    Bench {
        /// The model's manifest.
        #[arg(long)]
        model: PathBuf,
        /// Frames to time (after 5 warm-up frames).
        #[arg(long, default_value_t = 50)]
        frames: usize,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::CheckModel { model } => {
            let seg = Segmenter::load(&model)
                .with_context(|| format!("model {} refused", model.display()))?;
            let m = seg.manifest();
            println!(
                "{} {} ({}), {} input {}x{}, threshold {}: ok",
                m.model.name,
                m.model.version,
                m.model.architecture,
                m.model.precision,
                m.preprocess.width,
                m.preprocess.height,
                m.output.threshold
            );
        }
        Command::Bench { model, frames } => {
            let seg = Segmenter::load(&model)
                .with_context(|| format!("model {} refused", model.display()))?;
            let r = &seg.manifest().preprocess;
            let input = vec![0.1f32; 3 * (r.width * r.height) as usize];
            for _ in 0..5 {
                seg.run(&input)?;
            }
            let mut ms: Vec<f64> = (0..frames.max(1))
                .map(|_| {
                    let t = std::time::Instant::now();
                    seg.run(&input).map(|_| t.elapsed().as_secs_f64() * 1e3)
                })
                .collect::<Result<_, _>>()?;
            ms.sort_by(f64::total_cmp);
            let q = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
            println!(
                "{}: inference p50 {:.1} ms, p95 {:.1} ms over {} frames",
                seg.manifest().model.architecture,
                q(0.5),
                q(0.95),
                ms.len()
            );
        }
    }
    Ok(())
}
