//! Alert-level evaluation: labelled frame sequences replayed through the real
//! [`AlertMachine`] at a frame rate, scored the way an endoscopist lives them.
//!
//! A clip is a folder of frames in name order with a `labels.csv` (`frame,polyp_in_view,...`,
//! as `examples/make_clip` and `examples/make_alert_clip` write it). Every maximal run of
//! frames labelled 1 is one polyp sequence; the frames labelled 0 are the polyp-free
//! stretches. Each clip is its own stream (the alert machine starts idle).
//!
//! - **time to alert** of a sequence: from its first frame to the first frame with an alert
//!   active (0 when an alert is already active); a sequence that ends with none is missed;
//! - **polyp frames under an alert**: the share of the sequence's frames with an alert active;
//! - **false alarms**: alerts raised on a polyp-free frame, per minute of polyp-free frames;
//! - **polyp-free frames under an alert** (this includes an alert held on after a polyp left).
//!
//! A frame labelled 0 whose third column (`polyp_fraction`) is above 0 shows the edge of a
//! polyp coming into view or leaving it, below the in-view share: it is neither a polyp frame
//! nor a polyp-free one, and an alert raised on it is not a false alarm (the polyp is there).

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::alert::{AlertConfig, AlertMachine, Transition};

/// Errors of reading a clip's labels.
#[derive(Debug, thiserror::Error)]
pub enum ClipError {
    /// `labels.csv` is missing or unreadable.
    #[error("cannot read {path}: {error}; a labelled clip needs labels.csv (frame,polyp_in_view)")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// A line is not `frame,0|1,...`.
    #[error("{path} line {line}: expected frame,polyp_in_view (0 or 1), found {text:?}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// No frame listed.
    #[error("{0} lists no frame")]
    Empty(PathBuf),
}

/// What a labelled frame shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// No polyp pixel.
    Free,
    /// Part of a polyp, below the in-view share (see the module docs).
    Edge,
    /// A polyp in view.
    Polyp,
}

/// One labelled frame of a clip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelledFrame {
    /// The frame file, in the clip folder.
    pub path: PathBuf,
    /// What it shows.
    pub seen: Seen,
}

/// Reads a clip folder's `labels.csv` (a header line, then `frame,polyp_in_view[,...]`).
pub fn read_clip(dir: &Path) -> Result<Vec<LabelledFrame>, ClipError> {
    let path = dir.join("labels.csv");
    let text = crate::files::read_text(&path, crate::files::TEXT_CAP).map_err(|source| {
        ClipError::Read {
            path: path.clone(),
            error: source,
        }
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let mut f = line.split(',');
        let (Some(frame), Some(label)) = (f.next(), f.next()) else {
            return Err(ClipError::Line {
                path,
                line: i + 1,
                text: line.into(),
            });
        };
        let visible = f
            .next()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .is_some_and(|v| v > 0.0);
        let seen = match label.trim() {
            "1" => Seen::Polyp,
            "0" if visible => Seen::Edge,
            "0" => Seen::Free,
            _ => {
                return Err(ClipError::Line {
                    path,
                    line: i + 1,
                    text: line.into(),
                });
            }
        };
        out.push(LabelledFrame {
            path: dir.join(frame.trim()),
            seen,
        });
    }
    if out.is_empty() {
        return Err(ClipError::Empty(path));
    }
    Ok(out)
}

/// One polyp sequence's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SequenceReport {
    /// Index of its first frame in the clip.
    pub first_frame: usize,
    /// Its frames.
    pub frames: usize,
    /// Milliseconds from its first frame to an active alert (`None`: missed).
    pub time_to_alert_ms: Option<f64>,
    /// Share of its frames with an alert active.
    pub under_alert: f64,
}

/// A clip's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClipReport {
    /// Frame rate the clip was replayed at.
    pub fps: f64,
    /// The polyp sequences in order.
    pub sequences: Vec<SequenceReport>,
    /// Polyp-free frames.
    pub free_frames: usize,
    /// Alerts raised on a polyp-free frame.
    pub false_alarms: usize,
    /// False alarms per minute of polyp-free frames.
    pub false_alarms_per_minute: f64,
    /// Share of polyp-free frames with an alert active.
    pub free_under_alert: f64,
    /// Alerts raised in all.
    pub alerts: usize,
}

