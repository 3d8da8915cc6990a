//! Field updates: signed models installed into a state folder, verified before they go live,
//! with an install history kept for rollback.
//!
//! ```text
//! <state_dir>/lock                                      flock(2)ed by every change (CLI and daemon)
//! <state_dir>/models/<name>-<version>-<precision>-<sha8>/   one installed model (manifest,
//!                                                          .sig, .onnx, self-test files)
//! <state_dir>/models/current  -> <one of them>             symlinks, swapped by rename(2)
//! <state_dir>/models/previous -> <one of them>             where `rollback` goes (from history)
//! <state_dir>/models/history   folder names in activation order, the last one current
//! <state_dir>/incoming/    bundles dropped here are installed on SIGHUP
//! <state_dir>/rejected/    what failed, with reason.txt
//! ```
//!
//! An install copies the bundle into a staging folder (fsynced), verifies the copy (signature,
//! hashes, tract load and shapes, self-test frame, a version newer than the current one),
//! renames it into place and only then swaps the `current` link, so power loss at any point
//! leaves the old model active. Bundle files are opened without following links and without
//! blocking, must be regular files, and are read up to a cap. `rollback` walks the history back
//! to the factory model. Old models and rejected bundles are pruned to `[update] keep_models`
//! and `keep_rejected`.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::UpdateSection;
use crate::files::kind_of;
use crate::manifest::{Manifest, ManifestError, SelfTest};
use crate::model::{ModelError, Segmenter};
use crate::selftest::{self, SelfTestError};
use crate::signing::{PublicKey, SignError, SignatureFile};

/// Largest manifest or `.sig` read from a bundle (they are a few KiB).
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// Largest `.onnx` copied from a bundle.
pub const MAX_MODEL_BYTES: u64 = 512 << 20;
/// Largest self-test image or mask copied from a bundle.
pub const MAX_SELFTEST_BYTES: u64 = 64 << 20;

/// Why a model bundle was refused.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A file of the bundle is missing or unreadable.
    #[error("cannot read {path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// A file of the bundle is a symlink, FIFO, device or folder: never followed or read, so a
    /// pipe cannot block a reload and a link cannot copy a file the bundle does not own.
    #[error(
        "{path} is a {kind}, not a regular file: drop the bundle's real files into incoming/ (or name real files to `polypwatch model install`)"
    )]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// What it is: `symlink`, `FIFO`, `socket`, `device`, `folder`.
        kind: &'static str,
    },
    /// A file of the bundle is larger than its cap.
    #[error(
        "{path} is over the {cap_mib} MiB cap for a {what} ({size} bytes): this is not a bundle file; copy the right one"
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size (at least; reading stops past the cap).
        size: u64,
        /// The cap in MiB.
        cap_mib: u64,
        /// What the file is for: `manifest`, `signature`, `model`, `self-test file`.
        what: &'static str,
    },
    /// No signature beside the manifest.
    #[error("{path} is not signed: no {path}.sig beside it (sign it with `polypwatch-train sign`)")]
    Unsigned {
        /// The manifest.
        path: PathBuf,
    },
    /// The signature is wrong or from an untrusted key.
    #[error("{path}: {error}")]
    Signature {
        /// The manifest.
        path: PathBuf,
        /// What is wrong with it.
        error: SignError,
    },
    /// The manifest is invalid or a file does not match its hash.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// tract cannot load the model, or its shapes differ from the manifest.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The manifest has no self-test.
    #[error("{path} has no [selftest]: add one with `polypwatch-train selftest` before signing")]
    NoSelfTest {
        /// The manifest.
        path: PathBuf,
    },
    /// The model does not reproduce the self-test mask.
    #[error(
        "self-test failed: mask IoU {iou:.4} with the expected mask, below {min}: the model does not behave as it did when exported"
    )]
    SelfTest {
        /// IoU measured.
        iou: f64,
        /// Threshold.
        min: f64,
    },
    /// A model version is not `MAJOR.MINOR.PATCH`, so it cannot be ordered.
    #[error(
        "{path}: [model] version = {version:?} is not MAJOR.MINOR.PATCH (numbers, e.g. \"1.2.0\"), so it cannot be compared with the installed model: export it with such a version, or force it with `polypwatch model install --allow-downgrade`"
    )]
    Version {
        /// The manifest.
        path: PathBuf,
        /// The version it names.
        version: String,
    },
    /// The bundle is not newer than the current model: a downgrade or a replay.
    #[error(
        "version {new} is not newer than the installed {current} ({current_dir}): refused as a downgrade or replay; a technician can force it with `polypwatch model install --allow-downgrade`"
    )]
    NotNewer {
        /// The bundle's version.
        new: String,
        /// The current model's version.
        current: String,
        /// The current model's folder.
        current_dir: PathBuf,
    },
    /// The store itself cannot be written.
    #[error("model store {path}: {error}")]
    Store {
        /// The folder or file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
}

