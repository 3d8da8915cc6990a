//! The training loop: augmentation, BCE + Dice loss, Adam with a poly schedule, per-epoch
//! validation, metrics.csv and curves, best/last checkpoints and bit-for-bit resume.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::activation::{relu, sigmoid};
use indicatif::{ProgressBar, ProgressStyle};
use polypwatch_model::detect::{DetectConfig, Detector};
use polypwatch_model::frames::{FrameRegions, Grid, choose_operating_point};
use polypwatch_model::metrics::{Accumulator, ImageScores, SetScores};
use polypwatch_model::model::sigmoid as sigmoid_f32;
use polypwatch_model::preprocess::Recipe;
use rand::seq::SliceRandom;
use rand::{SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};

use crate::config::{SourceConfig, TrainConfig};
use crate::data::{self, Item, Set};
use crate::model::DeepLab;
use crate::operating::TARGET_SPECIFICITY;
use crate::plot;

/// Decision threshold on the probability used for validation metrics.
pub const THRESHOLD: f32 = 0.5;

/// Which Burn backend runs the computation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// burn-flex: the fast pure-Rust CPU backend (default).
    Flex,
    /// burn-ndarray (deprecated in Burn 0.22, slower; build with `--features ndarray`).
    Ndarray,
    /// burn-cuda on an NVIDIA GPU (build with `--features cuda`).
    Cuda,
    /// LibTorch on the CPU (build with `--features tch` against an installed PyTorch).
    Tch,
    /// LibTorch on the first CUDA GPU (build with `--features tch` against a CUDA PyTorch).
    TchCuda,
}

impl Backend {
    /// The device for this backend, without autodiff.
    pub fn device(self) -> Result<Device> {
        match self {
            Backend::Flex => Ok(Device::flex()),
            #[cfg(feature = "ndarray")]
            #[allow(deprecated)]
            Backend::Ndarray => Ok(Device::ndarray()),
            #[cfg(feature = "cuda")]
            Backend::Cuda => Ok(Device::cuda(0)),
            // burn-tch is deprecated in Burn 0.22 but still the one GPU path that builds
            // offline (against an installed PyTorch); README "Training speed".
            #[cfg(feature = "tch")]
            #[allow(deprecated)]
            Backend::Tch => Ok(Device::libtorch()),
            #[cfg(feature = "tch")]
            #[allow(deprecated)]
            Backend::TchCuda => Ok(Device::libtorch_cuda(0)),
            #[allow(unreachable_patterns)]
            other => {
                let feature = match other {
                    Backend::Tch | Backend::TchCuda => "tch",
                    Backend::Cuda => "cuda",
                    _ => "ndarray",
                };
                bail!(
                    "backend {other:?} is not compiled in: rebuild polypwatch-train with `--features {feature}`"
                )
            }
        }
    }
}

/// Options of `polypwatch-train train`.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// The configuration file.
    pub config: PathBuf,
    /// The run folder (checkpoints, metrics, curves).
    pub out: PathBuf,
    /// Continue from the run folder's last checkpoint.
    pub resume: bool,
    /// Backend.
    pub backend: Backend,
    /// Overrides `[data] root`.
    pub data: Option<PathBuf>,
    /// Overrides `[train] epochs`.
    pub epochs: Option<usize>,
    /// Overrides `[train] init` (weights to start from).
    pub init: Option<PathBuf>,
    /// Uses at most this many training (and validation) images: for smoke runs.
    pub max_images: Option<usize>,
    /// Stop after this many epochs of this invocation, as if killed (resume later).
    pub stop_after: Option<usize>,
    /// Hide progress bars (logs and CI).
    pub quiet: bool,
}

/// What a run folder remembers between epochs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunState {
    /// Epochs completed.
    pub epochs_done: usize,
    /// Optimiser steps taken.
    pub steps_done: usize,
    /// Best validation selection score so far ([`Validation::select`]).
    pub best_val_iou: f64,
    /// Epoch (1-based) of the best checkpoint.
    pub best_epoch: usize,
    /// Training wall time so far, seconds.
    pub train_seconds: f64,
}

/// Files of a run folder.
pub struct RunDir(pub PathBuf);

