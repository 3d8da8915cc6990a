//! Where alerts go: the log (systemd journal with structured fields, or stderr), a JSON-lines
//! event stream, and overlay snapshots with a disk quota. A sink that fails is reported and
//! skipped; it never stops detection or the other sinks.

use std::io::Write;
use std::path::{Path, PathBuf};

use image::{GrayImage, Rgb, RgbImage};
use serde::Serialize;

use crate::config::{EventsSection, Journald};

/// The journal's socket; its presence means journald is there to log to.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Lines an output's queue holds before new ones are dropped (counted).
pub const QUEUE_LINES: usize = 4096;

enum Msg {
    Line(Vec<u8>),
    Flush(std::sync::mpsc::Sender<()>),
}

/// A writer on its own thread behind a bounded queue: the frame loop never waits on an
/// output (a stdout pipe nobody reads, a full stderr, a FIFO). When the queue is full, new
/// lines are dropped and counted; once the output takes lines again, one line says how many
/// were lost. Alert events are among what can be lost this way, on that output only: the GPIO
/// line, the journal and the other outputs have their own paths.
pub struct AsyncWriter {
    tx: std::sync::mpsc::SyncSender<Msg>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl AsyncWriter {
    /// Starts the thread writing to `out`; `what` names the output in messages, `on_error`
    /// hears each write error (the line is lost).
    pub fn spawn(
        what: String,
        mut out: Box<dyn Write + Send>,
        on_error: impl Fn(&str, &std::io::Error) + Send + 'static,
        on_drops: impl Fn(&str, u64) -> Option<Vec<u8>> + Send + 'static,
    ) -> Self {
        use std::sync::atomic::Ordering;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Msg>(QUEUE_LINES);
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let lost = dropped.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("out {what}"))
            .spawn(move || {
                for msg in rx {
                    match msg {
                        Msg::Line(bytes) => {
                            if let Err(e) = out.write_all(&bytes).and_then(|_| out.flush()) {
                                on_error(&what, &e);
                            }
                            let n = lost.swap(0, Ordering::Relaxed);
                            if n > 0
                                && let Some(line) = on_drops(&what, n)
                            {
                                let _ = out.write_all(&line).and_then(|_| out.flush());
                            }
                        }
                        Msg::Flush(ack) => {
                            let _ = out.flush();
                            let _ = ack.send(());
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            // Without a thread the queue fills and every line is counted as dropped.
            eprintln!("polypwatch: cannot start the output thread: {e}");
        }
        AsyncWriter { tx, dropped }
    }

    /// Queues a line; `false` (and counted) when the queue is full or the thread is gone.
    pub fn write(&self, bytes: Vec<u8>) -> bool {
        let ok = self.tx.try_send(Msg::Line(bytes)).is_ok();
        if !ok {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        ok
    }

    /// Lines dropped since the output last took one.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits at most `timeout` for the queued lines to be written; `false` if they were not.
    pub fn flush(&self, timeout: std::time::Duration) -> bool {
        let (ack, done) = std::sync::mpsc::channel();
        let deadline = std::time::Instant::now() + timeout;
        let mut msg = Msg::Flush(ack);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(std::sync::mpsc::TrySendError::Full(m)) => {
                    if std::time::Instant::now() >= deadline {
                        return false;
                    }
                    msg = m;
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(std::sync::mpsc::TrySendError::Disconnected(_)) => return false,
            }
        }
        done.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .is_ok()
    }
}

/// How long shutdown waits for each output to take its last lines.
pub const FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// Installs the global logger: journald (structured fields) or stderr.
pub fn init_logging(cfg: &EventsSection) -> &'static str {
    let level = match cfg.level.as_str() {
        "error" => log::LevelFilter::Error,
        "warn" => log::LevelFilter::Warn,
        "debug" => log::LevelFilter::Debug,
        "trace" => log::LevelFilter::Trace,
        _ => log::LevelFilter::Info,
    };
    log::set_max_level(level);
    let want_journal = match cfg.journald {
        Journald::On => true,
        Journald::Off => false,
        Journald::Auto => Path::new(JOURNAL_SOCKET).exists(),
    };
    if want_journal
        && let Ok(j) = systemd_journal_logger::JournalLog::new()
        && log::set_boxed_logger(Box::new(QueuedJournal::spawn(
            j.with_syslog_identifier("polypwatch".into()),
        )))
        .is_ok()
    {
        return "journald";
    }
    let _ = log::set_boxed_logger(Box::new(StderrLog(AsyncWriter::spawn(
        "stderr".into(),
        Box::new(std::io::stderr()),
        |_, _| {},
        |_, n| {
            Some(
                format!("polypwatch WARN  {n} log lines dropped: stderr was not read\n")
                    .into_bytes(),
            )
        },
    ))));
    "stderr"
}

/// Logs `LEVEL message KEY=value ...` lines to stderr when there is no journal, through an
/// [`AsyncWriter`], so a full stderr never stops the frame loop.
struct StderrLog(AsyncWriter);

struct KvLine<'a>(&'a mut String);

impl<'kvs> log::kv::VisitSource<'kvs> for KvLine<'_> {
    fn visit_pair(
        &mut self,
        key: log::kv::Key<'kvs>,
        value: log::kv::Value<'kvs>,
    ) -> Result<(), log::kv::Error> {
        self.0.push_str(&format!(" {key}={value}"));
        Ok(())
    }
}

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let mut line = format!("polypwatch {:<5} {}", r.level(), r.args());
        let _ = r.key_values().visit(&mut KvLine(&mut line));
        line.push('\n');
        self.0.write(line.into_bytes());
    }
    fn flush(&self) {
        self.0.flush(FLUSH_TIMEOUT);
    }
}