/// The self-test's failures as the store has always reported them, variant for variant.
impl From<SelfTestError> for InstallError {
    fn from(e: SelfTestError) -> Self {
        match e {
            SelfTestError::Io { path, error } => InstallError::Io { path, error },
            SelfTestError::Write { path, error } => InstallError::Store { path, error },
            SelfTestError::Manifest(e) => InstallError::Manifest(e),
            SelfTestError::Model(e) => InstallError::Model(e),
            SelfTestError::Failed { iou, min } => InstallError::SelfTest { iou, min },
        }
    }
}

/// A model that passed every check.
#[derive(Debug)]
pub struct Verified {
    /// The loaded model, ready to serve.
    pub segmenter: Segmenter,
    /// The key that signed it.
    pub key: PublicKey,
    /// Self-test IoU.
    pub selftest_iou: f64,
}

/// A bundle that was installed and made current.
#[derive(Debug, Clone)]
pub struct Installed {
    /// Its manifest in the store.
    pub manifest: PathBuf,
    /// `name version (precision)`.
    pub label: String,
    /// Fingerprint of the key that signed it.
    pub key: String,
    /// Self-test IoU.
    pub selftest_iou: f64,
}

/// How [`Store::install_with`] treats a bundle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InstallOptions {
    /// Install a version that is not newer than the current one (or does not parse): the
    /// technician's `model install --allow-downgrade`. Daemon reloads never set it.
    pub allow_downgrade: bool,
}

/// One installed model, as `model list` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Its folder.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: PathBuf,
    /// `name version (precision)`, or why the manifest cannot be read.
    pub label: String,
    /// The active one.
    pub current: bool,
    /// The one the next `rollback` makes current (the entry before the current one in the
    /// install history; the `previous` link points at it).
    pub previous: bool,
    /// How many `rollback`s make it current: 0 for the current model, 1 for the previous one;
    /// `None` when the history no longer leads to it (it is pruned first).
    pub rollback_steps: Option<usize>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Store {
        path: path.to_path_buf(),
        error: source,
    }
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_path_buf(),
        error: source,
    }
}

/// Opens a bundle file for reading without following a symlink and without blocking (a FIFO
/// opens at once and is then refused), and checks on the opened file that it is a regular file
/// of at most `cap` bytes. Returns the file and its permission bits.
fn open_regular(
    path: &Path,
    cap: u64,
    what: &'static str,
) -> Result<(fs::File, u32), InstallError> {
    let not_regular = |kind| InstallError::NotRegular {
        path: path.to_path_buf(),
        kind,
    };
    // lstat first, so a device node is never even opened.
    let meta = fs::symlink_metadata(path).map_err(read_err(path))?;
    if let Some(kind) = kind_of(meta.file_type()) {
        return Err(not_regular(kind));
    }
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            // Swapped for a link since the lstat.
            if e.raw_os_error() == Some(libc::ELOOP) {
                not_regular("symlink")
            } else {
                read_err(path)(e)
            }
        })?;
    // fstat what was opened: the name may have been swapped since the lstat.
    let meta = f.metadata().map_err(read_err(path))?;
    if let Some(kind) = kind_of(meta.file_type()) {
        return Err(not_regular(kind));
    }
    check_cap(path, meta.len(), cap, what)?;
    Ok((f, meta.permissions().mode()))
}

fn check_cap(path: &Path, size: u64, cap: u64, what: &'static str) -> Result<(), InstallError> {
    if size > cap {
        return Err(InstallError::TooLarge {
            path: path.to_path_buf(),
            size,
            cap_mib: cap >> 20,
            what,
        });
    }
    Ok(())
}

/// Reads a whole bundle file through [`open_regular`], never more than `cap` bytes.
fn read_bounded(path: &Path, cap: u64, what: &'static str) -> Result<Vec<u8>, InstallError> {
    let (f, _) = open_regular(path, cap, what)?;
    let mut data = Vec::new();
    // The file may grow after the fstat: read one byte past the cap to notice.
    f.take(cap + 1)
        .read_to_end(&mut data)
        .map_err(read_err(path))?;
    check_cap(path, data.len() as u64, cap, what)?;
    Ok(data)
}

