//! The alert GPIO line (buzzer, LED, relay) through the Linux GPIO character device
//! (crate `gpiocdev`).
//!
//! [`Signal`] holds the logic (hold or pulse, inactive at start, at stop and on every error
//! path) over the [`OutputLine`] trait, so it is tested against a fake line; [`GpioAlerts`]
//! runs it on its own thread so a slow or failing line never delays a frame, and pulses end on
//! time whatever the frame rate.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Errors of the GPIO line.
#[derive(Debug, thiserror::Error)]
pub enum GpioError {
    /// The chip cannot be found or opened.
    #[error("GPIO chip {chip}: {message}")]
    Chip {
        /// As configured.
        chip: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The line cannot be found or requested.
    #[error("GPIO line {line} on {chip}: {message}")]
    Line {
        /// As configured.
        line: String,
        /// The chip's path.
        chip: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// Setting the value failed.
    #[error("GPIO {line}: cannot set value: {message}")]
    Set {
        /// The line.
        line: String,
        /// The driver's error.
        message: String,
    },
}

/// How an alert drives the line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Active for as long as the alert is (an LED, a relay).
    #[default]
    Hold,
    /// Active for `pulse_ms` when an alert starts (a buzzer).
    Pulse,
}

/// A line by offset or by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LineId {
    /// Offset on the chip, as `gpioinfo` lists it.
    Offset(u32),
    /// Line name from the device tree, e.g. `PQ.05`.
    Name(String),
}

impl std::fmt::Display for LineId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LineId::Offset(o) => write!(f, "{o}"),
            LineId::Name(n) => write!(f, "{n:?}"),
        }
    }
}

/// `[gpio]`: the alert output line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpioConfig {
    /// Chip: a path (`/dev/gpiochip0`), a name (`gpiochip0`) or a label (`tegra234-gpio`).
    pub chip: String,
    /// Line offset or name.
    pub line: LineId,
    /// The line is active when low (e.g. a relay board that switches on low).
    #[serde(default)]
    pub active_low: bool,
    /// `hold` or `pulse`.
    #[serde(default)]
    pub mode: Mode,
    /// Pulse length in milliseconds (mode `pulse`).
    #[serde(default = "default_pulse")]
    pub pulse_ms: u64,
    /// Exit at start if the line cannot be had; otherwise go on with journal alerts only.
    #[serde(default)]
    pub required: bool,
}

fn default_pulse() -> u64 {
    500
}

impl GpioConfig {
    /// Range checks, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.mode == Mode::Pulse && !(10..=60_000).contains(&self.pulse_ms) {
            return Err(format!(
                "[gpio] pulse_ms = {} must be in 10..=60000",
                self.pulse_ms
            ));
        }
        if self.chip.is_empty() {
            return Err("[gpio] chip must name a chip (gpioinfo lists them)".into());
        }
        Ok(())
    }
}

/// An output line. `set(true)` means active (whatever the polarity).
pub trait OutputLine: Send {
    /// Drives the line.
    fn set(&mut self, active: bool) -> Result<(), GpioError>;
    /// For logs.
    fn describe(&self) -> String;
}

/// The alert logic over a line.
pub struct Signal<L: OutputLine> {
    line: L,
    mode: Mode,
    pulse: Duration,
    active: bool,
    off_at: Option<Instant>,
    failing: bool,
}

impl<L: OutputLine> Signal<L> {
    /// Takes the line and drives it inactive.
    pub fn new(line: L, mode: Mode, pulse: Duration) -> Result<Self, GpioError> {
        let mut s = Signal {
            line,
            mode,
            pulse,
            active: true,
            off_at: None,
            failing: false,
        };
        s.line.set(false)?;
        s.active = false;
        Ok(s)
    }

    fn drive(&mut self, active: bool) {
        match self.line.set(active) {
            Ok(()) => {
                if self.failing {
                    log::info!("GPIO {}: working again", self.line.describe());
                    self.failing = false;
                }
                self.active = active;
            }
            Err(e) => {
                if !self.failing {
                    log::error!("{e}; alerts go on in the journal");
                    self.failing = true;
                }
                if active {
                    // Never leave the line half-set: try to release it.
                    let _ = self.line.set(false);
                }
                self.active = false;
            }
        }
    }

    /// An alert started.
    pub fn raise(&mut self, now: Instant) {
        self.drive(true);
        self.off_at = (self.mode == Mode::Pulse).then(|| now + self.pulse);
    }

    /// The alert ended (a pulse runs to its end).
    pub fn clear(&mut self) {
        if self.mode == Mode::Hold {
            self.off_at = None;
            self.drive(false);
        }
    }

    /// Ends a pulse that is due.
    pub fn tick(&mut self, now: Instant) {
        if self.off_at.is_some_and(|t| now >= t) {
            self.off_at = None;
            self.drive(false);
        }
    }

