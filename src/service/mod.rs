//! The daemon's pipeline: capture, decoding and preprocessing on the capture thread with a
//! latest-frame hand-off (`handoff`), then infer, detect, alert and sink on the processing
//! thread, so the two overlap on two cores; signals, systemd readiness, status with stage times
//! and watchdog (`health`), alert outputs (`alerts`) and reloads (`reload`).
//!
//! The frame loop takes its clock, its frame source and its systemd notifier as arguments, so
//! the tests in `loop_tests.rs` run the real loop on in-memory frames and a clock they move.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::alert::{AlertMachine, Transition};
use crate::camera::{Camera, CameraConfig};
use crate::capture::{CaptureError, Frame, FrameSource, Replay};
use crate::config::{Config, ConfigError, SourceKind};
use crate::gpio::GpioError;
use crate::model::ModelError;
use crate::sink::Event;
use crate::store::InstallError;
use crate::timing::{Timing, TimingReport};

mod alerts;
mod engine;
mod handoff;
mod health;
#[cfg(test)]
mod loop_tests;
mod reload;

pub use handoff::LOST_AFTER;

use alerts::{AlertOutputs, End, EndReason, Raise};
use health::{Clock, Notice, Notifier, SdNotify, SystemClock};

use engine::{Engine, Processed};
use handoff::{Feed, Handoff, Job};
use health::Health;
use reload::{Next, Reloader};

/// Errors that stop the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The model could not be loaded.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The frame source could not be opened.
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// The GPIO line is required and cannot be had.
    #[error("{0} ([gpio] required = true)")]
    Gpio(GpioError),
    /// The model store cannot be used, or its current model fails verification on reload.
    #[error(transparent)]
    Store(#[from] InstallError),
    /// The config's `[detect]` and the model's operating point do not fit together.
    #[error("detect settings for model {model}: {message}; change [detect] in the config")]
    Detect {
        /// The model.
        model: String,
        /// What does not fit.
        message: String,
    },
}

// By hand, not `#[from]`: `#[from]` would also make the GPIO error this one's `source()`,
// and the message already says it (one error convention: the cause in the message or in
// `source()`, never both, so `{:#}` prints each cause once).
impl From<GpioError> for ServiceError {
    fn from(e: GpioError) -> Self {
        ServiceError::Gpio(e)
    }
}

/// Flags set by signal handlers and read by the loop.
#[derive(Debug, Clone, Default)]
pub struct Control {
    /// SIGTERM/SIGINT: finish the frame, flush, exit.
    pub stop: Arc<AtomicBool>,
    /// SIGHUP: reload configuration and model.
    pub reload: Arc<AtomicBool>,
}

impl Control {
    /// Registers SIGTERM, SIGINT (stop) and SIGHUP (reload).
    pub fn install_signal_handlers(&self) -> std::io::Result<()> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        signal_hook::flag::register(SIGTERM, self.stop.clone())?;
        signal_hook::flag::register(SIGINT, self.stop.clone())?;
        signal_hook::flag::register(SIGHUP, self.reload.clone())?;
        Ok(())
    }
}

/// Counters and timing reported at exit.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Summary {
    /// Frames processed.
    pub frames: u64,
    /// Frames dropped because inference was busy (latest-frame semantics).
    pub dropped: u64,
    /// Frames that could not be read or decoded.
    pub bad_frames: u64,
    /// Frames with no detail ([`crate::preprocess::is_blank`]), counted as showing no polyp.
    pub blank_frames: u64,
    /// Alerts raised.
    pub alerts: u64,
    /// Frame rate, capture-to-decision latency and stage times over the whole run.
    pub timing: TimingReport,
}

/// Opens the configured frame source.
pub fn open_source(cfg: &Config) -> Result<Box<dyn FrameSource>, ServiceError> {
    match cfg.source.kind {
        SourceKind::Replay => Ok(Box::new(Replay::open(
            cfg.source.path.as_deref().unwrap_or(Path::new("")),
            cfg.source.fps,
            cfg.source.r#loop,
        )?)),
        SourceKind::V4l2 => Ok(Box::new(Camera::new(CameraConfig {
            device: cfg.source.device.clone().unwrap_or_default(),
            format: cfg.source.format,
            width: cfg.source.width,
            height: cfg.source.height,
            fps: cfg.source.fps.round() as u32,
            stall: Duration::from_secs_f64(cfg.runtime.stall_secs),
        }))),
    }
}

