//! Field updates end to end on the real tiny model: each kind of bad bundle is refused with
//! its own message, moved aside, and the active model stays; install, list and rollback work
//! through the library and through the `polypwatch model` command.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{TINY, bundle, root, sign};
use polypwatch::config::UpdateSection;
use polypwatch::signing::SecretKey;
use polypwatch::store::{InstallError, InstallOptions, Store};

struct Setup {
    dir: tempfile::TempDir,
    key: SecretKey,
    store: Store,
}

fn setup() -> Setup {
    setup_with(|_| {})
}

/// A store whose `[update]` section `edit` may change (counts).
fn setup_with(edit: impl FnOnce(&mut UpdateSection)) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate().unwrap();
    let mut cfg = UpdateSection::new(dir.path().join("state"), vec![key.public().to_string()]);
    edit(&mut cfg);
    let store = Store::open(&cfg).unwrap();
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
fn rollback_walks_back_through_the_history_to_the_factory_model() {
    let s = setup();
    let a = bundle(&s.path("a"), "1.0.0", Some(&s.key), |_, _| {});
    let b = bundle(&s.path("b"), "2.0.0", Some(&s.key), |_, _| {});
    let c = bundle(&s.path("c"), "3.0.0", Some(&s.key), |_, _| {});
    let ia = s.store.install(&a).unwrap();
    let ib = s.store.install(&b).unwrap();
    let ic = s.store.install(&c).unwrap();
    let dir = |i: &polypwatch::store::Installed| i.manifest.parent().unwrap().to_path_buf();
    assert_eq!(s.store.history(), vec![dir(&ia), dir(&ib), dir(&ic)]);
    let list = s.store.list();
    assert_eq!(list.len(), 3);
    assert!(list.iter().any(|e| e.current && e.manifest == ic.manifest));
    assert!(list.iter().any(|e| e.previous && e.manifest == ib.manifest));
    assert!(
        list.iter()
            .any(|e| e.rollback_steps == Some(2) && e.manifest == ia.manifest)
    );
    // Reinstalling the current model changes nothing.
    s.store.install(&c).unwrap();
    assert_eq!(s.store.history().len(), 3);
    // Each rollback goes one step further back (the old code swapped c and b forever).
    assert_eq!(s.store.rollback().unwrap(), Some(ib.manifest.clone()));
    assert_eq!(s.store.current(), Some(ib.manifest.clone()));
    assert_eq!(s.store.rollback().unwrap(), Some(ia.manifest.clone()));
    assert_eq!(s.store.current(), Some(ia.manifest.clone()));
    assert!(s.store.list().iter().all(|e| !e.previous));
    assert_eq!(s.store.rollback().unwrap(), None);
    assert_eq!(s.store.current(), None);
    assert!(s.store.history().is_empty());
    // At the factory model, rollback stays there.
    assert_eq!(s.store.rollback().unwrap(), None);
    // The models are still installed: a newer one installs over the factory model.
    assert_eq!(s.store.list().len(), 3);
    s.store.install(&b).unwrap();
    assert_eq!(s.store.current(), Some(ib.manifest.clone()));
    assert_eq!(s.store.history(), vec![dir(&ib)]);
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

    // An older signed version: refused unless the technician forces it.
    let old = bundle(&s.path("old"), "4.0.0", Some(&s.key), |_, _| {});
    let out = polypwatch(&["model", "install", "--config", cfg, old.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("4.0.0") && err.contains("5.0.0") && err.contains("--allow-downgrade"),
        "{err}"
    );
    let out = polypwatch(&[
        "model",
        "install",
        "--config",
        cfg,
        "--allow-downgrade",
        old.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = polypwatch(&["model", "list", "--config", cfg]);
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(
        list.lines()
            .any(|l| l.starts_with("* ") && l.contains("4.0.0")),
        "{list}"
    );
    assert!(
        list.lines()
            .any(|l| l.starts_with("- ") && l.contains("5.0.0")),
        "{list}"
    );
    let out = polypwatch(&["model", "rollback", "--config", cfg]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("5.0.0"));
    // `check` checks the model that would serve, not only the factory one.
    let out = polypwatch(&["check", "--config", cfg]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("model ") && l.contains("models/") && l.contains("5.0.0")),
        "{text}"
    );

    let out = polypwatch(&["model", "rollback", "--config", cfg]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("factory"));
    let out = polypwatch(&["model", "list", "--config", cfg]);
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(list.lines().any(|l| l.starts_with("* factory")), "{list}");
}

/// Makes a FIFO at `p`.
fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
}

/// Runs `install_incoming` on another thread so that a regression that blocks fails the test
/// instead of hanging it (the bound is a hang guard, not a timing check).
fn install_incoming_unblocked(s: &Setup) -> Vec<(PathBuf, Result<(), String>)> {
    let store = s.store.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let out = store
            .install_incoming()
            .into_iter()
            .map(|(m, r)| (m, r.map(|_| ()).map_err(|e| e.to_string())))
            .collect::<Vec<_>>();
        let _ = tx.send(out);
    });
    rx.recv_timeout(std::time::Duration::from_secs(300))
        .expect("install_incoming blocked on a file in incoming/")
}

