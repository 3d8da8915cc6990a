//! End-to-end tests of the daemon: the real binary as a child process, on replay clips, with
//! real signals.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Daemon {
    child: Child,
    events: Receiver<Value>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

fn config(dir: &Path, manifest: &Path, clip: &Path, fps: f64, looping: bool) -> PathBuf {
    let p = dir.join("polypwatch.toml");
    let text = format!(
        r#"
[model]
manifest = "{}"

[source]
kind = "replay"
path = "{}"
fps = {fps:.1}
loop = {looping}

[events]
journald = "off"
level = "info"
"#,
        manifest.display(),
        clip.display()
    );
    std::fs::write(&p, text).unwrap();
    p
}

fn start(config: &Path) -> Daemon {
    let mut child = Command::new(env!("CARGO_BIN_EXE_polypwatch"))
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, events) = channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                let _ = tx.send(v);
            }
        }
    });
    let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let err = child.stderr.take().unwrap();
    let sink = stderr.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let mut s = sink.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    Daemon {
        child,
        events,
        stderr,
    }
}

impl Daemon {
    /// Waits for the next event of `kind`, returning the events seen on the way.
    fn wait_for(&self, kind: &str, timeout: Duration) -> (Value, Vec<Value>) {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(v) if v["event"] == kind => return (v, seen),
                Ok(v) => seen.push(v),
                Err(_) => panic!(
                    "no {kind} event within {timeout:?}; saw {seen:?}; stderr:\n{}",
                    self.stderr.lock().unwrap()
                ),
            }
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} failed");
    }

    /// Waits for the process to exit, at most `timeout`.
    fn exit_within(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "still running after {timeout:?}; stderr:\n{}",
                    self.stderr.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process killed when the test ends, failed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Frame index from a clip file name (`frame_0042.jpg`).
fn frame_index(name: &str) -> usize {
    name.trim_start_matches("frame_")
        .trim_end_matches(".jpg")
        .parse()
        .unwrap()
}

/// First and last frames where the clip's labels say the polyp is in view.
fn in_view_run(clip: &Path) -> (usize, usize) {
    let labels = std::fs::read_to_string(clip.join("labels.csv")).unwrap();
    let in_view: Vec<usize> = labels
        .lines()
        .skip(1)
        .filter(|l| l.split(',').nth(1) == Some("1"))
        .map(|l| frame_index(l.split(',').next().unwrap()))
        .collect();
    (in_view[0], *in_view.last().unwrap())
}

#[test]
fn alerts_while_the_polyp_is_in_view_reloads_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let clip = root().join("demo/clip");
    let manifest = root().join("models/polypwatch-edge-int8.toml");
    // 10 fps: slow enough that no frame is dropped on a busy CI machine.
    let cfg = config(dir.path(), &manifest, &clip, 10.0, true);
    let mut d = start(&cfg);
    d.wait_for("ready", Duration::from_secs(30));

    let (first, last) = in_view_run(&clip);
    let (start, before) = d.wait_for("alert_start", Duration::from_secs(30));
    assert!(before.iter().all(|e| e["event"] != "alert_end"));
    let s = frame_index(start["frame"].as_str().unwrap());
    assert!(
        s >= first && s <= last,
        "alert raised at frame {s}, polyp in view {first}..={last}"
    );
    let (end, _) = d.wait_for("alert_end", Duration::from_secs(30));
    let e = frame_index(end["frame"].as_str().unwrap());
    assert!(
        e > last || e < first,
        "alert cleared at frame {e} while the polyp is in view ({first}..={last})"
    );
    assert!(end["peak_score"].as_f64().unwrap() >= start["score"].as_f64().unwrap());

    d.signal("-HUP");
    d.wait_for("reloaded", Duration::from_secs(10));
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "daemon exited on SIGHUP"
    );

    d.signal("-TERM");
    let status = d.exit_within(Duration::from_secs(2));
    assert!(status.success(), "{status:?}");
    d.wait_for("stopped", Duration::from_secs(1));
}