/// Runs the daemon until stopped (or until a finite replay ends). `config_path` is re-read on
/// SIGHUP; without one (the embedded demo) a reload re-checks the model file.
pub fn run(
    config_path: Option<&Path>,
    cfg: Config,
    control: &Control,
) -> Result<Summary, ServiceError> {
    crate::bench::set_threads(cfg.runtime.threads);
    // With several inference threads, the loop runs on one of tract's for its whole life: a
    // frame then starts without handing its run to the pool and waiting for it back (0.2 ms
    // of a 6 ms int8 frame on two threads).
    crate::accel::on_tract_threads(|| serve(config_path, cfg, control))
}

/// Opens what the configuration names (GPIO line, model, sinks, frame source) and serves.
fn serve(
    config_path: Option<&Path>,
    cfg: Config,
    control: &Control,
) -> Result<Summary, ServiceError> {
    let gpio = match &cfg.gpio {
        Some(g) => crate::gpio::open(g)?,
        None => None,
    };
    let (engine, events, snapshots) = Next::load(cfg, false)?.into_parts();
    let source = open_source(&engine.cfg)?;
    log::info!(
        "model {} from {}",
        engine.model_label(),
        engine.seg.onnx_path().display()
    );
    log::info!("source {}", source.describe());
    let outputs = AlertOutputs::new(gpio, events, snapshots);
    let watchdog = sd_notify::watchdog_enabled().map(|d| d / 2);
    let seams = Seams {
        clock: SystemClock,
        notifier: SdNotify,
        watchdog,
    };
    Ok(frame_loop(
        config_path,
        engine,
        outputs,
        source,
        control,
        seams,
    ))
}

/// What the frame loop is given rather than reaching for: time, systemd, and how often
/// systemd wants to hear from the watchdog (none: not watched).
struct Seams<C, N> {
    clock: C,
    notifier: N,
    watchdog: Option<Duration>,
}

/// The frame loop, from the capture thread's start to the last event.
fn frame_loop<C: Clock, N: Notifier>(
    config_path: Option<&Path>,
    engine: Engine,
    outputs: AlertOutputs,
    source: Box<dyn FrameSource>,
    control: &Control,
    mut seams: Seams<C, N>,
) -> Summary {
    let clock = seams.clock.clone();
    let source_desc = source.describe();
    let hand = Arc::new(Handoff::default());
    let cap_stop = Arc::new(AtomicBool::new(false));
    let recipe = Arc::new(Mutex::new(engine.seg.manifest().preprocess.clone()));
    let capture = handoff::spawn(
        source,
        hand.clone(),
        cap_stop.clone(),
        recipe.clone(),
        clock.clone(),
    );

    // Ready once the model is loaded and capture runs, not at the first frame: a camera that
    // is missing at boot must not fail the start; the watchdog covers a pipeline with no frames.
    let waiting = format!("model loaded, waiting for frames from {source_desc}");
    seams.notifier.notify(Notice::Ready(&waiting));
    let health = Health::new(
        clock.now(),
        Duration::from_secs_f64(engine.cfg.runtime.stall_secs),
        Duration::from_secs_f64(engine.cfg.runtime.status_secs),
        seams.watchdog,
    );
    let mut p = Pipeline {
        alerts: AlertMachine::new(engine.cfg.alert.clone()),
        engine,
        outputs,
        health,
        summary: Summary::default(),
        timing: Timing::default(),
        last_frame: None,
        blank: false,
        source_desc,
    };
    let mut reloader = Reloader::default();
    let mut source_lost = false;

    loop {
        if let Some(prepared) = reloader.poll(&control.reload, config_path, &p.engine) {
            reload::apply_reload(prepared, &mut p.engine, &mut p.alerts, &mut p.outputs);
            let rt = &p.engine.cfg.runtime;
            p.health
                .set_status_every(Duration::from_secs_f64(rt.status_secs));
            *recipe.lock().unwrap_or_else(|e| e.into_inner()) =
                p.engine.seg.manifest().preprocess.clone();
        }
        let taken = hand.take(&mut source_lost, control.stop.load(Ordering::Relaxed));
        p.summary.dropped = taken.dropped;
        p.summary.bad_frames = taken.bad;
        match taken.feed {
            Some(Feed::Lost { reason, failed }) => {
                p.outputs.events().emit(&Event::SourceLost {
                    reason,
                    failed_frames: failed,
                });
                // No frame decides anything now: the alert ends, the line goes inactive.
                p.close_alert(EndReason::SourceLost);
            }
            Some(Feed::Back) => p.outputs.events().emit(&Event::SourceBack {
                source: p.source_desc.clone(),
            }),
            None => {}
        }
        if let Some(job) = taken.job {
            p.frame(job, &clock);
        }
        p.tick(clock.now(), &mut seams.notifier);
        if control.stop.load(Ordering::Relaxed) || (taken.ended && hand.is_empty()) {
            break;
        }
    }

    seams.notifier.notify(Notice::Stopping);
    cap_stop.store(true, Ordering::Relaxed);
    let summary = p.shutdown();
    log::logger().flush();
    let _ = capture.join();
    summary
}