#[test]
fn a_fifo_in_incoming_is_refused_and_later_reloads_still_work() {
    let s = setup();
    let inc = s.store.incoming();
    // A FIFO in place of the .onnx (the old code blocked the reload thread forever on it),
    // and a FIFO named like a manifest.
    bundle(&inc, "2.0.0", Some(&s.key), |_, dir| {
        let p = dir.join(format!("{TINY}.onnx"));
        std::fs::remove_file(&p).unwrap();
        mkfifo(&p);
    });
    mkfifo(&inc.join("pipe.toml"));
    let out = install_incoming_unblocked(&s);
    assert_eq!(out.len(), 2);
    for (m, r) in &out {
        let err = r.as_ref().unwrap_err();
        assert!(
            err.contains("is a FIFO, not a regular file") && err.contains("incoming/"),
            "{}: {err}",
            m.display()
        );
    }
    let onnx = out
        .iter()
        .find(|(m, _)| m.ends_with(format!("{TINY}.toml")))
        .unwrap();
    assert!(
        onnx.1.as_ref().unwrap_err().contains(".onnx"),
        "{:?}",
        onnx.1
    );
    assert_eq!(
        std::fs::read_dir(&inc).unwrap().count(),
        0,
        "incoming emptied"
    );
    // The next drop installs.
    bundle(&inc, "3.0.0", Some(&s.key), |_, _| {});
    let out = install_incoming_unblocked(&s);
    assert!(out[0].1.is_ok(), "{:?}", out[0].1);
}