fn tiny() -> PathBuf {
    root().join("tests/fixtures/model/tiny-f32.toml")
}

#[test]
fn corrupt_frames_are_skipped_and_the_stream_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("clip");
    std::fs::create_dir(&clip).unwrap();
    let imgs = root().join("tests/fixtures/kvasir-mini/images");
    let mut names: Vec<_> = std::fs::read_dir(&imgs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    for (i, p) in names.iter().take(3).enumerate() {
        std::fs::copy(p, clip.join(format!("f{}.jpg", i * 2))).unwrap();
    }
    let good = std::fs::read(&names[0]).unwrap();
    // Cut inside the headers: no image data at all.
    std::fs::write(clip.join("f1.jpg"), &good[..200]).unwrap();
    std::fs::write(clip.join("f3.jpg"), b"not a jpeg at all").unwrap();
    let cfg = config(dir.path(), &tiny(), &clip, 0.0, false);
    let mut d = start(&cfg);
    let (stopped, _) = d.wait_for("stopped", Duration::from_secs(30));
    assert!(d.exit_within(Duration::from_secs(5)).success());
    assert_eq!(stopped["frames"], 3, "{stopped}");
    assert_eq!(stopped["bad_frames"], 2, "{stopped}");
    // The run's timing covers the three decoded frames, every stage measured.
    let timing = &stopped["timing"];
    assert_eq!(timing["frames"], 3, "{stopped}");
    for stage in ["decode", "preprocess", "inference", "postprocess"] {
        assert!(
            timing["mean"][stage].as_f64().unwrap() > 0.0,
            "{stage}: {stopped}"
        );
    }
    let (p50, max) = (
        timing["latency_p50_ms"].as_f64().unwrap(),
        timing["latency_max_ms"].as_f64().unwrap(),
    );
    assert!(p50 > 0.0 && p50 <= max, "{stopped}");
    let err = d.stderr.lock().unwrap().clone();
    assert!(
        err.contains("f3.jpg") && err.contains("skipping frame"),
        "{err}"
    );
}

#[test]
fn unknown_config_key_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &tiny(), &root().join("demo/clip"), 0.0, false);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[events]", "[events]\nvolume = 11");
    std::fs::write(&cfg, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_polypwatch"))
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("volume") && err.contains("line"), "{err}");
}

fn mkfifo(p: &Path) {
    let ok = Command::new("mkfifo").arg(p).status().unwrap().success();
    assert!(ok, "mkfifo {}", p.display());
}

