//! The real frame loop on in-memory frames, a clock the frame source moves, and a notifier
//! that records what systemd would have heard. The model is the tiny one the integration tests
//! serve (tests/fixtures/model); `[detect]` makes every frame positive (`LOUD`) or none
//! (`QUIET`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use image::RgbImage;
use serde_json::Value;

use super::alerts::AlertOutput;
use super::*;

const LOUD: &str =
    "pixel_threshold = 0.01\nmin_area = 0.0\nalert_score = 0.011\ncandidate_score = 0.01";
const QUIET: &str = "pixel_threshold = 0.99\nalert_score = 0.99";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A clock that moves only when told to.
#[derive(Clone)]
struct FakeClock {
    t0: Instant,
    elapsed: Arc<Mutex<Duration>>,
}

impl FakeClock {
    fn new() -> Self {
        FakeClock {
            t0: Instant::now(),
            elapsed: Arc::default(),
        }
    }
    fn advance(&self, d: Duration) {
        *self.elapsed.lock().unwrap() += d;
    }
    fn secs(&self) -> f64 {
        self.elapsed.lock().unwrap().as_secs_f64()
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Instant {
        self.t0 + *self.elapsed.lock().unwrap()
    }
    fn sleep(&self, d: Duration) {
        self.advance(d);
        std::thread::yield_now();
    }
}

/// What the fake source does at each call, in order; after the last step the stream ends.
enum Step {
    /// The clock moves on by this much, then the next image is the next frame.
    Frame(Duration),
    /// No frame for this long (the clock moves in tenths, with short real pauses so the loop
    /// looks in between); first a real pause for the loop to finish the frame it has.
    Stall(Duration),
    /// Something the test does between two frames.
    Do(Box<dyn FnOnce() + Send>),
    /// Waits (in real time, at most 60 s) until the condition holds.
    Until(Box<dyn Fn() -> bool + Send>),
    /// The source goes away (a camera unplugged), as `Camera` reports it.
    Lost(&'static str),
}

struct FakeSource {
    steps: std::collections::VecDeque<Step>,
    /// `Stall` in progress: steps left.
    stalling: Option<(Duration, u32)>,
    images: Vec<RgbImage>,
    clock: FakeClock,
    seq: u64,
}

impl FrameSource for FakeSource {
    fn next_frame(&mut self) -> Result<Option<Frame>, CaptureError> {
        if let Some((tenth, left)) = &mut self.stalling {
            self.clock.advance(*tenth);
            std::thread::sleep(Duration::from_millis(2));
            *left -= 1;
            if *left == 0 {
                self.stalling = None;
            }
            return Err(CaptureError::Waiting);
        }
        match self.steps.pop_front() {
            None => Ok(None),
            Some(Step::Frame(after)) => {
                self.clock.advance(after);
                let seq = self.seq;
                self.seq += 1;
                Ok(Some(Frame {
                    seq,
                    captured: Instant::now(),
                    decode_ms: 0.1,
                    t_ms: (self.clock.secs() * 1e3) as u64,
                    origin: format!("f{seq}"),
                    image: self.images[seq as usize % self.images.len()].clone(),
                }))
            }
            Some(Step::Stall(d)) => {
                std::thread::sleep(Duration::from_millis(200));
                self.stalling = Some((d / 100, 100));
                Err(CaptureError::Waiting)
            }
            Some(Step::Do(f)) => {
                f();
                Err(CaptureError::Waiting)
            }
            Some(Step::Lost(reason)) => Err(CaptureError::Lost {
                reason: reason.into(),
            }),
            Some(Step::Until(cond)) => {
                let deadline = Instant::now() + Duration::from_secs(60);
                while !cond() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(CaptureError::Waiting)
            }
        }
    }
    fn describe(&self) -> String {
        "fake".into()
    }
    fn paced(&self) -> bool {
        // Read only once the loop has taken the last frame: none is dropped.
        false
    }
}

/// Records notices as `(fake seconds, what)`.
struct Recorder {
    clock: FakeClock,
    heard: Arc<Mutex<Vec<(f64, String)>>>,
}

impl Notifier for Recorder {
    fn notify(&mut self, n: Notice<'_>) {
        let what = match n {
            Notice::Ready(s) => format!("ready {s}"),
            Notice::Status(s) => format!("status {s}"),
            Notice::Watchdog => "watchdog".into(),
            Notice::Stopping => "stopping".into(),
        };
        self.heard.lock().unwrap().push((self.clock.secs(), what));
    }
}

/// Records the alerts it hears, as an output beside the built-in ones.
struct Probe(Arc<Mutex<Vec<String>>>);

impl AlertOutput for Probe {
    fn raise(&mut self, r: &Raise<'_>) -> Result<(), alerts::OutputError> {
        self.0.lock().unwrap().push(format!("raise {}", r.alert.id));
        Ok(())
    }
    fn end(&mut self, e: &End<'_>) -> Result<(), alerts::OutputError> {
        let what = format!("end {} {:?} seq {}", e.alert.id, e.reason, e.frame.seq);
        self.0.lock().unwrap().push(what);
        Ok(())
    }
}

struct Bench {
    dir: tempfile::TempDir,
    clock: FakeClock,
    control: Control,
    images: Vec<RgbImage>,
}

/// What a run left.
struct Ran {
    summary: Summary,
    events: Vec<Value>,
    heard: Vec<(f64, String)>,
    alerts: Vec<String>,
}

impl Ran {
    fn events_of(&self, kind: &str) -> Vec<&Value> {
        self.events.iter().filter(|e| e["event"] == kind).collect()
    }
    fn heard(&self, prefix: &str) -> Vec<(f64, &str)> {
        self.heard
            .iter()
            .filter(|(_, w)| w.starts_with(prefix))
            .map(|(t, w)| (*t, w.as_str()))
            .collect()
    }
}

impl Bench {
    fn new() -> Self {
        let imgs = root().join("tests/fixtures/kvasir-mini/images");
        let images = crate::capture::list_frames(&imgs)
            .unwrap()
            .iter()
            .take(4)
            .map(|p| crate::preprocess::load_rgb(p).unwrap())
            .collect();
        Bench {
            dir: tempfile::tempdir().unwrap(),
            clock: FakeClock::new(),
            control: Control::default(),
            images,
        }
    }

