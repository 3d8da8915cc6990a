//! `polypwatch-train export`: ONNX + manifest, verified through tract before it is accepted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::prelude::*;
use polypwatch_model::dataset::Dataset;
use polypwatch_model::evaluate::{evaluate, score_sample};
use polypwatch_model::manifest::{
    FORMAT_VERSION, InputInfo, Manifest, ModelInfo, OutputInfo, Provenance, sha256_file,
};
use polypwatch_model::metrics::Confusion;
use polypwatch_model::model::{Segmenter, load_checked};
use polypwatch_model::preprocess::Recipe;
use tract_onnx::prelude::tvec;

use crate::data::{self, Set};
use crate::eval::{run_config, weights_path};
use crate::operating;
use crate::quant;
use crate::train::{self, RunDir, THRESHOLD};
use polypwatch_model::detect::DetectConfig;
use polypwatch_model::frames::{self, EvalReport, OperatingPoint};

/// Largest accepted |logit difference| between Burn and tract.
pub const MAX_LOGIT_DIFF: f32 = 1e-3;
/// Smallest accepted fraction of pixels whose thresholded masks agree.
pub const MIN_MASK_AGREEMENT: f64 = 0.999;

/// Options of `polypwatch-train export`.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// The run folder.
    pub run: PathBuf,
    /// `best`, `last` or a weights file.
    pub weights: String,
    /// Output folder for `.onnx` and manifest.
    pub out: PathBuf,
    /// Model name (file prefix).
    pub name: String,
    /// Model version.
    pub version: String,
    /// Overrides the dataset root.
    pub data: Option<PathBuf>,
    /// Validation images used to verify the export.
    pub verify_images: usize,
    /// Also write the int8 variant.
    pub int8: bool,
    /// Training images used to calibrate the int8 variant.
    pub calib_images: usize,
}

/// What an export wrote and measured.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// The f32 manifest.
    pub f32_manifest: PathBuf,
    /// The int8 manifest, if written.
    pub int8_manifest: Option<PathBuf>,
    /// Burn vs tract agreement of the f32 file.
    pub verification: Verification,
    /// Mean per-image IoU between the int8 and f32 masks on the validation set.
    pub int8_mask_iou_vs_f32: Option<f64>,
    /// Median tract latency (ms, one thread) of f32 and int8 on validation frames.
    pub latency_ms: (f64, Option<f64>),
    /// Operating point and frame-level figures per precision.
    pub frames: Vec<FrameFigures>,
}

/// One precision's operating point and its figures on every validation and test set.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FrameFigures {
    /// `f32` or `int8`.
    pub precision: String,
    /// The operating point written into the manifest (none without polyp-free frames).
    pub point: Option<OperatingPoint>,
    /// `(set, report)` for every source's validation and test frames.
    pub sets: Vec<(String, EvalReport)>,
    /// ROC curve and AUROC of the frame score over all test sets together.
    pub test_roc: (Vec<(f64, f64)>, Option<f64>),
}

/// What the verification measured.
#[derive(Debug, Clone, Copy)]
pub struct Verification {
    /// Images compared.
    pub images: usize,
    /// Largest |Burn logit - tract logit|.
    pub max_logit_diff: f32,
    /// Fraction of pixels whose thresholded masks agree.
    pub mask_agreement: f64,
}

fn git_commit() -> String {
    let out = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => "unknown".into(),
    }
}

