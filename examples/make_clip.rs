//! Builds a replay clip from one Kvasir-SEG image: a window pans across it so that the polyp
//! enters and leaves the view. The mask gives every frame's true label (`labels.csv`).
//!
//! cargo run --release --example make_clip -- ../shared/datasets/kvasir-seg NAME demo/clip [FRAMES] [WIDTH] [HEIGHT]
//!
//! With HEIGHT the window takes the output's aspect ratio (e.g. 1280 1024, a camera's frame).

use std::path::PathBuf;

use anyhow::{Context, Result};
use image::imageops::FilterType;
use image::{GrayImage, Rgb, RgbImage};
use polypwatch::dataset::Dataset;

/// A window counts as showing the polyp when polyp pixels cover this fraction of it.
const IN_VIEW_FRACTION: f64 = 0.01;

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
    let (w, h) = img.dimensions();
    let (x0, x1) = polyp_columns(&mask).context("the mask has no polyp")?;
    // Window: 45% of the width, full height; it travels from left of the polyp to right of it.
    let ww = match out_h {
        Some(oh) => ((h as f32 * out_w as f32 / oh as f32) as i64).min(w as i64),
        None => (w as f32 * 0.45) as i64,
    };
    let out_h = out_h.unwrap_or((out_w as f32 * h as f32 / ww as f32).round() as u32);
    // Half a window of empty travel on each side, so the clip starts and ends without polyp.
    let start = x0 as i64 - ww - ww / 2;
    let end = x1 as i64 + ww / 2;
    std::fs::create_dir_all(&out)?;
    let mut labels = String::from("frame,polyp_in_view,polyp_fraction\n");
    for i in 0..frames {
        let left = start + (end - start) * i as i64 / (frames as i64 - 1);
        let mut win = RgbImage::new(ww as u32, h);
        let mut polyp = 0u64;
        for y in 0..h {
            for x in 0..ww as u32 {
                let sx = left + x as i64;
                if sx >= 0 && sx < w as i64 {
                    win.put_pixel(x, y, *img.get_pixel(sx as u32, y));
                    polyp += u64::from(mask.get_pixel(sx as u32, y).0[0] > 127);
                } else {
                    win.put_pixel(x, y, Rgb([0, 0, 0]));
                }
            }
        }
        let frac = polyp as f64 / (ww as u64 * h as u64) as f64;
        let file = format!("frame_{i:04}.jpg");
        image::imageops::resize(&win, out_w, out_h, FilterType::Triangle).save(out.join(&file))?;
        labels += &format!("{file},{},{frac:.4}\n", u8::from(frac >= IN_VIEW_FRACTION));
    }
    std::fs::write(out.join("labels.csv"), labels)?;
    println!(
        "wrote {frames} frames of {out_w}x{out_h} to {}",
        out.display()
    );
    Ok(())
}

fn polyp_columns(mask: &GrayImage) -> Option<(u32, u32)> {
    let cols: Vec<u32> = (0..mask.width())
        .filter(|&x| (0..mask.height()).any(|y| mask.get_pixel(x, y).0[0] > 127))
        .collect();
    Some((*cols.first()?, *cols.last()?))
}