    fn events_file(&self) -> PathBuf {
        self.dir.path().join("events.jsonl")
    }

    /// A config on the tiny model (`precision` f32 or int8) with `detect` and `runtime` keys.
    fn config(&self, precision: &str, detect: &str, runtime: &str) -> String {
        format!(
            r#"
[model]
manifest = "{}"
[source]
kind = "replay"
path = "unused: the tests give the loop its frames"
[detect]
{detect}
[alert]
raise_n = 2
window_m = 3
clear_k = 3
min_hold_ms = 0
[events]
stdout = false
file = "{}"
journald = "off"
[runtime]
{runtime}
"#,
            root()
                .join(format!("tests/fixtures/model/tiny-{precision}.toml"))
                .display(),
            self.events_file().display()
        )
    }

    fn frames(n: usize, every: Duration) -> impl Iterator<Item = Step> {
        (0..n).map(move |_| Step::Frame(every))
    }

    /// Runs the real loop on `steps` until the source ends or a step stops it.
    fn run(
        &self,
        cfg: &str,
        config_path: Option<&Path>,
        watchdog: Option<Duration>,
        steps: impl IntoIterator<Item = Step>,
    ) -> Ran {
        let cfg = match config_path {
            // As the daemon reads it, so a reload compares like with like.
            Some(p) => Config::load(p).unwrap(),
            None => Config::parse(cfg, Path::new("test.toml")).unwrap(),
        };
        let (engine, events, snapshots) = Next::load(cfg, false).unwrap().into_parts();
        let mut outputs = AlertOutputs::new(None, events, snapshots);
        let alerts = Arc::new(Mutex::new(Vec::new()));
        outputs.push(Box::new(Probe(alerts.clone())));
        let source = Box::new(FakeSource {
            steps: steps.into_iter().collect(),
            stalling: None,
            images: self.images.clone(),
            clock: self.clock.clone(),
            seq: 0,
        });
        let heard = Arc::new(Mutex::new(Vec::new()));
        let seams = Seams {
            clock: self.clock.clone(),
            notifier: Recorder {
                clock: self.clock.clone(),
                heard: heard.clone(),
            },
            watchdog,
        };
        let summary = frame_loop(config_path, engine, outputs, source, &self.control, seams);
        let events = std::fs::read_to_string(self.events_file())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        Ran {
            summary,
            events,
            heard: heard.lock().unwrap().clone(),
            alerts: alerts.lock().unwrap().clone(),
        }
    }