/// The processing thread's state between frames.
struct Pipeline {
    engine: Engine,
    outputs: AlertOutputs,
    alerts: AlertMachine,
    health: Health,
    summary: Summary,
    /// The whole run's timing (the status window's is in `health`).
    timing: Timing,
    /// The frame an alert closed without one of its own ends on.
    last_frame: Option<Frame>,
    /// The last frame was blank.
    blank: bool,
    source_desc: String,
}

impl Pipeline {
    /// Ends the open alert, if any, on the last frame seen.
    fn close_alert(&mut self, reason: EndReason) {
        if let Some(frame) = &self.last_frame
            && let Some(alert) = self.alerts.close(frame.seq, frame.t_ms)
        {
            self.outputs.end(&End {
                alert: &alert,
                frame,
                reason,
            });
        }
    }

    /// Runs one frame and acts on what it decided.
    fn frame<C: Clock>(&mut self, job: Job, clock: &C) {
        let (frame, processed) = engine::process(&self.engine, job);
        match processed {
            Ok(p) => self.decided(&frame, &p, clock.now()),
            Err(e) => log::error!("frame {} ({}): {e}", frame.seq, frame.origin),
        }
        self.last_frame = Some(frame);
    }

    fn decided(&mut self, frame: &Frame, p: &Processed, now: std::time::Instant) {
        self.summary.frames += 1;
        let flow = self.health.frame(now, &p.stages, p.latency_ms);
        self.timing.record(&p.stages, p.latency_ms, now);
        if flow.again {
            log::info!("frames flow again");
        }
        if p.blank != self.blank {
            self.blank = p.blank;
            if p.blank {
                log::warn!(
                    "frame {} ({}) is blank (no detail): blank frames are not scored and count as no polyp",
                    frame.seq,
                    frame.origin
                );
            } else {
                log::info!("frames have detail again");
            }
        }
        self.summary.blank_frames += u64::from(p.blank);
        let d = &p.detection;
        if d.candidate && !d.positive {
            log::debug!(frame_seq = frame.seq, polyp_score = d.score; "candidate frame");
        }
        match self
            .alerts
            .update(frame.seq, frame.t_ms, d.positive, d.score)
        {
            Transition::Raised(alert) => {
                self.summary.alerts += 1;
                self.outputs.raise(&Raise {
                    alert: &alert,
                    frame,
                    detection: d,
                    mask: &p.mask,
                    latency_ms: p.latency_ms,
                    model_version: &self.engine.seg.manifest().model.version,
                });
            }
            Transition::Cleared(alert) => self.outputs.end(&End {
                alert: &alert,
                frame,
                reason: EndReason::Cleared,
            }),
            Transition::None => {}
        }
        if flow.first {
            self.outputs.events().emit(&Event::Ready {
                model: self.engine.model_label(),
                source: self.source_desc.clone(),
            });
            log::info!("ready: first frame processed in {:.1} ms", p.latency_ms);
        }
    }

