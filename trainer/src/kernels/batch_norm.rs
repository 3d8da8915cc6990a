//! Training-mode batch norm in two passes over the activation, forward and backward.
//!
//! Flex runs Burn's generic `batch_norm_train` and its backward as compositions of swaps,
//! reshapes, reductions and broadcasts (about ten passes each way, 10 % of a step). Here the
//! forward is one pass for the statistics and one for the output; the backward one pass for
//! the two per-channel sums and one for the input gradient. Same formulas as Burn's: biased
//! variance of the centred input, `dx = gamma / std * (dy - mean(dy) - xhat * mean(dy xhat))`.
//! A ReLU after it is fused in too: forward it clamps the output it writes anyway, backward it
//! zeroes `dy` where the recomputed pre-activation is not positive, so the ReLU's own pass over
//! the activation and its mask and gradient passes are gone.

use burn::backend::AutodiffBackend;
use burn::backend::Dispatch;
use burn::backend::Flex;
use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::nn::BatchNorm;
use burn::tensor::{Shape, Tensor, TensorData};
use std::mem::MaybeUninit;

use multiversion::multiversion;
use rayon::prelude::*;

use super::TrainOps;

thread_local! {
    static FROZEN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Makes batch norm use its running statistics in training too, on graphs built on this
/// thread from now on (`[train] freeze_bn`): a fine-tune then starts from exactly the function
/// it was given (an imported ONNX), instead of one renormalised by each batch of 8, whose
/// statistics are noisy (the image-pooling branch sees 8 values per channel). The scale and
/// shift still train; the running statistics stay as they are.
pub fn set_frozen(on: bool) {
    FROZEN.with(|f| f.set(on));
}

/// Whether batch norm is frozen on this thread.
pub fn frozen() -> bool {
    FROZEN.with(|f| f.get())
}

/// Batch norm on the running statistics, differentiable in the input, scale and shift.
fn batch_norm_frozen(bn: &BatchNorm, x: Tensor<4>) -> Tensor<4> {
    let device = x.device();
    let c = bn.gamma.dims()[0];
    let mean = bn.running_mean.value_sync().to_device(&device).detach();
    let var = bn.running_var.value_sync().to_device(&device).detach();
    let scale = bn.gamma.val().div(var.add_scalar(bn.epsilon).sqrt());
    let shift = bn.beta.val().sub(mean.mul(scale.clone()));
    x.mul(scale.reshape([1, c, 1, 1]))
        .add(shift.reshape([1, c, 1, 1]))
}

/// `BatchNorm::forward` in training mode (batch statistics, running statistics updated with the
/// layer's momentum), through the fused kernel where [`super::enabled`], else through Burn;
/// on the running statistics where [`frozen`].
pub fn batch_norm_train(bn: &BatchNorm, x: Tensor<4>) -> Tensor<4> {
    batch_norm_train_act(bn, x, false)
}

/// [`batch_norm_train`] followed by a ReLU where `relu`, fused into the kernel where it runs.
pub fn batch_norm_train_act(bn: &BatchNorm, x: Tensor<4>, relu: bool) -> Tensor<4> {
    let act = |y: Tensor<4>| {
        if relu {
            burn::tensor::activation::relu(y)
        } else {
            y
        }
    };
    if frozen() && x.device().is_autodiff() {
        return act(batch_norm_frozen(bn, x));
    }
    if !super::enabled() || !x.device().is_autodiff() {
        return act(bn.forward(x));
    }
    let (y, mean, var) = <Dispatch as TrainOps>::batch_norm_fused(
        x.into_dispatch(),
        bn.gamma.val().into_dispatch(),
        bn.beta.val().into_dispatch(),
        bn.epsilon,
        relu,
    );
    let (mean, var) = (
        Tensor::<1>::from_dispatch(mean),
        Tensor::<1>::from_dispatch(var),
    );
    let device = mean.device();
    let m = bn.momentum;
    let running_mean = bn.running_mean.value_sync().to_device(&device);
    let running_var = bn.running_var.value_sync().to_device(&device);
    bn.running_mean.update(
        running_mean
            .mul_scalar(1.0 - m)
            .add(mean.detach().mul_scalar(m))
            .detach(),
    );
    bn.running_var.update(
        running_var
            .mul_scalar(1.0 - m)
            .add(var.detach().mul_scalar(m))
            .detach(),
    );
    Tensor::from_dispatch(y)
}

/// NCHW as (images, channels, pixels per plane).
fn dims(x: &FlexTensor) -> (usize, usize, usize) {
    let s = x.layout().shape();
    let hw = s.num_elements() / (s[0] * s[1]).max(1);
    (s[0], s[1], hw)
}

fn vec1(v: Vec<f32>) -> FlexTensor {
    let n = v.len();
    FlexTensor::from_data(TensorData::new(v, Shape::new([n])))
}

/// Independent f64 partial sums a reduction keeps: one chain of f64 additions waits 4 cycles
/// an element; eight chains vectorise and overlap.
const LANES: usize = 8;

/// `sum over i of f(a[i], b[i])` in [`LANES`] partial sums, added in a fixed order (the same
/// bits on every run).
#[inline(always)]
fn lane_sum(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f64) -> f64 {
    lane_sum2(a, b, |x, y| (f(x, y), 0.0)).0
}

/// Two sums at once, as [`lane_sum`]: one pass over the data instead of two.
#[inline(always)]
fn lane_sum2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> (f64, f64)) -> (f64, f64) {
    let (mut p, mut q) = ([0f64; LANES], [0f64; LANES]);
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for j in 0..LANES {
            let (u, v) = f(x[j], y[j]);
            p[j] += u;
            q[j] += v;
        }
    }
    for (j, (&x, &y)) in ar.iter().zip(br).enumerate() {
        let (u, v) = f(x, y);
        p[j] += u;
        q[j] += v;
    }
    (p.iter().sum(), q.iter().sum())
}

