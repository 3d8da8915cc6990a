//! Pixel formats that capture cards and USB grabbers deliver, converted to RGB.
//!
//! YUV formats use BT.601 limited ("video") range, what SD/HD capture hardware emits for
//! endoscopy feeds. Every converter writes into a caller-owned image so the capture loop
//! reuses one buffer instead of allocating per frame.

use image::RgbImage;

#[cfg(target_arch = "aarch64")]
mod aarch64;

/// The formats the V4L2 source accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PixelFormat {
    /// Motion JPEG: one JPEG per frame.
    Mjpeg,
    /// Packed 4:2:2, Y0 U Y1 V.
    Yuyv,
    /// Planar Y then interleaved UV at half resolution both ways.
    Nv12,
    /// Packed 8-bit R, G, B.
    Rgb24,
    /// Packed 8-bit B, G, R.
    Bgr24,
}

impl PixelFormat {
    /// All formats, in the order the V4L2 source tries them when none is configured.
    pub const ALL: [PixelFormat; 5] = [
        PixelFormat::Mjpeg,
        PixelFormat::Yuyv,
        PixelFormat::Nv12,
        PixelFormat::Rgb24,
        PixelFormat::Bgr24,
    ];

    /// The V4L2 four-character code.
    pub fn fourcc(self) -> [u8; 4] {
        match self {
            PixelFormat::Mjpeg => *b"MJPG",
            PixelFormat::Yuyv => *b"YUYV",
            PixelFormat::Nv12 => *b"NV12",
            PixelFormat::Rgb24 => *b"RGB3",
            PixelFormat::Bgr24 => *b"BGR3",
        }
    }

    /// The format with this code, if supported.
    pub fn from_fourcc(code: [u8; 4]) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.fourcc() == code)
    }

    /// Smallest line stride in bytes for `width` pixels (0 for compressed formats).
    pub fn min_stride(self, width: u32) -> usize {
        let w = width as usize;
        match self {
            PixelFormat::Mjpeg => 0,
            PixelFormat::Yuyv => w.div_ceil(2) * 4,
            PixelFormat::Nv12 => w.div_ceil(2) * 2,
            PixelFormat::Rgb24 | PixelFormat::Bgr24 => w * 3,
        }
    }

    /// Smallest buffer for a frame with this stride (0 for compressed formats).
    pub fn min_len(self, width: u32, height: u32, stride: usize) -> usize {
        let h = height as usize;
        match self {
            PixelFormat::Mjpeg => 0,
            PixelFormat::Nv12 if h > 0 => {
                stride * h + stride * (h.div_ceil(2) - 1) + self.min_stride(width)
            }
            _ if h > 0 => stride * (h - 1) + self.min_stride(width),
            _ => 0,
        }
    }
}

impl std::fmt::Display for PixelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(std::str::from_utf8(&self.fourcc()).unwrap_or("????"))
    }
}

impl std::str::FromStr for PixelFormat {
    type Err = String;

    /// The configuration's name (`mjpeg`, `yuyv`, `nv12`, `rgb24`, `bgr24`): the same words
    /// as `[camera] format`, through the same serde names.
    fn from_str(name: &str) -> Result<Self, String> {
        use serde::Deserialize;
        let de = serde::de::value::StrDeserializer::<serde::de::value::Error>::new(name);
        PixelFormat::deserialize(de).map_err(|e| format!("pixel format {name:?}: {e}"))
    }
}

/// Why a buffer could not be converted.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConvertError {
    /// The buffer is shorter than the negotiated geometry needs (a truncated frame).
    #[error("{format} frame {width}x{height} stride {stride} needs {need} bytes, got {got}")]
    Short {
        /// Format.
        format: PixelFormat,
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// Line stride in bytes.
        stride: usize,
        /// Bytes needed.
        need: usize,
        /// Bytes received.
        got: usize,
    },
    /// The stride is smaller than a line.
    #[error("{format} stride {stride} is shorter than a line of {width} pixels")]
    Stride {
        /// Format.
        format: PixelFormat,
        /// Width in pixels.
        width: u32,
        /// Line stride in bytes.
        stride: usize,
    },
    /// An MJPEG frame that does not decode.
    #[error("MJPEG frame does not decode: {0}")]
    Jpeg(String),
}

