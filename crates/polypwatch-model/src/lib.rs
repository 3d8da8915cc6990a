//! polypwatch-model: the contract between the trainer that makes a model and the daemon that
//! runs it. Both sides go through this crate, so a frame is preprocessed, a model loaded and a
//! mask scored the same way in both; it depends on no device (no V4L2, GPIO, journald or
//! systemd).
//!
//! - [`preprocess`]: the one image-to-tensor recipe, and mask loading.
//! - [`dataset`]: image/mask folders and split files.
//! - [`metrics`]: Dice, IoU and friends, per image and over a set.
//! - [`detect`]: from logits to a per-frame decision (components, scores, the detector).
//! - [`frames`]: frame-level metrics, ROC and the operating point a manifest records.
//! - [`manifest`]: the model manifest, the contract the trainer writes and the daemon checks.
//! - [`model`]: loading a checked model and running it with tract (through `polypwatch-accel`).
//! - [`evaluate`]: scoring a model on an image/mask set through that same inference path.
//! - [`selftest`]: the frame and mask a model carries, attached at export, run before it goes
//!   live.
//! - [`signing`]: ed25519 signatures over manifests.
//! - [`files`]: bounded reads of regular files (no FIFO, device or runaway file blocks a read).

#![deny(missing_docs)]

pub mod dataset;
pub mod detect;
pub mod evaluate;
pub mod files;
pub mod frames;
pub mod manifest;
pub mod metrics;
pub mod model;
pub mod preprocess;
pub mod selftest;
pub mod signing;

/// The version of tract this build runs models with (recorded in manifests at export).
pub const TRACT_VERSION: &str = "0.23.9";

/// The workspace's root, where the shipped models, the demo clip and the test fixtures lie
/// (this crate is `crates/polypwatch-model`).
#[cfg(test)]
pub(crate) fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[cfg(test)]
mod tests {
    /// The tract the workspace builds (Cargo.lock) is the one manifests say models run with:
    /// the version is pinned by hand in two places (`[workspace.dependencies]` and
    /// [`TRACT_VERSION`](crate::TRACT_VERSION)), and a bump of one without the other would export
    /// manifests that name a tract the daemon does not run.
    #[test]
    fn the_locked_tract_is_the_one_manifests_record() {
        let path = crate::workspace_root().join("Cargo.lock");
        let text = std::fs::read_to_string(&path).unwrap();
        let lock: toml::Table = toml::from_str(&text).unwrap();
        let packages = lock["package"].as_array().unwrap();
        // tract-core too: polypwatch-accel rewrites its plan through its internals.
        for name in ["tract-onnx", "tract-core"] {
            let versions: Vec<&str> = packages
                .iter()
                .filter(|p| p["name"].as_str() == Some(name))
                .map(|p| p["version"].as_str().unwrap())
                .collect();
            assert_eq!(
                versions,
                [crate::TRACT_VERSION],
                "{name} in {}",
                path.display()
            );
        }
    }
}