    /// A step that raises a flag of [`Control`].
    fn set(flag: &Arc<AtomicBool>) -> Step {
        let flag = flag.clone();
        Step::Do(Box::new(move || flag.store(true, Ordering::Relaxed)))
    }
}

const TENTH: Duration = Duration::from_millis(100);
const HALF: Duration = Duration::from_millis(500);

#[test]
fn the_watchdog_is_not_fed_while_frames_stall_and_the_alert_ends_with_no_frames() {
    let b = Bench::new();
    let cfg = b.config("f32", LOUD, "stall_secs = 2.0");
    let steps = Bench::frames(8, HALF)
        .chain([Step::Stall(Duration::from_secs(10))])
        .chain(Bench::frames(8, HALF));
    let r = b.run(&cfg, None, Some(Duration::from_secs(1)), steps);
    assert_eq!(r.summary.frames, 16);

    let fed: Vec<f64> = r.heard("watchdog").iter().map(|(t, _)| *t).collect();
    // Frames until 4 s and from 14.5 s: fed about every second while they flow.
    let before = fed.iter().filter(|&&t| t < 5.0).count();
    let after = fed.iter().filter(|&&t| t >= 14.5).count();
    assert!(before >= 2 && after >= 2, "fed at {fed:?}");
    // Not fed from the stall time after the last frame until frames come again.
    let gap = fed.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
    assert!(gap >= 5.0, "longest gap {gap} s; fed at {fed:?}");

    let ends = r.events_of("alert_end");
    assert_eq!(ends[0]["reason"], "no_frames", "{ends:?}");
    assert_eq!(
        ends[0]["seq"], 7,
        "closed on the last frame before the stall"
    );
    assert_eq!(ends[1]["reason"], "shutdown", "{ends:?}");
    assert_eq!(
        r.events_of("alert_start").len(),
        2,
        "raised again after the stall"
    );
}

#[test]
fn a_lost_source_ends_the_alert_at_once_and_its_return_is_a_new_alert() {
    let b = Bench::new();
    // A loss far shorter than stall_secs: only the source's own report can end the alert.
    let cfg = b.config("f32", LOUD, "stall_secs = 30.0");
    let events = b.events_file();
    let steps = Bench::frames(4, TENTH)
        .chain([
            Step::Lost("unplugged (ENODEV)"),
            // Back once the loop has reported the loss (a camera is away for at least its
            // 0.5 s retry; the loop looks every 0.1 s).
            Step::Until(Box::new(move || {
                std::fs::read_to_string(&events).is_ok_and(|t| t.contains("source_lost"))
            })),
        ])
        .chain(Bench::frames(4, TENTH));
    let r = b.run(&cfg, None, None, steps);
    let lost = r.events_of("source_lost");
    assert_eq!(lost.len(), 1, "{:?}", r.events);
    assert_eq!(lost[0]["reason"], "unplugged (ENODEV)", "{lost:?}");
    assert_eq!(r.events_of("source_back").len(), 1, "{:?}", r.events);
    let ends = r.events_of("alert_end");
    assert_eq!(ends[0]["reason"], "source_lost", "{ends:?}");
    assert_eq!(
        ends[0]["seq"], 3,
        "closed on the last frame before the loss"
    );
    assert_eq!(r.events_of("alert_start").len(), 2, "{:?}", r.events);
    assert_eq!(
        r.alerts,
        [
            "raise 1",
            "end 1 SourceLost seq 3",
            "raise 2",
            "end 2 Shutdown seq 7"
        ]
    );
}

#[test]
fn status_lines_come_every_status_secs_once_frames_flow() {
    let b = Bench::new();
    let cfg = b.config("f32", QUIET, "status_secs = 1.0");
    let steps = [Step::Stall(Duration::from_secs(3))]
        .into_iter()
        .chain(Bench::frames(16, Duration::from_millis(250)));
    let r = b.run(&cfg, None, None, steps);
    assert_eq!(r.summary.frames, 16);
    assert!(
        r.heard[0]
            .1
            .starts_with("ready model loaded, waiting for frames from fake")
    );
    assert_eq!(r.heard.last().unwrap().1, "stopping");
    assert!(r.heard("watchdog").is_empty(), "not watched");

    let status = r.heard("status ");
    // The first frame comes after 3.25 s; from then on, one line a second until 7 s.
    assert!((4..=6).contains(&status.len()), "{status:?}");
    assert!(
        status[0].0 >= 3.25,
        "no status before the first frame: {status:?}"
    );
    for w in status.windows(2) {
        assert!(w[1].0 - w[0].0 >= 1.0, "{status:?}");
    }
    for (_, line) in &status {
        assert!(
            line.contains(" fps, latency ") && line.contains("model 0.1.0, 0 alerts, 0 dropped"),
            "{line}"
        );
    }
}

#[test]
fn a_reload_swaps_model_and_config_between_frames_and_loses_none() {
    let b = Bench::new();
    let path = b.dir.path().join("polypwatch.toml");
    std::fs::write(&path, b.config("f32", LOUD, "")).unwrap();
    let (new_cfg, reload_path) = (b.config("int8", QUIET, ""), path.clone());
    let reload = b.control.reload.clone();
    let rewrite = Step::Do(Box::new(move || {
        std::fs::write(&reload_path, new_cfg).unwrap();
        reload.store(true, Ordering::Relaxed);
    }));
    let events = b.events_file();
    let reloaded = Step::Until(Box::new(move || {
        std::fs::read_to_string(&events).is_ok_and(|t| t.contains(r#""event":"reloaded""#))
    }));
    let steps = Bench::frames(6, TENTH)
        .chain([rewrite])
        .chain(Bench::frames(4, TENTH))
        .chain([reloaded])
        .chain(Bench::frames(10, TENTH));
    let cfg = std::fs::read_to_string(&path).unwrap();
    let r = b.run(&cfg, Some(&path), None, steps);

    let s = r.summary;
    assert_eq!((s.frames, s.dropped, s.bad_frames), (20, 0, 0), "{s:?}");
    let kinds: Vec<&str> = r
        .events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["ready", "alert_start", "reloaded", "alert_end", "stopped"],
        "{:?}",
        r.events
    );
    assert_eq!(r.events_of("reloaded")[0]["model"], "tiny 0.1.0 (int8)");
    // The new [detect] ends the alert by the hysteresis: three quiet frames after the swap,
    // which came between frames 6 and 10.
    let end = r.events_of("alert_end")[0];
    assert!(end.get("reason").is_none(), "{end}");
    let seq = end["seq"].as_u64().unwrap();
    assert!((8..=12).contains(&seq), "{end}");
    assert_eq!(r.events_of("stopped")[0]["frames"], 20);
}

#[test]
fn an_open_alert_is_closed_at_stop_with_its_reason() {
    let b = Bench::new();
    let cfg = b.config("f32", LOUD, "");
    let steps = Bench::frames(5, TENTH).chain([Bench::set(&b.control.stop)]);
    let r = b.run(&cfg, None, None, steps);
    assert_eq!(r.summary.frames, 5);
    assert_eq!(r.alerts, ["raise 1", "end 1 Shutdown seq 4"]);
    let kinds: Vec<&str> = r
        .events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["ready", "alert_start", "alert_end", "stopped"]);
    let end = r.events_of("alert_end")[0];
    assert_eq!(
        (&end["reason"], &end["seq"]),
        (&Value::from("shutdown"), &Value::from(4))
    );
    assert_eq!(r.heard.last().unwrap().1, "stopping");
}