/// Per-channel mean and biased variance (two passes, f64 accumulation).
fn stats(x: &[f32], n: usize, c: usize, hw: usize) -> (Vec<f32>, Vec<f32>) {
    let count = (n * hw) as f64;
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let planes = (0..n).map(|i| &x[(i * c + ch) * hw..(i * c + ch + 1) * hw]);
            let sum: f64 = planes.clone().map(plane_sum).sum();
            let mean = sum / count;
            let sq: f64 = planes.map(|p| plane_sq_dev(p, mean)).sum();
            (mean as f32, (sq / count) as f32)
        })
        .unzip()
}

/// Forward on Flex, with a ReLU where `relu`: (output, mean, variance).
pub(super) fn forward(
    x: FlexTensor,
    gamma: FlexTensor,
    beta: FlexTensor,
    epsilon: f64,
    relu: bool,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let x = x.to_contiguous();
    let (n, c, hw) = dims(&x);
    let xs = x.storage::<f32>();
    let (mean, var) = stats(xs, n, c, hw);
    let gamma = gamma.to_contiguous();
    let beta = beta.to_contiguous();
    let (g, b) = (gamma.storage::<f32>(), beta.storage::<f32>());
    // SAFETY: `normalize` writes all of its plane.
    let out = unsafe {
        super::conv::written(xs.len(), hw, |plane, o| {
            let ch = plane % c;
            let (scale, shift) = affine(g[ch], b[ch], mean[ch], var[ch], epsilon);
            normalize(o, &xs[plane * hw..(plane + 1) * hw], scale, shift, relu);
        })
    };
    let shape = x.layout().shape().clone();
    (
        FlexTensor::from_data(TensorData::new(out, shape)),
        vec1(mean),
        vec1(var),
    )
}

/// The per-channel scale and shift of the normalisation, computed one way for the forward and
/// the ReLU's recomputed mask.
fn affine(gamma: f32, beta: f32, mean: f32, var: f32, epsilon: f64) -> (f32, f32) {
    let scale = gamma / (var as f64 + epsilon).sqrt() as f32;
    (scale, beta - mean * scale)
}

