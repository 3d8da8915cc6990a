//! A fixed number of passes of the capture thread's work on one camera-sized frame, for
//! counting instructions as `count_runs` counts inference: `bench/aarch64.sh` (CAPTURE=...)
//! runs it under qemu with RUNS = 10 and RUNS = 0 and takes the difference.
//!
//! cargo run --release --example count_capture -- MANIFEST FRAME FORMAT WIDTHxHEIGHT WARMUP RUNS
//!
//! FRAME (a JPEG/PNG) is scaled to WIDTHxHEIGHT and encoded once as the camera would deliver
//! it in FORMAT (`yuyv`, `nv12` or `mjpeg`, the last at quality 90); a pass is then what the
//! daemon's capture thread does per frame: the pixel-format conversion (or JPEG decode) into
//! RGB and the manifest's resize and normalisation into the model's input. The blank-frame
//! check, which the daemon runs on the inference thread, is counted with it (about 0.1 M
//! instructions a 1080p frame).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use image::RgbImage;
use polypwatch::model::Segmenter;
use polypwatch::pixfmt::{self, PixelFormat};
use polypwatch::preprocess;

/// BT.601 limited range from RGB, the inverse of `pixfmt`'s conversion (to make the frame).
fn yuv(p: &[u8]) -> (u8, u8, u8) {
    let (r, g, b) = (f32::from(p[0]), f32::from(p[1]), f32::from(p[2]));
    let y = 16.0 + 0.257 * r + 0.504 * g + 0.098 * b;
    let u = 128.0 - 0.148 * r - 0.291 * g + 0.439 * b;
    let v = 128.0 + 0.439 * r - 0.368 * g - 0.071 * b;
    let q = |x: f32| x.round().clamp(0.0, 255.0) as u8;
    (q(y), q(u), q(v))
}

/// `img` as the camera delivers it in `format`, and its line stride.
fn encode(img: &RgbImage, format: PixelFormat) -> Result<(Vec<u8>, usize)> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let px = |x: usize, y: usize| yuv(&img.as_raw()[(y * w + x) * 3..][..3]);
    Ok(match format {
        PixelFormat::Yuyv => {
            let mut out = Vec::with_capacity(w * h * 2);
            for y in 0..h {
                for x in (0..w).step_by(2) {
                    let (y0, u, v) = px(x, y);
                    let (y1, _, _) = px((x + 1).min(w - 1), y);
                    out.extend_from_slice(&[y0, u, y1, v]);
                }
            }
            (out, w.div_ceil(2) * 4)
        }
        PixelFormat::Nv12 => {
            let mut out: Vec<u8> = (0..h)
                .flat_map(|y| (0..w).map(move |x| (x, y)))
                .map(|(x, y)| px(x, y).0)
                .collect();
            for y in (0..h).step_by(2) {
                for x in (0..w).step_by(2) {
                    let (_, u, v) = px(x, y);
                    out.extend_from_slice(&[u, v]);
                }
            }
            (out, w)
        }
        PixelFormat::Mjpeg => {
            let mut out = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90).encode_image(img)?;
            (out, 0)
        }
        other => bail!("count_capture: format {other} is not one a camera of ours delivers"),
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: count_capture MANIFEST FRAME FORMAT WIDTHxHEIGHT WARMUP RUNS";
    let arg = |i: usize| args.get(i).context(usage);
    let seg = Segmenter::load(&PathBuf::from(arg(0)?))?;
    let frame = preprocess::load_rgb(&PathBuf::from(arg(1)?))?;
    let format: PixelFormat = arg(2)?.parse().map_err(anyhow::Error::msg)?;
    let (w, h) = arg(3)?
        .split_once('x')
        .and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)))
        .context("WIDTHxHEIGHT, e.g. 1920x1080")?;
    let warmup: usize = arg(4)?.parse()?;
    let runs: usize = arg(5)?.parse()?;
    let camera = image::imageops::resize(&frame, w, h, image::imageops::FilterType::Triangle);
    let (bytes, stride) = encode(&camera, format)?;
    let recipe = &seg.manifest().preprocess;
    let mut rgb = RgbImage::new(0, 0);
    let mut sum = 0.0f64;
    let mut blank = 0;
    for _ in 0..warmup + runs {
        pixfmt::convert(format, &bytes, w, h, stride, &mut rgb)?;
        let input = recipe.tensor_from_rgb(&rgb);
        sum += input.iter().map(|&v| f64::from(v)).sum::<f64>();
        blank += usize::from(preprocess::is_blank(&rgb));
    }
    println!(
        "{format} {w}x{h} ({} bytes): {warmup} warm-up + {runs} passes, input sum {sum:.6e}, {blank} blank",
        bytes.len()
    );
    Ok(())
}
