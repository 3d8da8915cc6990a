//! `--init model-f32.onnx`: the shipped model loaded into the Burn network, checked against
//! tract on fixture images; wrong files give one clear line.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::prelude::*;
use burn::tensor::TensorData;
use image::RgbImage;
use polypwatch_model::model::Segmenter;
use polypwatch_model::preprocess::{Recipe, load_rgb};
use polypwatch_train::config::TrainConfig;
use polypwatch_train::export::MAX_LOGIT_DIFF;
use polypwatch_train::import::{ImportError, init_from_onnx};
use polypwatch_train::model::DeepLab;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn shipped_onnx() -> PathBuf {
    repo().join("models/polypwatch-edge-f32.onnx")
}

fn shipped_config() -> TrainConfig {
    TrainConfig::load(&repo().join("models/polypwatch-edge-train-config.toml")).unwrap()
}

fn fixture_images() -> Vec<RgbImage> {
    let dir = repo().join("tests/fixtures/kvasir-mini/images");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    paths.iter().map(|p| load_rgb(p).unwrap()).collect()
}

fn input(recipe: &Recipe, images: &[RgbImage], device: &Device) -> Tensor<4> {
    let (h, w) = (recipe.height as usize, recipe.width as usize);
    let x: Vec<f32> = images
        .iter()
        .flat_map(|i| recipe.tensor_from_rgb(i))
        .collect();
    Tensor::from_data(TensorData::new(x, [images.len(), 3, h, w]), device)
}