    /// When [`Signal::tick`] next has work.
    pub fn deadline(&self) -> Option<Instant> {
        self.off_at
    }

    /// Whether the line is (believed) active.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The line.
    pub fn line(&self) -> &L {
        &self.line
    }
}

impl<L: OutputLine> Drop for Signal<L> {
    fn drop(&mut self) {
        if let Err(e) = self.line.set(false) {
            log::error!("{e} while releasing the line");
        }
    }
}

enum Cmd {
    Raise,
    Clear,
}

/// A [`Signal`] on its own thread. Dropping it drives the line inactive and joins the thread.
pub struct GpioAlerts {
    tx: Option<mpsc::Sender<Cmd>>,
    thread: Option<std::thread::JoinHandle<()>>,
    what: String,
}

impl GpioAlerts {
    /// Starts the thread that owns the line (already driven inactive).
    pub fn spawn<L: OutputLine + 'static>(signal: Signal<L>) -> Self {
        let what = signal.line().describe();
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("gpio".into())
            .spawn(move || {
                let mut signal = signal;
                loop {
                    let msg = match signal.deadline() {
                        Some(t) => rx.recv_timeout(t.saturating_duration_since(Instant::now())),
                        None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                    };
                    match msg {
                        Ok(Cmd::Raise) => signal.raise(Instant::now()),
                        Ok(Cmd::Clear) => signal.clear(),
                        Err(mpsc::RecvTimeoutError::Timeout) => signal.tick(Instant::now()),
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
            })
            .expect("spawn gpio thread");
        GpioAlerts {
            tx: Some(tx),
            thread: Some(thread),
            what,
        }
    }

    /// An alert started.
    pub fn raise(&self) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Cmd::Raise);
        }
    }

    /// The alert ended.
    pub fn clear(&self) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Cmd::Clear);
        }
    }

    /// The line, for logs.
    pub fn describe(&self) -> &str {
        &self.what
    }
}

impl Drop for GpioAlerts {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A line requested from the GPIO character device.
pub struct CdevLine {
    req: gpiocdev::Request,
    what: String,
}

fn chip_path(chip: &str) -> Result<PathBuf, GpioError> {
    let err = |message: String| GpioError::Chip {
        chip: chip.to_string(),
        message,
    };
    if chip.starts_with('/') {
        return Ok(PathBuf::from(chip));
    }
    if chip.starts_with("gpiochip") {
        return Ok(PathBuf::from("/dev").join(chip));
    }
    let chips = gpiocdev::chip::chips().map_err(|e| err(format!("cannot list GPIO chips: {e}")))?;
    for p in &chips {
        if let Ok(c) = gpiocdev::chip::Chip::from_path(p)
            && c.info().is_ok_and(|i| i.label == chip)
        {
            return Ok(p.clone());
        }
    }
    Err(err(format!(
        "no chip with this label among {} chips: `gpiodetect` lists them",
        chips.len()
    )))
}

impl CdevLine {
    /// Requests the configured line as an output, initially inactive.
    pub fn open(cfg: &GpioConfig) -> Result<Self, GpioError> {
        let path = chip_path(&cfg.chip)?;
        let chip = gpiocdev::chip::Chip::from_path(&path).map_err(|e| GpioError::Chip {
            chip: cfg.chip.clone(),
            message: format!(
                "cannot open {}: {e} (is the service user in the gpio group?)",
                path.display()
            ),
        })?;
        let line_err = |message: String| GpioError::Line {
            line: cfg.line.to_string(),
            chip: path.display().to_string(),
            message,
        };
        let offset = match &cfg.line {
            LineId::Offset(o) => *o,
            LineId::Name(n) => {
                chip.find_line_info(n)
                    .ok_or_else(|| {
                        line_err("no line with this name: `gpioinfo` lists them".into())
                    })?
                    .offset
            }
        };
        let mut b = gpiocdev::Request::builder();
        b.on_chip(&path)
            .with_consumer("polypwatch")
            .with_line(offset)
            .as_output(gpiocdev::line::Value::Inactive);
        if cfg.active_low {
            b.as_active_low();
        }
        let req = b.request().map_err(|e| {
            let msg = e.to_string();
            line_err(if msg.contains("busy") || msg.contains("EBUSY") {
                format!("{msg}: another program holds it (`gpioinfo` shows the consumer)")
            } else {
                msg
            })
        })?;
        Ok(CdevLine {
            req,
            what: format!(
                "{} line {offset}{}",
                path.display(),
                if cfg.active_low { " (active low)" } else { "" }
            ),
        })
    }
}

impl OutputLine for CdevLine {
    fn set(&mut self, active: bool) -> Result<(), GpioError> {
        let v = if active {
            gpiocdev::line::Value::Active
        } else {
            gpiocdev::line::Value::Inactive
        };
        self.req.set_lone_value(v).map_err(|e| GpioError::Set {
            line: self.what.clone(),
            message: e.to_string(),
        })
    }

