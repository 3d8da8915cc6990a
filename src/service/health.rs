//! The pipeline's health as systemd sees it: the watchdog, fed only while frames flow; the
//! stall (no frame for `stall_secs`); and the STATUS= line every `status_secs`.
//!
//! [`Health`] holds the logic and takes the time as an argument, like [`crate::gpio::Signal`]:
//! it says what is due and the loop does it (notify, log), so it is tested without a clock.
//! [`Clock`] and [`Notifier`] are the loop's seams to time and to systemd.

use std::time::{Duration, Instant};

use crate::timing::{Stages, Timing, TimingReport};

/// Where the loop gets the time and how it sleeps.
pub trait Clock: Clone + Send + 'static {
    /// The time now.
    fn now(&self) -> Instant;
    /// Waits `d` (a fake clock moves on by `d` instead).
    fn sleep(&self, d: Duration);
}

/// The real clock: [`Instant::now`] and [`std::thread::sleep`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// What the loop tells systemd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice<'a> {
    /// READY=1 with a first STATUS= line.
    Ready(&'a str),
    /// STATUS=.
    Status(&'a str),
    /// WATCHDOG=1.
    Watchdog,
    /// STOPPING=1.
    Stopping,
}

/// Where [`Notice`]s go.
pub trait Notifier {
    /// Sends one notice; failures are the notifier's to report.
    fn notify(&mut self, n: Notice<'_>);
}

/// `sd_notify(3)`; outside systemd every notice is a no-op.
#[derive(Debug, Clone, Copy, Default)]
pub struct SdNotify;

impl Notifier for SdNotify {
    fn notify(&mut self, n: Notice<'_>) {
        use sd_notify::NotifyState;
        let r = match n {
            Notice::Ready(s) => sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(s)]),
            Notice::Status(s) => sd_notify::notify(&[NotifyState::Status(s)]),
            Notice::Watchdog => sd_notify::notify(&[NotifyState::Watchdog]),
            Notice::Stopping => sd_notify::notify(&[NotifyState::Stopping]),
        };
        if let Err(e) = r {
            log::debug!("sd_notify: {e}");
        }
    }
}

/// What a processed frame changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flow {
    /// The first frame since start: the pipeline is ready.
    pub first: bool,
    /// Frames flow again after a stall.
    pub again: bool,
}

/// The status window that just closed.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusDue {
    /// Seconds the window covers.
    pub secs: f64,
    /// Frames and latency in it.
    pub window: TimingReport,
}

/// What is due at a tick.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Due {
    /// No frame for the stall time, reported once per stall.
    pub stalled: bool,
    /// Feed the watchdog.
    pub watchdog: bool,
    /// Send a STATUS= line.
    pub status: Option<StatusDue>,
}

/// The watchdog, stall and status state.
#[derive(Debug, Clone)]
pub struct Health {
    stall: Duration,
    status_every: Duration,
    watchdog: Option<Duration>,
    ready: bool,
    stalled: bool,
    last_frame: Instant,
    last_watchdog: Instant,
    last_status: Instant,
    window: Timing,
}

impl Health {
    /// Starts at `now` as if a frame had just come, so a pipeline that never gets one stalls
    /// `stall` later. `watchdog`: how often to feed it (none: not watched).
    pub fn new(
        now: Instant,
        stall: Duration,
        status_every: Duration,
        watchdog: Option<Duration>,
    ) -> Self {
        Health {
            stall,
            status_every,
            watchdog,
            ready: false,
            stalled: false,
            last_frame: now,
            last_watchdog: now,
            last_status: now,
            window: Timing::default(),
        }
    }

    /// A reload may change `status_secs`.
    pub fn set_status_every(&mut self, every: Duration) {
        self.status_every = every;
    }

    /// Whether the watchdog is fed at all.
    pub fn watched(&self) -> bool {
        self.watchdog.is_some()
    }

    /// How long without a frame counts as a stall.
    pub fn stall(&self) -> Duration {
        self.stall
    }

    /// A frame was processed at `now`.
    pub fn frame(&mut self, now: Instant, stages: &Stages, latency_ms: f64) -> Flow {
        self.last_frame = now;
        self.window.record(stages, latency_ms, now);
        let flow = Flow {
            first: !self.ready,
            again: self.stalled,
        };
        self.ready = true;
        self.stalled = false;
        flow
    }

