//! Labelled replay clips made from still images: a window pans across an image so that what
//! it shows changes frame by frame, as an endoscope's view does. `examples/make_clip` (the
//! demo) and `examples/make_alert_clip` (the alert-level evaluation) write them; the frames'
//! labels go in `labels.csv`, which [`crate::alert_eval::read_clip`] reads.

use std::path::Path;

use image::imageops::FilterType;
use image::{GrayImage, Rgb, RgbImage};

/// A window counts as showing the polyp when polyp pixels cover this fraction of it.
pub const IN_VIEW_FRACTION: f64 = 0.01;

/// One frame of a clip and the fraction of it covered by polyp pixels.
pub struct ClipFrame {
    /// The frame, at the output size.
    pub image: RgbImage,
    /// Polyp pixels over window pixels (0 for a polyp-free image).
    pub polyp_fraction: f64,
}

fn window(
    img: &RgbImage,
    mask: Option<&GrayImage>,
    left: i64,
    top: i64,
    ww: u32,
    wh: u32,
) -> (RgbImage, f64) {
    let (w, h) = img.dimensions();
    let mut win = RgbImage::new(ww, wh);
    let mut polyp = 0u64;
    for y in 0..wh {
        for x in 0..ww {
            let (sx, sy) = (left + x as i64, top + y as i64);
            if sx >= 0 && sy >= 0 && sx < w as i64 && sy < h as i64 {
                win.put_pixel(x, y, *img.get_pixel(sx as u32, sy as u32));
                polyp +=
                    u64::from(mask.is_some_and(|m| m.get_pixel(sx as u32, sy as u32).0[0] > 127));
            } else {
                win.put_pixel(x, y, Rgb([0, 0, 0]));
            }
        }
    }
    (win, polyp as f64 / (ww as u64 * wh as u64) as f64)
}

fn polyp_columns(mask: &GrayImage) -> Option<(u32, u32)> {
    let cols: Vec<u32> = (0..mask.width())
        .filter(|&x| (0..mask.height()).any(|y| mask.get_pixel(x, y).0[0] > 127))
        .collect();
    Some((*cols.first()?, *cols.last()?))
}

/// A pan across a polyp image from left of the polyp to right of it, starting and ending
/// with half a window of empty travel, so the polyp enters and leaves the view. The window is
/// the full height and 45 % of the width, or the output's aspect ratio when `out_h` is given.
/// `None` when the mask has no polyp.
pub fn polyp_pan(
    img: &RgbImage,
    mask: &GrayImage,
    frames: usize,
    out_w: u32,
    out_h: Option<u32>,
) -> Option<Vec<ClipFrame>> {
    let (w, h) = img.dimensions();
    let (x0, x1) = polyp_columns(mask)?;
    let ww = match out_h {
        Some(oh) => ((h as f32 * out_w as f32 / oh as f32) as i64).min(w as i64),
        None => (w as f32 * 0.45) as i64,
    };
    let out_h = out_h.unwrap_or((out_w as f32 * h as f32 / ww as f32).round() as u32);
    let start = x0 as i64 - ww - ww / 2;
    let end = x1 as i64 + ww / 2;
    Some(
        (0..frames)
            .map(|i| {
                let left = start + (end - start) * i as i64 / (frames as i64 - 1).max(1);
                let (win, frac) = window(img, Some(mask), left, 0, ww as u32, h);
                ClipFrame {
                    image: image::imageops::resize(&win, out_w, out_h, FilterType::Triangle),
                    polyp_fraction: frac,
                }
            })
            .collect(),
    )
}

/// A slow diagonal pan of a window of 80 % of a polyp-free image's sides, at `out_w` x `out_h`.
pub fn free_pan(img: &RgbImage, frames: usize, out_w: u32, out_h: u32) -> Vec<ClipFrame> {
    let (w, h) = img.dimensions();
    let (ww, wh) = ((w as f32 * 0.8) as u32, (h as f32 * 0.8) as u32);
    let (tx, ty) = ((w - ww) as i64, (h - wh) as i64);
    (0..frames)
        .map(|i| {
            let k = i as i64;
            let n = (frames as i64 - 1).max(1);
            let (win, _) = window(img, None, tx * k / n, ty * k / n, ww, wh);
            ClipFrame {
                image: image::imageops::resize(&win, out_w, out_h, FilterType::Triangle),
                polyp_fraction: 0.0,
            }
        })
        .collect()
}

/// Writes frames as `frame_NNNNN.jpg` (numbering from `first`) into `dir` and returns their
/// `labels.csv` lines.
pub fn write_frames(dir: &Path, first: usize, frames: &[ClipFrame]) -> image::ImageResult<String> {
    let mut labels = String::new();
    for (k, f) in frames.iter().enumerate() {
        let file = format!("frame_{:05}.jpg", first + k);
        f.image.save(dir.join(&file))?;
        labels += &format!(
            "{file},{},{:.4}\n",
            u8::from(f.polyp_fraction >= IN_VIEW_FRACTION),
            f.polyp_fraction
        );
    }
    Ok(labels)
}

/// The header line of `labels.csv`.
pub const LABELS_HEADER: &str = "frame,polyp_in_view,polyp_fraction\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pan_shows_the_polyp_in_the_middle_only() {
        // 100x40 image, polyp in columns 45..55.
        let img = RgbImage::from_pixel(100, 40, Rgb([200, 80, 80]));
        let mask = GrayImage::from_fn(100, 40, |x, _| {
            image::Luma([if (45..55).contains(&x) { 255 } else { 0 }])
        });
        let f = polyp_pan(&img, &mask, 21, 32, None).unwrap();
        assert_eq!(f.len(), 21);
        let seen: Vec<bool> = f
            .iter()
            .map(|c| c.polyp_fraction >= IN_VIEW_FRACTION)
            .collect();
        assert!(!seen[0] && !seen[20], "{seen:?}");
        assert!(seen[10]);
        assert!(polyp_pan(&img, &GrayImage::new(100, 40), 5, 32, None).is_none());
        let free = free_pan(&img, 4, 16, 16);
        assert!(
            free.iter()
                .all(|c| c.polyp_fraction == 0.0 && c.image.dimensions() == (16, 16))
        );
    }
}