    fn describe(&self) -> String {
        self.what.clone()
    }
}

/// Opens the configured line on its thread. `Ok(None)`: the line could not be had and the
/// config allows going on without it (the reason is logged).
pub fn open(cfg: &GpioConfig) -> Result<Option<GpioAlerts>, GpioError> {
    let line = CdevLine::open(cfg)
        .and_then(|l| Signal::new(l, cfg.mode, Duration::from_millis(cfg.pulse_ms)));
    match line {
        Ok(s) => {
            let g = GpioAlerts::spawn(s);
            log::info!("GPIO alert line {} ({:?})", g.describe(), cfg.mode);
            Ok(Some(g))
        }
        Err(e) if !cfg.required => {
            log::error!("{e}; going on with journal alerts only ([gpio] required = false)");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Records every value written; can be told to fail.
    #[derive(Clone, Default)]
    struct FakeLine {
        log: Arc<Mutex<Vec<bool>>>,
        fail: Arc<Mutex<bool>>,
    }

    impl OutputLine for FakeLine {
        fn set(&mut self, active: bool) -> Result<(), GpioError> {
            if *self.fail.lock().unwrap() {
                return Err(GpioError::Set {
                    line: "fake".into(),
                    message: "EIO".into(),
                });
            }
            self.log.lock().unwrap().push(active);
            Ok(())
        }
        fn describe(&self) -> String {
            "fake".into()
        }
    }

    impl FakeLine {
        fn values(&self) -> Vec<bool> {
            self.log.lock().unwrap().clone()
        }
    }

    #[test]
    fn hold_follows_the_alert_and_starts_and_ends_inactive() {
        let line = FakeLine::default();
        let mut s = Signal::new(line.clone(), Mode::Hold, Duration::ZERO).unwrap();
        assert_eq!(line.values(), [false]);
        s.raise(Instant::now());
        assert!(s.is_active());
        s.tick(Instant::now() + Duration::from_secs(60));
        assert!(s.is_active(), "hold is not timed");
        s.clear();
        assert!(!s.is_active());
        s.raise(Instant::now());
        drop(s);
        assert_eq!(line.values(), [false, true, false, true, false]);
    }

    #[test]
    fn pulse_ends_on_time_not_with_the_alert() {
        let line = FakeLine::default();
        let mut s = Signal::new(line.clone(), Mode::Pulse, Duration::from_millis(300)).unwrap();
        let t0 = Instant::now();
        s.raise(t0);
        s.clear();
        assert!(s.is_active(), "a pulse outlives a short alert");
        s.tick(t0 + Duration::from_millis(299));
        assert!(s.is_active());
        assert_eq!(s.deadline(), Some(t0 + Duration::from_millis(300)));
        s.tick(t0 + Duration::from_millis(300));
        assert!(!s.is_active());
        assert_eq!(s.deadline(), None);
    }

    #[test]
    fn a_failing_line_is_released_and_recovers() {
        let line = FakeLine::default();
        let mut s = Signal::new(line.clone(), Mode::Hold, Duration::ZERO).unwrap();
        *line.fail.lock().unwrap() = true;
        s.raise(Instant::now());
        assert!(!s.is_active());
        *line.fail.lock().unwrap() = false;
        s.raise(Instant::now());
        assert!(s.is_active());
        // A line that fails at start is an error, not a silent success.
        *line.fail.lock().unwrap() = true;
        assert!(Signal::new(line.clone(), Mode::Hold, Duration::ZERO).is_err());
    }

    #[test]
    fn the_thread_pulses_and_releases_on_drop() {
        let line = FakeLine::default();
        let g = GpioAlerts::spawn(
            Signal::new(line.clone(), Mode::Pulse, Duration::from_millis(50)).unwrap(),
        );
        g.raise();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(line.values(), [false, true]);
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(line.values(), [false, true, false], "pulse ended by itself");
        g.raise();
        drop(g);
        assert_eq!(line.values().last(), Some(&false), "dropped while active");
    }

    #[test]
    fn missing_chips_and_bad_config_are_clear() {
        let cfg = GpioConfig {
            chip: "/dev/gpiochip-polypwatch-missing".into(),
            line: LineId::Offset(3),
            active_low: false,
            mode: Mode::Hold,
            pulse_ms: 500,
            required: true,
        };
        let err = open(&cfg).err().unwrap().to_string();
        assert!(err.contains("gpiochip-polypwatch-missing"), "{err}");
        let optional = GpioConfig {
            required: false,
            ..cfg.clone()
        };
        assert!(open(&optional).unwrap().is_none());
        let bad = GpioConfig {
            mode: Mode::Pulse,
            pulse_ms: 1,
            ..cfg
        };
        assert!(bad.validate().unwrap_err().contains("pulse_ms"));
    }
}