/// Runs `polypwatch ARGS` to its end, killed (and failed) if it is still blocked after 20 s.
fn run_to_end(args: &[&std::ffi::OsStr]) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_polypwatch"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("polypwatch {args:?} blocked");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A temporary folder with an empty `clip/` in it, and a real frame to fill it with.
fn empty_clip() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("clip");
    std::fs::create_dir(&clip).unwrap();
    let mut frames: Vec<PathBuf> =
        std::fs::read_dir(root().join("tests/fixtures/kvasir-mini/images"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
    frames.sort();
    (dir, clip, frames.swap_remove(0))
}

/// FIFOs and devices where files belong: nothing blocks and nothing is read without bound.
#[test]
fn fifos_and_devices_in_place_of_files_are_refused_without_blocking() {
    let (dir, clip, first) = empty_clip();
    std::fs::copy(&first, clip.join("f0.jpg")).unwrap();
    mkfifo(&clip.join("f1.jpg"));
    std::fs::copy(&first, clip.join("f2.jpg")).unwrap();
    let cfg = config(dir.path(), &tiny(), &clip, 0.0, false);
    let mut d = start(&cfg);
    let (stopped, _) = d.wait_for("stopped", Duration::from_secs(30));
    assert!(d.exit_within(Duration::from_secs(5)).success());
    assert_eq!(stopped["frames"], 2, "{stopped}");
    assert_eq!(stopped["bad_frames"], 1, "{stopped}");
    let err = d.stderr.lock().unwrap().clone();
    assert!(err.contains("f1.jpg") && err.contains("FIFO"), "{err}");

    let fifo_cfg = dir.path().join("fifo.toml");
    mkfifo(&fifo_cfg);
    let (status, err) = run_to_end(&["check".as_ref(), "--config".as_ref(), fifo_cfg.as_ref()]);
    assert!(!status.success() && err.contains("FIFO"), "{err}");

    let zero = Path::new("/dev/zero");
    let (status, err) = run_to_end(&["check".as_ref(), "--config".as_ref(), zero.as_ref()]);
    assert!(!status.success() && err.contains("a device"), "{err}");
    let (status, err) = run_to_end(&[
        "infer".as_ref(),
        "--model".as_ref(),
        zero.as_ref(),
        "--out".as_ref(),
        dir.path().as_ref(),
        first.as_ref(),
    ]);
    assert!(!status.success() && err.contains("a device"), "{err}");
}

#[test]
fn bench_refuses_zero_threads() {
    let (status, err) = run_to_end(&[
        "bench".as_ref(),
        "--model".as_ref(),
        tiny().as_ref(),
        "--threads".as_ref(),
        "0".as_ref(),
    ]);
    assert!(!status.success() && err.contains("--threads"), "{err}");
}

/// A capture card's flat "no signal" screen between real frames: not scored, counted, and
/// said once when it starts.
#[test]
fn blank_frames_are_counted_as_no_polyp_and_said_once() {
    let (dir, clip, first) = empty_clip();
    std::fs::copy(&first, clip.join("f0.jpg")).unwrap();
    let blue = image::RgbImage::from_pixel(320, 240, image::Rgb([16, 32, 200]));
    for i in 1..=4 {
        blue.save(clip.join(format!("f{i}.jpg"))).unwrap();
    }
    std::fs::copy(&first, clip.join("f5.jpg")).unwrap();
    let cfg = config(dir.path(), &tiny(), &clip, 0.0, false);
    let mut d = start(&cfg);
    let (stopped, _) = d.wait_for("stopped", Duration::from_secs(30));
    assert!(d.exit_within(Duration::from_secs(5)).success());
    assert_eq!(stopped["frames"], 6, "{stopped}");
    assert_eq!(stopped["blank_frames"], 4, "{stopped}");
    let err = d.stderr.lock().unwrap().clone();
    assert_eq!(err.matches("is blank").count(), 1, "{err}");
    assert!(err.contains("f1.jpg"), "{err}");
}

fn tampered_copy(dir: &Path) -> PathBuf {
    for f in ["tiny-f32.onnx", "tiny-f32.toml"] {
        std::fs::copy(root().join("tests/fixtures/model").join(f), dir.join(f)).unwrap();
    }
    let onnx = dir.join("tiny-f32.onnx");
    let mut b = std::fs::read(&onnx).unwrap();
    b[64] ^= 0x55;
    std::fs::write(&onnx, b).unwrap();
    dir.join("tiny-f32.toml")
}

#[test]
fn model_with_a_wrong_sha256_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bad = tampered_copy(dir.path());
    let cfg = config(dir.path(), &bad, &root().join("demo/clip"), 0.0, false);
    let out = Command::new(env!("CARGO_BIN_EXE_polypwatch"))
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sha256") && err.contains("tiny-f32.onnx"),
        "{err}"
    );
}

#[test]
fn a_bad_reload_is_rejected_and_the_old_model_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &tiny(), &root().join("demo/clip"), 20.0, true);
    let mut d = start(&cfg);
    d.wait_for("ready", Duration::from_secs(30));
    let bad_dir = dir.path().join("bad");
    std::fs::create_dir(&bad_dir).unwrap();
    let bad = tampered_copy(&bad_dir);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&tiny().display().to_string(), &bad.display().to_string());
    std::fs::write(&cfg, text).unwrap();
    d.signal("-HUP");
    let (rejected, _) = d.wait_for("reload_rejected", Duration::from_secs(10));
    assert!(
        rejected["reason"].as_str().unwrap().contains("sha256"),
        "{rejected}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "daemon exited after a bad reload"
    );
    d.signal("-TERM");
    assert!(d.exit_within(Duration::from_secs(2)).success());
    let (stopped, _) = d.wait_for("stopped", Duration::from_secs(1));
    assert!(stopped["frames"].as_u64().unwrap() > 0);
}

