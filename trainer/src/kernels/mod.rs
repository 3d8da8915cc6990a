//! Training kernels for the Flex CPU backend that Burn's generic implementations leave slow,
//! added through Burn's backend-extension API (a backend trait of our own, implemented for
//! `Flex` and for `Autodiff<Flex>` with a hand-written backward), not by patching Burn.
//!
//! - [`conv2d`]: convolution forward and input gradient as matrix products over the input's
//!   column layout, and a direct weight gradient (one product of the output gradient with that
//!   layout) in place of Burn's generic one, which runs it as a convolution with batch and
//!   channels swapped. On the 24x24 and 48x48 maps the stride-1 ones skip the column layout:
//!   each tap is an offset view of a padded row band (`implicit`). Where the CPU has AVX-512,
//!   the forward and stride-1 input gradient run instead on polypwatch-accel's direct
//!   convolution kernel, the daemon's (`direct`).
//! - [`batch_norm_train`]: batch statistics, normalisation and its backward in two passes over
//!   the activation, in place of a dozen element-wise and reduction passes;
//!   [`batch_norm_train_act`] fuses the ReLU after it.
//!
//! The kernels are on only where [`set_enabled`] turned them on (the trainer does on the Flex
//! backend); elsewhere the same functions call Burn's own operations, so tests can compare the
//! two on one thread.

mod adam;
mod batch_norm;
mod conv;
mod direct;
mod implicit;
mod pool;
mod wgrad;

use std::cell::Cell;

use burn::backend::tensor::FloatTensor;
use burn::backend::{Dispatch, backend_extension};
use burn::tensor::Tensor;
#[cfg(test)]
use burn::tensor::TensorData;
use burn::tensor::ops::ConvOptions;

pub use adam::{AdamScalars, FusedAdam, adam};
pub use batch_norm::{
    batch_norm_train, batch_norm_train_act, frozen as batch_norm_frozen,
    set_frozen as set_batch_norm_frozen,
};
pub use conv::{
    forward as conv_forward, input_grad as conv_input_grad, weight_grad as conv_weight_grad,
};
pub use direct::set_enabled as set_direct_conv;
pub use implicit::set_enabled as set_implicit_gemm;
pub use pool::{PoolShape, max_pool2d};
pub use wgrad::set_enabled as set_pixel_major_wgrad;

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(false) };
}

/// Turns the kernels on or off for graphs built on this thread from now on. Only for the Flex
/// backend: another backend would panic on them.
pub fn set_enabled(on: bool) {
    ENABLED.with(|e| e.set(on));
}

/// Keeps the step's freed buffers in the process instead of returning them to the kernel.
///
/// glibc serves blocks over its mmap threshold with fresh mappings and unmaps them when freed,
/// and trims the heap's top past 128 KiB: every training step then faults its activation and
/// gradient buffers in page by page (zeroed by the kernel) and, on two threads, unmaps them
/// with a TLB shootdown to the other core. A 2-thread `bench` spent 3.4 s of 26 in the kernel
/// so, and 0.7 s with these settings (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_` and
/// `MALLOC_TOP_PAD_` in the environment still override them). Elsewhere than glibc, nothing.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let set = |var: &str, param: libc::c_int, value: libc::c_int| {
            if std::env::var_os(var).is_none() {
                // SAFETY: mallopt only sets glibc's allocator parameters; called before any
                // thread of ours allocates.
                unsafe { libc::mallopt(param, value) };
            }
        };
        // 32 MiB, glibc's largest: blocks up to it come from the heap.
        set("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, 32 << 20);
        set("MALLOC_TRIM_THRESHOLD_", libc::M_TRIM_THRESHOLD, 1 << 30);
        set("MALLOC_TOP_PAD_", libc::M_TOP_PAD, 64 << 20);
    }
}

/// Whether this thread builds graphs with the kernels.
pub fn enabled() -> bool {
    ENABLED.with(|e| e.get())
}

