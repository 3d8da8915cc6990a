//! SIGHUP: install the bundles waiting in the store, re-read the configuration and load the
//! model on a thread of its own while frames keep flowing through the old engine, then swap
//! the new one in between two frames.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use super::ServiceError;
use super::alerts::AlertOutputs;
use super::engine::Engine;
use crate::alert::AlertMachine;
use crate::config::Config;
use crate::sink::{Event, EventStream, SnapshotQueue, Snapshots};
use crate::store::Store;

/// A loaded engine with the sinks its configuration asks for.
pub(super) struct Next {
    pub(super) engine: Engine,
    events: EventStream,
    snapshots: Option<SnapshotQueue>,
}

impl Next {
    /// Loads `cfg`'s model and opens its sinks; `strict`: see [`Engine::new`].
    pub(super) fn load(cfg: Config, strict: bool) -> Result<Self, ServiceError> {
        let engine = Engine::new(cfg, strict)?;
        let events = EventStream::open(&engine.cfg.events);
        let snapshots = snapshots(&engine.cfg);
        Ok(Next {
            engine,
            events,
            snapshots,
        })
    }

    /// The engine and its sinks, to start serving with.
    pub(super) fn into_parts(self) -> (Engine, EventStream, Option<SnapshotQueue>) {
        (self.engine, self.events, self.snapshots)
    }
}

fn snapshots(cfg: &Config) -> Option<SnapshotQueue> {
    cfg.snapshots
        .dir
        .clone()
        .map(|d| SnapshotQueue::spawn(Snapshots::new(d, cfg.snapshots.quota_bytes())))
}

/// What a reload prepared off the processing thread: the outcome of each incoming bundle and
/// the new engine (or why there is none).
pub(super) struct Prepared {
    installs: Vec<(String, Result<crate::store::Installed, String>)>,
    next: Result<Next, ServiceError>,
}

/// Installs the bundles waiting in the store's incoming folder, re-reads the configuration and
/// loads the model. Runs on its own thread so frames keep flowing through the old engine.
pub(super) fn prepare_reload(config_path: Option<PathBuf>, old: Config) -> Prepared {
    let mut installs = Vec::new();
    if let Some(u) = &old.update {
        match Store::open(u) {
            Ok(store) => {
                for (file, result) in store.install_incoming() {
                    let file = file
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let result = result
                        .map_err(|e| format!("{e} (moved to {})", store.rejected().display()));
                    installs.push((file, result));
                }
            }
            Err(e) => log::error!("{e}"),
        }
    }
    let cfg = match &config_path {
        Some(p) => Config::load(p),
        None => Ok(old.clone()),
    };
    let next = cfg.map_err(ServiceError::from).and_then(|cfg| {
        if cfg.source != old.source {
            log::warn!("[source] changes take effect on restart");
        }
        if cfg.gpio != old.gpio {
            log::warn!("[gpio] changes take effect on restart");
        }
        if cfg.runtime.threads != old.runtime.threads {
            log::warn!("[runtime] threads changes take effect on restart");
        }
        Next::load(cfg, true)
    });
    Prepared { installs, next }
}

/// Swaps in a prepared engine between two frames, or reports why not.
pub(super) fn apply_reload(
    p: Prepared,
    engine: &mut Engine,
    alerts: &mut AlertMachine,
    outputs: &mut AlertOutputs,
) {
    for (file, result) in p.installs {
        match result {
            Ok(i) => {
                log::info!(
                    "installed {file}: {} signed by {}, self-test IoU {:.4}",
                    i.label,
                    i.key,
                    i.selftest_iou
                );
                outputs.events().emit(&Event::ModelInstalled {
                    file,
                    model: i.label,
                    key: i.key,
                });
            }
            Err(reason) => {
                log::error!("model update {file} rejected: {reason}");
                outputs
                    .events()
                    .emit(&Event::ModelRejected { file, reason });
            }
        }
    }
    match p.next {
        Ok(mut new) => {
            alerts.reconfigure(new.engine.cfg.alert.clone());
            let label = new.engine.model_label();
            // Events keep their order across the swap: the same outputs keep their writers;
            // changed ones get the old writers' last lines out first (bounded wait).
            if new.engine.cfg.events != engine.cfg.events {
                outputs.events().flush();
                std::mem::swap(&mut new.events, outputs.events());
            }
            outputs.set_snapshots(new.snapshots);
            *engine = new.engine;
            log::info!("reloaded: model {label}");
            outputs.events().emit(&Event::Reloaded { model: label });
        }
        Err(e) => {
            log::error!(
                "reload rejected, still serving {}: {e}",
                engine.model_label()
            );
            outputs.events().emit(&Event::ReloadRejected {
                reason: e.to_string(),
            });
        }
    }
}

/// At most one reload at a time: a SIGHUP during one waits for it.
#[derive(Default)]
pub(super) struct Reloader {
    pending: Option<JoinHandle<Prepared>>,
}

impl Reloader {
    /// Starts a reload if one is `requested` and none runs; returns a finished one.
    pub(super) fn poll(
        &mut self,
        requested: &AtomicBool,
        config_path: Option<&Path>,
        engine: &Engine,
    ) -> Option<Prepared> {
        if self.pending.is_none() && requested.swap(false, Ordering::Relaxed) {
            let (path, old) = (config_path.map(Path::to_path_buf), engine.cfg.clone());
            self.pending = std::thread::Builder::new()
                .name("reload".into())
                .spawn(move || prepare_reload(path, old))
                .map_err(|e| log::error!("cannot start the reload: {e}"))
                .ok();
        }
        if !self.pending.as_ref().is_some_and(|h| h.is_finished()) {
            return None;
        }
        match self.pending.take().map(|h| h.join()) {
            Some(Ok(prepared)) => Some(prepared),
            _ => {
                log::error!(
                    "the reload failed unexpectedly; still serving {}",
                    engine.model_label()
                );
                None
            }
        }
    }
}
