//! `polypwatch-train bench`: training steps per second of a configuration's network, on a fixed
//! synthetic batch (speed does not depend on pixel values), the workload `bench/train_compare.sh`
//! gives PyTorch too.

use std::time::Instant;

use anyhow::Result;
use burn::optim::GradientsParams;
use burn::prelude::*;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;

use crate::config::TrainConfig;
use crate::kernels;
use crate::model::DeepLab;
use crate::train::{Backend, loss};

/// Options of `polypwatch-train bench`.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Steps run before timing.
    pub warmup: usize,
    /// Timed steps.
    pub steps: usize,
    /// Use Burn's own convolution and batch-norm training kernels instead of ours.
    pub burn_kernels: bool,
    /// Backend.
    pub backend: Backend,
    /// Seed of the weights and of the batch.
    pub seed: u64,
}

/// What a bench run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Network, e.g. `deeplabv3plus-resnet18-w0.5-os16`.
    pub architecture: String,
    /// Trainable parameters.
    pub parameters: usize,
    /// Images per step.
    pub batch: usize,
    /// Crop side in pixels.
    pub crop: usize,
    /// Worker threads of rayon's pool (Flex; LibTorch takes OMP_NUM_THREADS).
    pub threads: usize,
    /// `polypwatch` kernels (Flex) or the backend's own (`burn`).
    pub kernels: &'static str,
    /// Timed steps.
    pub steps: usize,
    /// Images per second over the timed steps.
    pub images_per_s: f64,
    /// Median seconds per step.
    pub step_s_median: f64,
    /// Loss of every step, warm-up included (equal runs train alike).
    pub losses: Vec<f64>,
}

/// A fixed batch: normal pixels and one random disc of polyp per image.
fn synthetic_batch(n: usize, side: usize, seed: u64, device: &Device) -> (Tensor<4>, Tensor<4>) {
    let mut rng = StdRng::seed_from_u64(seed);
    // Box-Muller from the seeded generator, so both runtimes can be fed alike if needed.
    let x: Vec<f32> = (0..n * 3 * side * side)
        .map(|_| {
            let (u, v): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect();
    let mut y = vec![0f32; n * side * side];
    for img in y.chunks_mut(side * side) {
        let (cx, cy) = (rng.random_range(0..side), rng.random_range(0..side));
        let r = rng.random_range(side / 8..side / 3) as isize;
        for (i, v) in img.iter_mut().enumerate() {
            let (dx, dy) = (
                (i % side) as isize - cx as isize,
                (i / side) as isize - cy as isize,
            );
            *v = (dx * dx + dy * dy <= r * r) as u8 as f32;
        }
    }
    (
        Tensor::from_data(TensorData::new(x, [n, 3, side, side]), device),
        Tensor::from_data(TensorData::new(y, [n, 1, side, side]), device),
    )
}

/// Runs `warmup + steps` training steps of `cfg`'s network (its batch size, crop, loss and
/// Adam settings, learning rate constant) and times the last `steps`.
pub fn bench(cfg: &TrainConfig, opts: &BenchOptions) -> Result<BenchReport> {
    let device = opts.backend.device()?;
    device.seed(opts.seed);
    let device = device.autodiff();
    let ours = opts.backend == Backend::Flex && !opts.burn_kernels;
    kernels::set_enabled(ours);
    let mut model = DeepLab::new(&cfg.model, &device);
    let mut optim = crate::kernels::adam(cfg.train.weight_decay);
    let crop = cfg.train.crop.unwrap_or(cfg.train.input_size) as usize;
    let bs = cfg.train.batch_size;
    let (x, y) = synthetic_batch(bs, crop, opts.seed, &device);
    let mut losses = Vec::new();
    let mut times = Vec::new();
    for _ in 0..opts.warmup + opts.steps {
        let t = Instant::now();
        let l = loss(
            model.forward(x.clone()),
            y.clone(),
            cfg.train.bce_weight,
            cfg.train.dice_weight,
            cfg.train.tversky_beta(),
        );
        losses.push(l.clone().into_scalar::<f32>() as f64);
        let grads = GradientsParams::from_grads(l.backward(), &model);
        model = optim.step(cfg.train.lr, model, grads);
        times.push(t.elapsed().as_secs_f64());
    }
    kernels::set_enabled(false);
    let timed = &mut times[opts.warmup..];
    let total: f64 = timed.iter().sum();
    timed.sort_by(f64::total_cmp);
    Ok(BenchReport {
        architecture: cfg.model.architecture(),
        parameters: model.num_params(),
        batch: bs,
        crop,
        threads: rayon::current_num_threads(),
        kernels: if opts.burn_kernels {
            "burn"
        } else {
            "polypwatch"
        },
        steps: opts.steps,
        images_per_s: (opts.steps * bs) as f64 / total,
        step_s_median: timed.get(timed.len() / 2).copied().unwrap_or(f64::NAN),
        losses,
    })
}
