//! `polypwatch infer`: segment images: a mask and an overlay PNG per image, a JSON line each.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use polypwatch::detect::Detector;
use polypwatch::sink;

use super::load_model;

/// Arguments of `infer`.
#[derive(clap::Args)]
pub struct Args {
    /// The model's manifest.
    #[arg(long)]
    pub model: PathBuf,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Images.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

/// Runs the subcommand.
pub fn run(args: Args) -> Result<()> {
    let (model, out, images) = (&args.model, &args.out, &args.images);
    let seg = load_model(model)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let r = &seg.manifest().preprocess;
    let det = Detector::new(
        seg.manifest().detect_config(),
        seg.manifest().output.threshold,
    );
    let mut failed = 0;
    for path in images {
        let t = std::time::Instant::now();
        let img = match polypwatch::preprocess::load_rgb(path) {
            Ok(i) => i,
            Err(e) => {
                eprintln!("{e}");
                failed += 1;
                continue;
            }
        };
        let mut logits = seg.logits_for(&img)?;
        let mask = det.mask(&mut logits, r.width, r.height);
        let d = det.detect(&logits, &mask);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let stem = path.file_stem().unwrap_or_default().to_string_lossy();
        let (mw, mh) = img.dimensions();
        let full = image::imageops::resize(&mask, mw, mh, image::imageops::FilterType::Triangle);
        let full = image::GrayImage::from_fn(mw, mh, |x, y| {
            image::Luma([if full.get_pixel(x, y).0[0] > 127 {
                255
            } else {
                0
            }])
        });
        full.save(out.join(format!("{stem}_mask.png")))?;
        sink::overlay(&img, &mask, d.best.map(|c| c.bbox))
            .save(out.join(format!("{stem}_overlay.png")))?;
        println!(
            "{}",
            serde_json::json!({
                "image": path.display().to_string(),
                "score": d.score,
                "polyp": d.positive,
                "area": d.best.map_or(0.0, |c| c.area),
                "bbox": d.best.map(|c| c.bbox),
                "components": d.components,
                "latency_ms": ms,
            })
        );
    }
    if failed > 0 {
        bail!("{failed} of {} images could not be read", images.len());
    }
    Ok(())
}