/// Runs `onnx` through tract and compares it with Burn's logits on the same inputs.
pub fn verify(
    onnx: &Path,
    manifest: &Manifest,
    inputs: &[Vec<f32>],
    burn_logits: &[Vec<f32>],
) -> Result<Verification> {
    // The daemon's own path (tract's optimisation plus polypwatch's rewrites), so the check
    // covers what will run.
    let plan = polypwatch_model::model::optimize(load_checked(onnx, manifest)?)
        .map_err(|e| anyhow::anyhow!("tract cannot optimise {}: {e:#}", onnx.display()))?;
    let (h, w) = (
        manifest.preprocess.height as usize,
        manifest.preprocess.width as usize,
    );
    let logit_t = (THRESHOLD / (1.0 - THRESHOLD)).ln();
    let (mut max_diff, mut agree, mut total) = (0f32, 0usize, 0usize);
    for (x, ours) in inputs.iter().zip(burn_logits) {
        let t = tract_onnx::prelude::Tensor::from_shape(&[1, 3, h, w], x)?;
        let out = plan.run(tvec!(t.into()))?;
        let theirs = out[0].to_plain_array_view::<f32>()?;
        for (&a, &b) in ours.iter().zip(theirs.iter()) {
            max_diff = max_diff.max((a - b).abs());
            agree += usize::from((a >= logit_t) == (b >= logit_t));
            total += 1;
        }
    }
    Ok(Verification {
        images: inputs.len(),
        max_logit_diff: max_diff,
        mask_agreement: agree as f64 / total.max(1) as f64,
    })
}

/// Smallest self-test mask IoU a device accepts (tract's kernels differ slightly by CPU).
pub const SELFTEST_MIN_IOU: f64 = 0.98;