impl RunDir {
    /// The effective configuration.
    pub fn config(&self) -> PathBuf {
        self.0.join("config.toml")
    }
    /// The checkpoint to resume from.
    pub fn last(&self) -> PathBuf {
        self.0.join("last")
    }
    /// The best model by validation mean IoU.
    pub fn best_model(&self) -> PathBuf {
        self.0.join("best.bpk")
    }
    /// Per-epoch metrics.
    pub fn metrics_csv(&self) -> PathBuf {
        self.0.join("metrics.csv")
    }
}

/// BCE-with-logits plus soft Dice (per image, smoothed by 1), weighted. With `beta` other than
/// 0.5 the Dice term is a Tversky one, `1 - (2 TP + 1) / (2 TP + 2 (1 - beta) FP + 2 beta FN +
/// 1)`, which is soft Dice at 0.5 (computed as such, so runs without it keep their bits).
pub fn loss(logits: Tensor<4>, target: Tensor<4>, bce_w: f64, dice_w: f64, beta: f64) -> Tensor<1> {
    let n = logits.dims()[0];
    // max(x, 0) - x y + log(1 + exp(-|x|)): stable for large |x|.
    let bce = (relu(logits.clone()) - logits.clone() * target.clone()
        + logits.clone().abs().neg().exp().log1p())
    .mean();
    let p = sigmoid(logits).reshape([n as i32, -1]);
    let t = target.reshape([n as i32, -1]);
    let inter = (p.clone() * t.clone()).sum_dim(1);
    let denominator = if beta == 0.5 {
        p.sum_dim(1) + t.sum_dim(1)
    } else {
        let (fp, fn_) = (p.sum_dim(1) - inter.clone(), t.sum_dim(1) - inter.clone());
        inter.clone().mul_scalar(2.0)
            + fp.mul_scalar(2.0 * (1.0 - beta))
            + fn_.mul_scalar(2.0 * beta)
    };
    let dice = (inter.mul_scalar(2.0).add_scalar(1.0) / denominator.add_scalar(1.0))
        .neg()
        .add_scalar(1.0)
        .mean();
    bce.mul_scalar(bce_w) + dice.mul_scalar(dice_w)
}

/// Polyp logits (H x W each) of a set of items, in batches, in inference mode.
pub fn predict_logits(
    model: &DeepLab,
    items: &[Item],
    recipe: &Recipe,
    device: &Device,
) -> Vec<Vec<f32>> {
    let device = device.clone().inner();
    let model = model.valid().to_device(&device);
    let plane = (recipe.height * recipe.width) as usize;
    let mut out = Vec::with_capacity(items.len());
    for chunk in items.chunks(8) {
        let imgs: Vec<_> = chunk.iter().map(|i| i.image.clone()).collect();
        let masks: Vec<&[u8]> = chunk.iter().map(|i| i.mask.as_slice()).collect();
        let (x, _) = data::batch(&imgs, &masks, recipe, &device);
        let v: Vec<f32> = model
            .forward(x)
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("f32");
        out.extend(v.chunks(plane).map(|c| c.to_vec()));
    }
    out
}

/// Scores a set of items with the library's metrics.
pub fn evaluate(model: &DeepLab, items: &[Item], recipe: &Recipe, device: &Device) -> SetScores {
    let logits = predict_logits(model, items, recipe, device);
    let mut acc = Accumulator::default();
    for (l, item) in logits.iter().zip(items) {
        let p: Vec<f32> = l.iter().map(|&v| sigmoid_f32(v)).collect();
        acc.push(&ImageScores::compute(&p, THRESHOLD, &item.mask));
    }
    acc.finish()
}

/// One epoch's validation over every source.
pub struct Validation {
    /// Mask metrics over the polyp sources' validation images together.
    pub polyp: SetScores,
    /// Frame specificity on the polyp-free validation images under the daemon's default
    /// detect settings, if there are any.
    pub specificity: Option<f64>,
    /// Frame sensitivity at the operating point `export` would choose now: the highest over
    /// the grid at frame specificity >= [`TARGET_SPECIFICITY`] on the polyp-free validation
    /// frames (0 when no point reaches it; `None` without polyp-free frames).
    pub sensitivity: Option<f64>,
    /// What selects the best checkpoint: polyp mean IoU, times the operating-point
    /// sensitivity where there are polyp-free frames (the two targets a shipped model is held
    /// to; its specificity is fixed by the operating point).
    pub select: f64,
    /// Per-source IoU or specificity, for the log line.
    pub per_source: String,
}

