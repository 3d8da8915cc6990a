//! Field updates end to end on the real tiny model: each kind of bad bundle is refused with
//! its own message, moved aside, and the active model stays; install, list and rollback work
//! through the library and through the `polypwatch model` command.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{TINY, bundle, root, sign};
use polypwatch::config::UpdateSection;
use polypwatch::signing::SecretKey;
use polypwatch::store::{InstallError, Store};

struct Setup {
    dir: tempfile::TempDir,
    key: SecretKey,
    store: Store,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate().unwrap();
    let store = Store::open(&UpdateSection::new(
        dir.path().join("state"),
        vec![key.public().to_string()],
    ))
    .unwrap();
    Setup { dir, key, store }
}

impl Setup {
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
    fn rejected_count(&self) -> usize {
        std::fs::read_dir(self.store.rejected()).unwrap().count()
    }
}

/// Installs `bad` after a good model and checks it is refused, moved aside with a reason, and
/// that the good model is still current. Returns the error message.
fn refused(s: &Setup, bad: &Path) -> String {
    let good = bundle(&s.path("good"), "1.0.0", Some(&s.key), |_, _| {});
    let before = s.store.install(&good).unwrap().manifest;
    let rejected = s.rejected_count();
    let err = s.store.install(bad).unwrap_err();
    assert_eq!(s.store.current(), Some(before), "active model changed");
    assert_eq!(s.rejected_count(), rejected + 1, "not moved aside");
    let newest = std::fs::read_dir(s.store.rejected())
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();
    let reason = std::fs::read_to_string(newest.join("reason.txt")).unwrap();
    assert!(reason.contains(&err.to_string()), "{reason}");
    err.to_string()
}

#[test]
fn a_good_bundle_installs_and_becomes_current() {
    let s = setup();
    let m = bundle(&s.path("b"), "1.0.0", Some(&s.key), |_, _| {});
    let i = s.store.install(&m).unwrap();
    assert_eq!(s.store.current().as_ref(), Some(&i.manifest));
    assert_eq!(i.key, s.key.public().id());
    assert!(i.selftest_iou >= 0.98);
    let v = polypwatch::store::verify(&i.manifest, s.store.keys()).unwrap();
    assert_eq!(v.segmenter.manifest().model.version, "1.0.0");
}

#[test]
fn a_tampered_onnx_is_refused() {
    let s = setup();
    let bad = bundle(&s.path("bad"), "2.0.0", Some(&s.key), |_, dir| {
        let p = dir.join(format!("{TINY}.onnx"));
        let mut b = std::fs::read(&p).unwrap();
        b[100] ^= 0x01;
        std::fs::write(&p, b).unwrap();
    });
    let err = refused(&s, &bad);
    assert!(err.contains("sha256") && err.contains(".onnx"), "{err}");
}

#[test]
fn a_truncated_onnx_is_refused() {
    let s = setup();
    let bad = bundle(&s.path("bad"), "2.0.0", Some(&s.key), |_, dir| {
        let p = dir.join(format!("{TINY}.onnx"));
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, &b[..b.len() / 2]).unwrap();
    });
    let err = refused(&s, &bad);
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn a_manifest_altered_after_signing_is_refused() {
    let s = setup();
    let bad = bundle(&s.path("bad"), "2.0.0", Some(&s.key), |_, _| {});
    let text = std::fs::read_to_string(&bad)
        .unwrap()
        .replace("threshold = 0.5", "threshold = 0.1");
    std::fs::write(&bad, text).unwrap();
    let err = refused(&s, &bad);
    assert!(err.contains("does not match the manifest"), "{err}");
}

#[test]
fn an_unknown_key_is_refused() {
    let s = setup();
    let stranger = SecretKey::generate().unwrap();
    let bad = bundle(&s.path("bad"), "2.0.0", Some(&stranger), |_, _| {});
    let err = refused(&s, &bad);
    assert!(
        err.contains("not in [update] trusted_keys") && err.contains(&stranger.public().id()),
        "{err}"
    );
}

#[test]
fn an_unsigned_bundle_is_refused() {
    let s = setup();
    let bad = bundle(&s.path("bad"), "2.0.0", None, |_, _| {});
    let err = refused(&s, &bad);
    assert!(err.contains("not signed"), "{err}");
}

#[test]
fn a_wrong_input_shape_is_refused() {
    let s = setup();
    let bad = bundle(&s.path("bad"), "2.0.0", Some(&s.key), |m, _| {
        m.preprocess.width *= 2;
        m.preprocess.height *= 2;
    });
    let err = refused(&s, &bad);
    assert!(err.contains("input shape"), "{err}");
}