/// Reads and parses a manifest through [`read_bounded`].
fn load_manifest(path: &Path) -> Result<Manifest, InstallError> {
    let bytes = read_bounded(path, MAX_MANIFEST_BYTES, "manifest")?;
    Ok(Manifest::parse(&String::from_utf8_lossy(&bytes), path)?)
}

fn sig_path(manifest: &Path) -> PathBuf {
    let mut s = manifest.as_os_str().to_owned();
    s.push(".sig");
    PathBuf::from(s)
}

/// The manifest file name every installed model folder uses.
const MANIFEST: &str = "manifest.toml";
/// The install history in models/: one folder name a line, oldest first, the last one current.
const HISTORY: &str = "history";

/// A `MAJOR.MINOR.PATCH` version, compared numerically (`1.10.0` is newer than `1.9.0`).
/// Anything else (a pre-release suffix, a leading `v`, two or four parts) is `None`.
pub fn parse_version(v: &str) -> Option<(u64, u64, u64)> {
    let mut parts = v.split('.').map(|p| {
        (!p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            .then(|| p.parse::<u64>().ok())
            .flatten()
    });
    let out = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(out)
}

/// Unique suffix for staging and temporary names within this process.
fn next_seq() -> u64 {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    SEQ.fetch_add(1, Ordering::Relaxed)
}
/// Runs the self-test of a loaded model whose manifest lies at `manifest_path` (see
/// [`selftest::run_selftest`]).
pub fn run_selftest(
    seg: &Segmenter,
    manifest_path: &Path,
    t: &SelfTest,
) -> Result<f64, InstallError> {
    Ok(selftest::run_selftest(seg, manifest_path, t)?)
}

/// Verifies a model bundle where it lies: signature over the manifest's bytes, hashes, tract
/// load and shapes, and the self-test.
pub fn verify(manifest_path: &Path, keys: &[PublicKey]) -> Result<Verified, InstallError> {
    let bytes = read_bounded(manifest_path, MAX_MANIFEST_BYTES, "manifest")?;
    let sig_file = sig_path(manifest_path);
    let sig_text = match read_bounded(&sig_file, MAX_MANIFEST_BYTES, "signature") {
        Ok(t) => String::from_utf8_lossy(&t).into_owned(),
        Err(InstallError::Io { error: source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            return Err(InstallError::Unsigned {
                path: manifest_path.to_path_buf(),
            });
        }
        Err(e) => return Err(e),
    };
    let sig_err = |source| InstallError::Signature {
        path: manifest_path.to_path_buf(),
        error: source,
    };
    let key = SignatureFile::parse(&sig_text)
        .and_then(|s| s.verify(&bytes, keys))
        .map_err(sig_err)?;
    let text = String::from_utf8_lossy(&bytes);
    let m = Manifest::parse(&text, manifest_path)?;
    let Some(t) = m.selftest.clone() else {
        return Err(InstallError::NoSelfTest {
            path: manifest_path.to_path_buf(),
        });
    };
    let segmenter = Segmenter::load(manifest_path)?;
    let selftest_iou = run_selftest(&segmenter, manifest_path, &t)?;
    Ok(Verified {
        segmenter,
        key,
        selftest_iou,
    })
}

fn fsync_dir(dir: &Path) -> Result<(), InstallError> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dir))
}

/// Writes `data` to a new file, fsynced, readable by others only once it is complete and only
/// as far as `mode` (the source's bits) allows: a 0600 source never becomes a 0644 copy.
fn write_synced(to: &Path, data: &[u8], mode: u32) -> Result<(), InstallError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(to)
        .map_err(io_err(to))?;
    f.write_all(data).map_err(io_err(to))?;
    f.sync_all().map_err(io_err(to))?;
    f.set_permissions(fs::Permissions::from_mode(mode & 0o644))
        .map_err(io_err(to))
}

/// Copies a bundle file (regular, at most `cap` bytes, links not followed) into staging.
fn copy_bounded(from: &Path, to: &Path, cap: u64, what: &'static str) -> Result<(), InstallError> {
    let (f, mode) = open_regular(from, cap, what)?;
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(to)
        .map_err(io_err(to))?;
    let n = std::io::copy(&mut f.take(cap + 1), &mut out).map_err(read_err(from))?;
    if let Err(e) = check_cap(from, n, cap, what) {
        drop(out);
        let _ = fs::remove_file(to);
        return Err(e);
    }
    out.sync_all().map_err(io_err(to))?;
    out.set_permissions(fs::Permissions::from_mode(mode & 0o644))
        .map_err(io_err(to))
}