/// Validates on each source: mask IoU on polyp sources, frame specificity on polyp-free ones,
/// and the operating-point sensitivity over all of them.
pub fn validate(
    model: &DeepLab,
    sets: &[(SourceConfig, Vec<Item>)],
    recipe: &Recipe,
    device: &Device,
) -> Validation {
    let detector = Detector::new(DetectConfig::default(), THRESHOLD);
    let grid = Grid::default();
    // Each frame's regions at every pixel threshold of the grid, as `export` searches them.
    let mut frames: Vec<Vec<FrameRegions>> = vec![Vec::new(); grid.pixel_thresholds.len()];
    let mut polyp = Accumulator::default();
    let (mut negatives, mut quiet) = (0usize, 0usize);
    let mut per_source = String::new();
    for (source, items) in sets {
        if items.is_empty() {
            // Nothing to score (a small smoke run's crops): no "spec 0.000" in the log.
            continue;
        }
        let logits = predict_logits(model, items, recipe, device);
        let mut acc = Accumulator::default();
        let mut q = 0;
        for (mut l, item) in logits.into_iter().zip(items) {
            // Turns `l` into probabilities.
            let mask = detector.mask(&mut l, recipe.width, recipe.height);
            for (f, &pt) in frames.iter_mut().zip(&grid.pixel_thresholds) {
                f.push(FrameRegions::compute(
                    &l,
                    recipe.width,
                    recipe.height,
                    pt,
                    &item.mask,
                ));
            }
            if source.polyp_free {
                q += usize::from(!detector.detect(&l, &mask).positive);
            } else {
                let s = ImageScores::compute(&l, THRESHOLD, &item.mask);
                acc.push(&s);
                polyp.push(&s);
            }
        }
        if sets.len() > 1 {
            if source.polyp_free {
                per_source += &format!(
                    " [{} spec {:.3}]",
                    source.name,
                    q as f64 / items.len().max(1) as f64
                );
            } else {
                per_source += &format!(" [{} iou {:.3}]", source.name, acc.finish().mean_iou);
            }
        }
        if source.polyp_free {
            negatives += items.len();
            quiet += q;
        }
    }
    let polyp = polyp.finish();
    let specificity = (negatives > 0).then(|| quiet as f64 / negatives as f64);
    let sensitivity = (negatives > 0).then(|| {
        choose_operating_point(&frames, &grid, TARGET_SPECIFICITY)
            .map_or(0.0, |p| p.val_sensitivity)
    });
    Validation {
        polyp,
        specificity,
        sensitivity,
        select: polyp.mean_iou * sensitivity.unwrap_or(1.0),
        per_source,
    }
}

/// The log line's operating-point sensitivity, empty without polyp-free frames.
fn sens_text(val: &Validation) -> String {
    val.sensitivity.map_or(String::new(), |s| {
        format!(" sensitivity@{TARGET_SPECIFICITY} {s:.4}")
    })
}

fn bar(len: u64, quiet: bool, template: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(ProgressStyle::with_template(template).expect("valid template"));
    pb
}

/// Loads the items of a sample list with a progress bar.
pub fn load_with_bar(
    what: &str,
    samples: &[polypwatch_model::dataset::Sample],
    recipe: &Recipe,
    quiet: bool,
) -> Result<Vec<Item>> {
    load_with_bar_crops(what, samples, recipe, false, quiet).map(|(items, _)| items)
}

/// Like [`load_with_bar`], also returning the polyp-free crops of the images when `crops`
/// (see [`data::load_items_with_crops`]).
pub fn load_with_bar_crops(
    what: &str,
    samples: &[polypwatch_model::dataset::Sample],
    recipe: &Recipe,
    crops: bool,
    quiet: bool,
) -> Result<(Vec<Item>, Vec<Item>)> {
    let pb = bar(
        samples.len() as u64,
        quiet,
        &format!("loading {what:<10} [{{bar:30}}] {{pos}}/{{len}} {{eta}}"),
    );
    let side = crops.then_some(data::FREE_CROP_MIN_SIDE);
    let out = data::load_items_with_crops(samples, recipe, side, || pb.inc(1))?;
    pb.finish_and_clear();
    Ok(out)
}