/// Exports the run's model to ONNX f32 with its manifest, verified through tract.
pub fn export(opts: &ExportOptions) -> Result<ExportReport> {
    let run = RunDir(opts.run.clone());
    let cfg = run_config(&run, opts.data.as_deref())?;
    let sources = cfg.data.sources();
    let device = Device::flex();
    let model = train::load_model(&cfg, &weights_path(&run, &opts.weights), &device)?.valid();
    let size = cfg.train.input_size as usize;
    let recipe = Recipe::square(cfg.train.input_size);

    std::fs::create_dir_all(&opts.out)?;
    let onnx_name = format!("{}-f32.onnx", opts.name);
    let onnx_path = opts.out.join(&onnx_name);
    let doc = format!(
        "{} {} ({})",
        opts.name,
        opts.version,
        cfg.model.architecture()
    );
    std::fs::write(&onnx_path, model.export_onnx(size, size, &doc))
        .with_context(|| format!("writing {}", onnx_path.display()))?;

    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        model: ModelInfo {
            name: opts.name.clone(),
            version: opts.version.clone(),
            architecture: cfg.model.architecture(),
            onnx: onnx_name,
            sha256: sha256_file(&onnx_path)?,
            precision: "f32".into(),
            bytes: Some(std::fs::metadata(&onnx_path)?.len()),
        },
        input: InputInfo {
            channel_order: "RGB".into(),
            layout: "NCHW".into(),
        },
        preprocess: recipe.clone(),
        output: OutputInfo {
            meaning: "logit".into(),
            threshold: THRESHOLD,
        },
        provenance: Provenance {
            training_data: sources
                .iter()
                .map(|s| format!("{} ({})", s.name, s.root.display()))
                .collect::<Vec<_>>()
                .join(", "),
            split: sources
                .iter()
                .map(|s| {
                    format!(
                        "{}: {} minus {:.0}% validation{} (seed {}){}",
                        s.name,
                        s.train_split
                            .as_ref()
                            .map_or("all images".into(), |p| p.display().to_string()),
                        s.val_fraction * 100.0,
                        if s.test_fraction > 0.0 {
                            format!(" and {:.0}% test", s.test_fraction * 100.0)
                        } else {
                            String::new()
                        },
                        cfg.data.seed,
                        s.test_split
                            .as_ref()
                            .map_or(String::new(), |p| format!("; test: {}", p.display()))
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
            trainer_commit: git_commit(),
            tract_version: polypwatch_model::TRACT_VERSION.into(),
            created: now_rfc3339(),
            command: std::fs::read_to_string(run.0.join("command.txt"))
                .unwrap_or_default()
                .lines()
                // argv[0] is wherever the binary was; the command is what matters.
                .map(|l| match l.split_once(' ') {
                    Some((_, args)) => format!("polypwatch-train {args}"),
                    None => l.to_string(),
                })
                .collect::<Vec<_>>()
                .join(" ; "),
        },
        selftest: None,
        detect: None,
        metrics: BTreeMap::new(),
    };

    // Verify on real validation images: Burn and tract must agree.
    // The first polyp source: its validation images verify the export, its test images
    // give the manifest's metrics, and its training images calibrate int8.
    let main = sources
        .iter()
        .find(|s| !s.polyp_free)
        .context("the run has no polyp source")?;
    let val = Dataset {
        root: main.root.clone(),
        samples: data::open_run_split(&run.0, &cfg, main, Set::Val)?,
    };
    let n = opts.verify_images.min(val.len()).max(1);
    let items = train::load_with_bar("verify", &val.samples[..n.min(val.len())], &recipe, true)?;
    let inputs: Vec<Vec<f32>> = items
        .iter()
        .map(|i| recipe.tensor_from_rgb(&i.image))
        .collect();
    let burn_logits = train::predict_logits(&model, &items, &recipe, &device);
    let v = verify(&onnx_path, &manifest, &inputs, &burn_logits)?;
    eprintln!(
        "verified {} on {} validation images: max |logit diff| {:.2e}, mask agreement {:.5}",
        onnx_path.display(),
        v.images,
        v.max_logit_diff,
        v.mask_agreement
    );
    if v.max_logit_diff > MAX_LOGIT_DIFF || v.mask_agreement < MIN_MASK_AGREEMENT {
        let rejected = onnx_path.with_extension("onnx.rejected");
        let _ = std::fs::rename(&onnx_path, &rejected);
        bail!(
            "export verification failed: max |logit diff| {:.2e} (limit {MAX_LOGIT_DIFF:.0e}), mask agreement {:.5} (limit {MIN_MASK_AGREEMENT}); file moved to {}",
            v.max_logit_diff,
            v.mask_agreement,
            rejected.display()
        );
    }
    let f32_manifest = opts.out.join(format!("{}-f32.toml", opts.name));
    manifest.save(&f32_manifest)?;
    // The daemon's own loader must accept it.
    let seg_f32 = Segmenter::load(&f32_manifest)?;

    // Metrics for the manifest, measured the way the daemon runs the model (tract).
    let test = Dataset {
        root: main.root.clone(),
        samples: data::open_run_split(&run.0, &cfg, main, Set::Test)?,
    };
    let mut manifest = manifest;
    let mut report = ExportReport {
        f32_manifest: f32_manifest.clone(),
        int8_manifest: None,
        verification: v,
        int8_mask_iou_vs_f32: None,
        latency_ms: (median_latency(&seg_f32, &inputs)?, None),
        frames: Vec::new(),
    };
    let mut int8 = None;
    if opts.int8 {
        let train_names = Dataset {
            root: main.root.clone(),
            samples: data::open_run_split(&run.0, &cfg, main, Set::Train)?,
        };
        let n = opts.calib_images.clamp(1, train_names.len());
        let calib = train::load_with_bar("calibrate", &train_names.samples[..n], &recipe, true)?;
        let calib: Vec<Vec<f32>> = calib
            .iter()
            .map(|i| recipe.tensor_from_rgb(&i.image))
            .collect();
        let ranges = quant::calibrate(
            &onnx_path,
            &quant::sites_of(&model, size, size),
            &calib,
            size,
            size,
        )?;
        let name = format!("{}-int8.onnx", opts.name);
        let path = opts.out.join(&name);
        std::fs::write(
            &path,
            quant::export_int8(&model, size, size, &ranges, &doc)?,
        )?;
        let mut m = manifest.clone();
        m.model.onnx = name;
        m.model.sha256 = sha256_file(&path)?;
        m.model.bytes = Some(std::fs::metadata(&path)?.len());
        m.model.precision = "int8".into();
        let mp = opts.out.join(format!("{}-int8.toml", opts.name));
        m.save(&mp)?;
        let seg = Segmenter::load(&mp).with_context(|| format!("int8 model {}", path.display()))?;
        report.latency_ms.1 = Some(median_latency(&seg, &inputs)?);
        int8 = Some((m, mp, seg));
    }
    for (set, samples) in [("validation", &val.samples), ("test", &test.samples)] {
        let mut agree = 0.0;
        let t = THRESHOLD;
        let f32_scores = evaluate(&seg_f32, samples, |_| {})?;
        manifest.metrics.insert(set.into(), f32_scores);
        if let Some((m, _, seg)) = &mut int8 {
            let mut acc = polypwatch_model::metrics::Accumulator::default();
            for s in samples.iter() {
                let a = score_sample(&seg_f32, s, t)?;
                let b = score_sample(seg, s, t)?;
                let ma: Vec<u8> = a.probs.iter().map(|&p| u8::from(p >= t)).collect();
                let mb: Vec<u8> = b.probs.iter().map(|&p| u8::from(p >= t)).collect();
                agree += Confusion::from_masks(&mb, &ma).iou();
                acc.push(&b.scores);
            }
            m.metrics.insert(set.into(), acc.finish());
            if set == "validation" {
                report.int8_mask_iou_vs_f32 = Some(agree / samples.len().max(1) as f64);
            }
        }
    }
    // The operating point of each precision, chosen on every source's validation frames, and
    // the frame-level figures of every set at it.
    let val_sets = operating::frame_sets(&run.0, &cfg, Set::Val, &recipe, true)?;
    let test_sets = operating::frame_sets(&run.0, &cfg, Set::Test, &recipe, true)?;
    let mut models: Vec<(&mut Manifest, &Segmenter)> = vec![(&mut manifest, &seg_f32)];
    if let Some((m, _, seg)) = &mut int8 {
        models.push((m, &*seg));
    }
    for (m, seg) in models {
        let val_probs = operating::probabilities(seg, &val_sets)?;
        let point = operating::choose(&val_sets, &val_probs, &recipe)?;
        let detect = match &point {
            Some(p) => p.detect_config(&DetectConfig::default()),
            None => {
                eprintln!(
                    "{}: no polyp-free validation frames, so no operating point: the manifest gets no [detect] and the daemon uses its defaults",
                    m.model.precision
                );
                m.detect_config()
            }
        };
        let test_probs = operating::probabilities(seg, &test_sets)?;
        let mut evals = operating::evaluate(&val_sets, &val_probs, &recipe, THRESHOLD, &detect);
        evals.extend(operating::evaluate(
            &test_sets,
            &test_probs,
            &recipe,
            THRESHOLD,
            &detect,
        ));
        for (name, ev) in &evals {
            let r = ev.finish();
            if r.masks.images > 0 && name != "data validation" && name != "data test" {
                m.metrics.insert(name.clone(), r.masks);
            }
        }
        m.detect = point;
        report.frames.push(FrameFigures {
            precision: m.model.precision.clone(),
            point: m.detect.clone(),
            sets: evals.iter().map(|(n, e)| (n.clone(), e.finish())).collect(),
            test_roc: {
                let test: Vec<_> = evals
                    .iter()
                    .filter(|(n, _)| n.ends_with(" test"))
                    .cloned()
                    .collect();
                let (p, f) = operating::pooled_scores(&test);
                (frames::roc_curve(&p, &f), frames::auroc(&p, &f))
            },
        });
    }
    manifest.save(&f32_manifest)?;
    // The self-test frame a device runs before it accepts this model as a field update.
    let frame = &items[0].image;
    polypwatch_model::selftest::attach_selftest(&f32_manifest, frame, SELFTEST_MIN_IOU)?;
    if let Some((m, mp, _)) = int8 {
        m.save(&mp)?;
        polypwatch_model::selftest::attach_selftest(&mp, frame, SELFTEST_MIN_IOU)?;
        report.int8_manifest = Some(mp);
    }
    Ok(report)
}

/// Median single-frame tract latency in milliseconds over the given inputs (after a warm-up).
fn median_latency(seg: &Segmenter, inputs: &[Vec<f32>]) -> Result<f64> {
    seg.run(&inputs[0])?;
    let mut ms = Vec::new();
    for _ in 0..3 {
        for x in inputs {
            let t = std::time::Instant::now();
            seg.run(x)?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms[ms.len() / 2])
}

fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86400;
    let (h, m, s) = (secs % 86400 / 3600, secs % 3600 / 60, secs % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}
