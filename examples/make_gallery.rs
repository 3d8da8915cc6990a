//! Draws the model report's gallery: polyp frames beside polyp-free ones, through the daemon's
//! own path (tract, the manifest's operating point), as overlays (predicted mask green, box of
//! the best region).
//!
//! cargo run --release --example make_gallery -- OUT.png MODEL.toml \
//!     POLYP_ROOT POLYP_SPLIT FREE_ROOT FREE_SPLIT [--per-row 6] [--side 160]
//!
//! Row 1: the first polyp frames of POLYP_SPLIT; row 2: polyp-free frames with the lowest
//! frame scores (true negatives); row 3: the polyp-free frames with the highest frame scores
//! (the worst false positives; among negatives, the highest peak pixel probability: the nearest
//! misses). Every polyp-free
//! frame of FREE_SPLIT is scored to find them. The scores and names are printed as a Markdown
//! table for the report. Use test carve-outs for figures in a report.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use image::RgbImage;
use polypwatch::dataset::Dataset;
use polypwatch::detect::Detector;
use polypwatch::evaluate::evaluate_frames;
use polypwatch::model::Segmenter;
use polypwatch::sink::overlay;

struct Pick {
    name: String,
    path: PathBuf,
    score: f32,
    peak: f32,
    positive: bool,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |k: &str, d: u32| -> Result<u32> {
        match args.iter().position(|a| a == k) {
            Some(i) => Ok(args
                .get(i + 1)
                .with_context(|| format!("{k} needs a value"))?
                .parse()?),
            None => Ok(d),
        }
    };
    let (per_row, side) = (opt("--per-row", 6)? as usize, opt("--side", 160)?);
    let mut pos = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a.starts_with("--") {
            it.next();
        } else {
            pos.push(PathBuf::from(a));
        }
    }
    let [out, model, polyp_root, polyp_split, free_root, free_split] = &pos[..] else {
        bail!(
            "usage: make_gallery OUT.png MODEL.toml POLYP_ROOT POLYP_SPLIT FREE_ROOT FREE_SPLIT [--per-row N] [--side PX]"
        );
    };
    let seg = Segmenter::load(model)?;
    let detect = seg.manifest().detect_config();
    let score_all = |root: &Path, split: &Path, limit: Option<usize>| -> Result<Vec<Pick>> {
        let mut ds = Dataset::open_maybe_split(root, Some(split))?;
        if let Some(n) = limit {
            ds.samples.truncate(n);
        }
        let mut picks = Vec::new();
        let paths: Vec<PathBuf> = ds.samples.iter().map(|s| s.image.clone()).collect();
        let mut i = 0;
        evaluate_frames(&seg, &ds.samples, &detect, |s, o| {
            picks.push(Pick {
                name: s.name.clone(),
                path: paths[i].clone(),
                score: o.score,
                peak: s.probs.iter().copied().fold(0.0, f32::max),
                positive: o.positive,
            });
            i += 1;
        })?;
        Ok(picks)
    };
    let polyp = score_all(polyp_root, polyp_split, Some(per_row))?;
    let mut free = score_all(free_root, free_split, None)?;
    // Frame score first (positives are the worst), then the peak pixel probability, which
    // ranks the frames no region of which passes the operating point.
    free.sort_by(|a, b| {
        (a.score, a.peak)
            .partial_cmp(&(b.score, b.peak))
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.name.cmp(&b.name))
    });
    if free.len() < 2 * per_row {
        bail!(
            "{} has {} frames; the gallery needs {}",
            free_split.display(),
            free.len(),
            2 * per_row
        );
    }
    let negatives: Vec<&Pick> = free.iter().take(per_row).collect();
    let worst: Vec<&Pick> = free.iter().rev().take(per_row).collect();
    let det = Detector::new(detect.clone(), seg.manifest().output.threshold);
    let r = &seg.manifest().preprocess;
    let rows = [
        ("polyp", polyp.iter().collect::<Vec<_>>()),
        ("polyp-free, lowest scores", negatives),
        ("polyp-free, highest scores", worst),
    ];
    let gap = 4;
    let mut sheet = RgbImage::from_pixel(
        per_row as u32 * (side + gap) + gap,
        rows.len() as u32 * (side + gap) + gap,
        image::Rgb([255, 255, 255]),
    );
    println!(
        "| row | frame | frame score | peak pixel probability | positive |\n| --- | --- | --- | --- | --- |"
    );
    for (ri, (label, picks)) in rows.iter().enumerate() {
        for (ci, p) in picks.iter().enumerate() {
            let img = polypwatch::preprocess::load_rgb(&p.path)?;
            let frame = r.resize(&img);
            let mut logits = seg.logits_for(&img)?;
            let mask = det.mask(&mut logits, r.width, r.height);
            let d = det.detect(&logits, &mask);
            let o = overlay(&frame, &mask, d.best.map(|c| c.bbox));
            let tile =
                image::imageops::resize(&o, side, side, image::imageops::FilterType::Triangle);
            image::imageops::replace(
                &mut sheet,
                &tile,
                i64::from(gap + ci as u32 * (side + gap)),
                i64::from(gap + ri as u32 * (side + gap)),
            );
            println!(
                "| {label} | {} | {:.3} | {:.3} | {} |",
                p.name,
                p.score,
                p.peak,
                if p.positive { "yes" } else { "no" }
            );
        }
    }
    let positives = free.iter().filter(|p| p.positive).count();
    println!(
        "\n{} polyp-free frames scored, {positives} positive at the manifest's operating point",
        free.len()
    );
    sheet
        .save(out)
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}