/// With two inference threads the frame loop runs on tract's thread pool: frames flow, a
/// reload is taken, and SIGTERM still stops it cleanly.
#[test]
fn two_inference_threads_serve_reload_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &tiny(), &root().join("demo/clip"), 20.0, true);
    with_section(&cfg, "\n[runtime]\nthreads = 2\n");
    let mut d = start(&cfg);
    d.wait_for("ready", Duration::from_secs(30));
    d.signal("-HUP");
    d.wait_for("reloaded", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(300));
    d.signal("-TERM");
    assert!(d.exit_within(Duration::from_secs(2)).success());
    let (stopped, _) = d.wait_for("stopped", Duration::from_secs(1));
    assert!(stopped["frames"].as_u64().unwrap() > 0, "{stopped}");
}

mod common;

fn with_section(cfg: &Path, section: &str) {
    let mut text = std::fs::read_to_string(cfg).unwrap();
    text.push_str(section);
    std::fs::write(cfg, text).unwrap();
}

#[test]
fn field_updates_on_sighup_reject_bad_bundles_and_switch_to_good_ones() {
    use polypwatch::signing::SecretKey;
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate().unwrap();
    let state = dir.path().join("state");
    let cfg = config(dir.path(), &tiny(), &root().join("demo/clip"), 20.0, true);
    with_section(
        &cfg,
        &format!(
            "\n[update]\nstate_dir = \"{}\"\ntrusted_keys = [\"{}\"]\n",
            state.display(),
            key.public()
        ),
    );
    let mut d = start(&cfg);
    d.wait_for("ready", Duration::from_secs(30));

    // A tampered bundle: refused, moved aside, the factory model keeps serving.
    let incoming = state.join("incoming");
    common::bundle(&incoming, "7.0.0", Some(&key), |_, dir| {
        let p = dir.join("tiny-f32.onnx");
        let mut b = std::fs::read(&p).unwrap();
        b[100] ^= 0x01;
        std::fs::write(&p, b).unwrap();
    });
    d.signal("-HUP");
    let (rej, _) = d.wait_for("model_rejected", Duration::from_secs(20));
    assert!(rej["reason"].as_str().unwrap().contains("sha256"), "{rej}");
    let (reloaded, _) = d.wait_for("reloaded", Duration::from_secs(20));
    assert!(
        !reloaded["model"].as_str().unwrap().contains("7.0.0"),
        "{reloaded}"
    );
    assert_eq!(
        std::fs::read_dir(state.join("rejected")).unwrap().count(),
        1
    );

    // A good one: installed and serving after the same reload.
    common::bundle(&incoming, "8.0.0", Some(&key), |_, _| {});
    d.signal("-HUP");
    let (inst, _) = d.wait_for("model_installed", Duration::from_secs(20));
    assert!(inst["model"].as_str().unwrap().contains("8.0.0"), "{inst}");
    let (reloaded, _) = d.wait_for("reloaded", Duration::from_secs(20));
    assert!(
        reloaded["model"].as_str().unwrap().contains("8.0.0"),
        "{reloaded}"
    );
    assert!(d.child.try_wait().unwrap().is_none());
    d.signal("-TERM");
    assert!(d.exit_within(Duration::from_secs(3)).success());
    let (stopped, _) = d.wait_for("stopped", Duration::from_secs(1));
    assert!(stopped["frames"].as_u64().unwrap() > 0);
}

