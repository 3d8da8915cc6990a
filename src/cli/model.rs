//! `polypwatch model`: field updates (install signed models, list them, roll back).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use polypwatch::config::Config;

/// Arguments of `model`.
#[derive(clap::Args)]
pub struct Args {
    /// What to do.
    #[command(subcommand)]
    pub action: Action,
}

/// The configuration a board's service runs with.
pub const DEFAULT_CONFIG: &str = "/etc/polypwatch/polypwatch.toml";

/// `model`'s actions.
#[derive(clap::Subcommand)]
pub enum Action {
    /// Verify and install signed model bundles (manifest .toml, with its .sig, .onnx and
    /// self-test files beside it) and make the last one current. The running daemon switches
    /// on `systemctl reload polypwatch`.
    Install {
        /// Daemon configuration (its [update] section names the store and trusted keys).
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Manifests (or their .onnx files) to install.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Install even a version not newer than the current one (a deliberate downgrade);
        /// without it, and always on daemon reloads, such a bundle is refused.
        #[arg(long)]
        allow_downgrade: bool,
    },
    /// List installed models: current (*), previous (-, where `rollback` goes), and the
    /// factory model.
    List {
        /// Daemon configuration.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Make the previous model current again; repeated, walk back through the install
    /// history to the factory model.
    Rollback {
        /// Daemon configuration.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

fn open_store(config: &Path) -> Result<(Config, polypwatch::store::Store)> {
    let cfg = Config::load(config)?;
    let u = cfg.update.clone().with_context(|| {
        format!(
            "{} has no [update] section: add state_dir and trusted_keys to enable field updates",
            config.display()
        )
    })?;
    let store = polypwatch::store::Store::open(&u)?;
    Ok((cfg, store))
}

/// Runs the subcommand.
pub fn run(args: Args) -> Result<()> {
    let action = args.action;
    const RELOAD: &str = "the running daemon switches on `systemctl reload polypwatch`";
    match action {
        Action::Install {
            config,
            files,
            allow_downgrade,
        } => {
            let (_, store) = open_store(&config)?;
            let opts = polypwatch::store::InstallOptions { allow_downgrade };
            let mut failed = 0;
            for f in files {
                let manifest = if f.extension().is_some_and(|e| e == "onnx") {
                    f.with_extension("toml")
                } else {
                    f.clone()
                };
                match store.install_with(&manifest, opts) {
                    Ok(i) => println!(
                        "installed {}: {} signed by {}, self-test IoU {:.4}; now current",
                        f.display(),
                        i.label,
                        i.key,
                        i.selftest_iou
                    ),
                    Err(e) => {
                        failed += 1;
                        eprintln!(
                            "polypwatch: {} refused: {e} (copy kept in {})",
                            f.display(),
                            store.rejected().display()
                        );
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} model(s) refused; the active model is unchanged by them");
            }
            println!("{RELOAD}");
        }
        Action::List { config } => {
            let (cfg, store) = open_store(&config)?;
            let entries = store.list();
            let any_current = entries.iter().any(|e| e.current);
            for e in &entries {
                let mark = if e.current {
                    '*'
                } else if e.previous {
                    '-'
                } else {
                    ' '
                };
                let back = match e.rollback_steps {
                    Some(n) if n > 1 => format!("  ({n} rollbacks back)"),
                    _ => String::new(),
                };
                println!("{mark} {}  {}{back}", e.label, e.dir.display());
            }
            println!(
                "{} factory  {}",
                if any_current { ' ' } else { '*' },
                cfg.model.manifest.display()
            );
        }
        Action::Rollback { config } => {
            let (cfg, store) = open_store(&config)?;
            match store.rollback()? {
                Some(m) => println!("current model is now {}", m.display()),
                None => println!(
                    "no previous model: the factory model {} is current",
                    cfg.model.manifest.display()
                ),
            }
            println!("{RELOAD}");
        }
    }
    Ok(())
}