fn to_vec(t: Tensor<4>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// Calibration images: the first four fixtures at the input size.
fn calibration(recipe: &Recipe, images: &[RgbImage]) -> Vec<RgbImage> {
    images[..4].iter().map(|i| recipe.resize(i)).collect()
}

/// The imported network in inference computes what tract computes from the same file. The
/// tolerance is the one `export` demands of Burn against tract before it accepts a file
/// (1e-3 on logits of order 10): the import must give back a network that the export's own
/// check would pass. One image was a calibration image, one was not (inference must not
/// depend on which images calibrated it).
#[test]
fn onnx_init_reproduces_tract() {
    let seg = Segmenter::load(&repo().join("models/polypwatch-edge-f32.toml")).unwrap();
    let recipe = seg.manifest().preprocess.clone();
    let cfg = shipped_config();
    assert_eq!(recipe, Recipe::square(cfg.train.input_size));
    let device = Device::flex();
    let images = fixture_images();
    let mut model = DeepLab::new(&cfg.model, &device);
    let r = init_from_onnx(
        &mut model,
        &shipped_onnx(),
        &calibration(&recipe, &images),
        8,
        &recipe,
    )
    .unwrap();
    assert_eq!((r.convs, r.images), (r.batch_norms + 1, 4));
    let model = model.valid();
    for img in [&images[0], &images[10]] {
        let theirs = seg.logits_for(img).unwrap();
        let ours = to_vec(model.forward(input(&recipe, std::slice::from_ref(img), &device)));
        let d = max_diff(&ours, &theirs);
        let range = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
        eprintln!("max |Burn - tract| logit difference {d:e} (max |logit| {range:.2})");
        assert!(range > 1.0, "logits of a real model vary: {range}");
        assert!(d <= MAX_LOGIT_DIFF, "Burn and tract differ by {d}");
    }
}

/// Calibration makes training-mode batch norm (batch statistics) compute what inference
/// computes when the batch is the calibration set: a fine-tune starts from the shipped
/// model's function, not from a rescaled one. The tolerance (1e-2) allows for f32 batch
/// statistics against the f64 calibration sums compounding over 20 layers; the second check
/// shows the comparison is sensitive to the statistics (calibrated on one image of the
/// four, training mode drifts far more), so the first cannot pass by accident.
#[test]
fn calibrated_batch_norm_matches_in_training_mode() {
    let cfg = shipped_config();
    let recipe = Recipe::square(cfg.train.input_size);
    let device = Device::flex().autodiff();
    let calib = calibration(&recipe, &fixture_images());
    let mut model = DeepLab::new(&cfg.model, &device);
    init_from_onnx(&mut model, &shipped_onnx(), &calib, 8, &recipe).unwrap();
    let x = input(&recipe, &calib, &device);
    let inner = device.clone().inner();
    let eval = to_vec(
        model
            .valid()
            .to_device(&inner)
            .forward(input(&recipe, &calib, &inner)),
    );
    let train = to_vec(model.forward(x.clone()));
    let d = max_diff(&train, &eval);
    eprintln!("training-mode vs inference logits on the calibration batch: {d:e}");
    assert!(d < 1e-2, "training mode differs from inference by {d}");

    // Calibrated on the first image only: the batch's statistics are no longer the
    // calibration ones.
    let mut raw = DeepLab::new(&cfg.model, &device);
    init_from_onnx(&mut raw, &shipped_onnx(), &calib[..1], 8, &recipe).unwrap();
    let d_one = max_diff(&to_vec(raw.forward(x)), &eval);
    eprintln!("calibrated on one image, batch of four: {d_one:e}");
    assert!(d_one > 10.0 * d, "{d_one} vs {d}");
}

fn err_line(e: &ImportError) -> String {
    let s = e.to_string();
    assert!(!s.contains('\n'), "one line: {s}");
    assert!(s.contains(".onnx"), "names the file: {s}");
    s
}

/// Wrong files are errors naming the file, the tensor or layer and the fix; none panics.
#[test]
fn wrong_onnx_files_are_one_clear_line() {
    let cfg = shipped_config();
    let recipe = Recipe::square(cfg.train.input_size);
    let device = Device::flex();
    let calib = calibration(&recipe, &fixture_images());
    let init = |model_cfg: &polypwatch_train::model::ModelConfig, path: &Path| {
        let mut model = DeepLab::new(model_cfg, &device);
        init_from_onnx(&mut model, path, &calib, 8, &recipe).unwrap_err()
    };

    // The int8 variant.
    let e = init(&cfg.model, &repo().join("models/polypwatch-edge-int8.onnx"));
    let s = err_line(&e);
    assert!(matches!(e, ImportError::Int8 { .. }), "{s}");
    assert!(s.contains("-f32.onnx"), "{s}");

    // Another architecture: narrower decoder, then other ASPP rates (same shapes).
    let mut narrow = cfg.model.clone();
    narrow.decoder_filters = 32;
    let e = init(&narrow, &shipped_onnx());
    let s = err_line(&e);
    assert!(
        matches!(&e, ImportError::Architecture(m) if m.what == "shape" && m.layer == "decoder.0" && m.tensor.starts_with("w_")),
        "{s}"
    );
    assert!(s.contains("polypwatch-edge-train-config.toml"), "{s}");
    let mut rates = cfg.model.clone();
    rates.aspp_rates = vec![1, 6, 12, 24];
    let e = init(&rates, &shipped_onnx());
    let s = err_line(&e);
    assert!(
        matches!(&e, ImportError::Architecture(m) if m.what == "dilations" && m.layer == "aspp.branches.3"),
        "{s}"
    );

    // Truncated copies (half, and cut inside the last bytes) and an empty file.
    let bytes = std::fs::read(shipped_onnx()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (name, len) in [
        ("half.onnx", bytes.len() / 2),
        ("short.onnx", bytes.len() - 3),
        ("empty.onnx", 0),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, &bytes[..len]).unwrap();
        let e = init(&cfg.model, &p);
        let s = err_line(&e);
        assert!(matches!(e, ImportError::Decode { .. }), "{name}: {s}");
        assert!(s.contains("truncated"), "{s}");
    }

    // Not a file.
    let e = init(&cfg.model, &dir.path().join("absent.onnx"));
    assert!(matches!(e, ImportError::Read { .. }), "{}", err_line(&e));
}