/// A config whose GPIO chip does not exist, replaying a three-frame clip: the test needs the
/// daemon to serve and stop, and the 175-frame demo clip took over 60 s on a loaded CI machine.
fn gpio_config(dir: &Path, required: bool) -> PathBuf {
    let clip = dir.join("short-clip");
    if !clip.exists() {
        std::fs::create_dir(&clip).unwrap();
        let (_keep, _, first) = empty_clip();
        for i in 0..3 {
            std::fs::copy(&first, clip.join(format!("f{i}.jpg"))).unwrap();
        }
    }
    let cfg = config(dir, &tiny(), &clip, 0.0, false);
    with_section(
        &cfg,
        &format!(
            "\n[gpio]\nchip = \"/dev/gpiochip-polypwatch-missing\"\nline = 5\nrequired = {required}\n"
        ),
    );
    cfg
}

#[test]
fn a_missing_gpio_chip_stops_the_daemon_only_when_required() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_polypwatch"))
        .args(["run", "--config"])
        .arg(gpio_config(dir.path(), true))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("gpiochip-polypwatch-missing") && err.contains("required = true"),
        "{err}"
    );

    let mut d = start(&gpio_config(dir.path(), false));
    let (stopped, _) = d.wait_for("stopped", Duration::from_secs(60));
    assert!(d.exit_within(Duration::from_secs(5)).success());
    assert_eq!(stopped["frames"].as_u64(), Some(3), "{stopped}");
    let err = d.stderr.lock().unwrap().clone();
    assert!(err.contains("journal alerts only"), "{err}");
}

/// Every cause of a fatal error is printed once, on one line: a cause sits either in its
/// error's message or in its `source()`, never both (before, `#[from]` plus `{0}` in the
/// message printed the GPIO cause twice, and a de-duplicating printer hid it).
#[test]
fn a_fatal_error_is_one_line_naming_each_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere.toml");
    let gpio = gpio_config(dir.path(), true);
    for (args, cause) in [
        (
            vec!["check".into(), "--config".into(), missing.into_os_string()],
            "os error 2",
        ),
        (
            vec!["run".into(), "--config".into(), gpio.into_os_string()],
            "required = true",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_polypwatch"))
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        // `run` logs its start first; the fatal error is the one line after.
        let fatal: Vec<&str> = err
            .lines()
            .filter(|l| l.starts_with("polypwatch: "))
            .collect();
        assert_eq!(fatal.len(), 1, "{err}");
        assert_eq!(fatal[0].matches(cause).count(), 1, "{err}");
        assert_eq!(fatal[0].matches("No such file").count(), 1, "{err}");
    }
}

/// The journal's `<3>` priority prefix only where stderr is the journal: a shell inherits
/// JOURNAL_STREAM from a desktop session or a service, and a pipe must get a plain line.
#[test]
fn an_inherited_journal_stream_on_a_pipe_gets_a_plain_fatal_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_polypwatch"))
        .args(["check", "--config"])
        .arg(dir.path().join("nowhere.toml"))
        .env("JOURNAL_STREAM", "8:12345")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("polypwatch: cannot read config"), "{err}");
}

#[test]
fn a_missing_camera_is_waited_for_and_sigterm_still_stops() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("cam.toml");
    std::fs::write(
        &p,
        format!(
            "[model]\nmanifest = \"{}\"\n[source]\nkind = \"v4l2\"\ndevice = \"/dev/v4l/by-id/polypwatch-test-missing\"\nformat = \"yuyv\"\nfps = 30\n[events]\njournald = \"off\"\n",
            tiny().display()
        ),
    )
    .unwrap();
    let mut d = start(&p);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "exited without a camera"
    );
    d.signal("-TERM");
    assert!(d.exit_within(Duration::from_secs(2)).success());
    let err = d.stderr.lock().unwrap().clone();
    // Several retries in 3 s, one log line.
    assert_eq!(err.matches("no such device").count(), 1, "{err}");
}

/// Shrinks a pipe to one page, so that a few lines fill it.
fn shrink_pipe(fd: &impl std::os::fd::AsRawFd) {
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    assert!(
        r >= 4096,
        "F_SETPIPE_SZ: {}",
        std::io::Error::last_os_error()
    );
}

