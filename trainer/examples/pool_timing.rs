//! Times the stem's max pool (3x3 stride 2, padding 1) on a training batch's activation
//! (8 x 32 x 96 x 96, ReLU'd), forward and backward, Burn's against the trainer's kernel.
//!   RAYON_NUM_THREADS=1 cargo run --release --example pool_timing -p polypwatch-train

use std::time::Instant;

use burn::nn::PaddingConfig2d;
use burn::nn::pool::MaxPool2dConfig;
use burn::tensor::{Device, Distribution, Tensor};
use polypwatch_train::kernels;

fn main() {
    let device = Device::flex().autodiff();
    device.seed(1);
    let pool = MaxPool2dConfig::new([3, 3])
        .with_strides([2, 2])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init();
    let x = burn::tensor::activation::relu(Tensor::<4>::random(
        [8, 32, 96, 96],
        Distribution::Normal(0.0, 1.0),
        &device,
    ));
    for round in 0..3 {
        for ours in [false, true] {
            kernels::set_enabled(ours);
            let (mut fwd, mut bwd) = (f64::MAX, f64::MAX);
            for _ in 0..10 {
                let xi = x.clone().detach().require_grad();
                let t = Instant::now();
                let y = kernels::max_pool2d(&pool, xi.clone());
                let y = y.sum();
                let _ = y.clone().into_scalar::<f32>();
                fwd = fwd.min(t.elapsed().as_secs_f64());
                let t = Instant::now();
                let g = y.backward();
                let _ = xi.grad(&g).unwrap().into_scalar_sum();
                bwd = bwd.min(t.elapsed().as_secs_f64());
            }
            println!(
                "round {round} {}: forward (with the sum) {:.2} ms, backward {:.2} ms (fastest of 10)",
                if ours { "polypwatch" } else { "Burn" },
                fwd * 1e3,
                bwd * 1e3
            );
        }
    }
}

trait SumScalar {
    fn into_scalar_sum(self) -> f32;
}

impl SumScalar for Tensor<4> {
    fn into_scalar_sum(self) -> f32 {
        self.sum().into_scalar::<f32>()
    }
}
