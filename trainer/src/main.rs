use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use polypwatch_train::eval;
use polypwatch_train::export::{self, ExportOptions};
use polypwatch_train::train::{self, Backend, RunDir, TrainOptions};

/// Train, evaluate and export the polypwatch DeepLabv3+ polyp segmentation model.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train (or resume) a model from a TOML configuration.
    Train {
        /// Training configuration (see trainer/configs/).
        #[arg(long)]
        config: PathBuf,
        /// Run folder for checkpoints, metrics.csv and curves.png [default: runs/<config name>].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue the run in --out from its last checkpoint.
        #[arg(long)]
        resume: bool,
        /// Compute backend.
        #[arg(long, value_enum, default_value = "flex")]
        backend: Backend,
        /// Dataset folder, overriding [data] root.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Number of epochs, overriding [train] epochs.
        #[arg(long)]
        epochs: Option<usize>,
        /// Start from these weights, overriding [train] init: an earlier run's best.bpk, or an
        /// f32 .onnx exported from this architecture (batch norm recalibrated on 64 training
        /// images).
        #[arg(long)]
        init: Option<PathBuf>,
        /// Use at most N training images (smoke runs).
        #[arg(long)]
        max_images: Option<usize>,
        /// Stop after N epochs of this invocation; continue later with --resume.
        #[arg(long)]
        stop_after: Option<usize>,
        /// No progress bars.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Evaluate a run on its train, validation and test sets.
    Eval {
        /// Run folder.
        #[arg(long)]
        run: PathBuf,
        /// `best`, `last` or a .bpk file.
        #[arg(long, default_value = "best")]
        weights: String,
        /// Dataset folder, overriding the run's.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Where to write the JSON [default: <run>/eval.json].
        #[arg(long)]
        json: Option<PathBuf>,
        /// Compute backend.
        #[arg(long, value_enum, default_value = "flex")]
        backend: Backend,
        /// No progress bars.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Export a run's model to ONNX with its manifest, verified through tract.
    Export {
        /// Run folder.
        #[arg(long)]
        run: PathBuf,
        /// `best`, `last` or a .bpk file.
        #[arg(long, default_value = "best")]
        weights: String,
        /// Output folder.
        #[arg(long, default_value = "models")]
        out: PathBuf,
        /// Model name (file prefix).
        #[arg(long, default_value = "polypwatch-edge")]
        name: String,
        /// Model version.
        #[arg(long, default_value = "0.1.0")]
        version: String,
        /// Dataset folder, overriding the run's.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Validation images used to verify the export (and to time it).
        #[arg(long, default_value_t = 16)]
        verify_images: usize,
        /// Skip the int8 variant.
        #[arg(long)]
        no_int8: bool,
        /// Training images used to calibrate the int8 variant.
        #[arg(long, default_value_t = 32)]
        calib_images: usize,
    },
    /// Time training steps of a configuration's network on a fixed synthetic batch (threads:
    /// RAYON_NUM_THREADS); bench/train_compare.sh runs it beside PyTorch.
    Bench {
        /// Training configuration (network, batch size, crop, loss, Adam).
        #[arg(long)]
        config: PathBuf,
        /// Untimed steps first.
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// Timed steps.
        #[arg(long, default_value_t = 30)]
        steps: usize,
        /// Burn's own convolution and batch-norm training kernels instead of polypwatch's.
        #[arg(long)]
        burn_kernels: bool,
        /// Compute backend.
        #[arg(long, value_enum, default_value = "flex")]
        backend: Backend,
        /// Seed of the weights and the batch.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Print the report as JSON (with every step's loss).
        #[arg(long)]
        json: bool,
    },
    /// Create an ed25519 key pair for signing models: FILE (secret) and FILE.pub.
    Keygen {
        /// Secret key file to create (never overwritten).
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign model manifests: writes MANIFEST.sig beside each.
    Sign {
        /// Secret key file from keygen.
        #[arg(long)]
        key: PathBuf,
        /// Manifests to sign.
        #[arg(required = true)]
        manifests: Vec<PathBuf>,
    },
    /// Add (or replace) a manifest's self-test frame: the model's mask for IMAGE, which a
    /// device must reproduce before accepting the model. Sign afterwards.
    Selftest {
        /// The manifest.
        #[arg(long)]
        manifest: PathBuf,
        /// Image to use (any size; resized to the model's input).
        #[arg(long)]
        image: PathBuf,
        /// Smallest IoU the device accepts.
        #[arg(long, default_value_t = export::SELFTEST_MIN_IOU)]
        min_iou: f64,
    },
}

fn main() -> std::process::ExitCode {
    polypwatch_train::kernels::keep_freed_memory();
    match run(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line, each cause once (our errors carry a cause in their message or as
            // `source()`, never both); `Result` from `main` would print anyhow's multi-line
            // Debug form instead.
            eprintln!("polypwatch-train: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Train {
            config,
            out,
            resume,
            backend,
            data,
            epochs,
            init,
            max_images,
            stop_after,
            quiet,
        } => {
            let out = out.unwrap_or_else(|| {
                PathBuf::from("runs").join(config.file_stem().unwrap_or_default())
            });
            let state = train::train(&TrainOptions {
                config,
                out: out.clone(),
                resume,
                backend,
                data,
                epochs,
                init,
                max_images,
                stop_after,
                quiet,
            })?;
            let best = RunDir(out).best_model();
            if state.epochs_done == 0 || !best.exists() {
                // `--stop-after 0`: validated the initial weights only; nothing was trained.
                println!("done: 0 epochs trained, no weights written");
            } else {
                println!(
                    "done: {} epochs, best validation score {:.4} (polyp mean IoU, times polyp-free specificity where there are such frames) at epoch {} ({:.1} min); weights in {}",
                    state.epochs_done,
                    state.best_val_iou,
                    state.best_epoch,
                    state.train_seconds / 60.0,
                    best.display()
                );
            }
        }
        Command::Eval {
            run,
            weights,
            data,
            json,
            backend,
            quiet,
        } => {
            let rd = RunDir(run.clone());
            let scores = eval::eval(&rd, &weights, data.as_deref(), backend, quiet)?;
            eval::print_table(&scores);
            let json = json.unwrap_or_else(|| run.join("eval.json"));
            std::fs::write(&json, serde_json::to_string_pretty(&scores)?)
                .with_context(|| format!("writing {}", json.display()))?;
            eprintln!("wrote {}", json.display());
        }
        Command::Export {
            run,
            weights,
            out,
            name,
            version,
            data,
            verify_images,
            no_int8,
            calib_images,
        } => {
            let name_prefix = name.clone();
            let r = export::export(&ExportOptions {
                run,
                weights,
                out,
                name,
                version,
                data,
                verify_images,
                int8: !no_int8,
                calib_images,
            })?;
            println!(
                "f32:  {} (tract p50 {:.1} ms/frame, 1 thread)",
                r.f32_manifest.display(),
                r.latency_ms.0
            );
            if let (Some(m), Some(ms), Some(iou)) =
                (&r.int8_manifest, r.latency_ms.1, r.int8_mask_iou_vs_f32)
            {
                println!(
                    "int8: {} (tract p50 {ms:.1} ms/frame, 1 thread; {:.2}x f32; mask IoU vs f32 on validation {iou:.4})",
                    m.display(),
                    r.latency_ms.0 / ms
                );
            }
            for f in &r.frames {
                match &f.point {
                    Some(p) => println!(
                        "\n{} operating point (validation): pixel_threshold {} alert_score {} min_area {}: frame sensitivity {:.4}, specificity {:.4} ({} polyp, {} polyp-free frames)",
                        f.precision,
                        p.pixel_threshold,
                        p.alert_score,
                        p.min_area,
                        p.val_sensitivity,
                        p.val_specificity,
                        p.val_polyp_frames,
                        p.val_free_frames
                    ),
                    None => println!(
                        "\n{}: no operating point (no polyp-free frames)",
                        f.precision
                    ),
                }
                println!("{}", polypwatch_model::metrics::SetScores::TABLE_HEADER);
                for (set, rep) in f.sets.iter().filter(|(_, r)| r.masks.images > 0) {
                    println!("{}", rep.masks.table_row(set));
                }
                println!("{}", polypwatch_model::frames::EvalReport::FRAME_HEADER);
                for (set, rep) in &f.sets {
                    println!("{}", rep.frame_row(set));
                }
                if let Some(a) = f.test_roc.1 {
                    println!("AUROC of the frame score over all test sets: {a:.4}");
                }
                let stem = r
                    .f32_manifest
                    .with_file_name(format!("{name_prefix}-{}", f.precision))
                    .display()
                    .to_string();
                let json = PathBuf::from(format!("{stem}.frames.json"));
                std::fs::write(&json, serde_json::to_string_pretty(f)?)
                    .with_context(|| format!("writing {}", json.display()))?;
                let png = PathBuf::from(format!("{stem}.roc.png"));
                polypwatch_train::plot::roc(
                    &f.test_roc.0,
                    f.test_roc.1,
                    &format!("{} test frames (all sources)", f.precision),
                    &png,
                )?;
                println!("wrote {} and {}", json.display(), png.display());
            }
        }
        Command::Keygen { out } => {
            let pub_path = PathBuf::from(format!("{}.pub", out.display()));
            for p in [&out, &pub_path] {
                if p.exists() {
                    bail!("{} exists; keygen never overwrites a key", p.display());
                }
            }
            let key = polypwatch_model::signing::SecretKey::generate()?;
            write_private(&out, &key.to_text())?;
            std::fs::write(&pub_path, format!("{}\n", key.public()))
                .with_context(|| format!("writing {}", pub_path.display()))?;
            println!(
                "secret key {} (keep it off the devices), public key {}:\n{}",
                out.display(),
                pub_path.display(),
                key.public()
            );
            println!("add the public key to [update] trusted_keys in the device's config");
        }
        Command::Sign { key, manifests } => {
            let text = std::fs::read_to_string(&key)
                .with_context(|| format!("reading key {}", key.display()))?;
            let key = polypwatch_model::signing::SecretKey::parse(&text)?;
            for m in manifests {
                // Refuse to sign what the device would refuse to load.
                let manifest = polypwatch_model::manifest::Manifest::load(&m)?;
                manifest.verify_sha256(&m)?;
                if manifest.selftest.is_none() {
                    bail!(
                        "{} has no [selftest]: run `polypwatch-train selftest` first",
                        m.display()
                    );
                }
                let bytes = std::fs::read(&m)?;
                let sig = PathBuf::from(format!("{}.sig", m.display()));
                std::fs::write(&sig, key.sign(&bytes).to_text())
                    .with_context(|| format!("writing {}", sig.display()))?;
                println!(
                    "signed {} with {} -> {}",
                    m.display(),
                    key.public().id(),
                    sig.display()
                );
            }
        }
        Command::Bench {
            config,
            warmup,
            steps,
            burn_kernels,
            backend,
            seed,
            json,
        } => {
            let cfg = polypwatch_train::config::TrainConfig::load(&config)?;
            let opts = polypwatch_train::bench::BenchOptions {
                warmup,
                steps,
                burn_kernels,
                backend,
                seed,
            };
            let r = polypwatch_train::bench::bench(&cfg, &opts)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} ({} parameters), batch {} of {}x{}, {} threads, {} kernels: {:.2} images/s \
                     (median step {:.3} s over {} steps)",
                    r.architecture,
                    r.parameters,
                    r.batch,
                    r.crop,
                    r.crop,
                    r.threads,
                    r.kernels,
                    r.images_per_s,
                    r.step_s_median,
                    r.steps
                );
            }
        }
        Command::Selftest {
            manifest,
            image,
            min_iou,
        } => {
            let img = polypwatch_model::preprocess::load_rgb(&image)?;
            let iou = polypwatch_model::selftest::attach_selftest(&manifest, &img, min_iou)?;
            println!(
                "self-test added to {} (re-run IoU {iou:.4}); sign it again",
                manifest.display()
            );
        }
    }
    Ok(())
}

/// Writes a secret file readable by its owner only.
fn write_private(path: &std::path::Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}
