//! `polypwatch eval-alerts`: replay labelled clips through the detector and the alert machine.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use polypwatch::alert::AlertConfig;
use polypwatch::alert_eval;
use polypwatch::config::Config;
use polypwatch::detect::{DetectOverrides, Detector};

use super::load_model;

/// Arguments of `eval-alerts`.
#[derive(clap::Args)]
pub struct Args {
    /// The model's manifest.
    #[arg(long)]
    pub model: PathBuf,
    /// Take [alert] and [detect] from this daemon config (default: the built-in alert
    /// settings and the model's operating point).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Replay frame rate.
    #[arg(long, default_value_t = 25.0)]
    pub fps: f64,
    /// Also write the figures as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Clip folders, each its own stream.
    #[arg(required = true)]
    pub clips: Vec<PathBuf>,
}

/// Runs the subcommand.
pub fn run(args: Args) -> Result<()> {
    let (model, fps, clips) = (&args.model, args.fps, &args.clips);
    let (config, json) = (args.config.as_deref(), args.json.as_deref());
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