/// A polyp source's polyp-free crops, validated as a polyp-free set of their own.
fn crops_source(source: &SourceConfig) -> SourceConfig {
    SourceConfig {
        name: format!("{}-free", source.name),
        polyp_free: true,
        free_crops: false,
        ..source.clone()
    }
}

fn save_checkpoint(
    run: &RunDir,
    model: &DeepLab,
    optim_bytes: burn::tensor::Bytes,
    state: &RunState,
) -> Result<()> {
    // Write the new checkpoint beside the old one, then swap, so a kill never leaves a
    // half-written `last/`.
    let tmp = run.0.join("last.tmp");
    let old = run.0.join("last.old");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    model
        .clone()
        .save_file(tmp.join("model.bpk"))
        .map_err(|e| anyhow::anyhow!("saving model: {e:?}"))?;
    std::fs::write(tmp.join("optim.bpk"), &*optim_bytes)?;
    std::fs::write(tmp.join("state.json"), serde_json::to_string_pretty(state)?)?;
    let _ = std::fs::remove_dir_all(&old);
    if run.last().exists() {
        std::fs::rename(run.last(), &old)?;
    }
    std::fs::rename(&tmp, run.last())?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

fn find_checkpoint(run: &RunDir) -> Option<PathBuf> {
    [run.last(), run.0.join("last.old")]
        .into_iter()
        .find(|p| p.join("state.json").exists())
}

/// Training images that calibrate the batch norms of a model initialised from ONNX.
pub const CALIBRATION_IMAGES: usize = 64;

/// Whether `path` names an ONNX file (by its extension).
pub fn is_onnx(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("onnx"))
}

/// Up to `n` images spread evenly over `items` (every source and the polyp-free crops, in the
/// proportions the training set has them), augmented and cropped as training draws them and
/// shuffled so that each batch mixes sources as training batches do (seeded): the batch
/// norms are calibrated on what their batch statistics will see.
pub fn calibration_images(
    items: &[Item],
    n: usize,
    augment: &crate::config::AugmentConfig,
    crop: u32,
    seed: u64,
) -> Vec<image::RgbImage> {
    let n = n.min(items.len());
    let mut rng = StdRng::seed_from_u64(seed);
    let mut images: Vec<_> = (0..n)
        .map(|i| data::augment(&items[i * items.len() / n], augment, crop, &mut rng).0)
        .collect();
    images.shuffle(&mut rng);
    images
}

/// Loads a model of `cfg` from a `.bpk` record.
pub fn load_model(cfg: &TrainConfig, path: &Path, device: &Device) -> Result<DeepLab> {
    DeepLab::new(&cfg.model, device)
        .try_load_file(path)
        .map_err(|e| anyhow::anyhow!("cannot load weights {}: {e:?}", path.display()))
}

