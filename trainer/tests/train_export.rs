//! End-to-end trainer tests on real (downscaled) Kvasir-SEG images from tests/fixtures.

use std::path::{Path, PathBuf};

use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use polypwatch_model::dataset::Dataset;
use polypwatch_model::model::Segmenter;
use polypwatch_model::preprocess::Recipe;
use polypwatch_train::config::TrainConfig;
use polypwatch_train::data;
use polypwatch_train::export::{ExportOptions, export};
use polypwatch_train::model::DeepLab;
use polypwatch_train::train::{Backend, TrainOptions, loss, train};

/// Burn's random generator is process-wide: tests that seed it must not interleave.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/kvasir-mini")
}

/// A tiny network on 64x64 inputs: seconds per epoch on two cores.
fn tiny_config(dir: &Path) -> PathBuf {
    let text = format!(
        r#"
[data]
root = "{}"
train_split = "splits/train.txt"
test_split = "splits/test.txt"
val_fraction = 0.2
seed = 7

[model]
encoder = "resnet18"
width = 0.25
aspp_rates = [1, 2]
aspp_filters = 16
low_level_filters = 8
decoder_filters = 16

[train]
input_size = 64
epochs = 2
batch_size = 4
lr = 5e-3
poly_power = 0.9
bce_weight = 1.0
dice_weight = 1.0

[augment]
scale = [0.8, 1.2]
rotate_degrees = 15.0
hflip = true
vflip = true
shift = 0.05
brightness = 0.1
contrast = 0.1
saturation = 0.1
"#,
        fixtures().display()
    );
    let p = dir.join("tiny.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn opts(config: &Path, out: &Path, stop_after: Option<usize>, resume: bool) -> TrainOptions {
    TrainOptions {
        config: config.to_path_buf(),
        out: out.to_path_buf(),
        resume,
        backend: Backend::Flex,
        data: None,
        epochs: None,
        init: None,
        max_images: None,
        stop_after,
        quiet: true,
    }
}

#[test]
fn loss_goes_down_on_real_images() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig::load(&tiny_config(dir.path())).unwrap();
    let recipe = Recipe::square(64);
    let ds = Dataset::open_split(&fixtures(), &fixtures().join("splits/train.txt")).unwrap();
    let items = data::load_items(&ds.samples[..4], &recipe, || {}).unwrap();
    let device = Device::flex();
    device.seed(1);
    let device = device.autodiff();
    let mut model = DeepLab::new(&cfg.model, &device);
    let mut optim = AdamConfig::new().init();
    let imgs: Vec<_> = items.iter().map(|i| i.image.clone()).collect();
    let masks: Vec<&[u8]> = items.iter().map(|i| i.mask.as_slice()).collect();
    let mut losses = Vec::new();
    for _ in 0..12 {
        let (x, y) = data::batch(&imgs, &masks, &recipe, &device);
        let l = loss(model.forward(x), y, 1.0, 1.0, 0.5);
        losses.push(l.clone().into_scalar::<f32>() as f64);
        let grads = GradientsParams::from_grads(l.backward(), &model);
        model = optim.step(3e-3, model, grads);
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < 0.8 * first, "loss did not go down: {losses:?}");
}

