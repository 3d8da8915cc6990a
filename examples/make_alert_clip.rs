//! Builds a labelled clip for `polypwatch eval-alerts`: polyp-free stretches (slow pans across
//! polyp-free frames) between polyp sequences (pans across polyp images that bring the polyp
//! into view and out again), each frame labelled in `labels.csv`.
//!
//! cargo run --release --example make_alert_clip -- OUT POLYP_ROOT POLYP_SPLIT FREE_ROOT FREE_SPLIT \
//!     [--sequences 20] [--gap 10] [--pan-frames 50] [--free-frames 25] [--width 320]
//!
//! The clip is: gap, polyp 1, gap, polyp 2, ..., polyp N, gap; a gap is `--gap` polyp-free
//! images of `--free-frames` frames each (taken in split order, cycled); a polyp sequence is
//! `--pan-frames` frames of the next image of POLYP_SPLIT. Use held-out (test) names for
//! figures that go in a report: the operating point was chosen on validation frames.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use polypwatch::clip;
use polypwatch::dataset::Dataset;

fn main() -> Result<()> {
    let mut pos = Vec::new();
    let opt = |k: &str, d: usize, args: &[String]| -> Result<usize> {
        match args.iter().position(|a| a == k) {
            Some(i) => Ok(args
                .get(i + 1)
                .with_context(|| format!("{k} needs a value"))?
                .parse()?),
            None => Ok(d),
        }
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut skip = false;
    for a in &args {
        if skip {
            skip = false;
        } else if a.starts_with("--") {
            skip = true;
        } else {
            pos.push(a.clone());
        }
    }
    let usage = "usage: make_alert_clip OUT POLYP_ROOT POLYP_SPLIT FREE_ROOT FREE_SPLIT [--sequences N] [--gap N] [--pan-frames N] [--free-frames N] [--width N]";
    if pos.len() != 5 {
        bail!("{usage}");
    }
    let sequences = opt("--sequences", 20, &args)?;
    let gap = opt("--gap", 10, &args)?;
    let pan_frames = opt("--pan-frames", 50, &args)?;
    let free_frames = opt("--free-frames", 25, &args)?;
    let width = opt("--width", 320, &args)? as u32;
    let out = PathBuf::from(&pos[0]);
    let polyp = Dataset::open_split(pos[1].as_ref(), pos[2].as_ref())?;
    let free = Dataset::open_split(pos[3].as_ref(), pos[4].as_ref())?;
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut labels = String::from(clip::LABELS_HEADER);
    let mut next = 0;
    let mut free_i = 0;
    let mut gap_stretch = |next: &mut usize, labels: &mut String| -> Result<()> {
        for _ in 0..gap {
            let s = &free.samples[free_i % free.samples.len()];
            free_i += 1;
            let (img, _) = s.load()?;
            let frames = clip::free_pan(&img, free_frames, width, width);
            *labels += &clip::write_frames(&out, *next, &frames)?;
            *next += frames.len();
        }
        Ok(())
    };
    gap_stretch(&mut next, &mut labels)?;
    let mut used = 0;
    for s in polyp.samples.iter() {
        if used == sequences {
            break;
        }
        let (img, mask) = s.load()?;
        let Some(frames) = clip::polyp_pan(&img, &mask, pan_frames, width, None) else {
            continue;
        };
        labels += &clip::write_frames(&out, next, &frames)?;
        next += frames.len();
        used += 1;
        gap_stretch(&mut next, &mut labels)?;
    }
    std::fs::write(out.join("labels.csv"), labels)?;
    println!(
        "wrote {next} frames ({used} polyp sequences) to {}",
        out.display()
    );
    Ok(())
}
