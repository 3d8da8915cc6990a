use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use polypwatch::alert::AlertConfig;
use polypwatch::config::Config;
use polypwatch::dataset::Dataset;
use polypwatch::detect::{DetectOverrides, Detector};
use polypwatch::frames::{self, EvalReport};
use polypwatch::metrics::SetScores;
use polypwatch::model::Segmenter;
use polypwatch::service::{self, Control};
use polypwatch::{alert_eval, bench, evaluate, sink};

/// polypwatch: real-time polyp detection on a colonoscopy video feed.
///
/// With no command, replays the bundled demo clip through the shipped model and prints alert
/// events as they happen, until stopped (Ctrl-C).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        /// Configuration file (see polypwatch.example.toml); default: the demo.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Segment images: writes a mask PNG and an overlay PNG per image, prints a JSON line each.
    Infer {
        /// The model's manifest.
        #[arg(long)]
        model: PathBuf,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Images.
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// Score a model on an image/mask folder (images/ and masks/).
    Eval {
        /// The model's manifest.
        #[arg(long)]
        model: PathBuf,
        /// Dataset folder.
        #[arg(long)]
        data: PathBuf,
        /// Split file naming the images to use (default: all).
        #[arg(long)]
        split: Option<PathBuf>,
        /// Also write the scores as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// No progress bar.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Replay labelled clips (frames + labels.csv) through the detector and the alert machine
    /// at a frame rate: time to alert and share under alert per polyp sequence, false alarms
    /// per minute and share under alert of the polyp-free frames.
    EvalAlerts {
        /// The model's manifest.
        #[arg(long)]
        model: PathBuf,
        /// Take [alert] and [detect] from this daemon config (default: the built-in alert
        /// settings and the model's operating point).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Replay frame rate.
        #[arg(long, default_value_t = 25.0)]
        fps: f64,
        /// Also write the figures as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Clip folders, each its own stream.
        #[arg(required = true)]
        clips: Vec<PathBuf>,
    },
    /// Per-stage latency (decode, preprocess, inference, post-process) and frames per second.
    Bench {
        /// The model's manifest.
        #[arg(long)]
        model: PathBuf,
        /// Frames to time.
        #[arg(long, default_value_t = 100)]
        frames: usize,
        /// Inference threads (1 to 64, as `[runtime] threads`).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        threads: u16,
        /// JPEG/PNG frames, or folders of them, to decode (cycled); default: the demo clip.
        #[arg(long)]
        images: Vec<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Field updates: install signed models, list them, roll back.
    Model {
        #[command(subcommand)]
        action: ModelCmd,
    },
    /// Check a configuration (and the model it names) without running.
    Check {
        /// Configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Or just a model manifest.
        #[arg(long)]
        model: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ModelCmd {
    /// Verify and install signed model bundles (manifest .toml, with its .sig, .onnx and
    /// self-test files beside it) and make the last one current. The running daemon switches
    /// on `systemctl reload polypwatch`.
    Install {
        /// Daemon configuration (its [update] section names the store and trusted keys).
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Manifests (or their .onnx files) to install.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Install even a version not newer than the current one (a deliberate downgrade);
        /// without it, and always on daemon reloads, such a bundle is refused.
        #[arg(long)]
        allow_downgrade: bool,
    },
    /// List installed models: current (*), previous (-, where `rollback` goes), and the
    /// factory model.
    List {
        /// Daemon configuration.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Make the previous model current again; repeated, walk back through the install
    /// history to the factory model.
    Rollback {
        /// Daemon configuration.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

const DEFAULT_CONFIG: &str = "/etc/polypwatch/polypwatch.toml";

fn open_store(config: &Path) -> Result<(Config, polypwatch::store::Store)> {
    let cfg = Config::load(config)?;
    let u = cfg.update.clone().with_context(|| {
        format!(
            "{} has no [update] section: add state_dir and trusted_keys to enable field updates",
            config.display()
        )
    })?;
    let store = polypwatch::store::Store::open(&u)?;
    Ok((cfg, store))
}

fn model_cmd(action: ModelCmd) -> Result<()> {
    const RELOAD: &str = "the running daemon switches on `systemctl reload polypwatch`";
    match action {
        ModelCmd::Install {
            config,
            files,
            allow_downgrade,
        } => {
            let (_, store) = open_store(&config)?;
            let opts = polypwatch::store::InstallOptions { allow_downgrade };
            let mut failed = 0;
            for f in files {
                let manifest = if f.extension().is_some_and(|e| e == "onnx") {
                    f.with_extension("toml")
                } else {
                    f.clone()
                };
                match store.install_with(&manifest, opts) {
                    Ok(i) => println!(
                        "installed {}: {} signed by {}, self-test IoU {:.4}; now current",
                        f.display(),
                        i.label,
                        i.key,
                        i.selftest_iou
                    ),
                    Err(e) => {
                        failed += 1;
                        eprintln!(
                            "polypwatch: {} refused: {e} (copy kept in {})",
                            f.display(),
                            store.rejected().display()
                        );
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} model(s) refused; the active model is unchanged by them");
            }
            println!("{RELOAD}");
        }
        ModelCmd::List { config } => {
            let (cfg, store) = open_store(&config)?;
            let entries = store.list();
            let any_current = entries.iter().any(|e| e.current);
            for e in &entries {
                let mark = if e.current {
                    '*'
                } else if e.previous {
                    '-'
                } else {
                    ' '
                };
                let back = match e.rollback_steps {
                    Some(n) if n > 1 => format!("  ({n} rollbacks back)"),
                    _ => String::new(),
                };
                println!("{mark} {}  {}{back}", e.label, e.dir.display());
            }
            println!(
                "{} factory  {}",
                if any_current { ' ' } else { '*' },
                cfg.model.manifest.display()
            );
        }
        ModelCmd::Rollback { config } => {
            let (cfg, store) = open_store(&config)?;
            match store.rollback()? {
                Some(m) => println!("current model is now {}", m.display()),
                None => println!(
                    "no previous model: the factory model {} is current",
                    cfg.model.manifest.display()
                ),
            }
            println!("{RELOAD}");
        }
    }
    Ok(())
}

fn load_model(path: &Path) -> Result<Segmenter> {
    Segmenter::load(path).with_context(|| format!("model {} refused", path.display()))
}

fn run(config: Option<PathBuf>) -> Result<()> {
    let cfg = match &config {
        Some(p) => Config::load(p)?,
        None => service::demo_config().context("the bundled demo configuration")?,
    };
    let sink = sink::init_logging(&cfg.events);
    log::info!(
        "polypwatch {} starting, logging to {sink}",
        env!("CARGO_PKG_VERSION")
    );
    let control = Control::default();
    control
        .install_signal_handlers()
        .context("installing signal handlers")?;
    let summary = service::run(config.as_deref(), cfg, &control)?;
    log::info!(
        "stopped: {} frames, {} dropped, {} unreadable, {} alerts; {}",
        summary.frames,
        summary.dropped,
        summary.bad_frames,
        summary.alerts,
        summary.timing
    );
    // The logger writes on its own thread: give it the last lines.
    log::logger().flush();
    Ok(())
}

fn infer(model: &Path, out: &Path, images: &[PathBuf]) -> Result<()> {
    let seg = load_model(model)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let r = &seg.manifest().preprocess;
    let det = Detector::new(
        seg.manifest().detect_config(),
        seg.manifest().output.threshold,
    );
    let mut failed = 0;
    for path in images {
        let t = std::time::Instant::now();
        let img = match polypwatch::preprocess::load_rgb(path) {
            Ok(i) => i,
            Err(e) => {
                eprintln!("{e}");
                failed += 1;
                continue;
            }
        };
        let mut logits = seg.logits_for(&img)?;
        let mask = det.mask(&mut logits, r.width, r.height);
        let d = det.detect(&logits, &mask);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let stem = path.file_stem().unwrap_or_default().to_string_lossy();
        let (mw, mh) = img.dimensions();
        let full = image::imageops::resize(&mask, mw, mh, image::imageops::FilterType::Triangle);
        let full = image::GrayImage::from_fn(mw, mh, |x, y| {
            image::Luma([if full.get_pixel(x, y).0[0] > 127 {
                255
            } else {
                0
            }])
        });
        full.save(out.join(format!("{stem}_mask.png")))?;
        sink::overlay(&img, &mask, d.best.map(|c| c.bbox))
            .save(out.join(format!("{stem}_overlay.png")))?;
        println!(
            "{}",
            serde_json::json!({
                "image": path.display().to_string(),
                "score": d.score,
                "polyp": d.positive,
                "area": d.best.map_or(0.0, |c| c.area),
                "bbox": d.best.map(|c| c.bbox),
                "components": d.components,
                "latency_ms": ms,
            })
        );
    }
    if failed > 0 {
        bail!("{failed} of {} images could not be read", images.len());
    }
    Ok(())
}

fn eval(
    model: &Path,
    data: &Path,
    split: Option<&Path>,
    json: Option<&Path>,
    quiet: bool,
) -> Result<()> {
    let seg = load_model(model)?;
    let ds = Dataset::open_maybe_split(data, split)?;
    let pb = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(ds.len() as u64)
    };
    pb.set_style(ProgressStyle::with_template(
        "eval [{bar:30}] {pos}/{len} {msg} eta {eta}",
    )?);
    let detect = seg.manifest().detect_config();
    let ev = evaluate::evaluate_frames(&seg, &ds.samples, &detect, |s, _| {
        pb.set_message(s.name.clone());
        pb.inc(1);
    })?;
    pb.finish_and_clear();
    let report = ev.finish();
    let set = split
        .and_then(|s| s.file_stem())
        .map_or("all".into(), |s| s.to_string_lossy().into_owned());
    if report.masks.images > 0 {
        println!("{}", SetScores::TABLE_HEADER);
        println!("{}", report.masks.table_row(&set));
    } else {
        println!("{set}: no polyp image (all masks empty): mask metrics do not apply");
    }
    println!(
        "frames at pixel_threshold {} min_area {} alert_score {}:",
        detect
            .pixel_threshold
            .unwrap_or(seg.manifest().output.threshold),
        detect.min_area,
        detect.alert_score
    );
    println!("{}", EvalReport::FRAME_HEADER);
    println!("{}", report.frame_row(&set));
    if let Some(j) = json {
        let (polyp, free) = ev.scores();
        let mut v = serde_json::to_value(report.masks)?;
        v["polyp_images"] = report.masks.images.into();
        v["frames"] = serde_json::to_value(report.frames)?;
        v["sensitivity"] = serde_json::to_value(report.sensitivity)?;
        v["specificity"] = serde_json::to_value(report.specificity)?;
        v["false_positives_per_1000"] = serde_json::to_value(report.false_positives_per_1000)?;
        v["auroc"] = serde_json::to_value(report.auroc)?;
        v["detect"] = serde_json::to_value(&detect)?;
        v["roc"] = serde_json::to_value(frames::roc_curve(polyp, free))?;
        std::fs::write(j, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", j.display()))?;
    }
    Ok(())
}

fn eval_alerts(
    model: &Path,
    config: Option<&Path>,
    fps: f64,
    json: Option<&Path>,
    clips: &[PathBuf],
) -> Result<()> {
    if !(1.0..=1000.0).contains(&fps) {
        bail!("--fps {fps} must be in [1, 1000]");
    }
    let seg = load_model(model)?;
    let m = seg.manifest();
    let (alert, overrides) = match config {
        Some(c) => {
            let cfg = Config::load(c)?;
            (cfg.alert, cfg.detect)
        }
        None => (AlertConfig::default(), DetectOverrides::default()),
    };
    let detect = overrides
        .resolve(m.detect.as_ref(), m.output.threshold)
        .map_err(|e| anyhow::anyhow!("{e}; change [detect] in the config"))?
        .cfg;
    let det = Detector::new(detect.clone(), m.output.threshold);
    let r = &m.preprocess;
    println!(
        "model {} {} ({}), pixel_threshold {} min_area {} alert_score {}; raise {} of {}, clear after {} (min {} ms); {fps} fps",
        m.model.name,
        m.model.version,
        m.model.precision,
        detect.pixel_threshold.unwrap_or(m.output.threshold),
        detect.min_area,
        detect.alert_score,
        alert.raise_n,
        alert.window_m,
        alert.clear_k,
        alert.min_hold_ms
    );
    let mut reports = Vec::new();
    for clip in clips {
        let frames = alert_eval::read_clip(clip)?;
        let mut decisions = Vec::with_capacity(frames.len());
        for f in &frames {
            let img = polypwatch::preprocess::load_rgb(&f.path)?;
            let mut logits = seg.logits_for(&img)?;
            let mask = det.mask(&mut logits, r.width, r.height);
            let d = det.detect(&logits, &mask);
            decisions.push((f.seen, d.positive, d.score));
        }
        let rep = alert_eval::replay(&decisions, fps, &alert);
        println!("{}: {} frames", clip.display(), frames.len());
        for (i, s) in rep.sequences.iter().enumerate() {
            println!(
                "  polyp sequence {:>3} (frames {}-{}): {}, {:.0} % of its frames under an alert",
                i + 1,
                s.first_frame,
                s.first_frame + s.frames - 1,
                s.time_to_alert_ms
                    .map_or("MISSED".into(), |t| format!("alert after {t:.0} ms")),
                s.under_alert * 100.0
            );
        }
        println!(
            "  polyp-free: {} frames ({:.1} min), {} false alarms ({:.2} per minute), {:.1} % under an alert",
            rep.free_frames,
            rep.free_frames as f64 / fps / 60.0,
            rep.false_alarms,
            rep.false_alarms_per_minute,
            rep.free_under_alert * 100.0
        );
        reports.push((clip.display().to_string(), rep));
    }
    let all: Vec<_> = reports.iter().map(|(_, r)| r.clone()).collect();
    let sum = alert_eval::Summary::of(&all);
    println!(
        "all clips: {} of {} polyp sequences alerted, median time to alert {}, {:.1} % of polyp frames under an alert; {} false alarms in {:.1} polyp-free minutes ({:.2} per minute), {:.1} % of polyp-free frames under an alert",
        sum.alerted,
        sum.sequences,
        sum.median_time_to_alert_ms
            .map_or("-".into(), |t| format!("{t:.0} ms")),
        sum.polyp_frames_under_alert * 100.0,
        sum.false_alarms,
        sum.free_minutes,
        sum.false_alarms_per_minute,
        sum.free_frames_under_alert * 100.0
    );
    if let Some(j) = json {
        let v = serde_json::json!({
            "model": format!("{} {} ({})", m.model.name, m.model.version, m.model.precision),
            "fps": fps,
            "detect": detect,
            "alert": alert,
            "summary": sum,
            "clips": reports.iter().map(|(c, r)| serde_json::json!({"clip": c, "report": r})).collect::<Vec<_>>(),
        });
        std::fs::write(j, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", j.display()))?;
    }
    Ok(())
}

fn bench_cmd(
    model: &Path,
    frames: usize,
    threads: u16,
    images: Vec<PathBuf>,
    json: bool,
) -> Result<()> {
    let threads = usize::from(threads);
    bench::set_threads(threads);
    let seg = load_model(model)?;
    let images = if images.is_empty() {
        let demo = service::demo_config()?;
        vec![demo.source.path.context("the demo config has no clip")?]
    } else {
        images
    };
    // A folder stands for its frames, by the replay source's rule.
    let mut files = Vec::new();
    for path in images {
        if path.is_dir() {
            let v = polypwatch::capture::list_frames(&path)
                .with_context(|| format!("cannot list {}", path.display()))?;
            if v.is_empty() {
                bail!(
                    "{} holds no frames ({})",
                    path.display(),
                    polypwatch::dataset::EXTENSIONS.join(", ")
                );
            }
            files.extend(v);
        } else {
            files.push(path);
        }
    }
    let images = files;
    let refs: Vec<&Path> = images.iter().map(|p| p.as_path()).collect();
    let r = bench::bench(&seg, &refs, frames.max(1), threads)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let m = seg.manifest();
    println!(
        "{} {} ({}, {}x{}), {} frames, {} thread(s)",
        m.model.name,
        m.model.version,
        m.model.precision,
        m.preprocess.width,
        m.preprocess.height,
        r.frames,
        r.threads
    );
    println!(
        "{:<12} {:>8} {:>8} {:>8}",
        "stage (ms)", "p50", "p95", "p99"
    );
    for (name, q) in [
        ("decode", r.decode),
        ("preprocess", r.preprocess),
        ("inference", r.inference),
        ("postprocess", r.postprocess),
        ("total", r.total),
    ] {
        println!("{name:<12} {:>8.2} {:>8.2} {:>8.2}", q.p50, q.p95, q.p99);
    }
    let q = r.inference_back_to_back;
    println!(
        "inference, runs back to back (as bench/compare.sh times ONNX Runtime): p50 {:.2}, p95 \
         {:.2}, p99 {:.2}",
        q.p50, q.p95, q.p99
    );
    println!(
        "{:.1} frames/s (stages back to back), peak RSS {:.0} MiB",
        r.fps, r.peak_rss_mib
    );
    Ok(())
}

fn check(config: Option<PathBuf>, model: Option<PathBuf>) -> Result<()> {
    let (manifest, overrides, installed) = match (&config, model) {
        (Some(c), None) => {
            let cfg = Config::load(c)?;
            println!("config {}: ok", c.display());
            // Check the model that would serve: the store's current one when it verifies,
            // as the daemon decides at start.
            let mut installed = None;
            if let Some(u) = &cfg.update {
                let store = polypwatch::store::Store::open(u)?;
                if let Some(cur) = store.current() {
                    match polypwatch::store::verify(&cur, store.keys()) {
                        Ok(v) => {
                            println!(
                                "installed model {}: signed by {}, self-test IoU {:.4}: serves instead of the factory model",
                                cur.display(),
                                v.key.id(),
                                v.selftest_iou
                            );
                            installed = Some((cur, v.segmenter));
                        }
                        Err(e) => println!(
                            "installed model {} fails verification ({e}): the daemon would serve the factory model",
                            cur.display()
                        ),
                    }
                }
            }
            (cfg.model.manifest, cfg.detect, installed)
        }
        (None, Some(m)) => (m, DetectOverrides::default(), None),
        _ => bail!("give exactly one of --config FILE or --model MANIFEST"),
    };
    let (manifest, seg) = match installed {
        Some(i) => i,
        None => {
            let seg = load_model(&manifest)?;
            (manifest, seg)
        }
    };
    let m = seg.manifest();
    println!(
        "model {}: {} {} ({}), {} input {}x{}, threshold {}: ok",
        manifest.display(),
        m.model.name,
        m.model.version,
        m.model.architecture,
        m.model.precision,
        m.preprocess.width,
        m.preprocess.height,
        m.output.threshold
    );
    let resolved = overrides
        .resolve(m.detect.as_ref(), m.output.threshold)
        .map_err(|e| anyhow::anyhow!("{e}; change [detect] in the config"))?;
    match &m.detect {
        Some(p) => println!(
            "operating point of the model: validation frame sensitivity {:.4}, specificity {:.4} ({} polyp, {} polyp-free frames)",
            p.val_sensitivity, p.val_specificity, p.val_polyp_frames, p.val_free_frames
        ),
        None => println!("the model has no operating point ([detect] in its manifest)"),
    }
    println!("effective [detect]:");
    for (key, value, origin) in resolved.origins {
        println!("  {key:<16} = {value:<8} ({origin})");
    }
    Ok(())
}

/// One line for an error chain: each cause is added unless the message above already says it
/// (our errors include their source in their own message).
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !out.contains(&s) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&s);
        }
    }
    out
}

fn main() -> std::process::ExitCode {
    polypwatch::model::keep_frame_buffers();
    match dispatch() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let journal = std::env::var_os("JOURNAL_STREAM").is_some();
            eprintln!("{}", fatal_line(&one_line(&e), journal));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The line a fatal error ends the process with. Under systemd stderr goes to the journal as
/// info unless the line starts with a syslog level prefix: the one line saying why the
/// service cannot start (a missing required GPIO line, an unreadable config) was filed as
/// info, invisible to `journalctl -p err`. `<3>` (err) is read and stripped by journald.
fn fatal_line(msg: &str, journal: bool) -> String {
    if journal {
        format!("<3>polypwatch: {msg}")
    } else {
        format!("polypwatch: {msg}")
    }
}

fn dispatch() -> Result<()> {
    match Cli::parse().command {
        None => run(None),
        Some(Command::Run { config }) => run(config),
        Some(Command::Infer { model, out, images }) => infer(&model, &out, &images),
        Some(Command::Eval {
            model,
            data,
            split,
            json,
            quiet,
        }) => eval(&model, &data, split.as_deref(), json.as_deref(), quiet),
        Some(Command::Bench {
            model,
            frames,
            threads,
            images,
            json,
        }) => bench_cmd(&model, frames, threads, images, json),
        Some(Command::Check { config, model }) => check(config, model),
        Some(Command::EvalAlerts {
            model,
            config,
            fps,
            json,
            clips,
        }) => eval_alerts(&model, config.as_deref(), fps, json.as_deref(), &clips),
        Some(Command::Model { action }) => model_cmd(action),
    }
}

#[cfg(test)]
mod fatal_tests {
    use super::fatal_line;

    #[test]
    fn a_fatal_error_is_an_err_line_in_the_journal_and_plain_on_a_terminal() {
        assert_eq!(fatal_line("no line", true), "<3>polypwatch: no line");
        assert_eq!(fatal_line("no line", false), "polypwatch: no line");
    }
}
