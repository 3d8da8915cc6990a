//! Frame sources. The daemon reads frames through [`FrameSource`]; `replay` plays images from
//! disk (the V4L2 camera source implements the same trait).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use image::RgbImage;

use crate::preprocess::{self, PreprocessError};

/// A decoded frame.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Sequence number of the frame at the source (gaps are frames dropped before decoding).
    pub seq: u64,
    /// When the frame arrived: dequeued from the camera, or read from the replay file (before
    /// decoding). Latencies are measured from here.
    pub captured: Instant,
    /// Time spent turning the buffer into RGB pixels (JPEG decoding, pixel format conversion).
    pub decode_ms: f64,
    /// Milliseconds since the stream started.
    pub t_ms: u64,
    /// Where it came from (file name, or device).
    pub origin: String,
    /// The pixels.
    pub image: RgbImage,
}

/// Errors of a frame source.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The source cannot be opened at all.
    #[error("frame source {what}: {message}")]
    Open {
        /// The source.
        what: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// One frame could not be read or decoded; the stream goes on.
    #[error("skipping frame {seq}: {error}")]
    BadFrame {
        /// Its sequence number.
        seq: u64,
        /// Why.
        error: PreprocessError,
    },
    /// One camera buffer could not be converted; the stream goes on.
    #[error("skipping frame {seq}: {error}")]
    BadBuffer {
        /// Its sequence number.
        seq: u64,
        /// Why.
        error: crate::pixfmt::ConvertError,
    },
    /// No frame this time (camera missing, reconnecting or stalled); the source logs why and
    /// retries, and the caller asks again.
    #[error("waiting for the frame source")]
    Waiting,
    /// A source that was streaming is gone (a camera unplugged, a failing capture): returned
    /// once when it goes, then [`CaptureError::Waiting`] until it is back. The source has
    /// logged it.
    #[error("frame source lost: {reason}")]
    Lost {
        /// Why, as the source logged it.
        reason: String,
    },
}

/// A stream of frames.
pub trait FrameSource: Send {
    /// The next frame; `Ok(None)` at the end of a finite stream. A [`CaptureError::BadFrame`] is
    /// one lost frame, not the end of the stream.
    fn next_frame(&mut self) -> Result<Option<Frame>, CaptureError>;
    /// One line describing the source for logs.
    fn describe(&self) -> String;
    /// Whether frames arrive at their own pace (a camera, a paced replay). An unpaced source is
    /// read only when the pipeline has taken the previous frame, so it loses none.
    fn paced(&self) -> bool {
        true
    }
}

/// Plays image files in order, paced at a frame rate.
pub struct Replay {
    files: Vec<PathBuf>,
    fps: f64,
    looping: bool,
    next: usize,
    seq: u64,
    start: Option<Instant>,
    what: String,
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| crate::dataset::EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The frames of a folder, by name: its files with an image extension
/// ([`crate::dataset::EXTENSIONS`]). Replay and `bench` list folders by this one rule.
pub fn list_frames(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_image(p))
        .collect();
    v.sort();
    Ok(v)
}

impl Replay {
    /// Opens a folder (its images, sorted by name) or a list file (one path per line, relative
    /// to the list's folder). `fps` 0 plays as fast as frames are taken.
    pub fn open(path: &Path, fps: f64, looping: bool) -> Result<Self, CaptureError> {
        let what = format!("replay {}", path.display());
        let open_err = |message: String| CaptureError::Open {
            what: what.clone(),
            message,
        };
        let files: Vec<PathBuf> = if path.is_dir() {
            list_frames(path).map_err(|e| open_err(e.to_string()))?
        } else {
            let text = crate::files::read_text(path, crate::files::TEXT_CAP)
                .map_err(|e| open_err(format!("{e}: give a folder of images or a list file")))?;
            let base = path.parent().unwrap_or(Path::new("."));
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(|l| base.join(l))
                .collect()
        };
        if files.is_empty() {
            return Err(open_err("no frames (jpg, png, tif) found".into()));
        }
        if !path.is_dir() && !files.iter().any(|f| f.is_file()) {
            return Err(open_err(format!(
                "none of the {} frames it lists exists (paths are relative to the list file's folder)",
                files.len()
            )));
        }
        Ok(Replay {
            files,
            fps,
            looping,
            next: 0,
            seq: 0,
            start: None,
            what,
        })
    }