#[test]
fn train_resume_export_round_trip() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path());

    // Reference: two epochs in one go.
    let straight = dir.path().join("straight");
    let s = train(&opts(&config, &straight, None, false)).unwrap();
    assert_eq!(s.epochs_done, 2);

    // Stopped after one epoch (as if killed), a refused restart over the same folder, then a
    // resume to the end.
    let resumed = dir.path().join("resumed");
    let half = train(&opts(&config, &resumed, Some(1), false)).unwrap();
    assert_eq!(half.epochs_done, 1);
    let err = train(&opts(&config, &resumed, None, false)).unwrap_err();
    assert!(format!("{err:#}").contains("--resume"), "{err:#}");
    let r = train(&opts(&config, &resumed, None, true)).unwrap();
    assert_eq!(r.epochs_done, 2);
    assert_eq!(r.steps_done, s.steps_done);

    // The resumed run continues the same schedule on the same batches: same losses and metrics
    // (all but the timing columns).
    let rows = |p: &Path| -> Vec<String> {
        std::fs::read_to_string(p.join("metrics.csv"))
            .unwrap()
            .lines()
            .map(|l| l.split(',').take(5).collect::<Vec<_>>().join(","))
            .collect()
    };
    assert_eq!(rows(&straight).len(), 3);
    assert_eq!(rows(&straight), rows(&resumed));
    assert!(straight.join("curves.png").exists());

    // Export: written, verified through tract inside `export`, and loadable by the daemon.
    let models = dir.path().join("models");
    let report = export(&ExportOptions {
        run: resumed.clone(),
        weights: "best".into(),
        out: models.clone(),
        name: "tiny".into(),
        version: "0.0.1".into(),
        data: None,
        verify_images: 2,
        int8: true,
        calib_images: 4,
    })
    .unwrap();
    assert!(report.verification.max_logit_diff <= 1e-3);
    let manifest = report.f32_manifest.clone();
    let seg = Segmenter::load(&manifest).unwrap();
    assert!(seg.manifest().metrics.contains_key("test"));

    // The int8 variant loads too, and its masks mostly agree with f32 even on an untrained net.
    let int8 = Segmenter::load(report.int8_manifest.as_ref().unwrap()).unwrap();
    assert_eq!(int8.manifest().model.precision, "int8");
    assert!(report.int8_mask_iou_vs_f32.unwrap() > 0.5, "{report:?}");
    let img = polypwatch_model::preprocess::load_rgb(
        &Dataset::open(&fixtures()).unwrap().samples[0].image,
    )
    .unwrap();
    assert_eq!(seg.logits_for(&img).unwrap().len(), 64 * 64);

    // A model file that does not match its manifest is refused.
    let onnx = seg.onnx_path().to_path_buf();
    let mut bytes = std::fs::read(&onnx).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(&onnx, &bytes).unwrap();
    let err = Segmenter::load(&manifest).unwrap_err().to_string();
    assert!(err.contains("sha256"), "{err}");
}

/// Two sources of real frames: the Kvasir fixtures (with polyp-free crops) and real polyp-free
/// colonoscopy frames (tests/fixtures/negatives-mini), a quarter of each batch polyp-free.
fn multi_config(dir: &Path) -> PathBuf {
    let tiny = std::fs::read_to_string(tiny_config(dir)).unwrap();
    let model_on = &tiny[tiny.find("[model]").unwrap()..];
    let text = format!(
        r#"
[data]
seed = 7
negative_share = 0.25

[[data.sources]]
name = "kvasir"
root = "{}"
train_split = "splits/train.txt"
test_split = "splits/test.txt"
val_fraction = 0.2
free_crops = true

[[data.sources]]
name = "free"
root = "{}"
val_fraction = 0.34
test_fraction = 0.34
polyp_free = true

{model_on}"#,
        fixtures().display(),
        fixtures().with_file_name("negatives-mini").display()
    );
    let p = dir.join("multi.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn multi_source_run_exports_its_operating_point() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = multi_config(dir.path());
    let run = dir.path().join("run");
    let mut o = opts(&config, &run, None, false);
    o.epochs = Some(1);
    let s = train(&o).unwrap();
    assert_eq!(s.epochs_done, 1);
    // Every source's carve-outs are written into the run folder, disjoint.
    let names = |f: &str| -> Vec<String> {
        std::fs::read_to_string(run.join(f))
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    };
    let (train_f, val_f, test_f) = (
        names("free.train.txt"),
        names("free.validation.txt"),
        names("free.test.txt"),
    );
    assert_eq!((train_f.len(), val_f.len(), test_f.len()), (2, 2, 2));
    assert!(val_f.iter().chain(&test_f).all(|n| !train_f.contains(n)));
    assert_eq!(names("kvasir.test.txt").len(), 4);
    // metrics.csv has the polyp-free specificity column filled.
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let row: Vec<&str> = csv.lines().nth(1).unwrap().split(',').collect();
    assert!(row[7].parse::<f64>().is_ok(), "{csv}");

    let report = export(&ExportOptions {
        run: run.clone(),
        weights: "best".into(),
        out: dir.path().join("models"),
        name: "multi".into(),
        version: "0.0.1".into(),
        data: None,
        verify_images: 2,
        int8: false,
        calib_images: 4,
    })
    .unwrap();
    let seg = Segmenter::load(&report.f32_manifest).unwrap();
    let point = seg.manifest().detect.clone().expect("an operating point");
    assert!(point.val_specificity >= 0.99, "{point:?}");
    assert!(point.val_free_frames >= 2);
    // The daemon's detect settings are the point's.
    let d = seg.manifest().detect_config();
    assert_eq!(d.pixel_threshold, Some(point.pixel_threshold));
    assert_eq!(
        (d.alert_score, d.min_area),
        (point.alert_score, point.min_area)
    );
    // Figures for every source's sets, polyp-free crops included.
    let sets: Vec<&str> = report.frames[0]
        .sets
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    for s in [
        "kvasir test",
        "kvasir-free test",
        "free test",
        "free validation",
    ] {
        assert!(sets.contains(&s), "{sets:?}");
    }
}