#[test]
fn a_symlinked_onnx_is_refused_and_its_target_never_copied() {
    let s = setup();
    let secret = s.path("secret.onnx");
    std::fs::write(&secret, b"private bytes behind a link").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let bad = bundle(&s.path("bad"), "2.0.0", Some(&s.key), |_, dir| {
        let p = dir.join(format!("{TINY}.onnx"));
        std::fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink(&secret, &p).unwrap();
    });
    let err = refused(&s, &bad);
    assert!(
        err.contains("is a symlink, not a regular file") && err.contains(".onnx"),
        "{err}"
    );
    // Nothing in rejected/ holds the link's target (the old code copied it there as 0644).
    for e in walk(&s.store.rejected()) {
        let data = std::fs::read(&e).unwrap();
        assert!(
            !data.windows(13).any(|w| w == b"private bytes".as_slice()),
            "{} leaks the target",
            e.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_copy_is_never_more_readable_than_its_source() {
    let s = setup();
    let m = bundle(&s.path("b"), "1.0.0", Some(&s.key), |_, dir| {
        let p = dir.join(format!("{TINY}.onnx"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    });
    let i = s.store.install(&m).unwrap();
    let dir = i.manifest.parent().unwrap();
    let mode = |n: &str| std::fs::metadata(dir.join(n)).unwrap().mode() & 0o777;
    assert_eq!(mode(&format!("{TINY}.onnx")), 0o600);
    assert_eq!(mode("manifest.toml"), 0o644);
}

#[test]
fn oversized_bundle_files_are_refused_naming_the_cap() {
    let s = setup();
    // A manifest over 1 MiB.
    let bad = bundle(&s.path("big"), "2.0.0", Some(&s.key), |_, _| {});
    let mut text = std::fs::read_to_string(&bad).unwrap();
    text.push_str(&format!("\n# {}\n", "x".repeat(1 << 20)));
    std::fs::write(&bad, text).unwrap();
    let err = refused(&s, &bad);
    assert!(
        err.contains("1 MiB cap") && err.contains("manifest"),
        "{err}"
    );
    // An .onnx over 512 MiB (sparse: refused from its size, never read).
    let bad = bundle(&s.path("huge"), "3.0.0", Some(&s.key), |_, dir| {
        std::fs::File::options()
            .write(true)
            .open(dir.join(format!("{TINY}.onnx")))
            .unwrap()
            .set_len((512 << 20) + 1)
            .unwrap();
    });
    let err = s.store.install(&bad).unwrap_err().to_string();
    assert!(
        err.contains("512 MiB cap") && err.contains(".onnx"),
        "{err}"
    );
}

#[test]
fn a_refused_bundle_does_not_take_files_another_bundle_shares() {
    let s = setup();
    let inc = s.store.incoming();
    // Two manifests naming the same .onnx and self-test files: a.toml (unsigned, refused,
    // handled first) and b.toml (good). The old clean-up of a deleted b's .onnx.
    let a = bundle(&s.path("a"), "1.0.0", None, |_, _| {});
    let b = bundle(&s.path("b"), "2.0.0", Some(&s.key), |_, _| {});
    std::fs::copy(&a, inc.join("a.toml")).unwrap();
    std::fs::copy(&b, inc.join("b.toml")).unwrap();
    std::fs::copy(format!("{}.sig", b.display()), inc.join("b.toml.sig")).unwrap();
    for ext in ["onnx", "selftest.png", "selftest-mask.png"] {
        let f = format!("{TINY}.{ext}");
        std::fs::copy(s.path("b").join(&f), inc.join(&f)).unwrap();
    }
    let out = s.store.install_incoming();
    assert_eq!(out.len(), 2);
    assert!(out[0].0.ends_with("a.toml"));
    assert!(matches!(out[0].1, Err(InstallError::Unsigned { .. })));
    assert!(out[1].1.is_ok(), "{:?}", out[1].1);
    assert!(
        std::fs::read_to_string(s.store.current().unwrap())
            .unwrap()
            .contains("2.0.0")
    );
    assert_eq!(
        std::fs::read_dir(&inc).unwrap().count(),
        0,
        "incoming emptied"
    );
}

#[test]
fn a_downgrade_or_replay_is_refused_unless_forced() {
    let s = setup();
    let v2 = bundle(&s.path("v2"), "2.0.0", Some(&s.key), |_, _| {});
    let v1 = bundle(&s.path("v1"), "1.10.0", Some(&s.key), |_, _| {});
    let i2 = s.store.install(&v2).unwrap();
    // Identical model again: a success that changes nothing.
    assert_eq!(s.store.install(&v2).unwrap().manifest, i2.manifest);
    assert_eq!(s.store.history().len(), 1);
    let err = s.store.install(&v1).unwrap_err().to_string();
    assert!(
        err.contains("1.10.0") && err.contains("2.0.0") && err.contains("--allow-downgrade"),
        "{err}"
    );
    assert_eq!(s.store.current(), Some(i2.manifest.clone()));
    let newest = std::fs::read_dir(s.store.rejected())
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();
    let reason = std::fs::read_to_string(newest.join("reason.txt")).unwrap();
    assert!(reason.contains(&err), "{reason}");
    // Daemon reloads never downgrade.
    let inc = s.store.incoming();
    bundle(&inc, "1.9.0", Some(&s.key), |_, _| {});
    let out = s.store.install_incoming();
    assert!(
        matches!(out[0].1, Err(InstallError::NotNewer { .. })),
        "{:?}",
        out[0].1
    );
    // Numeric order: 2.0.10 is newer than 2.0.9 is newer than 2.0.0.
    let v209 = bundle(&s.path("v209"), "2.0.9", Some(&s.key), |_, _| {});
    s.store.install(&v209).unwrap();
    let v2010 = bundle(&s.path("v2010"), "2.0.10", Some(&s.key), |_, _| {});
    let i2010 = s.store.install(&v2010).unwrap();
    // Forced by the technician.
    let forced = s
        .store
        .install_with(
            &v1,
            InstallOptions {
                allow_downgrade: true,
            },
        )
        .unwrap();
    assert_eq!(s.store.current(), Some(forced.manifest));
    assert_eq!(s.store.rollback().unwrap(), Some(i2010.manifest));
    // A version that cannot be ordered is refused with its own message.
    let odd = bundle(&s.path("odd"), "v3-rc1", Some(&s.key), |_, _| {});
    let err = s.store.install(&odd).unwrap_err();
    assert!(
        matches!(err, InstallError::Version { .. })
            && err.to_string().contains("MAJOR.MINOR.PATCH"),
        "{err}"
    );
}

/// Waits until some thread or process is blocked on the flock of `lock` (per /proc/locks), or
/// fails as soon as `done()` says the would-be waiter finished without waiting.
fn wait_for_lock_waiter(lock: &Path, done: impl Fn() -> bool) {
    let ino = std::fs::metadata(lock).unwrap().ino();
    let suffix = format!(":{ino}");
    loop {
        let locks = std::fs::read_to_string("/proc/locks").unwrap();
        let waiting = locks.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&"->")
                && f.get(2) == Some(&"FLOCK")
                && f.get(6).is_some_and(|d| d.ends_with(&suffix))
        });
        if waiting {
            return;
        }
        assert!(!done(), "finished while the store's lock was held");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn a_reload_waits_for_the_lock_another_store_holds() {
    let s = setup();
    bundle(&s.store.incoming(), "1.0.0", Some(&s.key), |_, _| {});
    let held = s.store.lock().unwrap();
    let other = s.store.clone();
    let t = std::thread::spawn(move || {
        other
            .install_incoming()
            .pop()
            .unwrap()
            .1
            .map(|i| i.manifest)
    });
    wait_for_lock_waiter(&s.store.lock_path(), || t.is_finished());
    assert_eq!(
        s.store.current(),
        None,
        "installed under someone else's lock"
    );
    drop(held);
    let m = t.join().unwrap().unwrap();
    assert_eq!(s.store.current(), Some(m));
}

#[test]
fn the_cli_install_waits_for_the_lock_the_daemon_holds() {
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
    let good = bundle(&s.path("good"), "5.0.0", Some(&s.key), |_, _| {});
    let held = s.store.lock().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_polypwatch"))
        .args(["model", "install", "--config"])
        .arg(&cfg)
        .arg(&good)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let child = std::cell::RefCell::new(child);
    wait_for_lock_waiter(&s.store.lock_path(), || {
        child.borrow_mut().try_wait().unwrap().is_some()
    });
    assert_eq!(
        s.store.current(),
        None,
        "the CLI installed under the daemon's lock"
    );
    drop(held);
    assert!(child.into_inner().wait().unwrap().success());
    assert!(
        std::fs::read_to_string(s.store.current().unwrap())
            .unwrap()
            .contains("5.0.0")
    );
}

#[test]
fn concurrent_installs_leave_a_consistent_current_and_history() {
    let s = setup();
    let bundles: Vec<PathBuf> = (1..=4)
        .map(|v| {
            bundle(
                &s.path(&format!("b{v}")),
                &format!("{v}.0.0"),
                Some(&s.key),
                |_, _| {},
            )
        })
        .collect();
    let threads: Vec<_> = bundles
        .iter()
        .map(|b| {
            let (store, b) = (s.store.clone(), b.clone());
            std::thread::spawn(move || store.install(&b).is_ok())
        })
        .collect();
    let installed = threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .filter(|&ok| ok)
        .count();
    // Whatever the order, the newest wins, the others were installed before it or refused
    // as downgrades, and the history ends with the current model.
    let cur = s.store.current().unwrap();
    assert!(std::fs::read_to_string(&cur).unwrap().contains("4.0.0"));
    let h = s.store.history();
    assert_eq!(h.last(), cur.parent().map(Path::to_path_buf).as_ref());
    assert_eq!(h.len(), installed.min(3));
    assert!(h.iter().all(|d| d.join("manifest.toml").is_file()));
    let models = std::fs::read_dir(s.path("state/models"))
        .unwrap()
        .filter(|e| {
            let e = e.as_ref().unwrap();
            e.file_type().unwrap().is_dir() && !e.file_name().to_string_lossy().starts_with('.')
        })
        .count();
    assert!(models <= 3, "{models} model folders, keep_models is 3");
}

#[test]
fn staging_left_by_a_crash_is_removed_at_open_unless_someone_holds_the_lock() {
    let s = setup();
    let stale = s.path("state/models/.staging-999999-1-0");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("manifest.toml"), "half").unwrap();
    let cfg = UpdateSection::new(s.path("state"), vec![s.key.public().to_string()]);
    // An install in progress elsewhere: its staging folder is live.
    let held = s.store.lock().unwrap();
    Store::open(&cfg).unwrap();
    assert!(stale.is_dir());
    drop(held);
    Store::open(&cfg).unwrap();
    assert!(!stale.exists(), "stale staging folder kept");
}

#[test]
fn old_models_and_rejected_bundles_are_pruned_to_the_configured_counts() {
    let s = setup_with(|u| {
        u.keep_models = 2;
        u.keep_rejected = 2;
    });
    let mut installed = Vec::new();
    for v in 1..=4 {
        let b = bundle(
            &s.path(&format!("b{v}")),
            &format!("{v}.0.0"),
            Some(&s.key),
            |_, _| {},
        );
        installed.push(s.store.install(&b).unwrap());
    }
    let folders: Vec<PathBuf> = s.store.list().into_iter().map(|e| e.dir).collect();
    let dir = |i: usize| installed[i].manifest.parent().unwrap().to_path_buf();
    assert_eq!(folders.len(), 2, "{folders:?}");
    assert!(folders.contains(&dir(3)) && folders.contains(&dir(2)));
    assert_eq!(s.store.history(), vec![dir(2), dir(3)]);
    for v in 5..=8 {
        let bad = bundle(
            &s.path(&format!("bad{v}")),
            &format!("{v}.0.0"),
            None,
            |_, _| {},
        );
        s.store.install(&bad).unwrap_err();
    }
    assert_eq!(s.rejected_count(), 2);
    // Rollback reaches what was kept, then the factory model (outside the store, untouched).
    assert_eq!(
        s.store.rollback().unwrap(),
        Some(installed[2].manifest.clone())
    );
    assert_eq!(s.store.rollback().unwrap(), None);
    assert!(root().join("tests/fixtures/model/tiny-f32.onnx").is_file());
    // At the factory model, pruning still keeps keep_models folders to install again.
    s.store.prune().unwrap();
    assert_eq!(s.store.list().len(), 2);
}
