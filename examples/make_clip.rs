//! Builds a replay clip from one Kvasir-SEG image: a window pans across it so that the polyp
//! enters and leaves the view. The mask gives every frame's true label (`labels.csv`).
//!
//! cargo run --release --example make_clip -- ../shared/datasets/kvasir-seg NAME demo/clip [FRAMES] [WIDTH] [HEIGHT]
//!
//! With HEIGHT the window takes the output's aspect ratio (e.g. 1280 1024, a camera's frame).
//! `make_alert_clip` builds longer clips with polyp-free stretches.

use std::path::PathBuf;

use anyhow::{Context, Result};
use polypwatch::clip;
use polypwatch::dataset::Dataset;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: make_clip DATASET NAME OUT [FRAMES] [WIDTH] [HEIGHT]";
    let src = PathBuf::from(args.first().context(usage)?);
    let name = args.get(1).context(usage)?;
    let out = PathBuf::from(args.get(2).context(usage)?);
    let frames: usize = args.get(3).map_or(Ok(75), |s| s.parse())?;
    let out_w: u32 = args.get(4).map_or(Ok(320), |s| s.parse())?;
    let out_h: Option<u32> = args.get(5).map(|s| s.parse()).transpose()?;
    let ds = Dataset::open(&src)?;
    let s = ds
        .samples
        .iter()
        .find(|s| &s.name == name)
        .context("no such image")?;
    let (img, mask) = s.load()?;
    let pan =
        clip::polyp_pan(&img, &mask, frames, out_w, out_h).context("the mask has no polyp")?;
    std::fs::create_dir_all(&out)?;
    let labels = clip::write_frames(&out, 0, &pan)?;
    std::fs::write(
        out.join("labels.csv"),
        format!("{}{labels}", clip::LABELS_HEADER),
    )?;
    let (w, h) = pan[0].image.dimensions();
    println!("wrote {frames} frames of {w}x{h} to {}", out.display());
    Ok(())
}