impl ClipReport {
    /// Sequences with an alert.
    pub fn alerted(&self) -> usize {
        self.sequences
            .iter()
            .filter(|s| s.time_to_alert_ms.is_some())
            .count()
    }

    /// Median time to alert over the alerted sequences.
    pub fn median_time_to_alert_ms(&self) -> Option<f64> {
        median(self.sequences.iter().filter_map(|s| s.time_to_alert_ms))
    }
}

/// Figures over several clips together.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Polyp sequences.
    pub sequences: usize,
    /// Sequences with an alert.
    pub alerted: usize,
    /// Median time to alert over the alerted sequences.
    pub median_time_to_alert_ms: Option<f64>,
    /// Share of all polyp frames with an alert active.
    pub polyp_frames_under_alert: f64,
    /// Minutes of polyp-free frames.
    pub free_minutes: f64,
    /// Alerts raised on polyp-free frames.
    pub false_alarms: usize,
    /// False alarms per polyp-free minute.
    pub false_alarms_per_minute: f64,
    /// Share of polyp-free frames with an alert active.
    pub free_frames_under_alert: f64,
}

impl Summary {
    /// The clips' figures together (all at the same frame rate).
    pub fn of(reports: &[ClipReport]) -> Self {
        let seqs: Vec<&SequenceReport> = reports.iter().flat_map(|r| &r.sequences).collect();
        let polyp_frames: usize = seqs.iter().map(|s| s.frames).sum();
        let free: usize = reports.iter().map(|r| r.free_frames).sum();
        let false_alarms = reports.iter().map(|r| r.false_alarms).sum();
        let free_minutes = reports
            .iter()
            .map(|r| r.free_frames as f64 / r.fps / 60.0)
            .sum::<f64>();
        Summary {
            sequences: seqs.len(),
            alerted: seqs.iter().filter(|s| s.time_to_alert_ms.is_some()).count(),
            median_time_to_alert_ms: median(seqs.iter().filter_map(|s| s.time_to_alert_ms)),
            polyp_frames_under_alert: seqs
                .iter()
                .map(|s| s.under_alert * s.frames as f64)
                .sum::<f64>()
                / polyp_frames.max(1) as f64,
            free_minutes,
            false_alarms,
            false_alarms_per_minute: if free_minutes > 0.0 {
                false_alarms as f64 / free_minutes
            } else {
                0.0
            },
            free_frames_under_alert: reports
                .iter()
                .map(|r| r.free_under_alert * r.free_frames as f64)
                .sum::<f64>()
                / free.max(1) as f64,
        }
    }
}