// The per-element loops below are compiled for AVX-512 and AVX2 besides the baseline and
// chosen at run time: built for x86-64's baseline (SSE2), the normalisation was 8 % of a
// training step's samples, four lanes at a time. The same operations in the same order on
// every path, so the same bits.

/// `out = x * scale + shift`, clamped at 0 where `relu`: every value of `out`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2"))]
fn normalize(out: &mut [MaybeUninit<f32>], x: &[f32], scale: f32, shift: f32, relu: bool) {
    assert_eq!(out.len(), x.len());
    if relu {
        for (o, &v) in out.iter_mut().zip(x) {
            o.write((v * scale + shift).max(0.0));
        }
    } else {
        for (o, &v) in out.iter_mut().zip(x) {
            o.write(v * scale + shift);
        }
    }
}

/// The sum of a plane's values, in f64.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2"))]
fn plane_sum(p: &[f32]) -> f64 {
    lane_sum(p, p, |v, _| v as f64)
}

/// The sum of a plane's squared deviations from `mean`, in f64.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2"))]
fn plane_sq_dev(p: &[f32], mean: f64) -> f64 {
    lane_sum(p, p, |v, _| (v as f64 - mean).powi(2))
}

/// One channel's constants in the backward.
#[derive(Clone, Copy)]
struct Channel {
    /// The forward's (scale, shift) where a ReLU was fused: the gradient is `dy` only where
    /// the recomputed pre-activation is positive.
    mask: Option<(f32, f32)>,
    mean: f32,
    inv_std: f32,
}

impl Channel {
    /// The gradient reaching the normalisation (a select, so the loops vectorise).
    #[inline(always)]
    fn grad(&self, d: f32, v: f32) -> f32 {
        match self.mask {
            Some((scale, shift)) if v * scale + shift <= 0.0 => 0.0,
            _ => d,
        }
    }
}

/// A plane's sum(dy) and sum(dy * xhat).
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2"))]
fn grad_sums(dy: &[f32], x: &[f32], k: Channel) -> (f64, f64) {
    lane_sum2(dy, x, |d, v| {
        let d = k.grad(d, v);
        (d as f64, d as f64 * ((v - k.mean) * k.inv_std) as f64)
    })
}

/// A plane's input gradient, `sums` being (gamma * inv_std, mean dy, mean dy * xhat): every
/// value of `out`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2"))]
fn input_grad(
    out: &mut [MaybeUninit<f32>],
    dy: &[f32],
    x: &[f32],
    k: Channel,
    sums: (f32, f32, f32),
) {
    assert!(out.len() == dy.len() && out.len() == x.len());
    let (scale, md, mdx) = sums;
    for ((o, &d), &v) in out.iter_mut().zip(dy).zip(x) {
        let xhat = (v - k.mean) * k.inv_std;
        o.write(scale * (k.grad(d, v) - md - xhat * mdx));
    }
}

