//! A fixed number of inference runs of a manifest's model on one preprocessed frame, for
//! counting instructions: `bench/aarch64.sh` runs it under qemu with an instruction-counting
//! plugin twice, with RUNS = 10 and RUNS = 0, and takes the difference (issue 16's protocol),
//! so loading, optimising and the warm-up runs cancel out.
//!
//! cargo run --release --example count_runs -- MANIFEST FRAME WARMUP RUNS THREADS [DUMP]
//!
//! FRAME is a JPEG/PNG preprocessed with the manifest's recipe; DUMP, if given, receives that
//! input tensor as raw little-endian f32 (1x3xHxW), for ONNX Runtime's driver to run the same.

use std::path::PathBuf;

use anyhow::{Context, Result};
use polypwatch::model::Segmenter;
use polypwatch::preprocess;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: count_runs MANIFEST FRAME WARMUP RUNS THREADS [DUMP]";
    let manifest = PathBuf::from(args.first().context(usage)?);
    let frame = PathBuf::from(args.get(1).context(usage)?);
    let warmup: usize = args.get(2).context(usage)?.parse()?;
    let runs: usize = args.get(3).context(usage)?.parse()?;
    let threads: usize = args.get(4).context(usage)?.parse()?;
    polypwatch::bench::set_threads(threads);
    // As `polypwatch` itself does.
    polypwatch::model::keep_frame_buffers();
    let seg = Segmenter::load(&manifest)?;
    let input = seg
        .manifest()
        .preprocess
        .tensor_from_rgb(&preprocess::load_rgb(&frame)?);
    if let Some(dump) = args.get(5) {
        let bytes: Vec<u8> = input.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(dump, bytes).with_context(|| format!("writing {dump}"))?;
    }
    // On one of tract's threads for the whole loop, as the daemon's inference thread is.
    let sum = polypwatch::accel::on_tract_threads(|| -> Result<f64> {
        let mut sum = 0.0;
        for _ in 0..warmup + runs {
            let logits = seg.run(&input)?;
            sum += logits.iter().map(|&v| f64::from(v)).sum::<f64>();
        }
        Ok(sum)
    })?;
    println!(
        "{} {} warm-up + {runs} runs, {threads} threads, logit sum {sum:.6e}",
        seg.manifest().model.name,
        warmup
    );
    Ok(())
}