/// BT.601 limited range to RGB, in 16.16 fixed point.
#[inline]
fn yuv_to_rgb(y: u8, u: u8, v: u8) -> [u8; 3] {
    let c = (y as i32 - 16).max(0) * 76_309; // 1.164 * 65536
    let d = u as i32 - 128;
    let e = v as i32 - 128;
    let r = (c + 104_597 * e + 32_768) >> 16;
    let g = (c - 25_675 * d - 53_279 * e + 32_768) >> 16;
    let b = (c + 132_201 * d + 32_768) >> 16;
    [
        r.clamp(0, 255) as u8,
        g.clamp(0, 255) as u8,
        b.clamp(0, 255) as u8,
    ]
}

/// Converts one frame into `dst`, resizing `dst` only when the geometry changed.
pub fn convert(
    format: PixelFormat,
    src: &[u8],
    width: u32,
    height: u32,
    stride: usize,
    dst: &mut RgbImage,
) -> Result<(), ConvertError> {
    if format == PixelFormat::Mjpeg {
        if !crate::preprocess::jpeg_is_complete(src) {
            return Err(ConvertError::Jpeg(
                "truncated frame (no end-of-image marker)".into(),
            ));
        }
        let img = crate::preprocess::decode_limited(src)
            .map_err(|e| ConvertError::Jpeg(e.to_string()))?;
        *dst = img.into_rgb8();
        return Ok(());
    }
    if stride < format.min_stride(width) {
        return Err(ConvertError::Stride {
            format,
            width,
            stride,
        });
    }
    let need = format.min_len(width, height, stride);
    if src.len() < need {
        return Err(ConvertError::Short {
            format,
            width,
            height,
            stride,
            need,
            got: src.len(),
        });
    }
    if dst.dimensions() != (width, height) {
        *dst = RgbImage::new(width, height);
    }
    let (w, h) = (width as usize, height as usize);
    let out: &mut [u8] = dst;
    for row in 0..h {
        let line = &src[row * stride..];
        let o = &mut out[row * w * 3..(row + 1) * w * 3];
        match format {
            PixelFormat::Rgb24 => o.copy_from_slice(&line[..w * 3]),
            PixelFormat::Bgr24 => {
                for (px, bgr) in o.chunks_exact_mut(3).zip(line.chunks_exact(3)) {
                    px.copy_from_slice(&[bgr[2], bgr[1], bgr[0]]);
                }
            }
            PixelFormat::Yuyv => {
                #[cfg(target_arch = "aarch64")]
                let done = aarch64::yuyv(line, o, w);
                #[cfg(not(target_arch = "aarch64"))]
                let done = 0;
                for x in done..w {
                    let quad = &line[(x / 2) * 4..(x / 2) * 4 + 4];
                    let y = quad[(x % 2) * 2];
                    o[x * 3..x * 3 + 3].copy_from_slice(&yuv_to_rgb(y, quad[1], quad[3]));
                }
            }
            PixelFormat::Nv12 => {
                let uv = &src[h * stride + (row / 2) * stride..];
                #[cfg(target_arch = "aarch64")]
                let done = aarch64::nv12(&line[..w], uv, o, w);
                #[cfg(not(target_arch = "aarch64"))]
                let done = 0;
                for x in done..w {
                    let (u, v) = (uv[(x / 2) * 2], uv[(x / 2) * 2 + 1]);
                    o[x * 3..x * 3 + 3].copy_from_slice(&yuv_to_rgb(line[x], u, v));
                }
            }
            PixelFormat::Mjpeg => unreachable!("decoded above"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const WHITE: (u8, u8, u8) = (235, 128, 128);
    const BLACK: (u8, u8, u8) = (16, 128, 128);
    // BT.601 limited-range codes of pure red and pure blue.
    const RED: (u8, u8, u8) = (81, 90, 240);
    const BLUE: (u8, u8, u8) = (41, 240, 110);

    fn close(a: [u8; 3], b: [u8; 3]) -> bool {
        a.iter().zip(b).all(|(x, y)| x.abs_diff(y) <= 2)
    }

    #[test]
    fn reference_colours() {
        assert_eq!(yuv_to_rgb(WHITE.0, WHITE.1, WHITE.2), [255, 255, 255]);
        assert_eq!(yuv_to_rgb(BLACK.0, BLACK.1, BLACK.2), [0, 0, 0]);
        assert!(close(yuv_to_rgb(RED.0, RED.1, RED.2), [255, 0, 0]));
        assert!(close(yuv_to_rgb(BLUE.0, BLUE.1, BLUE.2), [0, 0, 255]));
    }

    #[test]
    fn yuyv_odd_width_with_padding() {
        // 3x2, stride 16 (two YUYV quads = 8 bytes, plus 8 bytes of padding per line).
        // Row 0: white, white | red (its pair's second Y is padding). Row 1: black, black | blue.
        let mut src = vec![0xEEu8; 32];
        src[0..8].copy_from_slice(&[WHITE.0, 128, WHITE.0, 128, RED.0, RED.1, 0, RED.2]);
        src[16..24].copy_from_slice(&[BLACK.0, 128, BLACK.0, 128, BLUE.0, BLUE.1, 0, BLUE.2]);
        let mut dst = RgbImage::new(1, 1);
        convert(PixelFormat::Yuyv, &src, 3, 2, 16, &mut dst).unwrap();
        assert_eq!(dst.dimensions(), (3, 2));
        assert_eq!(dst.get_pixel(1, 0).0, [255, 255, 255]);
        assert!(close(dst.get_pixel(2, 0).0, [255, 0, 0]));
        assert_eq!(dst.get_pixel(0, 1).0, [0, 0, 0]);
        assert!(close(dst.get_pixel(2, 1).0, [0, 0, 255]));
    }

    #[test]
    fn nv12_odd_size_with_stride() {
        // 3x3, stride 4: Y plane 3 rows, then UV plane 2 rows of 2 pairs.
        let mut src = vec![0u8; 4 * 3 + 4 * 2];
        for r in 0..3 {
            src[r * 4..r * 4 + 3].copy_from_slice(&[RED.0, RED.0, BLUE.0]);
        }
        // Chroma pair 0 (columns 0-1) red, pair 1 (column 2) blue, on both chroma rows.
        for r in 0..2 {
            src[12 + r * 4..12 + r * 4 + 4].copy_from_slice(&[RED.1, RED.2, BLUE.1, BLUE.2]);
        }
        let mut dst = RgbImage::new(3, 3);
        convert(PixelFormat::Nv12, &src, 3, 3, 4, &mut dst).unwrap();
        for y in 0..3 {
            assert!(close(dst.get_pixel(0, y).0, [255, 0, 0]));
            assert!(close(dst.get_pixel(1, y).0, [255, 0, 0]));
            assert!(close(dst.get_pixel(2, y).0, [0, 0, 255]));
        }
        // The last line of the UV plane needs only its used bytes, not a full stride.
        assert_eq!(PixelFormat::Nv12.min_len(3, 3, 4), 12 + 4 + 4);
    }

    #[test]
    fn rgb_and_bgr_with_stride() {
        let src = [1, 2, 3, 4, 5, 6, 0, 0, 7, 8, 9, 10, 11, 12, 0, 0];
        let mut dst = RgbImage::new(2, 2);
        convert(PixelFormat::Rgb24, &src, 2, 2, 8, &mut dst).unwrap();
        assert_eq!(dst.as_raw(), &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        convert(PixelFormat::Bgr24, &src, 2, 2, 8, &mut dst).unwrap();
        assert_eq!(dst.get_pixel(1, 1).0, [12, 11, 10]);
    }

    #[test]
    fn mjpeg_decodes_and_garbage_is_an_error() {
        let img = RgbImage::from_pixel(5, 3, image::Rgb([200, 30, 40]));
        let mut jpg = Vec::new();
        img.write_to(
            &mut std::io::Cursor::new(&mut jpg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
        let mut dst = RgbImage::new(1, 1);
        convert(PixelFormat::Mjpeg, &jpg, 5, 3, 0, &mut dst).unwrap();
        assert_eq!(dst.dimensions(), (5, 3));
        assert!(close(dst.get_pixel(2, 1).0, [200, 30, 40]));
        let err = convert(PixelFormat::Mjpeg, b"\xff\xd8garbage", 5, 3, 0, &mut dst);
        assert!(matches!(err, Err(ConvertError::Jpeg(_))));
        // A USB frame cut short decodes "fine" (the decoder fills the rest): refused.
        let err = convert(
            PixelFormat::Mjpeg,
            &jpg[..jpg.len() - 10],
            5,
            3,
            0,
            &mut dst,
        );
        assert!(
            matches!(err, Err(ConvertError::Jpeg(ref m)) if m.contains("truncated")),
            "{err:?}"
        );
    }

    #[test]
    fn short_buffers_and_strides_are_refused() {
        let mut dst = RgbImage::new(1, 1);
        let err = convert(PixelFormat::Yuyv, &[0; 10], 4, 2, 8, &mut dst).unwrap_err();
        assert_eq!(
            err.to_string(),
            "YUYV frame 4x2 stride 8 needs 16 bytes, got 10"
        );
        let err = convert(PixelFormat::Rgb24, &[0; 100], 4, 2, 8, &mut dst).unwrap_err();
        assert!(matches!(err, ConvertError::Stride { .. }), "{err}");
    }

    /// Every YUYV and NV12 byte pattern converts to `yuv_to_rgb`'s pixels, at widths that
    /// leave no, some and most pixels to the scalar tail of the vector loop (aarch64).
    #[test]
    fn conversions_are_yuv_to_rgb_of_every_pixel() {
        let mut seed = 0x9e37_79b9_u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed as u8
        };
        for (w, h) in [(16, 2), (37, 3), (64, 2), (15, 2), (50, 5)] {
            // Extremes first (clamping both ways), then random bytes.
            let n = 4 * w * h;
            let src: Vec<u8> = (0..n)
                .map(|i| match i % 97 {
                    0..=7 => [0, 255, 16, 235, 128, 1, 254, 240][i % 8],
                    _ => next(),
                })
                .collect();
            // Every pixel of `src` converted as `format` with `stride` is `want(x, y)`'s.
            let check =
                |format: PixelFormat, stride: usize, want: &dyn Fn(usize, usize) -> [u8; 3]| {
                    let mut dst = RgbImage::new(1, 1);
                    convert(format, &src, w as u32, h as u32, stride, &mut dst).unwrap();
                    assert_eq!(dst.dimensions(), (w as u32, h as u32));
                    for (x, y, px) in dst.enumerate_pixels() {
                        let (x, y) = (x as usize, y as usize);
                        assert_eq!(px.0, want(x, y), "{format} {w}x{h} {x},{y}");
                    }
                };
            let stride = PixelFormat::Yuyv.min_stride(w as u32) + 4;
            check(PixelFormat::Yuyv, stride, &|x, y| {
                let q = &src[y * stride + (x / 2) * 4..];
                yuv_to_rgb(q[(x % 2) * 2], q[1], q[3])
            });
            let stride = w + 3;
            check(PixelFormat::Nv12, stride, &|x, y| {
                let uv = &src[h * stride + (y / 2) * stride + (x / 2) * 2..];
                yuv_to_rgb(src[y * stride + x], uv[0], uv[1])
            });
        }
    }

    #[test]
    fn fourcc_round_trip() {
        for f in PixelFormat::ALL {
            assert_eq!(PixelFormat::from_fourcc(f.fourcc()), Some(f));
        }
        assert_eq!(PixelFormat::from_fourcc(*b"H264"), None);
    }

    #[test]
    fn names_parse_as_the_config_spells_them() {
        for (name, f) in [("mjpeg", PixelFormat::Mjpeg), ("yuyv", PixelFormat::Yuyv)] {
            assert_eq!(name.parse::<PixelFormat>(), Ok(f));
        }
        for f in PixelFormat::ALL {
            let name = toml::Value::try_from(f).unwrap();
            assert_eq!(name.as_str().unwrap().parse::<PixelFormat>(), Ok(f));
        }
        let e = "h264".parse::<PixelFormat>().unwrap_err();
        assert!(e.contains("\"h264\"") && e.contains("yuyv"), "{e}");
    }
}