/// Runs (or resumes) a training run.
pub fn train(opts: &TrainOptions) -> Result<RunState> {
    let run = RunDir(opts.out.clone());
    let mut cfg = TrainConfig::load(&opts.config)?;
    if let Some(root) = &opts.data {
        cfg.set_data_root(root);
    }
    if let Some(e) = opts.epochs {
        cfg.train.epochs = e;
    }
    if let Some(w) = &opts.init {
        cfg.train.init = Some(w.clone());
    }
    if let (false, Some(init)) = (opts.resume, &cfg.train.init)
        && is_onnx(init)
    {
        // Before the data loads: a wrong file is one line at once, not after minutes.
        crate::import::check_onnx(&mut DeepLab::new(&cfg.model, &Device::flex()), init)?;
    }
    std::fs::create_dir_all(&run.0).with_context(|| format!("creating {}", run.0.display()))?;
    let mut state = RunState::default();
    let checkpoint = if opts.resume {
        let ck = find_checkpoint(&run).with_context(|| {
            format!(
                "--resume: no checkpoint in {}; start without --resume",
                run.0.display()
            )
        })?;
        let saved = TrainConfig::load(&run.config())?;
        let mut cmp = saved.clone();
        cmp.train.epochs = cfg.train.epochs;
        // The checkpoint's weights replace the starting ones.
        cmp.train.init = cfg.train.init.clone();
        if let Some(root) = &opts.data {
            cmp.set_data_root(root);
        }
        if cmp != cfg {
            bail!(
                "--resume: {} differs from the run's {} (only epochs and the data path may change)",
                opts.config.display(),
                run.config().display()
            );
        }
        state = serde_json::from_str(&std::fs::read_to_string(ck.join("state.json"))?)?;
        truncate_metrics(&run.metrics_csv(), state.epochs_done)?;
        Some(ck)
    } else {
        if find_checkpoint(&run).is_some() {
            bail!(
                "{} already holds a run: pass --resume to continue it or choose another --out",
                run.0.display()
            );
        }
        None
    };
    std::fs::write(run.config(), toml::to_string_pretty(&cfg)?)?;
    // The command line, for the manifest's provenance.
    let cmd: Vec<String> = std::env::args().collect();
    append(&run.0.join("command.txt"), &format!("{}\n", cmd.join(" ")))?;

    let recipe = Recipe::square(cfg.train.input_size);
    let mut splits = data::splits(&cfg)?;
    let mut train_items = Vec::new();
    let mut groups = Vec::new();
    let mut neg_start = None;
    let (mut free_crops, mut val_crops_sets, mut crops_before) = (Vec::new(), Vec::new(), 0);
    let mut val_sets = Vec::new();
    // Polyp sources first, so the polyp-free items are one range at the end.
    splits.sort_by_key(|s| s.source.polyp_free);
    for split in &mut splits {
        if let Some(m) = opts.max_images {
            split.train.truncate(m);
            split.val.truncate(m.div_ceil(4).max(2));
        }
        let name = &split.source.name;
        for (set, names) in [
            (Set::Train, &split.train),
            (Set::Val, &split.val),
            (Set::Test, &split.test),
        ] {
            data::write_names(&run.0.join(format!("{name}.{}.txt", set.as_str())), names)?;
        }
        if cfg.data.single() {
            data::write_names(&run.0.join("train.txt"), &split.train)?;
            data::write_names(&run.0.join("val.txt"), &split.val)?;
        }
        let start = train_items.len();
        let crops = split.source.free_crops;
        let (items, train_crops) = load_with_bar_crops(
            &format!("{name} train"),
            &split.train,
            &recipe,
            crops,
            opts.quiet,
        )?;
        train_items.extend(items);
        free_crops.extend(train_crops);
        if split.source.polyp_free {
            neg_start.get_or_insert(start);
        } else {
            groups.push((start..train_items.len(), split.source.weight));
        }
        let (val, val_crops) = load_with_bar_crops(
            &format!("{name} val"),
            &split.val,
            &recipe,
            crops,
            opts.quiet,
        )?;
        val_sets.push((split.source.clone(), val));
        if crops {
            eprintln!(
                "source {name}: {} training and {} validation polyp-free crops",
                free_crops.len() - crops_before,
                val_crops.len()
            );
            val_crops_sets.push((crops_source(&split.source), val_crops));
        }
        crops_before = free_crops.len();
    }
    // The crops join the polyp-free sources' items, which end the list.
    neg_start.get_or_insert(train_items.len());
    train_items.extend(free_crops);
    val_sets.extend(val_crops_sets);
    let negatives = neg_start.unwrap_or(train_items.len())..train_items.len();
    let bs = cfg.train.batch_size.min(train_items.len());
    if bs < 2 {
        bail!(
            "need at least 2 training images, found {}",
            train_items.len()
        );
    }
    let sampler = data::Sampler::new(groups, negatives, bs, cfg.data.negative_share);

    let device = opts.backend.device()?;
    device.seed(cfg.data.seed);
    let device = device.autodiff();
    crate::kernels::set_enabled(opts.backend == Backend::Flex);
    let mut model = DeepLab::new(&cfg.model, &device);
    let mut optim = crate::kernels::adam(cfg.train.weight_decay);
    if let (None, Some(init)) = (&checkpoint, &cfg.train.init) {
        if is_onnx(init) {
            let crop = cfg.train.crop.unwrap_or(cfg.train.input_size);
            let images = calibration_images(
                &train_items,
                CALIBRATION_IMAGES,
                &cfg.augment,
                crop,
                cfg.data.seed,
            );
            let t = Instant::now();
            // The error names the file, the tensor and the fix in one line: no context added.
            let r = crate::import::init_from_onnx(&mut model, init, &images, bs, &recipe)?;
            eprintln!(
                "starting from {}: {} convolutions, {} batch norms calibrated on {} training crops in batches of {bs}, {} passes in training mode (last change {:.1e} sd; {:.1} s)",
                init.display(),
                r.convs,
                r.batch_norms,
                r.images,
                r.training_passes,
                r.last_change,
                t.elapsed().as_secs_f64()
            );
        } else {
            model = load_model(&cfg, init, &device).context(
                "[train] init must be a .bpk of this architecture (an earlier run's best.bpk) or an f32 .onnx it exported",
            )?;
            eprintln!("starting from the weights in {}", init.display());
        }
        // Epoch 0: what the run starts from, on the same validation sets as every epoch.
        let t = Instant::now();
        let val = validate(&model, &val_sets, &recipe, &device);
        eprintln!(
            "epoch   0 (init)  val dice {:.4} iou {:.4}{}{}{}  {:.0}s",
            val.polyp.mean_dice,
            val.polyp.mean_iou,
            val.specificity
                .map_or(String::new(), |s| format!(" specificity {s:.4}")),
            sens_text(&val),
            val.per_source,
            t.elapsed().as_secs_f64()
        );
    }
    if let Some(ck) = &checkpoint {
        model = load_model(&cfg, &ck.join("model.bpk"), &device)?;
        optim = optim
            .load(ck.join("optim.bpk"))
            .map_err(|e| anyhow::anyhow!("cannot load optimiser state: {e:?}"))?;
        eprintln!(
            "resuming {} after epoch {} (best validation score {:.4} at epoch {})",
            run.0.display(),
            state.epochs_done,
            state.best_val_iou,
            state.best_epoch
        );
    } else {
        std::fs::write(
            run.metrics_csv(),
            "epoch,train_loss,val_dice,val_iou,lr,images_per_s,epoch_seconds,val_specificity,val_select,val_sensitivity\n",
        )?;
    }

    let crop = cfg.train.crop.unwrap_or(cfg.train.input_size);
    let steps_per_epoch = sampler.steps_per_epoch();
    let total_steps = steps_per_epoch * cfg.train.epochs;
    eprintln!(
        "training {} ({} parameters) on {} images, validating on {}, {} epochs of {} steps",
        cfg.model.architecture(),
        model.num_params(),
        train_items.len(),
        val_sets.iter().map(|(_, v)| v.len()).sum::<usize>(),
        cfg.train.epochs,
        steps_per_epoch
    );
    let last_epoch = match opts.stop_after {
        Some(n) => (state.epochs_done + n).min(cfg.train.epochs),
        None => cfg.train.epochs,
    };
    // After the import's calibration, which needs batch statistics.
    crate::kernels::set_batch_norm_frozen(cfg.train.freeze_bn);
    if cfg.train.freeze_bn {
        eprintln!("batch norm frozen on its running statistics ([train] freeze_bn)");
    }
    for epoch in state.epochs_done..last_epoch {
        let start = Instant::now();
        // One RNG per epoch, derived from the seed: a resumed run draws the same batches.
        let mut rng = StdRng::seed_from_u64(
            cfg.data.seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let batches = sampler.epoch(&mut rng);
        let pb = bar(
            steps_per_epoch as u64,
            opts.quiet,
            &format!(
                "epoch {:>3}/{} [{{bar:30}}] {{pos}}/{{len}} {{msg}} eta {{eta}}",
                epoch + 1,
                cfg.train.epochs
            ),
        );
        let mut loss_sum = 0.0;
        let mut lr = 0.0;
        for (step, idx) in batches.iter().enumerate() {
            let (imgs, masks): (Vec<_>, Vec<_>) = idx
                .iter()
                .map(|&i| data::augment(&train_items[i], &cfg.augment, crop, &mut rng))
                .unzip();
            let mrefs: Vec<&[u8]> = masks.iter().map(|m| m.as_slice()).collect();
            let (x, y) = data::batch(&imgs, &mrefs, &recipe, &device);
            // Where a fine-tune starts, before any step: the first batch's loss with batch
            // norm on the running statistics (inference, before the training forward moves
            // them) and on the batch's own (training).
            let first_eval = (step == 0 && epoch == 0 && cfg.train.init.is_some()).then(|| {
                let inner = device.clone().inner();
                loss(
                    model.valid().to_device(&inner).forward(x.clone().inner()),
                    y.clone().inner(),
                    cfg.train.bce_weight,
                    cfg.train.dice_weight,
                    cfg.train.tversky_beta(),
                )
                .into_scalar::<f32>()
            });
            let l = loss(
                model.forward(x),
                y,
                cfg.train.bce_weight,
                cfg.train.dice_weight,
                cfg.train.tversky_beta(),
            );
            let lv: f64 = l.clone().into_scalar::<f32>() as f64;
            if let Some(eval) = first_eval {
                eprintln!(
                    "first training batch of the initial weights: loss {lv:.4} in training mode, {eval:.4} in inference"
                );
            }
            if !lv.is_finite() {
                bail!(
                    "loss became {lv} at epoch {} step {step}: lower [train] lr",
                    epoch + 1
                );
            }
            let grads = GradientsParams::from_grads(l.backward(), &model);
            lr = cfg.lr_at(epoch, state.steps_done, total_steps);
            model = optim.step(lr, model, grads);
            state.steps_done += 1;
            loss_sum += lv;
            let done = (step + 1) as f64;
            pb.set_message(format!(
                "loss {:.4} lr {lr:.2e} {:.1} img/s",
                loss_sum / done,
                done * bs as f64 / start.elapsed().as_secs_f64()
            ));
            pb.inc(1);
        }
        pb.finish_and_clear();
        let train_secs = start.elapsed().as_secs_f64();
        let val = validate(&model, &val_sets, &recipe, &device);
        let secs = start.elapsed().as_secs_f64();
        state.epochs_done = epoch + 1;
        state.train_seconds += secs;
        let train_loss = loss_sum / steps_per_epoch.max(1) as f64;
        let ips = (steps_per_epoch * bs) as f64 / train_secs;
        let line = format!(
            "{},{train_loss:.6},{:.6},{:.6},{lr:.3e},{ips:.2},{secs:.1},{},{:.6},{}\n",
            epoch + 1,
            val.polyp.mean_dice,
            val.polyp.mean_iou,
            val.specificity.map_or(String::new(), |s| format!("{s:.6}")),
            val.select,
            val.sensitivity.map_or(String::new(), |s| format!("{s:.6}"))
        );
        append(&run.metrics_csv(), &line)?;
        let is_best = val.select > state.best_val_iou || state.best_epoch == 0;
        if is_best {
            state.best_val_iou = val.select;
            state.best_epoch = epoch + 1;
            model
                .clone()
                .save_file(run.best_model())
                .map_err(|e| anyhow::anyhow!("saving best model: {e:?}"))?;
        }
        let optim_bytes = optim
            .into_bytes()
            .map_err(|e| anyhow::anyhow!("serialising optimiser: {e:?}"))?;
        save_checkpoint(&run, &model, optim_bytes, &state)?;
        if let Err(e) = plot::curves(&run.metrics_csv(), &run.0.join("curves.png")) {
            eprintln!("warning: could not draw curves: {e:#}");
        }
        eprintln!(
            "epoch {:>3}/{}  loss {train_loss:.4}  val dice {:.4} iou {:.4}{}{}{}{}  lr {lr:.2e}  {ips:.1} img/s  {secs:.0}s",
            epoch + 1,
            cfg.train.epochs,
            val.polyp.mean_dice,
            val.polyp.mean_iou,
            val.specificity
                .map_or(String::new(), |s| format!(" specificity {s:.4}")),
            sens_text(&val),
            val.per_source,
            if is_best { " (best)" } else { "" }
        );
    }
    Ok(state)
}

fn append(path: &Path, line: &str) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.write_all(line.as_bytes())?;
    Ok(())
}