fn median(v: impl Iterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = v.collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Replays one clip's frame decisions: `frames[i] = (what it shows, positive, score)`, at
/// `fps`, through an [`AlertMachine`] with `cfg`.
pub fn replay(frames: &[(Seen, bool, f32)], fps: f64, cfg: &AlertConfig) -> ClipReport {
    let mut machine = AlertMachine::new(cfg.clone());
    let mut active = Vec::with_capacity(frames.len());
    let (mut false_alarms, mut alerts) = (0, 0);
    for (i, &(seen, positive, score)) in frames.iter().enumerate() {
        let t_ms = (i as f64 * 1000.0 / fps).round() as u64;
        if let Transition::Raised(_) = machine.update(i as u64, t_ms, positive, score) {
            alerts += 1;
            false_alarms += usize::from(seen == Seen::Free);
        }
        active.push(machine.active().is_some());
    }
    let mut sequences = Vec::new();
    let mut i = 0;
    while i < frames.len() {
        if frames[i].0 != Seen::Polyp {
            i += 1;
            continue;
        }
        let start = i;
        while i < frames.len() && frames[i].0 == Seen::Polyp {
            i += 1;
        }
        let run = &active[start..i];
        sequences.push(SequenceReport {
            first_frame: start,
            frames: i - start,
            time_to_alert_ms: run.iter().position(|&a| a).map(|k| k as f64 * 1000.0 / fps),
            under_alert: run.iter().filter(|&&a| a).count() as f64 / run.len() as f64,
        });
    }
    let free_frames = frames.iter().filter(|f| f.0 == Seen::Free).count();
    let free_active = frames
        .iter()
        .zip(&active)
        .filter(|(f, a)| f.0 == Seen::Free && **a)
        .count();
    let minutes = free_frames as f64 / fps / 60.0;
    ClipReport {
        fps,
        sequences,
        free_frames,
        false_alarms,
        false_alarms_per_minute: if minutes > 0.0 {
            false_alarms as f64 / minutes
        } else {
            0.0
        },
        free_under_alert: free_active as f64 / free_frames.max(1) as f64,
        alerts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AlertConfig {
        AlertConfig {
            raise_n: 3,
            window_m: 5,
            clear_k: 4,
            min_hold_ms: 0,
        }
    }

    #[test]
    fn time_to_alert_share_and_false_alarms() {
        // 10 quiet free frames, a 10-frame polyp run positive from its 2nd frame, 10 free
        // frames with a burst of 3 positives (a false alarm), at 10 fps.
        let mut f = vec![(Seen::Free, false, 0.1); 10];
        f.extend((0..10).map(|i| (Seen::Polyp, i >= 1, 0.9)));
        f.extend((0..10).map(|i| (Seen::Free, (6..9).contains(&i), 0.8)));
        let r = replay(&f, 10.0, &cfg());
        assert_eq!(r.sequences.len(), 1);
        let s = &r.sequences[0];
        assert_eq!((s.first_frame, s.frames), (10, 10));
        // Positives at run frames 1, 2, 3: raised on the third, 300 ms after the first frame.
        assert_eq!(s.time_to_alert_ms, Some(300.0));
        assert!((s.under_alert - 0.7).abs() < 1e-12);
        // The alert clears on the 4th negative after the run; the burst at free frames 6..9
        // raises a second alert on free frame 8.
        assert_eq!(r.alerts, 2);
        assert_eq!(r.false_alarms, 1);
        assert_eq!(r.free_frames, 20);
        assert!((r.false_alarms_per_minute - 1.0 / (20.0 / 10.0 / 60.0)).abs() < 1e-9);
        assert_eq!(r.alerted(), 1);
        assert_eq!(r.median_time_to_alert_ms(), Some(300.0));
        let both = Summary::of(&[r.clone(), r]);
        assert_eq!((both.sequences, both.alerted, both.false_alarms), (2, 2, 2));
        assert!((both.polyp_frames_under_alert - 0.7).abs() < 1e-12);
        assert!((both.free_minutes - 2.0 * 20.0 / 10.0 / 60.0).abs() < 1e-12);
    }

    #[test]
    fn an_alert_raised_on_a_polyp_edge_is_no_false_alarm() {
        // The polyp's edge (under the in-view share) is positive before the labelled run.
        let mut f = vec![(Seen::Free, false, 0.1); 10];
        f.extend([(Seen::Edge, true, 0.9); 3]);
        f.extend([(Seen::Polyp, true, 0.9); 5]);
        f.extend([(Seen::Free, false, 0.1); 10]);
        let r = replay(&f, 10.0, &cfg());
        assert_eq!((r.alerts, r.false_alarms), (1, 0));
        assert_eq!(r.sequences[0].time_to_alert_ms, Some(0.0));
        assert_eq!(r.free_frames, 20);
    }

    #[test]
    fn a_silent_sequence_is_missed() {
        let f: Vec<_> = (0..6)
            .map(|i| (if i >= 2 { Seen::Polyp } else { Seen::Free }, false, 0.0))
            .collect();
        let r = replay(&f, 25.0, &cfg());
        assert_eq!(r.sequences[0].time_to_alert_ms, None);
        assert_eq!(r.alerted(), 0);
        assert_eq!(r.false_alarms_per_minute, 0.0);
    }

    #[test]
    fn labels_file_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("labels.csv"),
            "frame,polyp_in_view\na.jpg,1\nb.jpg,x\n",
        )
        .unwrap();
        let e = read_clip(dir.path()).unwrap_err().to_string();
        assert!(e.contains("line 3"), "{e}");
        std::fs::write(
            dir.path().join("labels.csv"),
            "frame,polyp_in_view\na.jpg,1,0.2\nb.jpg,0,0.004\nc.jpg,0,0.0\nd.jpg,0\n",
        )
        .unwrap();
        let c = read_clip(dir.path()).unwrap();
        let seen: Vec<Seen> = c.iter().map(|f| f.seen).collect();
        assert_eq!(seen, [Seen::Polyp, Seen::Edge, Seen::Free, Seen::Free]);
        assert_eq!(c[0].path, dir.path().join("a.jpg"));
        assert!(
            read_clip(&dir.path().join("none"))
                .unwrap_err()
                .to_string()
                .contains("labels.csv")
        );
    }
}
