//! Where an alert's raise and end go. Every output (the GPIO line, the log, the event stream,
//! snapshots) implements [`AlertOutput`]; [`AlertOutputs`] calls them all, in that order, from
//! one place, and an output that fails is logged and skipped there: it never stops the others.

use image::GrayImage;

use crate::alert::AlertEvent;
use crate::capture::Frame;
use crate::detect::Detection;
use crate::gpio::GpioAlerts;
use crate::sink::{Event, EventStream, SnapshotQueue};

/// Why an alert ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The hysteresis cleared it.
    Cleared,
    /// The frame source failed for good enough to count as lost.
    SourceLost,
    /// No frame came for `stall_secs`.
    NoFrames,
    /// The daemon is stopping.
    Shutdown,
}

impl EndReason {
    /// The `reason` of the `alert_end` event; none for an ordinary clear.
    pub fn as_str(self) -> Option<&'static str> {
        match self {
            EndReason::Cleared => None,
            EndReason::SourceLost => Some("source_lost"),
            EndReason::NoFrames => Some("no_frames"),
            EndReason::Shutdown => Some("shutdown"),
        }
    }
}

/// An alert was raised on `frame`.
#[derive(Debug, Clone, Copy)]
pub struct Raise<'a> {
    /// The alert.
    pub alert: &'a AlertEvent,
    /// The frame that raised it.
    pub frame: &'a Frame,
    /// That frame's detection.
    pub detection: &'a Detection,
    /// Its mask, at the model's size.
    pub mask: &'a GrayImage,
    /// Capture to decision, in milliseconds.
    pub latency_ms: f64,
    /// The model's version.
    pub model_version: &'a str,
}

/// An alert ended; `frame` is the last one it saw.
#[derive(Debug, Clone, Copy)]
pub struct End<'a> {
    /// The alert, closed.
    pub alert: &'a AlertEvent,
    /// The frame that ended it (or the last one before it was closed).
    pub frame: &'a Frame,
    /// Why.
    pub reason: EndReason,
}

/// An alert output that failed; the alert goes on through the others.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// A snapshot was skipped: the writer thread is still busy with the earlier ones (a
    /// write that fails there is logged by that thread).
    #[error("snapshot {name} skipped: the earlier ones are still being written")]
    SnapshotSkipped {
        /// Its file name.
        name: String,
    },
}