/// The bundle files a manifest names beside it (.onnx, self-test image and mask), with caps.
fn named_files(m: &Manifest) -> Vec<(String, u64, &'static str)> {
    let mut v = vec![(m.model.onnx.clone(), MAX_MODEL_BYTES, "model")];
    if let Some(t) = &m.selftest {
        for n in [&t.image, &t.mask] {
            v.push((n.clone(), MAX_SELFTEST_BYTES, "self-test file"));
        }
    }
    v
}

/// An exclusive hold on the store (flock(2) on `<state_dir>/lock`); released when dropped.
/// The CLI and the daemon take it for every install, rollback and prune, so they cannot
/// interleave.
#[derive(Debug)]
pub struct StoreLock {
    _file: fs::File,
}

/// The state folder.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    keys: Vec<PublicKey>,
    keep_models: usize,
    keep_rejected: usize,
}

impl Store {
    /// Opens (and creates) the state folder's layout. When no other process holds the lock,
    /// removes what a crash left: staging folders and temporary links (an install holds the
    /// lock while they exist, so unlocked ones belong to nobody).
    pub fn open(cfg: &UpdateSection) -> Result<Self, InstallError> {
        let keys = cfg
            .trusted_keys
            .iter()
            .map(|k| PublicKey::parse(k))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| InstallError::Signature {
                path: "[update] trusted_keys".into(),
                error: source,
            })?;
        let s = Store {
            root: cfg.state_dir.clone(),
            keys,
            // The current model is always kept, whatever the count says.
            keep_models: cfg.keep_models.max(1),
            keep_rejected: cfg.keep_rejected,
        };
        for d in [s.models(), s.incoming(), s.rejected()] {
            fs::create_dir_all(&d).map_err(io_err(&d))?;
        }
        match s.try_lock() {
            Ok(Some(_lock)) => s.remove_leftovers(),
            // Someone is installing: their staging folder is live; the next open cleans up.
            Ok(None) => {}
            Err(e) => log::warn!("{e}; leftovers of an interrupted install are kept"),
        }
        Ok(s)
    }

    fn models(&self) -> PathBuf {
        self.root.join("models")
    }
    /// Where bundles to install on SIGHUP are dropped.
    pub fn incoming(&self) -> PathBuf {
        self.root.join("incoming")
    }
    /// Where refused bundles are moved, each with a `reason.txt`.
    pub fn rejected(&self) -> PathBuf {
        self.root.join("rejected")
    }
    /// The lock file every change of the store holds (see [`StoreLock`]).
    pub fn lock_path(&self) -> PathBuf {
        self.root.join("lock")
    }
    /// The trusted keys.
    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    fn lock_file(&self) -> Result<fs::File, InstallError> {
        let p = self.lock_path();
        // flock(2) needs no write access: open read-only so any user who may read the store
        // can take turns with the daemon; create it (0644) the first time.
        let open = || {
            fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&p)
        };
        match open() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => fs::OpenOptions::new()
                .write(true)
                .create(true)
                .mode(0o644)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&p),
            other => other,
        }
        .map_err(io_err(&p))
    }

    fn flock(&self, f: &fs::File, flags: libc::c_int) -> Result<bool, InstallError> {
        use std::os::fd::AsRawFd;
        loop {
            // SAFETY: flock on a file descriptor this function borrows; no memory involved.
            if unsafe { libc::flock(f.as_raw_fd(), flags) } == 0 {
                return Ok(true);
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) => return Ok(false),
                _ => return Err(io_err(&self.lock_path())(e)),
            }
        }
    }

    /// Waits for and takes the store's exclusive lock, as install, rollback and prune do. For
    /// a tool that must change the store without racing the daemon (or a test).
    pub fn lock(&self) -> Result<StoreLock, InstallError> {
        let f = self.lock_file()?;
        self.flock(&f, libc::LOCK_EX)?;
        Ok(StoreLock { _file: f })
    }

    /// Takes the lock if nobody holds it.
    fn try_lock(&self) -> Result<Option<StoreLock>, InstallError> {
        let f = self.lock_file()?;
        Ok(self
            .flock(&f, libc::LOCK_EX | libc::LOCK_NB)?
            .then_some(StoreLock { _file: f }))
    }

    /// Staging folders and temporary files of installs that died (call with the lock held).
    fn remove_leftovers(&self) {
        let models = self.models();
        for e in fs::read_dir(&models).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            if name.starts_with(".staging-") {
                log::warn!("removing {} left by an interrupted install", path.display());
                if let Err(err) = fs::remove_dir_all(&path) {
                    log::warn!("cannot remove {}: {err}", path.display());
                }
            } else if name.starts_with('.') && name.contains(".tmp-") {
                let _ = fs::remove_file(&path);
            }
        }
    }

    fn link_name(&self, name: &str) -> Option<String> {
        let target = fs::read_link(self.models().join(name)).ok()?;
        Some(target.file_name()?.to_string_lossy().into_owned())
    }

    fn link(&self, name: &str) -> Option<PathBuf> {
        let target = fs::read_link(self.models().join(name)).ok()?;
        let dir = self.models().join(target);
        dir.join(MANIFEST).is_file().then_some(dir)
    }

    /// The active installed model's manifest, if any (else the factory model serves).
    pub fn current(&self) -> Option<PathBuf> {
        self.link("current").map(|d| d.join(MANIFEST))
    }

    /// Points `name` at `dir` (a folder name in models/) with an atomic rename.
    fn set_link(&self, name: &str, dir: Option<&str>) -> Result<(), InstallError> {
        let models = self.models();
        let link = models.join(name);
        match dir {
            Some(dir) => {
                let tmp = models.join(format!(".{name}.tmp-{}-{}", std::process::id(), next_seq()));
                let _ = fs::remove_file(&tmp);
                std::os::unix::fs::symlink(dir, &tmp).map_err(io_err(&tmp))?;
                fs::rename(&tmp, &link).map_err(io_err(&link))?;
            }
            None => match fs::remove_file(&link) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io_err(&link)(e));
                }
                _ => {}
            },
        }
        fsync_dir(&models)
    }

    /// The install history, oldest first, the current model last, reconciled with the
    /// `current` link (which decides what serves): a crash between swapping the link and
    /// writing the history is repaired here. A store from before the history starts from its
    /// `previous` and `current` links.
    fn read_history(&self) -> Vec<String> {
        let path = self.models().join(HISTORY);
        let mut h: Vec<String> = match read_bounded(&path, MAX_MANIFEST_BYTES, "history") {
            Ok(b) => String::from_utf8_lossy(&b)
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('.') && !l.contains('/'))
                .map(String::from)
                .collect(),
            Err(_) => self.link_name("previous").into_iter().collect(),
        };
        match self.link_name("current") {
            // The factory model serves: nothing to roll back to.
            None => h.clear(),
            Some(c) => match h.iter().rposition(|e| *e == c) {
                Some(i) => h.truncate(i + 1),
                None => h.push(c),
            },
        }
        h
    }

    /// Writes the history (tmp + fsync + rename) and points `previous` at where `rollback`
    /// goes, for people and older tools reading the links.
    fn write_history(&self, h: &[String]) -> Result<(), InstallError> {
        let models = self.models();
        let tmp = models.join(format!(
            ".{HISTORY}.tmp-{}-{}",
            std::process::id(),
            next_seq()
        ));
        let mut text = h.join("\n");
        text.push('\n');
        write_synced(&tmp, text.as_bytes(), 0o644)?;
        let path = models.join(HISTORY);
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        fsync_dir(&models)?;
        let prev = h.len().checked_sub(2).map(|i| h[i].as_str());
        self.set_link("previous", prev)
    }

    /// Installed model folders in activation order, oldest first; the last one is current.
    /// Repeated `rollback` walks this back to the factory model.
    pub fn history(&self) -> Vec<PathBuf> {
        self.read_history()
            .into_iter()
            .map(|n| self.models().join(n))
            .collect()
    }

    /// Copies, verifies and activates a bundle (its manifest path; the `.sig`, `.onnx` and
    /// self-test files lie beside it), refusing a version not newer than the current one. On
    /// failure the staged copy goes to `rejected/` with the reason, and the active model is
    /// untouched. Reinstalling the current model is a success that changes nothing.
    pub fn install(&self, manifest_path: &Path) -> Result<Installed, InstallError> {
        self.install_with(manifest_path, InstallOptions::default())
    }

    /// [`Store::install`] with options (a forced downgrade). Holds the store's lock, and
    /// prunes old models and rejected bundles afterwards.
    pub fn install_with(
        &self,
        manifest_path: &Path,
        opts: InstallOptions,
    ) -> Result<Installed, InstallError> {
        let _lock = self.lock()?;
        let result = self.install_locked(manifest_path, opts);
        self.prune_locked();
        result
    }

    fn install_locked(
        &self,
        manifest_path: &Path,
        opts: InstallOptions,
    ) -> Result<Installed, InstallError> {
        let staging = self.models().join(format!(
            ".staging-{}-{}-{}",
            std::process::id(),
            unix_ms(),
            next_seq()
        ));
        fs::create_dir(&staging).map_err(io_err(&staging))?;
        let result = self
            .stage_and_verify(manifest_path, &staging)
            .and_then(|v| {
                let name = folder_name(v.segmenter.manifest());
                self.check_newer(manifest_path, v.segmenter.manifest(), &name, opts)?;
                Ok((v, name))
            });
        let (v, name) = match result {
            Ok(ok) => ok,
            Err(e) => {
                self.reject(&staging, manifest_path, &e);
                return Err(e);
            }
        };
        let m = v.segmenter.manifest();
        let dir = self.models().join(&name);
        let installed = Installed {
            manifest: dir.join(MANIFEST),
            label: format!(
                "{} {} ({})",
                m.model.name, m.model.version, m.model.precision
            ),
            key: v.key.id(),
            selftest_iou: v.selftest_iou,
        };
        if dir.join(MANIFEST).is_file() {
            // The same model is already in the store: keep the copy verified in place.
            let _ = fs::remove_dir_all(&staging);
            if self.link_name("current").as_deref() == Some(name.as_str()) {
                return Ok(installed);
            }
        } else {
            let _ = fs::remove_dir_all(&dir);
            fs::rename(&staging, &dir).map_err(io_err(&dir))?;
            fsync_dir(&self.models())?;
        }
        // Read before the link moves, so the reconciliation sees the old current.
        let mut history = self.read_history();
        history.push(name.clone());
        self.set_link("current", Some(name.as_str()))?;
        self.write_history(&history)?;
        Ok(installed)
    }

    /// Refuses a downgrade or replay: the bundle's version must be newer than the current
    /// model's, both `MAJOR.MINOR.PATCH`, unless forced.
    fn check_newer(
        &self,
        src: &Path,
        m: &Manifest,
        name: &str,
        opts: InstallOptions,
    ) -> Result<(), InstallError> {
        if opts.allow_downgrade || self.link_name("current").as_deref() == Some(name) {
            return Ok(());
        }
        let new = parse_version(&m.model.version).ok_or_else(|| InstallError::Version {
            path: src.to_path_buf(),
            version: m.model.version.clone(),
        })?;
        let Some(cur_path) = self.current() else {
            return Ok(());
        };
        let cur = match load_manifest(&cur_path) {
            Ok(c) => c,
            Err(e) => {
                // It cannot serve either (verification reads the same file): nothing to protect.
                log::warn!("current model unreadable ({e}); not comparing versions");
                return Ok(());
            }
        };
        let old = parse_version(&cur.model.version).ok_or_else(|| InstallError::Version {
            path: cur_path.clone(),
            version: cur.model.version.clone(),
        })?;
        if new <= old {
            return Err(InstallError::NotNewer {
                new: m.model.version.clone(),
                current: cur.model.version.clone(),
                current_dir: cur_path.parent().unwrap_or(&cur_path).to_path_buf(),
            });
        }
        Ok(())
    }

    fn stage_and_verify(&self, src: &Path, staging: &Path) -> Result<Verified, InstallError> {
        let staged = staging.join(MANIFEST);
        // The manifest is read once: what is parsed here is what is copied and verified.
        let bytes = read_bounded(src, MAX_MANIFEST_BYTES, "manifest")?;
        write_synced(&staged, &bytes, 0o644)?;
        let sig = sig_path(src);
        match read_bounded(&sig, MAX_MANIFEST_BYTES, "signature") {
            Ok(s) => write_synced(&sig_path(&staged), &s, 0o644)?,
            // Verification says it is unsigned.
            Err(InstallError::Io { error: source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        // Copy what the manifest names, if it parses; verification says what is wrong.
        if let Ok(m) = Manifest::parse(&String::from_utf8_lossy(&bytes), src) {
            let dir = src.parent().unwrap_or(Path::new("."));
            for (n, cap, what) in named_files(&m) {
                copy_bounded(&dir.join(&n), &staging.join(&n), cap, what)?;
            }
        }
        fsync_dir(staging)?;
        verify(&staged, &self.keys)
    }

    fn reject(&self, staging: &Path, src: &Path, e: &InstallError) {
        let stem = src
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let base = format!("{}-{}", unix_ms(), sanitize(&stem));
        let mut dest = self.rejected().join(&base);
        // Two refusals of one name within a millisecond must not collide.
        for i in 1.. {
            if fs::symlink_metadata(&dest).is_err() {
                break;
            }
            dest = self.rejected().join(format!("{base}-{i}"));
        }
        log::warn!("{} refused: {e}", src.display());
        let _ = fs::write(
            staging.join("reason.txt"),
            format!("{}\nfrom {}\n", e, src.display()),
        );
        if let Err(err) = fs::rename(staging, &dest) {
            log::warn!("cannot move {} aside: {err}", staging.display());
            let _ = fs::remove_dir_all(staging);
        }
    }

    /// Installs every bundle in `incoming/` (oldest name first) and empties it; what failed is
    /// in `rejected/`. Returns each manifest with its outcome; the last success is active.
    /// Never a downgrade. Every manifest is read first and each file is removed only once
    /// every bundle that names it has been handled, so one bundle's refusal cannot take a file
    /// another bundle of the same drop shares.
    pub fn install_incoming(&self) -> Vec<(PathBuf, Result<Installed, InstallError>)> {
        let inc = self.incoming();
        let _lock = match self.lock() {
            Ok(l) => l,
            Err(e) => return vec![(inc, Err(e))],
        };
        let mut manifests: Vec<PathBuf> = fs::read_dir(&inc)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        manifests.sort();
        // Claim each bundle's files before anything is removed.
        let bundles: Vec<(PathBuf, Vec<PathBuf>)> = manifests
            .into_iter()
            .map(|m| {
                let mut files = vec![m.clone(), sig_path(&m)];
                if let Ok(man) = load_manifest(&m) {
                    files.extend(named_files(&man).into_iter().map(|(n, ..)| inc.join(n)));
                }
                (m, files)
            })
            .collect();
        let mut claims: HashMap<PathBuf, usize> = HashMap::new();
        for f in bundles.iter().flat_map(|(_, files)| files) {
            *claims.entry(f.clone()).or_default() += 1;
        }
        let mut out = Vec::new();
        for (m, files) in bundles {
            let result = self.install_locked(&m, InstallOptions::default());
            // The bundle now lives in models/ or rejected/: drop what nobody else needs.
            for f in files {
                let left = claims.get_mut(&f).map(|c| {
                    *c -= 1;
                    *c
                });
                if left == Some(0) {
                    let _ = fs::remove_file(&f);
                }
            }
            out.push((m, result));
        }
        self.prune_locked();
        out
    }

    /// Installed models, folder name order.
    pub fn list(&self) -> Vec<Entry> {
        let history = self.read_history();
        let steps = |name: &str| history.iter().rev().position(|h| h == name);
        let mut v: Vec<Entry> = fs::read_dir(self.models())
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_type().is_ok_and(|t| t.is_dir())
                    && !e.file_name().to_string_lossy().starts_with('.')
            })
            .map(|e| {
                let dir = e.path();
                let manifest = dir.join(MANIFEST);
                let label = match load_manifest(&manifest) {
                    Ok(m) => format!(
                        "{} {} ({})",
                        m.model.name, m.model.version, m.model.precision
                    ),
                    Err(e) => format!("unreadable: {e}"),
                };
                let rollback_steps = steps(&e.file_name().to_string_lossy());
                Entry {
                    current: rollback_steps == Some(0),
                    previous: rollback_steps == Some(1),
                    rollback_steps,
                    dir,
                    manifest,
                    label,
                }
            })
            .collect();
        v.sort_by(|a, b| a.dir.cmp(&b.dir));
        v
    }

    /// Makes the model installed before the current one current again, one step back in the
    /// history each time; past the first one, the factory model serves. A model whose folder
    /// is gone or broken is skipped. Returns the manifest now active, if any.
    pub fn rollback(&self) -> Result<Option<PathBuf>, InstallError> {
        let _lock = self.lock()?;
        let mut h = self.read_history();
        h.pop();
        while h
            .last()
            .is_some_and(|n| !self.models().join(n).join(MANIFEST).is_file())
        {
            h.pop();
        }
        let now = h.last().cloned();
        self.set_link("current", now.as_deref())?;
        self.write_history(&h)?;
        Ok(now.map(|n| self.models().join(n).join(MANIFEST)))
    }

    /// Prunes old models beyond `[update] keep_models` and rejected bundles beyond
    /// `keep_rejected`, under the lock (installs do this themselves).
    pub fn prune(&self) -> Result<(), InstallError> {
        let _lock = self.lock()?;
        self.prune_locked();
        Ok(())
    }

    /// Keeps `keep_models` model folders: the current model and the ones the next rollbacks
    /// reach first, then the newest others; removes the rest (the factory model lives outside
    /// the store), the history entries rollback could no longer reach, and all but the newest
    /// `keep_rejected` refusals.
    /// Best effort: a failure is logged and the store stays usable.
    fn prune_locked(&self) {
        let mut history = self.read_history();
        let mut keep: Vec<String> = Vec::new();
        for n in history.iter().rev() {
            if keep.len() == self.keep_models {
                break;
            }
            if !keep.contains(n) {
                keep.push(n.clone());
            }
        }
        // Other folders (rolled back past, or from before the history): newest first.
        let mut others: Vec<(std::time::SystemTime, String)> = fs::read_dir(self.models())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                (e, n)
            })
            .filter(|(_, n)| !n.starts_with('.') && !keep.contains(n))
            .map(|(e, n)| {
                let t = e.metadata().and_then(|m| m.modified());
                (t.unwrap_or(std::time::UNIX_EPOCH), n)
            })
            .collect();
        others.sort_by(|a, b| b.cmp(a));
        let room = self.keep_models.saturating_sub(keep.len());
        for (_, name) in others.into_iter().skip(room) {
            let path = self.models().join(&name);
            log::info!("pruning old model {}", path.display());
            if let Err(err) = fs::remove_dir_all(&path) {
                log::warn!("cannot prune {}: {err}", path.display());
            }
        }
        let before = history.len();
        history.retain(|n| keep.contains(n));
        if history.len() != before
            && let Err(e) = self.write_history(&history)
        {
            log::warn!("{e}");
        }
        // Names start with the refusal's Unix milliseconds: name order is age order.
        let mut rejected: Vec<PathBuf> = fs::read_dir(self.rejected())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        rejected.sort();
        let drop = rejected.len().saturating_sub(self.keep_rejected);
        for p in &rejected[..drop] {
            let r = if p.is_dir() && !p.is_symlink() {
                fs::remove_dir_all(p)
            } else {
                fs::remove_file(p)
            };
            if let Err(err) = r {
                log::warn!("cannot prune {}: {err}", p.display());
            }
        }
    }
}

