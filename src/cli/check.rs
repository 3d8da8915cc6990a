//! `polypwatch check`: check a configuration (and the model it names) without running.

use std::path::PathBuf;

use anyhow::{Result, bail};
use polypwatch::config::Config;
use polypwatch::detect::DetectOverrides;

use super::load_model;

/// Arguments of `check`.
#[derive(clap::Args)]
pub struct Args {
    /// Configuration file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Or just a model manifest.
    #[arg(long)]
    pub model: Option<PathBuf>,
}

/// Runs the subcommand.
pub fn run(args: Args) -> Result<()> {
    let (config, model) = (args.config, args.model);
    let (manifest, overrides, installed) = match (&config, model) {
        (Some(c), None) => {
            let cfg = Config::load(c)?;
            println!("config {}: ok", c.display());
            // Check the model that would serve: the store's current one when it verifies,
            // as the daemon decides at start.
            let mut installed = None;
            if let Some(u) = &cfg.update {
                let store = polypwatch::store::Store::open(u)?;
                if let Some(cur) = store.current() {
                    match polypwatch::store::verify(&cur, store.keys()) {
                        Ok(v) => {
                            println!(
                                "installed model {}: signed by {}, self-test IoU {:.4}: serves instead of the factory model",
                                cur.display(),
                                v.key.id(),
                                v.selftest_iou
                            );
                            installed = Some((cur, v.segmenter));
                        }
                        Err(e) => println!(
                            "installed model {} fails verification ({e}): the daemon would serve the factory model",
                            cur.display()
                        ),
                    }
                }
            }
            (cfg.model.manifest, cfg.detect, installed)
        }
        (None, Some(m)) => (m, DetectOverrides::default(), None),
        _ => bail!("give exactly one of --config FILE or --model MANIFEST"),
    };
    let (manifest, seg) = match installed {
        Some(i) => i,
        None => {
            let seg = load_model(&manifest)?;
            (manifest, seg)
        }
    };
    let m = seg.manifest();
    println!(
        "model {}: {} {} ({}), {} input {}x{}, threshold {}: ok",
        manifest.display(),
        m.model.name,
        m.model.version,
        m.model.architecture,
        m.model.precision,
        m.preprocess.width,
        m.preprocess.height,
        m.output.threshold
    );
    let resolved = overrides
        .resolve(m.detect.as_ref(), m.output.threshold)
        .map_err(|e| anyhow::anyhow!("{e}; change [detect] in the config"))?;
    match &m.detect {
        Some(p) => println!(
            "operating point of the model: validation frame sensitivity {:.4}, specificity {:.4} ({} polyp, {} polyp-free frames)",
            p.val_sensitivity, p.val_specificity, p.val_polyp_frames, p.val_free_frames
        ),
        None => println!("the model has no operating point ([detect] in its manifest)"),
    }
    println!("effective [detect]:");
    for (key, value, origin) in resolved.origins {
        println!("  {key:<16} = {value:<8} ({origin})");
    }
    Ok(())
}