    /// The stall, the watchdog and the status line, as due at `now`.
    fn tick(&mut self, now: std::time::Instant, notifier: &mut impl Notifier) {
        let due = self.health.tick(now);
        if due.stalled {
            log::error!(
                "no frame for {:.1} s{}",
                self.health.stall().as_secs_f64(),
                if self.health.watched() {
                    ": watchdog no longer fed"
                } else {
                    ""
                }
            );
            // Nothing is watched now: an alert left raised would never clear.
            self.close_alert(EndReason::NoFrames);
        }
        if due.watchdog {
            notifier.notify(Notice::Watchdog);
        }
        if let Some(s) = due.status {
            let version = &self.engine.seg.manifest().model.version;
            let line = health::status_line(&s, version, self.summary.alerts, self.summary.dropped);
            notifier.notify(Notice::Status(&line));
            if s.window.frames > 0 {
                log::info!("timing over {:.0} s: {}", s.secs, s.window);
            }
        }
    }

    /// Closes the open alert (so every start has an end in the stream), lets the GPIO line go,
    /// and writes the last event.
    fn shutdown(mut self) -> Summary {
        let open = self
            .last_frame
            .as_ref()
            .and_then(|f| self.alerts.close(f.seq, f.t_ms).map(|a| (a, f)));
        self.outputs.shutdown(
            open.as_ref()
                .map(|(alert, frame)| End {
                    alert,
                    frame,
                    reason: EndReason::Shutdown,
                })
                .as_ref(),
        );
        let mut summary = self.summary;
        summary.timing = self.timing.report();
        let events = self.outputs.events();
        events.emit(&Event::Stopped {
            timing: summary.timing,
            frames: summary.frames,
            dropped: summary.dropped,
            bad_frames: summary.bad_frames,
            blank_frames: summary.blank_frames,
            alerts: summary.alerts,
        });
        events.flush();
        summary
    }
}

/// The configuration that `polypwatch` with no arguments runs: the bundled demo clip through
/// the shipped model, events on stdout. Found beside the installed binary first (the .deb puts
/// it in `/usr/share/polypwatch/demo/`), then in the source tree the binary was built from.
pub fn demo_config() -> Result<Config, ConfigError> {
    let exe = std::env::current_exe().ok();
    load_first(&demo_candidates(exe.as_deref()))
}

/// Where the demo's configuration may be, in the order tried: `<prefix>/share/polypwatch/demo/`
/// for a binary in `<prefix>/bin/`, then the build's source tree (`cargo run`).
pub fn demo_candidates(exe: Option<&Path>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(prefix) = exe.and_then(Path::parent).and_then(Path::parent) {
        out.push(prefix.join("share/polypwatch/demo/demo.toml"));
    }
    out.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("demo/demo.toml"));
    out
}

/// Loads the first of `candidates` that exists; none existing is [`ConfigError::NoDemo`].
fn load_first(candidates: &[PathBuf]) -> Result<Config, ConfigError> {
    match candidates.iter().find(|p| p.exists()) {
        Some(p) => Config::load(p),
        None => Err(ConfigError::NoDemo {
            looked: candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_is_looked_for_beside_the_installed_binary_first() {
        let c = demo_candidates(Some(Path::new("/usr/bin/polypwatch")));
        assert_eq!(c[0], Path::new("/usr/share/polypwatch/demo/demo.toml"));
        assert_eq!(
            c.last().unwrap(),
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("demo/demo.toml")
        );
        assert_eq!(demo_candidates(None).len(), 1);
    }

    #[test]
    fn an_installed_demo_loads_with_paths_relative_to_it() {
        // The .deb's layout: <prefix>/share/polypwatch/{demo,models}.
        let prefix = tempfile::tempdir().unwrap();
        let share = prefix.path().join("share/polypwatch");
        std::fs::create_dir_all(share.join("demo/clip")).unwrap();
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("demo/demo.toml"),
            share.join("demo/demo.toml"),
        )
        .unwrap();
        let exe = prefix.path().join("bin/polypwatch");
        let cfg = load_first(&demo_candidates(Some(&exe))).unwrap();
        assert_eq!(cfg.source.path.unwrap(), share.join("demo/clip"));
        assert_eq!(
            cfg.model.manifest,
            share.join("demo/../models/polypwatch-edge-int8.toml")
        );
    }

    #[test]
    fn no_demo_names_every_place_it_looked_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a/demo.toml");
        let b = dir.path().join("b/demo.toml");
        let msg = load_first(&[a.clone(), b.clone()]).unwrap_err().to_string();
        assert!(msg.contains(&a.display().to_string()), "{msg}");
        assert!(msg.contains(&b.display().to_string()), "{msg}");
        assert!(msg.contains("--config"), "{msg}");
    }
}