/// A log record with its fields owned, to cross to the journal thread.
struct OwnedRecord {
    level: log::Level,
    target: String,
    message: String,
    fields: Vec<(String, String)>,
}

struct KvOwned<'a>(&'a mut Vec<(String, String)>);

impl<'kvs> log::kv::VisitSource<'kvs> for KvOwned<'_> {
    fn visit_pair(
        &mut self,
        key: log::kv::Key<'kvs>,
        value: log::kv::Value<'kvs>,
    ) -> Result<(), log::kv::Error> {
        self.0.push((key.to_string(), value.to_string()));
        Ok(())
    }
}

/// The journal logger on its own thread behind a bounded queue: a slow journal socket never
/// stops the frame loop. A full queue drops records (counted, reported once it drains).
struct QueuedJournal {
    tx: std::sync::mpsc::SyncSender<Option<OwnedRecord>>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
    flushed: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl QueuedJournal {
    fn spawn(journal: systemd_journal_logger::JournalLog) -> Self {
        use log::Log;
        use std::sync::atomic::Ordering;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Option<OwnedRecord>>(QUEUE_LINES);
        let (ack, flushed) = std::sync::mpsc::channel();
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let lost = dropped.clone();
        let send = move |r: &OwnedRecord| {
            let fields: &[(String, String)] = &r.fields;
            journal.log(
                &log::Record::builder()
                    .level(r.level)
                    .target(&r.target)
                    .args(format_args!("{}", r.message))
                    .key_values(&fields)
                    .build(),
            );
        };
        let _ = std::thread::Builder::new()
            .name("out journal".into())
            .spawn(move || {
                for msg in rx {
                    match msg {
                        Some(r) => {
                            send(&r);
                            let n = lost.swap(0, Ordering::Relaxed);
                            if n > 0 {
                                send(&OwnedRecord {
                                    level: log::Level::Warn,
                                    target: "polypwatch".into(),
                                    message: format!(
                                        "{n} log records dropped: the journal was not taking them"
                                    ),
                                    fields: Vec::new(),
                                });
                            }
                        }
                        None => {
                            let _ = ack.send(());
                        }
                    }
                }
            });
        QueuedJournal {
            tx,
            dropped,
            flushed: std::sync::Mutex::new(flushed),
        }
    }
}

impl log::Log for QueuedJournal {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let mut fields = Vec::new();
        let _ = r.key_values().visit(&mut KvOwned(&mut fields));
        let owned = OwnedRecord {
            level: r.level(),
            target: r.target().to_string(),
            message: r.args().to_string(),
            fields,
        };
        if self.tx.try_send(Some(owned)).is_err() {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    fn flush(&self) {
        if self.tx.try_send(None).is_ok()
            && let Ok(rx) = self.flushed.lock()
        {
            let _ = rx.recv_timeout(FLUSH_TIMEOUT);
        }
    }
}

/// A JSON-lines event (one object per line, `event` names its kind).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The pipeline is running: model loaded and a first frame processed.
    Ready {
        /// Model name and version.
        model: String,
        /// Frame source.
        source: String,
    },
    /// An alert started.
    AlertStart {
        /// Alert number.
        alert_id: u64,
        /// Frame that raised it.
        seq: u64,
        /// Its origin (file name or device).
        frame: String,
        /// Stream time of the raise, ms.
        t_ms: u64,
        /// Frame score.
        score: f32,
        /// Best component's area (fraction of the frame).
        area: f32,
        /// Best component's box `[x, y, w, h]` (fractions).
        bbox: [f32; 4],
        /// Capture-to-decision latency, ms.
        latency_ms: f64,
        /// Model version.
        model_version: String,
    },
    /// An alert ended.
    AlertEnd {
        /// Alert number.
        alert_id: u64,
        /// Frame that cleared it.
        seq: u64,
        /// Its origin.
        frame: String,
        /// Stream time of the raise, ms.
        start_ms: u64,
        /// Stream time of the clear, ms.
        end_ms: u64,
        /// Highest frame score during the alert.
        peak_score: f32,
        /// Frames processed during the alert.
        frames: u64,
        /// Why it ended other than by the hysteresis (`source_lost`, `shutdown`).
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// The frame source stopped delivering readable frames (every attempt failing); an
    /// active alert was closed.
    SourceLost {
        /// The last failure.
        reason: String,
        /// Consecutive failed frames.
        failed_frames: u64,
    },
    /// Readable frames again after [`Event::SourceLost`].
    SourceBack {
        /// The frame source.
        source: String,
    },
    /// The configuration and model were reloaded (SIGHUP).
    Reloaded {
        /// The model now in use.
        model: String,
    },
    /// A model bundle from the incoming folder was verified and made current.
    ModelInstalled {
        /// Its manifest's name.
        file: String,
        /// `name version (precision)`.
        model: String,
        /// Fingerprint of the signing key.
        key: String,
    },
    /// A model bundle was refused and moved to the rejected folder.
    ModelRejected {
        /// Its manifest's name.
        file: String,
        /// Why.
        reason: String,
    },
    /// A reload was refused; the previous configuration and model keep serving.
    ReloadRejected {
        /// Why.
        reason: String,
    },
    /// The daemon stopped.
    Stopped {
        /// Frames processed.
        frames: u64,
        /// Frames dropped because inference was busy.
        dropped: u64,
        /// Frames that could not be read or decoded.
        bad_frames: u64,
        /// Frames with no detail, not scored (counted as no polyp).
        blank_frames: u64,
        /// Alerts raised.
        alerts: u64,
        /// Frame rate, capture-to-decision latency and stage times over the run.
        timing: crate::timing::TimingReport,
    },
}

/// JSON-lines writers (stdout and/or a file), each an [`AsyncWriter`]: emitting never waits
/// on a reader.
pub struct EventStream {
    outputs: Vec<AsyncWriter>,
}

fn event_drops(what: &str, n: u64) -> Option<Vec<u8>> {
    log::warn!(
        "{n} events dropped on {what}: it was not taking them (alerts went on through the other sinks)"
    );
    None
}

impl EventStream {
    /// Opens the configured event outputs; a file that cannot be opened is logged and skipped.
    /// The file is opened without blocking (a FIFO nobody reads does not hang the open).
    pub fn open(cfg: &EventsSection) -> Self {
        use std::os::unix::fs::OpenOptionsExt;
        let mut outputs = Vec::new();
        if cfg.stdout {
            outputs.push(AsyncWriter::spawn(
                "stdout".into(),
                Box::new(std::io::stdout()),
                |_, _| {},
                event_drops,
            ));
        }
        if let Some(p) = &cfg.file {
            match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(p)
            {
                Ok(f) => {
                    // Writes may block from here on, on the writer's own thread only.
                    let failed = std::sync::atomic::AtomicBool::new(false);
                    outputs.push(AsyncWriter::spawn(
                        format!("event file {}", p.display()),
                        Box::new(f),
                        move |what, e| {
                            if !failed.swap(true, std::sync::atomic::Ordering::Relaxed) {
                                log::error!(
                                    "cannot write {what}: {e}; still alerting through the other sinks"
                                );
                            }
                        },
                        event_drops,
                    ))
                }
                Err(e) => log::error!(
                    "cannot open event file {}: {e}; events go to the other sinks",
                    p.display()
                ),
            }
        }
        EventStream { outputs }
    }

