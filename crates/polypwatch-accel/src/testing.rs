//! What the tests of the rewrites share: the shipped models and a real frame.

use tract_onnx::prelude::*;

/// The workspace's root, where the shipped models and the test fixtures lie (this crate is
/// `crates/polypwatch-accel`).
pub(crate) fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A shipped model (`models/NAME`), optimised by tract, for the tests of the rewrites.
pub(crate) fn shipped_model(name: &str) -> TypedModel {
    let path = workspace_root().join("models").join(name);
    tract_onnx::onnx()
        .model_for_path(path)
        .and_then(|m| m.into_optimized())
        .expect("the shipped model loads")
}

/// A real frame (a Kvasir-SEG fixture) preprocessed as the shipped int8 model's manifest says.
pub(crate) fn fixture_input() -> Tensor {
    let root = workspace_root();
    let manifest =
        polypwatch_model::manifest::Manifest::load(&root.join("models/polypwatch-edge-int8.toml"))
            .unwrap();
    let image = polypwatch_model::preprocess::load_rgb(
        &root.join("tests/fixtures/kvasir-mini/images/cju0qkwl35piu0993l0dewei2.jpg"),
    )
    .unwrap();
    let r = &manifest.preprocess;
    let x = r.tensor_from_rgb(&image);
    Tensor::from_shape(&[1, 3, r.height as usize, r.width as usize], &x).unwrap()
}