/// stdout and stderr are pipes nobody reads (as `polypwatch run | sleep 1000`): once they are
/// full, frames keep flowing, alerts keep reaching the event file, and SIGTERM still stops the
/// daemon at once.
#[test]
fn outputs_nobody_reads_never_stop_the_frame_loop() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    // The demo clip's polyp sequence (frames 68-106) with 28 polyp-free frames on either side:
    // one alert a loop in half the clip's frames, so a loaded machine gets there too.
    let clip = dir.path().join("clip");
    std::fs::create_dir(&clip).unwrap();
    for i in 40..135 {
        let name = format!("frame_{i:05}.jpg");
        std::fs::copy(root().join("demo/clip").join(&name), clip.join(&name)).unwrap();
    }
    let cfg = dir.path().join("polypwatch.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[model]
manifest = "{}"

[source]
kind = "replay"
path = "{}"
fps = 0.0
loop = true

[events]
stdout = true
file = "{}"
journald = "off"
level = "debug"

[runtime]
status_secs = 0.1
"#,
            root().join("models/polypwatch-edge-int8.toml").display(),
            clip.display(),
            events.display()
        ),
    )
    .unwrap();
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_polypwatch"))
            .args(["run", "--config"])
            .arg(&cfg)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let child = &mut child.0;
    let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    shrink_pipe(&out);
    shrink_pipe(&err);
    let count = |kind: &str| {
        std::fs::read_to_string(&events)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&format!("\"event\":\"{kind}\"")))
            .count()
    };
    // Each loop of the clip is one alert (two events, over 400 bytes with the status and
    // debug lines): 12 alerts are far more than both 4 KiB pipes hold.
    let deadline = Instant::now() + Duration::from_secs(180);
    while count("alert_end") < 12 {
        assert!(
            Instant::now() < deadline,
            "only {} alerts in 180 s with stdout and stderr unread",
            count("alert_end")
        );
        assert!(child.try_wait().unwrap().is_none(), "daemon exited");
        std::thread::sleep(Duration::from_millis(100));
    }
    let t = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            assert!(s.success(), "{s:?}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "SIGTERM took over 2 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(count("stopped"), 1);
    drop((out, err));
}

/// The replay folder vanishes mid-alert (a source whose every frame fails): one `source_lost`
/// event, the alert closed with that reason, a bounded number of log lines instead of a spin,
/// and `source_back` when frames are readable again.
#[test]
fn a_dead_feed_closes_the_alert_and_backs_off() {
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("clip");
    std::fs::create_dir(&clip).unwrap();
    let demo = root().join("demo/clip");
    let copy_clip = || {
        for e in std::fs::read_dir(&demo).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, clip.join(p.file_name().unwrap())).unwrap();
        }
    };
    copy_clip();
    let manifest = root().join("models/polypwatch-edge-int8.toml");
    let cfg = config(dir.path(), &manifest, &clip, 10.0, true);
    let mut d = start(&cfg);
    d.wait_for("alert_start", Duration::from_secs(60));
    std::fs::remove_dir_all(&clip).unwrap();
    let (lost, _) = d.wait_for("source_lost", Duration::from_secs(20));
    assert!(lost["failed_frames"].as_u64().unwrap() >= 25, "{lost}");
    // The alert open when the feed died (no frame reaches the alert machine after it) is
    // closed, saying why: the feed lost, or no frame for stall_secs if that came first.
    let (end, _) = d.wait_for("alert_end", Duration::from_secs(10));
    assert!(
        end["reason"] == "source_lost" || end["reason"] == "no_frames",
        "{end}"
    );
    std::thread::sleep(Duration::from_secs(3));
    let lines = d.stderr.lock().unwrap().lines().count();
    assert!(lines < 200, "{lines} log lines: the dead feed spins");
    std::fs::create_dir(&clip).unwrap();
    copy_clip();
    d.wait_for("source_back", Duration::from_secs(20));
    d.signal("-TERM");
    assert!(d.exit_within(Duration::from_secs(2)).success());
}
