//! The capture thread and its latest-frame hand-off to the processing thread: capture reads,
//! decodes and preprocesses the next frame while the model runs on the previous one; a frame
//! the processing thread has not taken yet is replaced by the newer one (counted as dropped).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::health::Clock;
use crate::capture::{CaptureError, Frame, FrameSource};
use crate::preprocess::Recipe;

/// Unreadable frames in a row after which the feed counts as lost.
pub const LOST_AFTER: u64 = 25;
/// Longest wait between attempts on a lost feed (doubling from half a second).
const LOST_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long either side waits on the other before looking at its flags again.
const POLL: Duration = Duration::from_millis(100);

/// A frame with its model input, prepared on the capture thread.
pub(super) struct Job {
    pub(super) frame: Frame,
    /// The recipe `input` was made with; a reload may have changed the model's since.
    pub(super) recipe: Recipe,
    pub(super) input: Vec<f32>,
    pub(super) preprocess_ms: f64,
    /// When it was handed to the processing thread.
    pub(super) queued: Instant,
}

#[derive(Default)]
struct Slot {
    frame: Option<Job>,
    dropped: u64,
    bad: u64,
    ended: bool,
    /// Set while the source is lost: the last failure and the failures in a row.
    lost: Option<(String, u64)>,
}

/// The feed changed state since the processing thread last looked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Feed {
    /// Every frame is failing: the last failure and the failures in a row.
    Lost { reason: String, failed: u64 },
    /// Readable frames again.
    Back,
}

/// What the processing thread takes from the slot.
pub(super) struct Taken {
    pub(super) job: Option<Job>,
    /// The source has ended (a finite replay, or it failed for good).
    pub(super) ended: bool,
    pub(super) dropped: u64,
    pub(super) bad: u64,
    pub(super) feed: Option<Feed>,
}

/// The slot between the two threads.
#[derive(Default)]
pub(super) struct Handoff {
    slot: Mutex<Slot>,
    ready: Condvar,
}

impl Handoff {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the waiting frame, waiting a little for one unless `stopping`. `lost` is the
    /// processing side's view of the feed, updated here when it changes.
    pub(super) fn take(&self, lost: &mut bool, stopping: bool) -> Taken {
        let mut slot = self.lock();
        if slot.frame.is_none() && !slot.ended && !stopping {
            slot = self
                .ready
                .wait_timeout(slot, POLL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let feed = match (&slot.lost, *lost) {
            (Some((reason, failed)), false) => {
                *lost = true;
                Some(Feed::Lost {
                    reason: reason.clone(),
                    failed: *failed,
                })
            }
            (None, true) if slot.frame.is_some() => {
                *lost = false;
                Some(Feed::Back)
            }
            _ => None,
        };
        let job = slot.frame.take();
        // An unpaced source waits for the slot to empty.
        self.ready.notify_all();
        Taken {
            job,
            ended: slot.ended,
            dropped: slot.dropped,
            bad: slot.bad,
            feed,
        }
    }

    /// No frame is waiting.
    pub(super) fn is_empty(&self) -> bool {
        self.lock().frame.is_none()
    }
}

/// Starts the capture thread; it runs until `stop` or the end of the source.
pub(super) fn spawn<C: Clock>(
    src: Box<dyn FrameSource>,
    hand: Arc<Handoff>,
    stop: Arc<AtomicBool>,
    recipe: Arc<Mutex<Recipe>>,
    clock: C,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("capture".into())
        .spawn(move || capture_loop(src, &hand, &stop, &recipe, &clock))
        .expect("spawn capture thread")
}

fn capture_loop<C: Clock>(
    mut src: Box<dyn FrameSource>,
    hand: &Handoff,
    stop: &AtomicBool,
    recipe: &Mutex<Recipe>,
    clock: &C,
) {
    let paced = src.paced();
    let (mut failed, mut backoff) = (0u64, Duration::from_millis(500));
    while !stop.load(Ordering::Relaxed) {
        if !paced {
            let mut slot = hand.lock();
            while slot.frame.is_some() && !stop.load(Ordering::Relaxed) {
                slot = hand
                    .ready
                    .wait_timeout(slot, POLL)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        // Preprocessing here overlaps the model running on the previous frame.
        let next = src.next_frame().map(|f| {
            f.map(|frame| {
                let recipe = recipe.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let t = Instant::now();
                let input = recipe.tensor_from_rgb(&frame.image);
                Job {
                    preprocess_ms: t.elapsed().as_secs_f64() * 1e3,
                    frame,
                    recipe,
                    input,
                    queued: Instant::now(),
                }
            })
        });
        let mut slot = hand.lock();
        match next {
            Ok(Some(f)) => {
                if failed >= LOST_AFTER {
                    log::info!("the feed is back after {failed} unreadable frames");
                }
                (failed, backoff) = (0, Duration::from_millis(500));
                slot.lost = None;
                // Latest frame wins: capture never waits for inference.
                if slot.frame.replace(f).is_some() {
                    slot.dropped += 1;
                }
            }
            Ok(None) => {
                slot.ended = true;
                hand.ready.notify_all();
                return;
            }
            Err(CaptureError::Waiting) => {}
            // The processing side reports it and ends the alert (`Feed::Lost`), then
            // `Feed::Back` with the next frame. A frame from before the loss still waiting
            // would decide after the alert ended (with raise_n = 1, raise it again): dropped.
            Err(CaptureError::Lost { reason }) => {
                slot.lost = Some((reason, 0));
                if slot.frame.take().is_some() {
                    slot.dropped += 1;
                }
            }
            Err(e @ (CaptureError::BadFrame { .. } | CaptureError::BadBuffer { .. })) => {
                slot.bad += 1;
                failed += 1;
                if failed < LOST_AFTER {
                    log::warn!("{e}");
                } else {
                    if failed == LOST_AFTER {
                        log::error!(
                            "{LOST_AFTER} frames in a row unreadable, the last: {e}; the feed counts as lost, retrying with backoff"
                        );
                    }
                    slot.lost = Some((e.to_string(), failed));
                    drop(slot);
                    // Back off instead of spinning (0.5 s doubling to 5 s), still stoppable.
                    let until = clock.now() + backoff;
                    while clock.now() < until && !stop.load(Ordering::Relaxed) {
                        clock.sleep(Duration::from_millis(50));
                    }
                    backoff = (backoff * 2).min(LOST_BACKOFF_MAX);
                    continue;
                }
            }
            Err(e) => {
                log::error!("{e}; the frame source stopped");
                slot.ended = true;
                hand.ready.notify_all();
                return;
            }
        }
        hand.ready.notify_all();
    }
}
