//! `polypwatch bench`: per-stage latency and frames per second.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use polypwatch::{bench, service};

use super::load_model;

/// Arguments of `bench`.
#[derive(clap::Args)]
pub struct Args {
    /// The model's manifest.
    #[arg(long)]
    pub model: PathBuf,
    /// Frames to time.
    #[arg(long, default_value_t = 100)]
    pub frames: usize,
    /// Inference threads (1 to 64, as `[runtime] threads`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,
    /// JPEG/PNG frames, or folders of them, to decode (cycled); default: the demo clip.
    #[arg(long)]
    pub images: Vec<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the subcommand.
pub fn run(args: Args) -> Result<()> {
    let (model, frames, threads, images, json) = (
        &args.model,
        args.frames,
        args.threads,
        args.images,
        args.json,
    );
    let threads = usize::from(threads);
    bench::set_threads(threads);
    let seg = load_model(model)?;
    let images = if images.is_empty() {
        let demo = service::demo_config()?;
        vec![demo.source.path.context("the demo config has no clip")?]
    } else {
        images
    };
    // A folder stands for its frames, by the replay source's rule.
    let mut files = Vec::new();
    for path in images {
        if path.is_dir() {
            let v = polypwatch::capture::list_frames(&path)
                .with_context(|| format!("cannot list {}", path.display()))?;
            if v.is_empty() {
                bail!(
                    "{} holds no frames ({})",
                    path.display(),
                    polypwatch::dataset::EXTENSIONS.join(", ")
                );
            }
            files.extend(v);
        } else {
            files.push(path);
        }
    }
    let images = files;
    let refs: Vec<&Path> = images.iter().map(|p| p.as_path()).collect();
    let r = bench::bench(&seg, &refs, frames.max(1), threads)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let m = seg.manifest();
    println!(
        "{} {} ({}, {}x{}), {} frames, {} thread(s)",
        m.model.name,
        m.model.version,
        m.model.precision,
        m.preprocess.width,
        m.preprocess.height,
        r.frames,
        r.threads
    );
    println!(
        "{:<12} {:>8} {:>8} {:>8}",
        "stage (ms)", "p50", "p95", "p99"
    );
    for (name, q) in [
        ("decode", r.decode),
        ("preprocess", r.preprocess),
        ("inference", r.inference),
        ("postprocess", r.postprocess),
        ("total", r.total),
    ] {
        println!("{name:<12} {:>8.2} {:>8.2} {:>8.2}", q.p50, q.p95, q.p99);
    }
    let q = r.inference_back_to_back;
    println!(
        "inference, runs back to back (as bench/compare.sh times ONNX Runtime): p50 {:.2}, p95 \
         {:.2}, p99 {:.2}",
        q.p50, q.p95, q.p99
    );
    println!(
        "{:.1} frames/s (stages back to back), peak RSS {:.0} MiB",
        r.fps, r.peak_rss_mib
    );
    Ok(())
}
