//! The daemon's pipeline: capture, decoding and preprocessing on the capture thread with a
//! latest-frame hand-off, then infer, detect, alert and sink on the processing thread, so the two
//! overlap on two cores; signals, systemd readiness, status with stage times, and watchdog.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::alert::{AlertEvent, AlertMachine, Transition};
use crate::camera::{Camera, CameraConfig};
use crate::capture::{CaptureError, Frame, FrameSource, Replay};
use crate::config::{Config, ConfigError, SourceKind};
use crate::detect::{Detection, Detector};
use crate::gpio::GpioError;
use crate::model::{ModelError, Segmenter};
use crate::preprocess::Recipe;
use crate::sink::{Event, EventStream, SnapshotQueue, Snapshots};
use crate::store::{InstallError, Store};
use crate::timing::{Stages, Timing, TimingReport};

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
    Gpio(#[from] GpioError),
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

/// A frame with its model input, prepared on the capture thread.
struct Job {
    frame: Frame,
    /// The recipe `input` was made with; a reload may have changed the model's since.
    recipe: Recipe,
    input: Vec<f32>,
    preprocess_ms: f64,
    /// When it was handed to the processing thread.
    queued: Instant,
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

/// Unreadable frames in a row after which the feed counts as lost.
pub const LOST_AFTER: u64 = 25;
/// Longest wait between attempts on a lost feed (doubling from half a second).
const LOST_BACKOFF_MAX: Duration = Duration::from_secs(5);

struct Handoff {
    slot: Mutex<Slot>,
    ready: Condvar,
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

fn capture_loop(
    mut src: Box<dyn FrameSource>,
    hand: Arc<Handoff>,
    stop: Arc<AtomicBool>,
    recipe: Arc<Mutex<Recipe>>,
) {
    let paced = src.paced();
    let (mut failed, mut backoff) = (0u64, Duration::from_millis(500));
    while !stop.load(Ordering::Relaxed) {
        if !paced {
            let mut slot = hand.slot.lock().unwrap_or_else(|e| e.into_inner());
            while slot.frame.is_some() && !stop.load(Ordering::Relaxed) {
                slot = hand
                    .ready
                    .wait_timeout(slot, Duration::from_millis(100))
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
        let mut slot = hand.slot.lock().unwrap_or_else(|e| e.into_inner());
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
                    let until = Instant::now() + backoff;
                    while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(50));
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

/// The parts of the pipeline a reload replaces.
struct Engine {
    cfg: Config,
    seg: Segmenter,
    detector: Detector,
    events: EventStream,
    snapshots: Option<SnapshotQueue>,
}

/// The model to serve: the store's current model if one is installed and passes verification,
/// else the factory model of `[model] manifest`. `strict` (a reload): a current model that fails
/// is an error, so the running model keeps serving instead of falling back.
fn load_model(cfg: &Config, strict: bool) -> Result<Segmenter, ServiceError> {
    if let Some(u) = &cfg.update {
        let store = Store::open(u)?;
        if let Some(current) = store.current() {
            match crate::store::verify(&current, store.keys()) {
                Ok(v) => {
                    log::info!(
                        "installed model {} signed by {}, self-test IoU {:.4}",
                        current.display(),
                        v.key.id(),
                        v.selftest_iou
                    );
                    return Ok(v.segmenter);
                }
                Err(e) if strict => return Err(e.into()),
                Err(e) => log::error!(
                    "installed model {} fails verification ({e}); serving the factory model (`polypwatch model rollback` or install another)",
                    current.display()
                ),
            }
        }
    }
    Ok(Segmenter::load(&cfg.model.manifest)?)
}

impl Engine {
    fn new(cfg: Config, strict: bool) -> Result<Self, ServiceError> {
        let seg = load_model(&cfg, strict)?;
        let m = seg.manifest();
        let detect = cfg
            .detect
            .resolve(m.detect.as_ref(), m.output.threshold)
            .map_err(|message| ServiceError::Detect {
                model: format!("{} {}", m.model.name, m.model.version),
                message,
            })?;
        let detector = Detector::new(detect.cfg, m.output.threshold);
        let events = EventStream::open(&cfg.events);
        let snapshots = cfg
            .snapshots
            .dir
            .clone()
            .map(|d| SnapshotQueue::spawn(Snapshots::new(d, cfg.snapshots.quota_bytes())));
        Ok(Engine {
            cfg,
            seg,
            detector,
            events,
            snapshots,
        })
    }

    fn model_label(&self) -> String {
        let m = &self.seg.manifest().model;
        format!("{} {} ({})", m.name, m.version, m.precision)
    }
}

/// What processing one frame produced.
struct Processed {
    detection: Detection,
    mask: image::GrayImage,
    /// Capture to decision (the alert machine's input is ready), in milliseconds.
    latency_ms: f64,
    stages: Stages,
    /// The frame had no detail and was not run through the model.
    blank: bool,
}

fn process(engine: &Engine, job: Job) -> (Frame, Result<Processed, ModelError>) {
    let t0 = Instant::now();
    let r = &engine.seg.manifest().preprocess;
    let mut stages = Stages {
        decode: job.frame.decode_ms,
        preprocess: job.preprocess_ms,
        wait: (t0 - job.queued).as_secs_f64() * 1e3,
        ..Stages::default()
    };
    let input = if job.recipe == *r {
        job.input
    } else {
        // Prepared before a reload changed the recipe.
        let t = Instant::now();
        let input = r.tensor_from_rgb(&job.frame.image);
        stages.preprocess += t.elapsed().as_secs_f64() * 1e3;
        input
    };
    if crate::preprocess::is_blank(&job.frame.image) {
        // Not scored: a flat frame is no polyp (and must not hold an alert up).
        let p = Processed {
            detection: Detection::none(),
            mask: image::GrayImage::new(r.width, r.height),
            latency_ms: job.frame.captured.elapsed().as_secs_f64() * 1e3,
            stages,
            blank: true,
        };
        return (job.frame, Ok(p));
    }
    let t1 = Instant::now();
    let result = engine.seg.run(&input).map(|mut logits| {
        let t2 = Instant::now();
        let mask = engine.detector.mask(&mut logits, r.width, r.height);
        let detection = engine.detector.detect(&logits, &mask);
        stages.inference = (t2 - t1).as_secs_f64() * 1e3;
        stages.postprocess = t2.elapsed().as_secs_f64() * 1e3;
        Processed {
            detection,
            mask,
            latency_ms: job.frame.captured.elapsed().as_secs_f64() * 1e3,
            stages,
            blank: false,
        }
    });
    (job.frame, result)
}

fn notify(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        log::debug!("sd_notify: {e}");
    }
}

fn alert_start(engine: &mut Engine, a: &AlertEvent, frame: &Frame, p: &Processed) {
    let best = p.detection.best;
    let area = best.map_or(0.0, |c| c.area);
    let bbox = best.map_or([0.0; 4], |c| c.bbox);
    let version = engine.seg.manifest().model.version.clone();
    let bbox_s = format!(
        "{:.3},{:.3},{:.3},{:.3}",
        bbox[0], bbox[1], bbox[2], bbox[3]
    );
    log::warn!(
        polyp_event = "start", polyp_alert_id = a.id, polyp_score = p.detection.score,
        polyp_area = area, polyp_bbox = bbox_s.as_str(), frame_seq = frame.seq,
        latency_ms = p.latency_ms, model_version = version.as_str();
        "polyp alert {} raised: score {:.2}, area {:.1}%", a.id, p.detection.score, area * 100.0
    );
    engine.events.emit(&Event::AlertStart {
        alert_id: a.id,
        seq: frame.seq,
        frame: frame.origin.clone(),
        t_ms: frame.t_ms,
        score: p.detection.score,
        area,
        bbox,
        latency_ms: p.latency_ms,
        model_version: version,
    });
    if let Some(s) = &engine.snapshots {
        let name = format!(
            "{}-alert{:04}-seq{}.jpg",
            crate::store::unix_ms(),
            a.id,
            frame.seq
        );
        s.queue(name, &frame.image, &p.mask, best.map(|c| c.bbox));
    }
}

fn alert_end(engine: &mut Engine, a: &AlertEvent, frame: &Frame, reason: Option<&str>) {
    log::info!(
        polyp_event = "end", polyp_alert_id = a.id, polyp_score = a.peak_score,
        frame_seq = frame.seq, polyp_frames = a.frames;
        "polyp alert {} cleared after {} frames (peak score {:.2})", a.id, a.frames, a.peak_score
    );
    engine.events.emit(&Event::AlertEnd {
        alert_id: a.id,
        seq: frame.seq,
        frame: frame.origin.clone(),
        start_ms: a.start_ms,
        end_ms: a.end_ms.unwrap_or(frame.t_ms),
        peak_score: a.peak_score,
        frames: a.frames,
        reason: reason.map(String::from),
    });
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

fn serve(
    config_path: Option<&Path>,
    cfg: Config,
    control: &Control,
) -> Result<Summary, ServiceError> {
    let gpio = match &cfg.gpio {
        Some(g) => crate::gpio::open(g)?,
        None => None,
    };
    let mut engine = Engine::new(cfg, false)?;
    let source = open_source(&engine.cfg)?;
    log::info!(
        "model {} from {}",
        engine.model_label(),
        engine.seg.onnx_path().display()
    );
    log::info!("source {}", source.describe());
    let source_desc = source.describe();

    let hand = Arc::new(Handoff {
        slot: Mutex::new(Slot::default()),
        ready: Condvar::new(),
    });
    let cap_stop = Arc::new(AtomicBool::new(false));
    let recipe = Arc::new(Mutex::new(engine.seg.manifest().preprocess.clone()));
    let capture = {
        let (hand, stop, recipe) = (hand.clone(), cap_stop.clone(), recipe.clone());
        std::thread::Builder::new()
            .name("capture".into())
            .spawn(move || capture_loop(source, hand, stop, recipe))
            .expect("spawn capture thread")
    };

    // Ready once the model is loaded and capture runs, not at the first frame: a camera that
    // is missing at boot must not fail the start; the watchdog covers a pipeline with no frames.
    let waiting = format!("model loaded, waiting for frames from {source_desc}");
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&waiting),
    ]);
    let watchdog = sd_notify::watchdog_enabled().map(|d| d / 2);
    let stall = Duration::from_secs_f64(engine.cfg.runtime.stall_secs);
    let mut alerts = AlertMachine::new(engine.cfg.alert.clone());
    let mut summary = Summary::default();
    let mut ready = false;
    let mut last_frame_at = Instant::now();
    let mut last_watchdog = Instant::now();
    let mut last_status = Instant::now();
    let mut window = Timing::default();
    let mut timing = Timing::default();
    let mut last_frame: Option<Frame> = None;
    let mut stalled = false;
    let mut blank = false;
    let mut pending: Option<std::thread::JoinHandle<Prepared>> = None;
    let mut source_lost = false;

    loop {
        // A reload is prepared on its own thread; a SIGHUP during one waits for it.
        if pending.is_none() && control.reload.swap(false, Ordering::Relaxed) {
            let (path, old) = (config_path.map(Path::to_path_buf), engine.cfg.clone());
            pending = std::thread::Builder::new()
                .name("reload".into())
                .spawn(move || prepare_reload(path, old))
                .map_err(|e| log::error!("cannot start the reload: {e}"))
                .ok();
        }
        if pending.as_ref().is_some_and(|h| h.is_finished()) {
            match pending.take().map(|h| h.join()) {
                Some(Ok(prepared)) => {
                    apply_reload(prepared, &mut engine, &mut alerts);
                    *recipe.lock().unwrap_or_else(|e| e.into_inner()) =
                        engine.seg.manifest().preprocess.clone();
                }
                _ => log::error!(
                    "the reload failed unexpectedly; still serving {}",
                    engine.model_label()
                ),
            }
        }
        let (frame, ended) = {
            let mut slot = hand.slot.lock().unwrap_or_else(|e| e.into_inner());
            if slot.frame.is_none() && !slot.ended && !control.stop.load(Ordering::Relaxed) {
                slot = hand
                    .ready
                    .wait_timeout(slot, Duration::from_millis(100))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            summary.dropped = slot.dropped;
            summary.bad_frames = slot.bad;
            match (&slot.lost, source_lost) {
                (Some((reason, failed)), false) => {
                    source_lost = true;
                    engine.events.emit(&Event::SourceLost {
                        reason: reason.clone(),
                        failed_frames: *failed,
                    });
                    // No frame decides anything now: the alert ends, the line goes inactive.
                    if let Some(f) = &last_frame
                        && let Some(a) = alerts.close(f.seq, f.t_ms)
                    {
                        if let Some(g) = &gpio {
                            g.clear();
                        }
                        alert_end(&mut engine, &a, f, Some("source_lost"));
                    }
                }
                (None, true) if slot.frame.is_some() => {
                    source_lost = false;
                    engine.events.emit(&Event::SourceBack {
                        source: source_desc.clone(),
                    });
                }
                _ => {}
            }
            let taken = slot.frame.take();
            // An unpaced source waits for the slot to empty.
            hand.ready.notify_all();
            (taken, slot.ended)
        };
        if let Some(job) = frame {
            let (frame, processed) = process(&engine, job);
            match processed {
                Ok(p) => {
                    summary.frames += 1;
                    last_frame_at = Instant::now();
                    window.record(&p.stages, p.latency_ms, last_frame_at);
                    timing.record(&p.stages, p.latency_ms, last_frame_at);
                    if stalled {
                        log::info!("frames flow again");
                        stalled = false;
                    }
                    if p.blank != blank {
                        blank = p.blank;
                        if blank {
                            log::warn!(
                                "frame {} ({}) is blank (no detail): blank frames are not scored and count as no polyp",
                                frame.seq,
                                frame.origin
                            );
                        } else {
                            log::info!("frames have detail again");
                        }
                    }
                    summary.blank_frames += u64::from(p.blank);
                    if p.detection.candidate && !p.detection.positive {
                        log::debug!(frame_seq = frame.seq, polyp_score = p.detection.score; "candidate frame");
                    }
                    match alerts.update(
                        frame.seq,
                        frame.t_ms,
                        p.detection.positive,
                        p.detection.score,
                    ) {
                        Transition::Raised(a) => {
                            summary.alerts += 1;
                            if let Some(g) = &gpio {
                                g.raise();
                            }
                            alert_start(&mut engine, &a, &frame, &p);
                        }
                        Transition::Cleared(a) => {
                            if let Some(g) = &gpio {
                                g.clear();
                            }
                            alert_end(&mut engine, &a, &frame, None)
                        }
                        Transition::None => {}
                    }
                    if !ready {
                        ready = true;
                        engine.events.emit(&Event::Ready {
                            model: engine.model_label(),
                            source: source_desc.clone(),
                        });
                        log::info!("ready: first frame processed in {:.1} ms", p.latency_ms);
                    }
                }
                Err(e) => log::error!("frame {} ({}): {e}", frame.seq, frame.origin),
            }
            last_frame = Some(frame);
        }
        let now = Instant::now();
        let flowing = now - last_frame_at < stall;
        if !flowing && !stalled {
            stalled = true;
            log::error!(
                "no frame for {:.1} s{}",
                stall.as_secs_f64(),
                if watchdog.is_some() {
                    ": watchdog no longer fed"
                } else {
                    ""
                }
            );
            // Nothing is watched now: an alert left raised would never clear.
            if let Some(f) = &last_frame
                && let Some(a) = alerts.close(f.seq, f.t_ms)
            {
                if let Some(g) = &gpio {
                    g.clear();
                }
                alert_end(&mut engine, &a, f, Some("no_frames"));
            }
        }
        // Fed only while frames flow, so systemd restarts a stalled pipeline.
        if let Some(wd) = watchdog
            && flowing
            && now - last_watchdog >= wd
        {
            notify(&[sd_notify::NotifyState::Watchdog]);
            last_watchdog = now;
        }
        if ready && now - last_status >= Duration::from_secs_f64(engine.cfg.runtime.status_secs) {
            let secs = (now - last_status).as_secs_f64();
            let w = window.report();
            let status = format!(
                "{:.1} fps, latency {:.0} ms, model {}, {} alerts, {} dropped",
                w.frames as f64 / secs,
                w.latency_p50_ms,
                engine.seg.manifest().model.version,
                summary.alerts,
                summary.dropped
            );
            notify(&[sd_notify::NotifyState::Status(&status)]);
            if w.frames > 0 {
                log::info!("timing over {:.0} s: {w}", secs);
            }
            (last_status, window) = (now, Timing::default());
        }
        if control.stop.load(Ordering::Relaxed)
            || (ended && hand.slot.lock().map(|s| s.frame.is_none()).unwrap_or(true))
        {
            break;
        }
    }

    notify(&[sd_notify::NotifyState::Stopping]);
    // Dropping the line's thread drives it inactive.
    drop(gpio);
    cap_stop.store(true, Ordering::Relaxed);
    if let Some(f) = &last_frame
        && let Some(a) = alerts.close(f.seq, f.t_ms)
    {
        // Close the open alert so every start has an end in the stream.
        alert_end(&mut engine, &a, f, Some("shutdown"));
    }
    summary.timing = timing.report();
    engine.events.emit(&Event::Stopped {
        timing: summary.timing,
        frames: summary.frames,
        dropped: summary.dropped,
        bad_frames: summary.bad_frames,
        blank_frames: summary.blank_frames,
        alerts: summary.alerts,
    });
    engine.events.flush();
    log::logger().flush();
    let _ = capture.join();
    Ok(summary)
}

/// What a reload prepared off the processing thread: the outcome of each incoming bundle and
/// the new engine (or why there is none).
struct Prepared {
    installs: Vec<(String, Result<crate::store::Installed, String>)>,
    engine: Result<Engine, ServiceError>,
}

/// Installs the bundles waiting in the store's incoming folder, re-reads the configuration and
/// loads the model. Runs on its own thread so frames keep flowing through the old engine.
fn prepare_reload(config_path: Option<PathBuf>, old: Config) -> Prepared {
    let mut installs = Vec::new();
    if let Some(u) = &old.update {
        match Store::open(u) {
            Ok(store) => {
                for (file, result) in store.install_incoming() {
                    let file = file
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let result = result
                        .map_err(|e| format!("{e} (moved to {})", store.rejected().display()));
                    installs.push((file, result));
                }
            }
            Err(e) => log::error!("{e}"),
        }
    }
    let cfg = match &config_path {
        Some(p) => Config::load(p),
        None => Ok(old.clone()),
    };
    let engine = cfg.map_err(ServiceError::from).and_then(|cfg| {
        if cfg.source != old.source {
            log::warn!("[source] changes take effect on restart");
        }
        if cfg.gpio != old.gpio {
            log::warn!("[gpio] changes take effect on restart");
        }
        if cfg.runtime.threads != old.runtime.threads {
            log::warn!("[runtime] threads changes take effect on restart");
        }
        Engine::new(cfg, true)
    });
    Prepared { installs, engine }
}

/// Swaps in a prepared engine between two frames, or reports why not.
fn apply_reload(p: Prepared, engine: &mut Engine, alerts: &mut AlertMachine) {
    for (file, result) in p.installs {
        match result {
            Ok(i) => {
                log::info!(
                    "installed {file}: {} signed by {}, self-test IoU {:.4}",
                    i.label,
                    i.key,
                    i.selftest_iou
                );
                engine.events.emit(&Event::ModelInstalled {
                    file,
                    model: i.label,
                    key: i.key,
                });
            }
            Err(reason) => {
                log::error!("model update {file} rejected: {reason}");
                engine.events.emit(&Event::ModelRejected { file, reason });
            }
        }
    }
    match p.engine {
        Ok(mut new) => {
            alerts.reconfigure(new.cfg.alert.clone());
            let label = new.model_label();
            // Events keep their order across the swap: the same outputs keep their writers;
            // changed ones get the old writers' last lines out first (bounded wait).
            if new.cfg.events == engine.cfg.events {
                std::mem::swap(&mut new.events, &mut engine.events);
            } else {
                engine.events.flush();
            }
            *engine = new;
            log::info!("reloaded: model {label}");
            engine.events.emit(&Event::Reloaded { model: label });
        }
        Err(e) => {
            log::error!(
                "reload rejected, still serving {}: {e}",
                engine.model_label()
            );
            engine.events.emit(&Event::ReloadRejected {
                reason: e.to_string(),
            });
        }
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