/// Backward on Flex, through the fused ReLU where `relu`: (dx, dgamma, dbeta).
#[allow(clippy::too_many_arguments)]
fn backward(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    mean: &[f32],
    var: &[f32],
    epsilon: f64,
    relu: bool,
    dy: FlexTensor,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let (n, c, hw) = dims(x);
    let gamma = gamma.to_contiguous();
    let beta = beta.to_contiguous();
    let (g, b) = (gamma.storage::<f32>(), beta.storage::<f32>());
    let dy = dy.to_contiguous();
    let (xs, dys) = (x.storage::<f32>(), dy.storage::<f32>());
    // With a fused ReLU, the gradient reaching the normalisation is `dy` where the
    // pre-activation (recomputed exactly as the forward did) was positive, else 0. The
    // per-channel constants are copied out before the loops and the mask is a select, so the
    // loops vectorise.
    let inv_std: Vec<f32> = var
        .iter()
        .map(|&v| 1.0 / (v as f64 + epsilon).sqrt() as f32)
        .collect();
    let channel = |ch: usize| {
        let (scale, shift) = affine(g[ch], b[ch], mean[ch], var[ch], epsilon);
        Channel {
            mask: relu.then_some((scale, shift)),
            mean: mean[ch],
            inv_std: inv_std[ch],
        }
    };
    // Per channel: sum(dy) (the beta gradient) and sum(dy * xhat) (the gamma gradient).
    let (dbeta, dgamma): (Vec<f32>, Vec<f32>) = (0..c)
        .into_par_iter()
        .map(|ch| {
            let k = channel(ch);
            let (mut s, mut sx) = (0f64, 0f64);
            for i in 0..n {
                let r = (i * c + ch) * hw..(i * c + ch + 1) * hw;
                let (ds, dsx) = grad_sums(&dys[r.clone()], &xs[r], k);
                s += ds;
                sx += dsx;
            }
            (s as f32, sx as f32)
        })
        .unzip();
    let count = (n * hw) as f32;
    // SAFETY: `input_grad` writes all of its plane.
    let dx = unsafe {
        super::conv::written(xs.len(), hw, |plane, out| {
            let ch = plane % c;
            let r = plane * hw..(plane + 1) * hw;
            let sums = (g[ch] * inv_std[ch], dbeta[ch] / count, dgamma[ch] / count);
            input_grad(out, &dys[r.clone()], &xs[r], channel(ch), sums);
        })
    };
    let shape = x.layout().shape().clone();
    (
        FlexTensor::from_data(TensorData::new(dx, shape)),
        vec1(dgamma),
        vec1(dbeta),
    )
}

#[derive(Debug)]
struct BatchNormFused;

impl Backward<Flex, 3> for BatchNormFused {
    // Input, gamma, beta, batch mean and variance, epsilon, fused ReLU.
    type State = (
        FlexTensor,
        FlexTensor,
        FlexTensor,
        Vec<f32>,
        Vec<f32>,
        f64,
        bool,
    );

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (x, gamma, beta, mean, var, eps, relu) = ops.state;
        let (dx, dgamma, dbeta) = backward(&x, &gamma, &beta, &mean, &var, eps, relu, grad);
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, dx);
        }
        if let Some(node) = node_gamma {
            grads.register::<Flex>(node.id, dgamma);
        }
        if let Some(node) = node_beta {
            grads.register::<Flex>(node.id, dbeta);
        }
    }
}

/// Output, mean and variance.
type Triple<B> = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

/// Forward on `Autodiff<Flex>`, recording [`BatchNormFused`]; the statistics are untracked.
pub(super) fn autodiff_forward<C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<Flex, C>>,
    gamma: FloatTensor<Autodiff<Flex, C>>,
    beta: FloatTensor<Autodiff<Flex, C>>,
    epsilon: f64,
    relu: bool,
) -> Triple<Autodiff<Flex, C>> {
    match BatchNormFused
        .prepare::<C>([x.node(), gamma.node(), beta.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (x, gamma, beta) = (
                x.into_primitive().to_contiguous(),
                gamma.into_primitive(),
                beta.into_primitive(),
            );
            let (y, mean, var) = forward(x.clone(), gamma.clone(), beta.clone(), epsilon, relu);
            let (m, v) = (
                mean.storage::<f32>().to_vec(),
                var.storage::<f32>().to_vec(),
            );
            let y = prep.finish((x, gamma, beta, m, v, epsilon, relu), y);
            (
                y,
                <Autodiff<Flex, C> as AutodiffBackend>::from_inner(mean),
                <Autodiff<Flex, C> as AutodiffBackend>::from_inner(var),
            )
        }
        OpsKind::UnTracked(prep) => {
            let (y, mean, var) = forward(
                x.into_primitive(),
                gamma.into_primitive(),
                beta.into_primitive(),
                epsilon,
                relu,
            );
            (
                prep.finish(y),
                <Autodiff<Flex, C> as AutodiffBackend>::from_inner(mean),
                <Autodiff<Flex, C> as AutodiffBackend>::from_inner(var),
            )
        }
    }
}