    /// Queues one event on every output; never waits.
    pub fn emit(&mut self, ev: &Event) {
        let mut line = serde_json::to_string(ev).expect("events serialise");
        line.push('\n');
        for o in &self.outputs {
            o.write(line.clone().into_bytes());
        }
    }

    /// Waits a short while ([`FLUSH_TIMEOUT`]) for every output to take its queued events.
    pub fn flush(&mut self) {
        for o in &self.outputs {
            if !o.flush(FLUSH_TIMEOUT) {
                log::warn!("an event output did not take its last events before shutdown");
            }
        }
    }
}

/// Draws the mask over a frame: polyp pixels tinted green, the mask's outline in yellow and the
/// best component's box in red. `mask` is at the model's size; it is scaled to the frame.
pub fn overlay(frame: &RgbImage, mask: &GrayImage, bbox: Option<[f32; 4]>) -> RgbImage {
    let (w, h) = frame.dimensions();
    let big = image::imageops::resize(mask, w, h, image::imageops::FilterType::Nearest);
    let mut out = frame.clone();
    for (px, m) in out.pixels_mut().zip(big.pixels()) {
        if m.0[0] > 127 {
            px.0 = [px.0[0] / 2, (px.0[1] / 2).saturating_add(120), px.0[2] / 2];
        }
    }
    for c in imageproc::contours::find_contours::<i32>(&big) {
        for p in c.points {
            for (dx, dy) in [(0, 0), (1, 0), (0, 1)] {
                let (x, y) = ((p.x + dx) as u32, (p.y + dy) as u32);
                if x < w && y < h {
                    out.put_pixel(x, y, Rgb([255, 230, 0]));
                }
            }
        }
    }
    if let Some([bx, by, bw, bh]) = bbox {
        let r = imageproc::rect::Rect::at((bx * w as f32) as i32, (by * h as f32) as i32).of_size(
            ((bw * w as f32) as u32).max(1),
            ((bh * h as f32) as u32).max(1),
        );
        imageproc::drawing::draw_hollow_rect_mut(&mut out, r, Rgb([255, 0, 0]));
    }
    out
}

/// Saves overlay snapshots into a folder, deleting the oldest beyond a quota.
pub struct Snapshots {
    dir: PathBuf,
    quota: u64,
}

impl Snapshots {
    /// A snapshot folder with a quota in bytes (created on first save).
    pub fn new(dir: PathBuf, quota_bytes: u64) -> Self {
        Snapshots {
            dir,
            quota: quota_bytes,
        }
    }

