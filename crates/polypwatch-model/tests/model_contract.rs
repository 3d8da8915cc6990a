//! The model contract, on a real model exported by polypwatch-train (tests/fixtures/model):
//! the daemon loads what the trainer writes and refuses anything that does not match.

use std::path::{Path, PathBuf};

use polypwatch_model::dataset::Dataset;
use polypwatch_model::evaluate::evaluate;
use polypwatch_model::model::Segmenter;

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(p)
}

/// Copies the fixture model into a temporary folder that a test may damage.
fn scratch_copy() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    for f in ["tiny-f32.onnx", "tiny-f32.toml"] {
        std::fs::copy(fixture("model").join(f), dir.path().join(f)).unwrap();
    }
    let manifest = dir.path().join("tiny-f32.toml");
    (dir, manifest)
}

fn load_err(manifest: &Path) -> String {
    format!("{}", Segmenter::load(manifest).unwrap_err())
}

#[test]
fn exported_models_load_and_run_on_real_images() {
    let ds = Dataset::open(&fixture("kvasir-mini")).unwrap();
    for precision in ["f32", "int8"] {
        let seg = Segmenter::load(&fixture(&format!("model/tiny-{precision}.toml"))).unwrap();
        assert_eq!(seg.manifest().model.precision, precision);
        let (img, _) = ds.samples[0].load().unwrap();
        let logits = seg.logits_for(&img).unwrap();
        assert_eq!(logits.len(), 64 * 64);
        assert!(logits.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn evaluation_reproduces_the_manifest_metrics() {
    let seg = Segmenter::load(&fixture("model/tiny-f32.toml")).unwrap();
    let test = Dataset::open_split(
        &fixture("kvasir-mini"),
        &fixture("kvasir-mini/splits/test.txt"),
    )
    .unwrap();
    let scores = evaluate(&seg, &test.samples, |_| {}).unwrap();
    let recorded = seg.manifest().metrics["test"];
    assert_eq!(scores.images, recorded.images);
    assert!((scores.mean_iou - recorded.mean_iou).abs() < 1e-9);
    assert!((scores.accuracy - recorded.accuracy).abs() < 1e-9);
}

#[test]
fn tampered_model_file_is_refused() {
    let (dir, manifest) = scratch_copy();
    let onnx = dir.path().join("tiny-f32.onnx");
    let mut bytes = std::fs::read(&onnx).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&onnx, bytes).unwrap();
    let err = load_err(&manifest);
    assert!(
        err.contains("sha256") && err.contains("tiny-f32.onnx"),
        "{err}"
    );
}

#[test]
fn truncated_model_file_is_refused_even_with_a_matching_hash() {
    let (dir, manifest) = scratch_copy();
    let onnx = dir.path().join("tiny-f32.onnx");
    let bytes = std::fs::read(&onnx).unwrap();
    std::fs::write(&onnx, &bytes[..bytes.len() / 3]).unwrap();
    let sha = polypwatch_model::manifest::sha256_file(&onnx).unwrap();
    let text = std::fs::read_to_string(&manifest).unwrap();
    let old = polypwatch_model::manifest::Manifest::load(&manifest)
        .unwrap()
        .model
        .sha256;
    std::fs::write(&manifest, text.replace(&old, &sha)).unwrap();
    let err = load_err(&manifest);
    assert!(
        err.contains("cannot load model") && err.contains("tiny-f32.onnx"),
        "{err}"
    );
}

#[test]
fn manifest_with_the_wrong_input_shape_is_refused() {
    let (_dir, manifest) = scratch_copy();
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replace("height = 64", "height = 96")).unwrap();
    let err = load_err(&manifest);
    assert!(err.contains("input shape") && err.contains("96"), "{err}");
}

#[test]
fn manifest_errors_name_the_problem() {
    let (dir, manifest) = scratch_copy();
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        text.replace("[output]", "[output]\ncolour = \"red\""),
    )
    .unwrap();
    let err = load_err(&manifest);
    assert!(err.contains("colour"), "{err}");

    std::fs::write(&manifest, &text).unwrap();
    std::fs::remove_file(dir.path().join("tiny-f32.onnx")).unwrap();
    let err = load_err(&manifest);
    assert!(err.contains("tiny-f32.onnx"), "{err}");

    let err = load_err(&dir.path().join("missing.toml"));
    assert!(err.contains("missing.toml"), "{err}");
}