/// The operations this module adds to a backend.
#[backend_extension(Flex, Autodiff)]
pub trait TrainOps: burn::backend::Backend {
    /// 2-D convolution without bias (forward as the backend's own).
    fn conv2d_direct(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self>;

    /// Batch norm with the batch's own statistics, then a ReLU where `relu`: (output, mean,
    /// biased variance).
    fn batch_norm_fused(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
        relu: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// One Adam update of a parameter (never tracked): (parameter, first moment, second
    /// moment).
    fn adam_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        scalars: AdamScalars,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// Max pooling of `x` over `shape`'s windows (backward through the argmaxes).
    fn max_pool2d_argmax(x: FloatTensor<Self>, shape: PoolShape) -> FloatTensor<Self>;
}

/// A 2-D convolution without bias: the direct weight gradient where [`enabled`], else Burn's.
pub fn conv2d(x: Tensor<4>, weight: Tensor<4>, options: ConvOptions<2>) -> Tensor<4> {
    if !enabled() {
        return burn::tensor::module::conv2d(x, weight, None, options);
    }
    Tensor::from_dispatch(<Dispatch as TrainOps>::conv2d_direct(
        x.into_dispatch(),
        weight.into_dispatch(),
        options,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::BatchNormConfig;
    use burn::tensor::{Device, Distribution, Tensor};

    /// Forward output and gradients of `f` on `inputs`, kernels on or off.
    fn run(
        on: bool,
        inputs: &[Tensor<4>],
        f: &dyn Fn(&[Tensor<4>]) -> Tensor<4>,
    ) -> (Vec<f32>, Vec<Vec<f32>>) {
        set_enabled(on);
        // Fresh leaves, so each run has its own graph.
        let xs: Vec<Tensor<4>> = inputs
            .iter()
            .map(|t| Tensor::from_data(t.to_data(), &t.device()).require_grad())
            .collect();
        let y = f(&xs);
        // A fixed random projection, so every output element gets its own gradient.
        let r = Tensor::<4>::from_data(
            TensorData::new(
                (0..y.shape().num_elements())
                    .map(|i| ((i * 7919) % 13) as f32 / 6.0 - 1.0)
                    .collect::<Vec<_>>(),
                y.shape(),
            ),
            &y.device(),
        );
        let grads = (y.clone() * r).sum().backward();
        let out = y.into_data().try_to_vec::<f32>().unwrap();
        let gs = xs
            .iter()
            .map(|x| {
                x.grad(&grads)
                    .unwrap()
                    .into_data()
                    .try_to_vec::<f32>()
                    .unwrap()
            })
            .collect();
        set_enabled(false);
        (out, gs)
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: length");
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-4 * scale,
                "{what}[{i}]: {x} vs Burn's {y} (scale {scale})"
            );
        }
    }

    fn compare(inputs: &[Tensor<4>], f: &dyn Fn(&[Tensor<4>]) -> Tensor<4>, what: &str) {
        let (y1, g1) = run(true, inputs, f);
        let (y0, g0) = run(false, inputs, f);
        close(&y1, &y0, &format!("{what} output"));
        for (k, (a, b)) in g1.iter().zip(&g0).enumerate() {
            close(a, b, &format!("{what} gradient {k}"));
        }
    }

    fn random(shape: [usize; 4], device: &Device) -> Tensor<4> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
    }

    #[test]
    fn convolution_matches_burn() {
        let device = Device::flex().autodiff();
        device.seed(3);
        // (input, weight, stride, pad, dilation): the network's shapes in small, including a
        // stem, strided, pointwise and dilated taps that reach past the map.
        let cases = [
            ([2, 3, 17, 15], [5, 3, 7, 7], 2, 3, 1),
            ([2, 4, 9, 9], [6, 4, 3, 3], 1, 1, 1),
            ([3, 4, 9, 8], [6, 4, 3, 3], 2, 1, 1),
            ([2, 6, 7, 7], [3, 6, 1, 1], 1, 0, 1),
            ([1, 6, 7, 7], [3, 6, 1, 1], 1, 0, 1),
            ([2, 6, 8, 8], [4, 6, 1, 1], 2, 0, 1),
            // The image-pooling branch: a 1x1 map.
            ([3, 6, 1, 1], [4, 6, 1, 1], 1, 0, 1),
            ([2, 5, 6, 6], [4, 5, 3, 3], 1, 2, 2),
            ([2, 5, 6, 6], [4, 5, 3, 3], 1, 12, 12),
            // Large enough for the tiled weight gradient, tiles ending mid-row.
            ([2, 32, 96, 96], [8, 32, 3, 3], 1, 1, 1),
            ([2, 8, 200, 200], [4, 8, 7, 7], 2, 3, 1),
            // Wide enough for the implicit path: row bands ending inside the map, dilation,
            // a kernel wider than tall.
            ([2, 40, 70, 50], [24, 40, 3, 3], 1, 1, 1),
            ([2, 6, 30, 27], [5, 6, 3, 3], 1, 2, 2),
            ([2, 5, 25, 33], [4, 5, 1, 3], 1, 1, 1),
            // 48 output channels: the 3x3 weight gradient's two-vector and one-vector blocks.
            ([1, 7, 26, 30], [48, 7, 3, 3], 1, 1, 1),
        ];
        // The direct kernel and the 3x3 weight gradient's (where the CPU has them), and the
        // matrix products they stand in for.
        for direct in [true, false] {
            set_direct_conv(direct);
            set_pixel_major_wgrad(direct);
            for (xs, ws, s, p, d) in cases {
                let inputs = [random(xs, &device), random(ws, &device)];
                let opts = ConvOptions::new([s, s], [p, p], [d, d], 1);
                compare(
                    &inputs,
                    &|t| conv2d(t[0].clone(), t[1].clone(), opts.clone()),
                    &format!("conv {xs:?} {ws:?} s{s} p{p} d{d} direct {direct}"),
                );
            }
        }
        set_direct_conv(true);
        set_pixel_major_wgrad(true);
    }

    #[test]
    fn max_pool_matches_burn() {
        use burn::nn::PaddingConfig2d;
        use burn::nn::pool::MaxPool2dConfig;
        let device = Device::flex().autodiff();
        device.seed(5);
        // (input, kernel, stride, padding): the stem's 3x3 stride 2, odd and even sides, a
        // window wider than tall, no padding.
        let cases = [
            ([2, 3, 9, 8], [3, 3], [2, 2], [1, 1]),
            ([2, 2, 10, 10], [3, 3], [2, 2], [1, 1]),
            ([1, 2, 7, 6], [2, 3], [1, 2], [0, 1]),
            ([2, 2, 6, 6], [2, 2], [2, 2], [0, 0]),
        ];
        for (xs, k, s, p) in cases {
            let pool = MaxPool2dConfig::new(k)
                .with_strides(s)
                .with_padding(PaddingConfig2d::Explicit(p[0], p[1], p[0], p[1]))
                .init();
            // Raw values, and after a ReLU: half zeros, so ties decide the gradient's place.
            for relu in [false, true] {
                let x = random(xs, &device);
                let x = if relu {
                    burn::tensor::activation::relu(x)
                } else {
                    x
                };
                compare(
                    &[x],
                    &|t| max_pool2d(&pool, t[0].clone()),
                    &format!("max pool {xs:?} k{k:?} s{s:?} p{p:?} relu {relu}"),
                );
            }
        }
    }

    /// Frozen, training-mode batch norm is the inference-mode function (running statistics),
    /// leaves those statistics alone, and still trains its scale and shift.
    #[test]
    fn frozen_batch_norm_is_the_inference_function() {
        use burn::prelude::*;
        let device = Device::flex().autodiff();
        device.seed(5);
        let x = random([3, 5, 6, 7], &device)
            .mul_scalar(2.0)
            .add_scalar(0.5);
        let mut bn = BatchNormConfig::new(5).init(&device);
        let stat = |m: f64, s: f64| {
            Tensor::<1>::random([5], Distribution::Normal(m, s), &device)
                .abs()
                .detach()
        };
        bn.running_mean.update(stat(0.0, 1.0));
        bn.running_var.update(stat(2.0, 0.5));
        bn.gamma = burn::module::Param::from_tensor(stat(1.0, 0.3).require_grad());
        let mean_before = bn.running_mean.value_sync().into_data();
        set_batch_norm_frozen(true);
        let xl = Tensor::<4>::from_data(x.to_data(), &device).require_grad();
        let y = batch_norm_train(&bn, xl);
        set_batch_norm_frozen(false);
        let grads = y.clone().sum().backward();
        assert!(bn.gamma.val().grad(&grads).is_some());
        let inner = device.inner();
        let inference = bn
            .clone()
            .valid()
            .forward(Tensor::<4>::from_data(x.to_data(), &inner));
        let v = |t: Tensor<4>| t.into_data().try_to_vec::<f32>().unwrap();
        close(&v(y), &v(inference), "frozen batch norm vs inference");
        assert_eq!(bn.running_mean.value_sync().into_data(), mean_before);
        // Unfrozen, the same layer normalises by the batch: a different function.
        let unfrozen = v(batch_norm_train(&bn, x.clone()));
        let frozen = v(bn
            .valid()
            .forward(Tensor::<4>::from_data(x.to_data(), &inner)));
        assert!(
            unfrozen
                .iter()
                .zip(&frozen)
                .any(|(a, b)| (a - b).abs() > 0.1)
        );
    }

    #[test]
    fn batch_norm_matches_burn() {
        let device = Device::flex().autodiff();
        device.seed(4);
        let x = random([3, 5, 6, 7], &device)
            .mul_scalar(3.0)
            .add_scalar(1.5);
        let g = Tensor::<1>::random([5], Distribution::Normal(1.0, 0.5), &device);
        let b = Tensor::<1>::random([5], Distribution::Normal(0.0, 0.5), &device);
        let bn_run = |on: bool, relu: bool| {
            set_enabled(on);
            let leaf1 = |t: &Tensor<1>| Tensor::<1>::from_data(t.to_data(), &device);
            let mut bn = BatchNormConfig::new(5).init(&device);
            bn.gamma = burn::module::Param::from_tensor(leaf1(&g));
            bn.beta = burn::module::Param::from_tensor(leaf1(&b));
            let xl = Tensor::<4>::from_data(x.to_data(), &device).require_grad();
            let y = batch_norm_train_act(&bn, xl.clone(), relu);
            // Shifted, so the gradient is not zero where the ReLU clamps to 0.
            let r = y.clone().add_scalar(0.5).sin();
            let grads = (y.clone() * r.detach()).sum().backward();
            set_enabled(false);
            let v = |t: Tensor<1>| t.into_data().try_to_vec::<f32>().unwrap();
            (
                y.into_data().try_to_vec::<f32>().unwrap(),
                xl.grad(&grads)
                    .unwrap()
                    .into_data()
                    .try_to_vec::<f32>()
                    .unwrap(),
                v(bn.gamma.val().grad(&grads).unwrap()),
                v(bn.beta.val().grad(&grads).unwrap()),
            )
        };
        // Without and with the fused ReLU (about half the outputs are negative).
        for relu in [false, true] {
            let (on, off) = (bn_run(true, relu), bn_run(false, relu));
            let what = if relu {
                "batch norm + ReLU"
            } else {
                "batch norm"
            };
            close(&on.0, &off.0, &format!("{what} output"));
            close(&on.1, &off.1, &format!("{what} input gradient"));
            close(&on.2, &off.2, &format!("{what} gamma gradient"));
            close(&on.3, &off.3, &format!("{what} beta gradient"));
            if relu {
                let zeros = on.0.iter().filter(|v| **v == 0.0).count();
                assert!(zeros > on.0.len() / 4, "only {zeros} outputs clamped");
            }
        }
        let inputs = [x];
        // The running statistics move the same way.
        let stats = |on: bool| {
            set_enabled(on);
            let bn = BatchNormConfig::new(5).init(&device);
            let _ = batch_norm_train(&bn, inputs[0].clone());
            set_enabled(false);
            let m = bn
                .running_mean
                .value()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            let v = bn
                .running_var
                .value()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            (m, v)
        };
        let ((m1, v1), (m0, v0)) = (stats(true), stats(false));
        close(&m1, &m0, "running mean");
        close(&v1, &v0, "running variance");
    }
}