    /// Writes `name` (JPEG) and enforces the quota; returns the path written.
    pub fn save(&self, name: &str, img: &RgbImage) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let written = img
            .save_with_format(&tmp, image::ImageFormat::Jpeg)
            .map_err(std::io::Error::other)
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            // A full disk must not also leak the partial file (the quota would not see it).
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        self.enforce_quota()?;
        Ok(path)
    }

    fn enforce_quota(&self) -> std::io::Result<()> {
        // Saves run one at a time, so a `.tmp` here is left from a crash: remove it.
        for e in std::fs::read_dir(&self.dir)?.filter_map(Result::ok) {
            if e.path().extension().is_some_and(|x| x == "tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let mut files: Vec<(std::time::SystemTime, String, u64, PathBuf)> =
            std::fs::read_dir(&self.dir)?
                .filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "jpg"))
                .filter_map(|e| {
                    let m = e.metadata().ok()?;
                    Some((
                        m.modified().ok()?,
                        e.file_name().to_string_lossy().into_owned(),
                        m.len(),
                        e.path(),
                    ))
                })
                .collect();
        // Oldest first; names carry a timestamp, which breaks ties of coarse mtimes.
        files.sort();
        let mut total: u64 = files.iter().map(|f| f.2).sum();
        for (_, _, len, path) in files {
            if total <= self.quota {
                break;
            }
            std::fs::remove_file(&path)?;
            total -= len;
        }
        Ok(())
    }
}

/// A snapshot waiting for the writer: the frame, its mask and the box to draw.
struct Shot {
    name: String,
    frame: RgbImage,
    mask: GrayImage,
    bbox: Option<[f32; 4]>,
}

/// Snapshots drawn and saved on their own thread. Drawing the overlay of a camera frame,
/// encoding it as JPEG and writing it takes tens of milliseconds on the board, seconds on a
/// stalled disk or under emulation (4.8 s in the system test's VM), and the frame loop must
/// not wait for it. One snapshot is written while one more waits; one asked for beyond that
/// is skipped with a line, and alerting goes on.
pub struct SnapshotQueue {
    tx: Option<std::sync::mpsc::SyncSender<Shot>>,
    done: std::sync::mpsc::Receiver<()>,
}

impl SnapshotQueue {
    /// Starts the writer thread for `snapshots`.
    pub fn spawn(snapshots: Snapshots) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Shot>(1);
        let (finished, done) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("snapshots".into())
            .spawn(move || {
                for shot in rx {
                    let img = overlay(&shot.frame, &shot.mask, shot.bbox);
                    match snapshots.save(&shot.name, &img) {
                        Ok(path) => log::info!("snapshot {}", path.display()),
                        Err(e) => {
                            log::error!("cannot save snapshot {}: {e}; alerting goes on", shot.name)
                        }
                    }
                }
                let _ = finished.send(());
            });
        if let Err(e) = spawned {
            log::error!("cannot start the snapshot thread: {e}; no snapshots will be saved");
        }
        SnapshotQueue { tx: Some(tx), done }
    }