    /// What is due at `now`.
    pub fn tick(&mut self, now: Instant) -> Due {
        let mut due = Due::default();
        let flowing = now - self.last_frame < self.stall;
        if !flowing && !self.stalled {
            self.stalled = true;
            due.stalled = true;
        }
        // Fed only while frames flow, so systemd restarts a stalled pipeline.
        if let Some(wd) = self.watchdog
            && flowing
            && now - self.last_watchdog >= wd
        {
            due.watchdog = true;
            self.last_watchdog = now;
        }
        if self.ready && now - self.last_status >= self.status_every {
            let window = std::mem::take(&mut self.window);
            due.status = Some(StatusDue {
                secs: (now - self.last_status).as_secs_f64(),
                window: window.report(),
            });
            self.last_status = now;
        }
        due
    }
}

/// The STATUS= line `systemctl status` shows.
pub fn status_line(s: &StatusDue, model_version: &str, alerts: u64, dropped: u64) -> String {
    format!(
        "{:.1} fps, latency {:.0} ms, model {model_version}, {alerts} alerts, {dropped} dropped",
        s.window.frames as f64 / s.secs,
        s.window.latency_p50_ms,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn health(t0: Instant) -> Health {
        Health::new(t0, 5 * S, 2 * S, Some(S))
    }

    #[test]
    fn the_watchdog_is_fed_while_frames_flow_and_not_after_a_stall() {
        let t0 = Instant::now();
        let mut h = health(t0);
        assert!(!h.tick(t0).watchdog, "not before its interval");
        h.frame(t0 + S, &Stages::default(), 1.0);
        assert!(h.tick(t0 + S).watchdog);
        assert!(!h.tick(t0 + S + S / 2).watchdog);
        assert!(h.tick(t0 + 2 * S).watchdog);
        // The last frame at 1 s: from 6 s on the pipeline is stalled, reported once.
        assert!(h.tick(t0 + 5 * S).watchdog, "still within the stall time");
        let d = h.tick(t0 + 6 * S);
        assert!(d.stalled && !d.watchdog, "{d:?}");
        let d = h.tick(t0 + 60 * S);
        assert!(!d.stalled && !d.watchdog, "{d:?}");
        let f = h.frame(t0 + 61 * S, &Stages::default(), 1.0);
        assert!(f.again && !f.first);
        assert!(h.tick(t0 + 61 * S).watchdog);
    }

    #[test]
    fn a_pipeline_without_frames_stalls_and_no_watchdog_means_none_due() {
        let t0 = Instant::now();
        let mut h = Health::new(t0, 5 * S, 2 * S, None);
        assert!(!h.watched());
        let d = h.tick(t0 + 5 * S);
        assert!(d.stalled && !d.watchdog && d.status.is_none(), "{d:?}");
    }

    #[test]
    fn status_comes_every_interval_from_the_first_frame_on() {
        let t0 = Instant::now();
        let mut h = health(t0);
        assert_eq!(h.tick(t0 + 3 * S).status, None, "not ready yet");
        assert!(h.frame(t0 + 3 * S, &Stages::default(), 4.0).first);
        let s = h.tick(t0 + 3 * S).status.expect("overdue since 2 s");
        assert_eq!((s.secs, s.window.frames), (3.0, 1));
        assert_eq!(h.tick(t0 + 4 * S).status, None);
        for i in 0..8 {
            h.frame(t0 + 4 * S + i * S / 4, &Stages::default(), 4.0);
        }
        let s = h.tick(t0 + 5 * S).status.unwrap();
        assert_eq!((s.secs, s.window.frames), (2.0, 8));
        let line = status_line(&s, "1.2.0", 3, 1);
        assert_eq!(
            line,
            "4.0 fps, latency 4 ms, model 1.2.0, 3 alerts, 1 dropped"
        );
        h.set_status_every(10 * S);
        assert_eq!(h.tick(t0 + 9 * S).status, None);
        assert!(h.tick(t0 + 15 * S).status.is_some());
    }
}