/// The folder an installed model gets: `<name>-<version>-<precision>-<sha8>`.
fn folder_name(m: &Manifest) -> String {
    sanitize(&format!(
        "{}-{}-{}-{}",
        m.model.name,
        m.model.version,
        m.model.precision,
        &m.model.sha256[..8]
    ))
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Milliseconds since the Unix epoch (0 if the clock is before it), for unique file names.
pub(crate) fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// Adds a self-test to a manifest (see [`selftest::attach_selftest`]); the trainer calls it
/// through the model crate.
pub fn attach_selftest(
    manifest_path: &Path,
    image: &image::RgbImage,
    min_iou: f64,
) -> Result<f64, InstallError> {
    Ok(selftest::attach_selftest(manifest_path, image, min_iou)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically_and_odd_ones_do_not_parse() {
        assert_eq!(parse_version("1.10.0"), Some((1, 10, 0)));
        assert!(parse_version("1.10.0") > parse_version("1.9.9"));
        assert!(parse_version("2.0.0") > parse_version("1.99.99"));
        for v in [
            "",
            "1",
            "1.2",
            "1.2.3.4",
            "v1.2.3",
            "1.2.3-rc1",
            "1..3",
            "1.2.x",
            " 1.2.3",
            "+1.2.3",
        ] {
            assert_eq!(parse_version(v), None, "{v:?}");
        }
    }

    #[test]
    fn a_fifo_or_a_link_is_refused_without_blocking_and_reads_are_capped() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("p");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        // A plain open of a FIFO with no writer blocks forever: this must return at once.
        let err = read_bounded(&fifo, 10, "manifest").unwrap_err();
        assert!(
            matches!(err, InstallError::NotRegular { kind: "FIFO", .. }),
            "{err}"
        );
        let real = d.path().join("r");
        std::fs::write(&real, b"0123456789x").unwrap();
        let link = d.path().join("l");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = read_bounded(&link, 100, "manifest").unwrap_err();
        assert!(err.to_string().contains("is a symlink"), "{err}");
        let err = read_bounded(d.path(), 100, "manifest").unwrap_err();
        assert!(err.to_string().contains("is a folder"), "{err}");
        let err = read_bounded(&real, 10, "manifest").unwrap_err();
        assert!(
            matches!(err, InstallError::TooLarge { size: 11, .. }),
            "{err}"
        );
        assert_eq!(read_bounded(&real, 11, "manifest").unwrap().len(), 11);
    }
}
