//! Frame- and alert-level evaluation through the real binary, on real frames: Kvasir-SEG polyp
//! images and polyp-free colonoscopy frames (tests/fixtures), and the model's operating point.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::root;
use polypwatch::clip;
use polypwatch::dataset::Dataset;
use polypwatch::frames::OperatingPoint;
use serde_json::Value;

fn fixture(p: &str) -> PathBuf {
    root().join("tests/fixtures").join(p)
}

fn polypwatch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_polypwatch"))
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn tiny() -> String {
    fixture("model/tiny-f32.toml").display().to_string()
}

#[test]
fn eval_on_polyp_free_frames_reports_specificity_only() {
    let dir = tempfile::tempdir().unwrap();
    let j = dir.path().join("free.json");
    let data = fixture("negatives-mini");
    let o = polypwatch(&[
        "eval",
        "--model",
        &tiny(),
        "--data",
        data.to_str().unwrap(),
        "--json",
        j.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("no polyp image"), "{}", text(&o));
    let v = json(&j);
    assert_eq!(v["polyp_images"], 0);
    assert_eq!(v["frames"]["free_frames"], 6);
    let spec = v["specificity"].as_f64().unwrap();
    let fp = v["frames"]["false_positives"].as_u64().unwrap();
    assert!((spec - (1.0 - fp as f64 / 6.0)).abs() < 1e-12, "{v}");
    assert!(v["sensitivity"].is_null() && v["auroc"].is_null());

    // Polyp frames: the mask table as before, and frame sensitivity.
    let o = polypwatch(&[
        "eval",
        "--model",
        &tiny(),
        "--data",
        fixture("kvasir-mini").to_str().unwrap(),
        "--split",
        fixture("kvasir-mini/splits/test.txt").to_str().unwrap(),
        "--json",
        j.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v = json(&j);
    assert_eq!(v["images"], 4);
    assert_eq!(v["frames"]["polyp_frames"], 4);
    assert!(v["specificity"].is_null());
    let hits = v["frames"]["hits"].as_u64().unwrap();
    assert!((v["sensitivity"].as_f64().unwrap() - hits as f64 / 4.0).abs() < 1e-12);
}

/// The tiny model's bundle with an operating point in its manifest.
fn with_point(dir: &Path) -> PathBuf {
    common::bundle(dir, "0.0.2", None, |m, _| {
        m.detect = Some(OperatingPoint {
            pixel_threshold: 0.6,
            alert_score: 0.65,
            min_area: 0.01,
            target_specificity: 0.99,
            val_sensitivity: 0.9,
            val_specificity: 0.995,
            val_polyp_frames: 10,
            val_free_frames: 200,
        })
    })
}

fn daemon_config(dir: &Path, manifest: &Path, detect: &str) -> PathBuf {
    let p = dir.join("polypwatch.toml");
    std::fs::write(
        &p,
        format!(
            "[model]\nmanifest = \"{}\"\n\n[source]\nkind = \"replay\"\npath = \"{}\"\n\n[detect]\n{detect}\n",
            manifest.display(),
            root().join("demo/clip").display()
        ),
    )
    .unwrap();
    p
}

#[test]
fn check_prints_effective_detect_settings_and_their_origins() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = with_point(&dir.path().join("model"));
    let cfg = daemon_config(dir.path(), &manifest, "alert_score = 0.8");
    let o = polypwatch(&["check", "--config", cfg.to_str().unwrap()]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    let line = |key: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(key))
            .unwrap_or_else(|| panic!("no {key} in {out}"))
            .to_string()
    };
    assert!(line("alert_score").contains("0.8") && line("alert_score").contains("config [detect]"));
    assert!(
        line("pixel_threshold").contains("0.6")
            && line("pixel_threshold").contains("model manifest")
    );
    assert!(line("min_area").contains("0.01") && line("min_area").contains("model manifest"));
    assert!(line("candidate_score").contains("built-in default"));

    // A candidate score above the model's alert score is refused, naming both origins.
    let cfg = daemon_config(dir.path(), &manifest, "candidate_score = 0.7");
    let o = polypwatch(&["check", "--config", cfg.to_str().unwrap()]);
    let out = text(&o);
    assert!(!o.status.success());
    assert!(
        out.contains("candidate_score") && out.contains("model manifest"),
        "{out}"
    );
    assert_eq!(
        out.trim()
            .lines()
            .filter(|l| l.starts_with("polypwatch:"))
            .count(),
        1,
        "{out}"
    );

    // A manifest without a point: the built-in defaults and its own threshold.
    let o = polypwatch(&["check", "--model", &tiny()]);
    let out = text(&o);
    assert!(out.contains("no operating point"), "{out}");
    assert!(
        out.contains("min_area") && out.contains("built-in default"),
        "{out}"
    );
}

/// A clip of real frames: polyp-free stretches around two polyp pans.
fn make_clip(dir: &Path) -> PathBuf {
    let out = dir.join("clip");
    std::fs::create_dir_all(&out).unwrap();
    let free = Dataset::open(&fixture("negatives-mini")).unwrap();
    let polyp = Dataset::open(&fixture("kvasir-mini")).unwrap();
    let mut labels = String::from(clip::LABELS_HEADER);
    let mut next = 0;
    let mut add = |frames: Vec<clip::ClipFrame>, labels: &mut String| {
        *labels += &clip::write_frames(&out, next, &frames).unwrap();
        next += frames.len();
    };
    for k in 0..3 {
        let (img, _) = free.samples[k].load().unwrap();
        add(clip::free_pan(&img, 8, 64, 64), &mut labels);
        if k < 2 {
            let (img, mask) = polyp.samples[k].load().unwrap();
            add(
                clip::polyp_pan(&img, &mask, 12, 64, None).unwrap(),
                &mut labels,
            );
        }
    }
    std::fs::write(out.join("labels.csv"), labels).unwrap();
    out
}

#[test]
fn eval_alerts_replays_labelled_clips_through_the_alert_machine() {
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(dir.path());
    let labels = std::fs::read_to_string(clip.join("labels.csv")).unwrap();
    // Polyp-free: labelled 0 with no polyp pixel (a 0 with pixels is a polyp's edge).
    let free = labels
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|c| c[1] == "0" && c[2].parse::<f64>().unwrap() == 0.0)
        .count();
    let manifest = with_point(&dir.path().join("model"));
    let run = |detect: &str| -> Value {
        let cfg = daemon_config(dir.path(), &manifest, detect);
        let j = dir.path().join("alerts.json");
        let o = polypwatch(&[
            "eval-alerts",
            "--model",
            manifest.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
            "--fps",
            "25",
            "--json",
            j.to_str().unwrap(),
            clip.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        json(&j)["summary"].clone()
    };
    // Every frame positive: every polyp sequence is alerted, and the first alert is raised on
    // the opening polyp-free stretch, a false alarm.
    let loud =
        run("pixel_threshold = 0.01\nmin_area = 0.0\nalert_score = 0.011\ncandidate_score = 0.01");
    assert_eq!(loud["sequences"], 2);
    assert_eq!(loud["alerted"], 2);
    assert!(loud["false_alarms"].as_u64().unwrap() >= 1, "{loud}");
    assert!((loud["free_minutes"].as_f64().unwrap() - free as f64 / 25.0 / 60.0).abs() < 1e-9);
    // No frame positive: every sequence missed, no false alarm.
    let quiet = run("pixel_threshold = 0.99\nalert_score = 0.99");
    assert_eq!(quiet["alerted"], 0);
    assert_eq!(quiet["false_alarms"], 0);
    assert!(quiet["median_time_to_alert_ms"].is_null());

    // A clip without labels is one clear line.
    let o = polypwatch(&[
        "eval-alerts",
        "--model",
        &tiny(),
        dir.path().to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("labels.csv"), "{}", text(&o));
}
