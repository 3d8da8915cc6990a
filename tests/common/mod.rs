//! Helpers shared by the end-to-end tests: signed model bundles built from the tiny fixture.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use polypwatch::manifest::Manifest;
use polypwatch::signing::SecretKey;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub const TINY: &str = "tiny-f32";

/// Copies the tiny model's bundle (manifest, .onnx, self-test files) into `dir` with the given
/// version, optionally edits the manifest, and signs it with `key` (if any). Returns the
/// manifest path.
pub fn bundle(
    dir: &Path,
    version: &str,
    key: Option<&SecretKey>,
    edit: impl FnOnce(&mut Manifest, &Path),
) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let src = root().join("tests/fixtures/model");
    for ext in ["onnx", "selftest.png", "selftest-mask.png"] {
        let f = format!("{TINY}.{ext}");
        std::fs::copy(src.join(&f), dir.join(&f)).unwrap();
    }
    let mut m = Manifest::load(&src.join(format!("{TINY}.toml"))).unwrap();
    m.model.version = version.into();
    m.model.bytes = Some(
        std::fs::metadata(dir.join(format!("{TINY}.onnx")))
            .unwrap()
            .len(),
    );
    edit(&mut m, dir);
    let path = dir.join(format!("{TINY}.toml"));
    m.save(&path).unwrap();
    if let Some(k) = key {
        sign(&path, k);
    }
    path
}

pub fn sign(manifest: &Path, key: &SecretKey) {
    let bytes = std::fs::read(manifest).unwrap();
    std::fs::write(
        format!("{}.sig", manifest.display()),
        key.sign(&bytes).to_text(),
    )
    .unwrap();
}