    /// Number of files per pass.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether the replay has no frames (never true after `open`).
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

impl FrameSource for Replay {
    fn next_frame(&mut self) -> Result<Option<Frame>, CaptureError> {
        if self.next == self.files.len() {
            if !self.looping {
                return Ok(None);
            }
            self.next = 0;
        }
        let start = *self.start.get_or_insert_with(Instant::now);
        if self.fps > 0.0 {
            let due = start + Duration::from_secs_f64(self.seq as f64 / self.fps);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        let path = &self.files[self.next];
        let seq = self.seq;
        self.next += 1;
        self.seq += 1;
        let captured = Instant::now();
        let image = preprocess::load_rgb(path)
            .map_err(|source| CaptureError::BadFrame { seq, error: source })?;
        Ok(Some(Frame {
            seq,
            captured,
            decode_ms: captured.elapsed().as_secs_f64() * 1e3,
            t_ms: (captured - start).as_millis() as u64,
            origin: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            image,
        }))
    }

    fn paced(&self) -> bool {
        self.fps > 0.0
    }

    fn describe(&self) -> String {
        format!(
            "{} ({} frames, {}, {})",
            self.what,
            self.files.len(),
            if self.fps > 0.0 {
                format!("{} fps", self.fps)
            } else {
                "unpaced".into()
            },
            if self.looping { "looping" } else { "once" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn replays_sorted_skips_corrupt_and_ends() {
        let d = tempfile::tempdir().unwrap();
        for (n, ok) in [("b.png", true), ("a.png", true), ("c.jpg", false)] {
            let p = d.path().join(n);
            if ok {
                RgbImage::from_pixel(4, 4, Rgb([1, 2, 3])).save(&p).unwrap();
            } else {
                std::fs::write(&p, b"\xff\xd8\xff truncated").unwrap();
            }
        }
        let mut r = Replay::open(d.path(), 0.0, false).unwrap();
        assert_eq!(r.next_frame().unwrap().unwrap().origin, "a.png");
        assert_eq!(r.next_frame().unwrap().unwrap().origin, "b.png");
        let err = r.next_frame().unwrap_err().to_string();
        assert!(
            err.contains("c.jpg") && err.contains("skipping frame 2"),
            "{err}"
        );
        assert!(r.next_frame().unwrap().is_none());
    }

    #[test]
    fn loops_and_paces() {
        let d = tempfile::tempdir().unwrap();
        RgbImage::new(2, 2).save(d.path().join("x.png")).unwrap();
        let mut r = Replay::open(d.path(), 100.0, true).unwrap();
        let t = Instant::now();
        for i in 0..5 {
            assert_eq!(r.next_frame().unwrap().unwrap().seq, i);
        }
        // Frame 4 is due 40 ms after frame 0.
        assert!(t.elapsed() >= Duration::from_millis(39));
    }

    #[test]
    fn empty_or_missing_sources_are_clear() {
        let d = tempfile::tempdir().unwrap();
        let err = Replay::open(d.path(), 0.0, false)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("no frames"), "{err}");
        let err = Replay::open(&d.path().join("nope"), 0.0, false)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("nope"), "{err}");
        let list = d.path().join("frames.txt");
        std::fs::write(&list, "a.jpg\nb.jpg\n").unwrap();
        let err = Replay::open(&list, 0.0, false).err().unwrap().to_string();
        assert!(err.contains("none of the 2 frames"), "{err}");
    }
}
