//! Rebuilds `tests/fixtures/kvasir-mini` from a Kvasir-SEG copy: a few real images and masks,
//! downscaled, so the test suite runs on real data without the full dataset.
//!
//! cargo run --example make_fixtures -- ../shared/datasets/kvasir-seg tests/fixtures/kvasir-mini
//!
//! With `--polyp-free`, rebuilds `tests/fixtures/negatives-mini` from the polyp-free frames
//! (every 37th of the folder, all-zero masks kept as they are):
//!
//! cargo run --example make_fixtures -- --polyp-free ../shared/datasets/cpchild-negatives tests/fixtures/negatives-mini

use std::path::PathBuf;

use anyhow::{Context, Result};
use image::imageops::FilterType;
use polypwatch::dataset::{Dataset, read_split};

const TRAIN: usize = 10;
const TEST: usize = 4;
const MAX_SIDE: u32 = 160;

const FREE: usize = 6;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("--polyp-free") {
        args.next();
        let usage = "usage: make_fixtures --polyp-free SRC DST";
        let src = PathBuf::from(args.next().context(usage)?);
        let dst = PathBuf::from(args.next().context(usage)?);
        std::fs::create_dir_all(dst.join("images"))?;
        std::fs::create_dir_all(dst.join("masks"))?;
        for s in Dataset::open(&src)?.samples.iter().step_by(37).take(FREE) {
            let (img, mask) = s.load()?;
            let side = 96;
            image::imageops::resize(&img, side, side, FilterType::Triangle)
                .save(dst.join("images").join(format!("{}.jpg", s.name)))?;
            image::imageops::resize(&mask, side, side, FilterType::Triangle)
                .save(dst.join("masks").join(format!("{}.png", s.name)))?;
        }
        println!("wrote {}", dst.display());
        return Ok(());
    }
    let src = PathBuf::from(args.next().context("usage: make_fixtures SRC DST")?);
    let dst = PathBuf::from(args.next().context("usage: make_fixtures SRC DST")?);
    std::fs::create_dir_all(dst.join("images"))?;
    std::fs::create_dir_all(dst.join("masks"))?;
    std::fs::create_dir_all(dst.join("splits"))?;
    let ds = Dataset::open(&src)?;
    for (split, file, n) in [
        ("splits/official_train.txt", "train.txt", TRAIN),
        ("splits/official_val.txt", "test.txt", TEST),
    ] {
        // Every 37th name: a spread of sizes and polyp shapes, reproducibly.
        let names: Vec<String> = read_split(&src.join(split))?
            .into_iter()
            .map(|(_, n)| n)
            .step_by(37)
            .take(n)
            .collect();
        for name in &names {
            let s = ds
                .samples
                .iter()
                .find(|s| &s.name == name)
                .context("name")?;
            let (img, mask) = s.load()?;
            let (w, h) = img.dimensions();
            let k = MAX_SIDE as f32 / w.max(h) as f32;
            let (nw, nh) = ((w as f32 * k).round() as u32, (h as f32 * k).round() as u32);
            image::imageops::resize(&img, nw, nh, FilterType::Triangle)
                .save(dst.join("images").join(format!("{name}.jpg")))?;
            image::imageops::resize(&mask, nw, nh, FilterType::Triangle)
                .save(dst.join("masks").join(format!("{name}.png")))?;
        }
        std::fs::write(dst.join("splits").join(file), names.join("\n") + "\n")?;
    }
    println!("wrote {}", dst.display());
    Ok(())
}