    /// Queues a snapshot named `name` (a `.jpg` file name); never waits. `false` when the
    /// writer is still busy with the ones before (the caller says so).
    pub fn queue(
        &self,
        name: String,
        frame: &RgbImage,
        mask: &GrayImage,
        bbox: Option<[f32; 4]>,
    ) -> bool {
        let Some(tx) = &self.tx else { return false };
        let shot = Shot {
            name,
            frame: frame.clone(),
            mask: mask.clone(),
            bbox,
        };
        match tx.try_send(shot) {
            Ok(()) => true,
            Err(_) => false,
        }
    }
}

impl SnapshotQueue {
    /// Takes no more snapshots and waits at most `timeout` for the queued ones to be
    /// written; `false` if they were not (the thread goes on alone).
    pub fn finish(&mut self, timeout: std::time::Duration) -> bool {
        match self.tx.take() {
            Some(tx) => {
                drop(tx);
                self.done.recv_timeout(timeout).is_ok()
            }
            None => true,
        }
    }
}

impl Drop for SnapshotQueue {
    /// Lets the queued snapshots be written, waiting at most [`FLUSH_TIMEOUT`] (a stalled
    /// disk must not hold up a stop or a reload).
    fn drop(&mut self) {
        self.finish(FLUSH_TIMEOUT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stalled_snapshot_never_holds_the_caller() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("snaps");
        std::fs::create_dir_all(&dir).unwrap();
        // A FIFO where the first snapshot's temporary file goes: its open blocks the writer
        // until someone reads, as a hung disk would.
        let fifo = dir.join(".a.jpg.tmp");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let mut q = SnapshotQueue::spawn(Snapshots::new(dir.clone(), 1 << 20));
        let frame = RgbImage::from_pixel(16, 16, Rgb([200, 90, 80]));
        let mask = GrayImage::from_pixel(4, 4, image::Luma([255]));
        assert!(q.queue("a.jpg".into(), &frame, &mask, None));
        // The writer takes "a" and blocks; one more waits in the queue; then one is refused,
        // at once (a caller that waited would hang here).
        let mut accepted = Vec::new();
        let mut refused = false;
        for i in 0..50 {
            let name = format!("x{i}.jpg");
            if q.queue(name.clone(), &frame, &mask, None) {
                accepted.push(name);
            } else {
                refused = true;
                break;
            }
        }
        assert!(
            refused,
            "the queue never refused a snapshot while the writer was stalled"
        );
        assert!(accepted.len() <= 1, "{accepted:?}");
        // Unblock: read the FIFO to its end, then let the queue finish.
        let reader = std::thread::spawn(move || std::fs::read(&fifo).map(|b| b.len()));
        assert!(q.finish(std::time::Duration::from_secs(60)));
        assert!(
            reader.join().unwrap().unwrap() > 0,
            "the first snapshot was written"
        );
        for name in accepted {
            assert!(
                dir.join(&name).is_file(),
                "{name}, queued during the stall, was written"
            );
        }
    }

    #[test]
    fn queued_snapshots_are_written_with_the_overlay() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("snaps");
        let mut q = SnapshotQueue::spawn(Snapshots::new(dir.clone(), 1 << 20));
        let frame = RgbImage::from_pixel(16, 16, Rgb([0, 0, 0]));
        let mask = GrayImage::from_pixel(4, 4, image::Luma([255]));
        assert!(q.queue("s.jpg".into(), &frame, &mask, Some([0.0, 0.0, 0.5, 0.5])));
        assert!(q.finish(std::time::Duration::from_secs(60)));
        let img = image::open(dir.join("s.jpg")).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (16, 16));
        // The mask's green tint, not the black frame.
        assert!(
            img.get_pixel(12, 12).0[1] > 80,
            "{:?}",
            img.get_pixel(12, 12)
        );
    }

    #[test]
    fn failed_and_crashed_saves_leave_no_partial_files() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("snaps");
        let img = RgbImage::from_pixel(8, 8, Rgb([9, 9, 9]));
        let s = Snapshots::new(dir.clone(), 1 << 20);
        // A folder where the snapshot should go makes the final rename fail.
        std::fs::create_dir_all(dir.join("busy.jpg/x")).unwrap();
        assert!(s.save("busy.jpg", &img).is_err());
        assert!(!dir.join(".busy.jpg.tmp").exists());
        // A partial file from a crash goes at the next save.
        std::fs::write(dir.join(".old.jpg.tmp"), b"partial").unwrap();
        s.save("new.jpg", &img).unwrap();
        assert!(!dir.join(".old.jpg.tmp").exists());
        assert!(dir.join("new.jpg").is_file());
    }

    #[test]
    fn snapshots_rotate_oldest_first_under_the_quota() {
        let d = tempfile::tempdir().unwrap();
        let img = RgbImage::from_fn(64, 64, |x, y| Rgb([(x * 4) as u8, (y * 4) as u8, 7]));
        let one = {
            let s = Snapshots::new(d.path().join("probe"), u64::MAX);
            std::fs::metadata(s.save("p.jpg", &img).unwrap())
                .unwrap()
                .len()
        };
        let s = Snapshots::new(d.path().join("snaps"), one * 3 + one / 2);
        for i in 0..6 {
            s.save(&format!("{i:03}.jpg"), &img).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(15));
        }
        let mut left: Vec<String> = std::fs::read_dir(d.path().join("snaps"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["003.jpg", "004.jpg", "005.jpg"]);
    }

    #[test]
    fn unwritable_snapshot_folder_is_an_error_not_a_panic() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("file"), b"x").unwrap();
        let s = Snapshots::new(d.path().join("file").join("sub"), 1 << 20);
        assert!(s.save("a.jpg", &RgbImage::new(4, 4)).is_err());
    }

    #[test]
    fn overlay_marks_polyp_pixels() {
        let frame = RgbImage::from_pixel(8, 8, Rgb([100, 100, 100]));
        let mut mask = GrayImage::new(4, 4);
        mask.put_pixel(1, 1, image::Luma([255]));
        let o = overlay(&frame, &mask, None);
        assert_ne!(o.get_pixel(2, 2), &Rgb([100, 100, 100]));
        assert_eq!(o.get_pixel(7, 7), &Rgb([100, 100, 100]));
    }
}