/// Something an alert drives.
pub trait AlertOutput {
    /// An alert started.
    fn raise(&mut self, r: &Raise<'_>) -> Result<(), OutputError>;
    /// The alert ended.
    fn end(&mut self, e: &End<'_>) -> Result<(), OutputError>;
}

/// The line follows the alert on its own thread, so this never fails nor waits.
impl AlertOutput for GpioAlerts {
    fn raise(&mut self, _: &Raise<'_>) -> Result<(), OutputError> {
        GpioAlerts::raise(self);
        Ok(())
    }
    fn end(&mut self, _: &End<'_>) -> Result<(), OutputError> {
        self.clear();
        Ok(())
    }
}

/// The log (journal or stderr): structured `polyp_*` fields.
#[derive(Debug, Clone, Copy, Default)]
pub struct Journal;

impl AlertOutput for Journal {
    fn raise(&mut self, r: &Raise<'_>) -> Result<(), OutputError> {
        let (a, frame, d) = (r.alert, r.frame, r.detection);
        let area = d.best.map_or(0.0, |c| c.area);
        let bbox = d.best.map_or([0.0; 4], |c| c.bbox);
        let bbox_s = format!(
            "{:.3},{:.3},{:.3},{:.3}",
            bbox[0], bbox[1], bbox[2], bbox[3]
        );
        log::warn!(
            polyp_event = "start", polyp_alert_id = a.id, polyp_score = d.score,
            polyp_area = area, polyp_bbox = bbox_s.as_str(), frame_seq = frame.seq,
            latency_ms = r.latency_ms, model_version = r.model_version;
            "polyp alert {} raised: score {:.2}, area {:.1}%", a.id, d.score, area * 100.0
        );
        Ok(())
    }
    fn end(&mut self, e: &End<'_>) -> Result<(), OutputError> {
        let a = e.alert;
        // An end the hysteresis did not decide says why, in the field and the line: "cleared"
        // for a camera that was unplugged misleads whoever reads the journal.
        let why = e
            .reason
            .as_str()
            .map_or(String::new(), |r| format!(", {r}"));
        log::info!(
            polyp_event = "end", polyp_alert_id = a.id, polyp_score = a.peak_score,
            frame_seq = e.frame.seq, polyp_frames = a.frames,
            polyp_end_reason = e.reason.as_str().unwrap_or("cleared");
            "polyp alert {} {} after {} frames (peak score {:.2}{why})", a.id,
            if e.reason == EndReason::Cleared { "cleared" } else { "ended" }, a.frames, a.peak_score
        );
        Ok(())
    }
}

/// `alert_start` and `alert_end` events.
impl AlertOutput for EventStream {
    fn raise(&mut self, r: &Raise<'_>) -> Result<(), OutputError> {
        let best = r.detection.best;
        self.emit(&Event::AlertStart {
            alert_id: r.alert.id,
            seq: r.frame.seq,
            frame: r.frame.origin.clone(),
            t_ms: r.frame.t_ms,
            score: r.detection.score,
            area: best.map_or(0.0, |c| c.area),
            bbox: best.map_or([0.0; 4], |c| c.bbox),
            latency_ms: r.latency_ms,
            model_version: r.model_version.to_string(),
        });
        Ok(())
    }
    fn end(&mut self, e: &End<'_>) -> Result<(), OutputError> {
        let a = e.alert;
        self.emit(&Event::AlertEnd {
            alert_id: a.id,
            seq: e.frame.seq,
            frame: e.frame.origin.clone(),
            start_ms: a.start_ms,
            end_ms: a.end_ms.unwrap_or(e.frame.t_ms),
            peak_score: a.peak_score,
            frames: a.frames,
            reason: e.reason.as_str().map(String::from),
        });
        Ok(())
    }
}

/// The frame that raised an alert with its mask drawn over it, drawn and written on the
/// queue's own thread.
impl AlertOutput for SnapshotQueue {
    fn raise(&mut self, r: &Raise<'_>) -> Result<(), OutputError> {
        let name = format!(
            "{}-alert{:04}-seq{}.jpg",
            crate::store::unix_ms(),
            r.alert.id,
            r.frame.seq
        );
        let bbox = r.detection.best.map(|c| c.bbox);
        if self.queue(name.clone(), &r.frame.image, r.mask, bbox) {
            Ok(())
        } else {
            Err(OutputError::SnapshotSkipped { name })
        }
    }
    fn end(&mut self, _: &End<'_>) -> Result<(), OutputError> {
        Ok(())
    }
}

/// Every output an alert drives, called in a fixed order: the line first (it is what the
/// endoscopist notices), then the log, the event stream and the snapshot.
pub struct AlertOutputs {
    gpio: Option<GpioAlerts>,
    journal: Journal,
    events: EventStream,
    snapshots: Option<SnapshotQueue>,
    others: Vec<Box<dyn AlertOutput>>,
}

impl AlertOutputs {
    /// The daemon's outputs; `events` also carries the events that are not alerts.
    pub fn new(
        gpio: Option<GpioAlerts>,
        events: EventStream,
        snapshots: Option<SnapshotQueue>,
    ) -> Self {
        AlertOutputs {
            gpio,
            journal: Journal,
            events,
            snapshots,
            others: Vec::new(),
        }
    }

    /// Adds an output, called after the built-in ones.
    #[cfg(test)]
    pub fn push(&mut self, o: Box<dyn AlertOutput>) {
        self.others.push(o);
    }

    /// The event stream, for the events that are not alerts.
    pub fn events(&mut self) -> &mut EventStream {
        &mut self.events
    }

    /// A reload's snapshot folder and quota.
    pub fn set_snapshots(&mut self, s: Option<SnapshotQueue>) {
        self.snapshots = s;
    }

    fn each(&mut self, mut f: impl FnMut(&mut dyn AlertOutput) -> Result<(), OutputError>) {
        let built_in: [Option<&mut dyn AlertOutput>; 4] = [
            self.gpio.as_mut().map(|g| g as &mut dyn AlertOutput),
            Some(&mut self.journal),
            Some(&mut self.events),
            self.snapshots.as_mut().map(|s| s as &mut dyn AlertOutput),
        ];
        let others = self
            .others
            .iter_mut()
            .map(|o| &mut **o as &mut dyn AlertOutput);
        for o in built_in.into_iter().flatten().chain(others) {
            if let Err(e) = f(o) {
                log::error!("{e}; alerting goes on");
            }
        }
    }

    /// An alert started: every output hears it.
    pub fn raise(&mut self, r: &Raise<'_>) {
        self.each(|o| o.raise(r));
    }

    /// An alert ended: every output hears it.
    pub fn end(&mut self, e: &End<'_>) {
        self.each(|o| o.end(e));
    }

    /// Stopping: ends the open alert if there is one, then lets the line go (its thread drives
    /// it inactive). The event stream stays for the last events.
    pub fn shutdown(&mut self, open: Option<&End<'_>>) {
        if let Some(e) = open {
            self.end(e);
        }
        self.gpio = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Records what it heard; fails every call when told to.
    struct Probe {
        log: Arc<Mutex<Vec<String>>>,
        name: &'static str,
        fail: bool,
    }

    impl Probe {
        fn record(&self, what: &str) -> Result<(), OutputError> {
            self.log
                .lock()
                .unwrap()
                .push(format!("{} {what}", self.name));
            if self.fail {
                return Err(OutputError::SnapshotSkipped {
                    name: self.name.into(),
                });
            }
            Ok(())
        }
    }

    impl AlertOutput for Probe {
        fn raise(&mut self, _: &Raise<'_>) -> Result<(), OutputError> {
            self.record("raise")
        }
        fn end(&mut self, e: &End<'_>) -> Result<(), OutputError> {
            self.record(&format!("end {:?}", e.reason))
        }
    }

    #[test]
    fn a_failing_output_is_skipped_and_the_others_still_hear_every_alert() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let events = EventStream::open(&crate::config::EventsSection {
            stdout: false,
            ..Default::default()
        });
        let mut outs = AlertOutputs::new(None, events, None);
        for (name, fail) in [("a", true), ("b", false)] {
            outs.push(Box::new(Probe {
                log: log.clone(),
                name,
                fail,
            }));
        }
        let alert = AlertEvent {
            id: 1,
            start_seq: 0,
            start_ms: 0,
            end_seq: None,
            end_ms: None,
            peak_score: 0.9,
            frames: 3,
            positive_frames: 3,
        };
        let frame = Frame {
            seq: 7,
            captured: std::time::Instant::now(),
            decode_ms: 0.0,
            t_ms: 280,
            origin: "f7.jpg".into(),
            image: image::RgbImage::new(4, 4),
        };
        let (detection, mask) = (Detection::none(), GrayImage::new(4, 4));
        outs.raise(&Raise {
            alert: &alert,
            frame: &frame,
            detection: &detection,
            mask: &mask,
            latency_ms: 5.0,
            model_version: "1.0.0",
        });
        outs.shutdown(Some(&End {
            alert: &alert,
            frame: &frame,
            reason: EndReason::Shutdown,
        }));
        assert_eq!(
            *log.lock().unwrap(),
            ["a raise", "b raise", "a end Shutdown", "b end Shutdown"]
        );
        assert_eq!(EndReason::Shutdown.as_str(), Some("shutdown"));
        assert_eq!(EndReason::Cleared.as_str(), None);
    }
}