/// Drops metric rows of epochs after the checkpoint (written before a kill), so that a resumed
/// run's metrics.csv has one row per epoch.
fn truncate_metrics(path: &Path, epochs_done: usize) -> Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let kept: String = text
        .lines()
        .enumerate()
        .filter(|(i, l)| {
            *i == 0
                || l.split(',')
                    .next()
                    .and_then(|e| e.parse::<usize>().ok())
                    .is_some_and(|e| e <= epochs_done)
        })
        .map(|(_, l)| format!("{l}\n"))
        .collect();
    std::fs::write(path, kept).with_context(|| format!("rewriting {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    fn logits(v: Vec<f32>, n: usize, side: usize) -> Tensor<4> {
        Tensor::from_data(TensorData::new(v, [n, 1, side, side]), &Device::flex())
    }

    /// A polyp-free image is scored by its own soft Dice term (per image, smoothed by 1): an
    /// empty prediction costs nothing, a false blob costs about as much as missing a polyp, and
    /// a batch partner with a polyp does not dilute it (per-batch Dice would).
    #[test]
    fn loss_on_empty_masks() {
        let side = 16;
        let px = side * side;
        let empty = vec![0f32; px];
        let quiet = logits(vec![-12.0; px], 1, side);
        let l = loss(quiet, logits(empty.clone(), 1, side), 0.0, 1.0, 0.5).into_scalar::<f32>();
        assert!(l < 0.01, "empty on empty: {l}");
        // A 4x4 false blob on a polyp-free image.
        let mut blob = vec![-12.0f32; px];
        for y in 4..8 {
            for x in 4..8 {
                blob[y * side + x] = 12.0;
            }
        }
        let l_blob = loss(
            logits(blob.clone(), 1, side),
            logits(empty.clone(), 1, side),
            0.0,
            1.0,
            0.5,
        )
        .into_scalar::<f32>();
        assert!(l_blob > 0.9, "false blob: {l_blob}");
        // Beside a perfectly predicted polyp image, the blob still costs half the batch's mean.
        let truth: Vec<f32> = blob.iter().map(|&v| f32::from(v > 0.0)).collect();
        let two = logits([blob.clone(), blob].concat(), 2, side);
        let target = logits([empty, truth].concat(), 2, side);
        let l_pair = loss(two, target, 0.0, 1.0, 0.5).into_scalar::<f32>();
        assert!((l_pair - l_blob / 2.0).abs() < 0.01, "{l_pair} vs {l_blob}");
    }

    /// The Tversky term is soft Dice at 0.5 (to the bit: the same formula), and above it costs
    /// a missed polyp pixel more than a false one.
    #[test]
    fn tversky_term() {
        let side = 8;
        let px = side * side;
        // Truth: the top half; prediction: the top quarter (misses) or top three quarters
        // (false positives), with some soft values.
        let truth: Vec<f32> = (0..px).map(|i| f32::from(i < px / 2)).collect();
        let pred = |rows: usize| -> Vec<f32> {
            (0..px)
                .map(|i| {
                    if i < rows * side {
                        3.0
                    } else {
                        -3.0 + (i % 5) as f32 * 0.1
                    }
                })
                .collect()
        };
        let run = |rows: usize, beta: f64| {
            loss(
                logits(pred(rows), 1, side),
                logits(truth.clone(), 1, side),
                0.3,
                1.0,
                beta,
            )
            .into_scalar::<f32>()
        };
        let near_half = run(2, 0.5 + 1e-9);
        assert!(
            (run(2, 0.5) - near_half).abs() < 1e-5,
            "{} vs {near_half}",
            run(2, 0.5)
        );
        let (under, over) = (run(2, 0.7), run(6, 0.7));
        let (under_dice, over_dice) = (run(2, 0.5), run(6, 0.5));
        assert!(
            under > under_dice && over < over_dice,
            "{under} {over} {under_dice} {over_dice}"
        );
        assert!(
            under > over,
            "misses {under} cost less than false positives {over}"
        );
    }
}
