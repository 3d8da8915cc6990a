//! `polypwatch run` (and `polypwatch` alone): the daemon, or the bundled demo.

use std::path::PathBuf;

use anyhow::{Context, Result};
use polypwatch::config::Config;
use polypwatch::service::{self, Control};
use polypwatch::sink;

/// Arguments of `run`.
#[derive(clap::Args, Default)]
pub struct Args {
    /// Configuration file (see polypwatch.example.toml); default: the demo.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Runs the daemon until a stop signal; with no config, the demo.
pub fn run(args: Args) -> Result<()> {
    let config = args.config;
    let cfg = match &config {
        Some(p) => Config::load(p)?,
        None => service::demo_config().context("the bundled demo configuration")?,
    };
    let sink = sink::init_logging(&cfg.events);
    log::info!(
        "polypwatch {} starting, logging to {sink}",
        env!("CARGO_PKG_VERSION")
    );
    let control = Control::default();
    control
        .install_signal_handlers()
        .context("installing signal handlers")?;
    let summary = service::run(config.as_deref(), cfg, &control)?;
    log::info!(
        "stopped: {} frames, {} dropped, {} unreadable, {} alerts; {}",
        summary.frames,
        summary.dropped,
        summary.bad_frames,
        summary.alerts,
        summary.timing
    );
    // The logger writes on its own thread: give it the last lines.
    log::logger().flush();
    Ok(())
}