#[test]
fn a_selftest_mismatch_is_refused() {
    let s = setup();
    let bad = bundle(&s.path("bad"), "2.0.0", Some(&s.key), |m, dir| {
        // Expect polyp everywhere: the model does not agree.
        let t = m.selftest.as_mut().unwrap();
        let p = dir.join(&t.mask);
        let old = image::open(&p).unwrap().into_luma8();
        image::GrayImage::from_pixel(old.width(), old.height(), image::Luma([255]))
            .save(&p)
            .unwrap();
        t.mask_sha256 = polypwatch::manifest::sha256_file(&p).unwrap();
    });
    let err = refused(&s, &bad);
    assert!(err.contains("self-test failed"), "{err}");
}

#[test]
fn rollback_returns_to_the_previous_model_then_the_factory() {
    let s = setup();
    let a = bundle(&s.path("a"), "1.0.0", Some(&s.key), |_, _| {});
    let b = bundle(&s.path("b"), "2.0.0", Some(&s.key), |_, _| {});
    let ia = s.store.install(&a).unwrap();
    let ib = s.store.install(&b).unwrap();
    let list = s.store.list();
    assert_eq!(list.len(), 2);
    assert!(list.iter().any(|e| e.current && e.manifest == ib.manifest));
    assert!(list.iter().any(|e| e.previous && e.manifest == ia.manifest));
    assert_eq!(s.store.rollback().unwrap(), Some(ia.manifest.clone()));
    assert_eq!(s.store.current(), Some(ia.manifest.clone()));
    // Rolling back again swaps back: previous is now b.
    assert_eq!(s.store.rollback().unwrap(), Some(ib.manifest.clone()));
    // Reinstalling the current model keeps the previous link.
    s.store.install(&b).unwrap();
    assert_eq!(s.store.current(), Some(ib.manifest));
}

#[test]
fn incoming_bundles_are_installed_or_moved_aside_and_incoming_is_emptied() {
    let s = setup();
    let inc = s.store.incoming();
    bundle(&inc, "3.0.0", Some(&s.key), |_, _| {});
    let out = s.store.install_incoming();
    assert_eq!(out.len(), 1);
    assert!(out[0].1.is_ok(), "{:?}", out[0].1);
    assert_eq!(std::fs::read_dir(&inc).unwrap().count(), 0);
    let stranger = SecretKey::generate().unwrap();
    bundle(&inc, "4.0.0", Some(&stranger), |_, _| {});
    let out = s.store.install_incoming();
    assert!(matches!(out[0].1, Err(InstallError::Signature { .. })));
    assert_eq!(std::fs::read_dir(&inc).unwrap().count(), 0);
    assert_eq!(s.rejected_count(), 1);
    let cur = s.store.current().unwrap();
    assert!(std::fs::read_to_string(cur).unwrap().contains("3.0.0"));
}

fn polypwatch(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_polypwatch"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn the_model_command_installs_lists_and_rolls_back() {
    let s = setup();
    let cfg = s.path("polypwatch.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\nmanifest = \"{}\"\n[source]\nkind = \"replay\"\npath = \"{}\"\n[update]\nstate_dir = \"{}\"\ntrusted_keys = [\"{}\"]\n",
            root().join("tests/fixtures/model/tiny-f32.toml").display(),
            root().join("demo/clip").display(),
            s.path("state").display(),
            s.key.public()
        ),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    let good = bundle(&s.path("good"), "5.0.0", Some(&s.key), |_, _| {});
    let out = polypwatch(&["model", "install", "--config", cfg, good.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("5.0.0"));

    let bad = bundle(&s.path("bad"), "6.0.0", None, |_, _| {});
    sign(&bad, &SecretKey::generate().unwrap());
    let out = polypwatch(&["model", "install", "--config", cfg, bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("trusted_keys") && err.contains("refused"),
        "{err}"
    );

    let out = polypwatch(&["model", "list", "--config", cfg]);
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(
        list.lines()
            .any(|l| l.starts_with("* ") && l.contains("5.0.0")),
        "{list}"
    );
    assert!(!list.contains("6.0.0"), "{list}");

    let out = polypwatch(&["model", "rollback", "--config", cfg]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("factory"));
    let out = polypwatch(&["model", "list", "--config", cfg]);
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(list.lines().any(|l| l.starts_with("* factory")), "{list}");
}
