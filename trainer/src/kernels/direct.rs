//! Forward convolutions on polypwatch-accel's direct kernel: [`SliceConv`] is the daemon's
//! `FConv` (AVX-512 FMA tiles of 8 channels x 48 pixels over the padded input read in place,
//! taps that read only padding skipped, Winograd's F(2x2, 3x3) for the 3x3 stride-1 maps it
//! tiles), run one image per task. The stride-1 input gradients go through the forward too
//! (`conv::input_grad`). On the trainer's batch of 8 at 192x192, one thread, it runs the
//! decoder's 176 -> 64 3x3 in 21 ms where the implicit GEMM took 34, and a step's forward and
//! input-gradient convolutions in 287 ms instead of 347 (`examples/conv_timing.rs`). Where
//! the CPU has no AVX-512 F, the matrix-product paths (`conv`, `implicit`) run as before.

use std::sync::atomic::{AtomicBool, Ordering};

use polypwatch_accel::fconv::{ConvShape, Kernel, SliceConv};
use rayon::prelude::*;

use super::conv::Geometry;

static ON: AtomicBool = AtomicBool::new(true);

/// Turns this path on or off (on by default where the CPU has the kernel), to compare it with
/// the matrix products: `examples/conv_timing.rs`.
pub fn set_enabled(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// The kernel this CPU runs (AVX-512 F, or NEON on aarch64), where the path is on. Never the
/// portable kernel: it is for tests, slower than the matrix products.
fn kernel() -> Option<Kernel> {
    ON.load(Ordering::Relaxed).then(Kernel::fast).flatten()
}

/// `Y = conv(X, W)` (NCHW, OIHW, no bias) where the kernel takes it, else `None`. 1x1
/// convolutions stay matrix products: on the 12x12 and 24x24 maps they ran 1.5-2.5x slower on
/// the direct kernel (its 16-pixel vectors a quarter empty on 12-pixel rows, and a padded copy
/// where a product reads the input in place).
pub(crate) fn forward(x: &[f32], w: &[f32], g: &Geometry) -> Option<Vec<f32>> {
    if g.kh * g.kw == 1 {
        return None;
    }
    forward_on(kernel()?, x, w, g)
}

fn forward_on(kernel: Kernel, x: &[f32], w: &[f32], g: &Geometry) -> Option<Vec<f32>> {
    let shape = ConvShape {
        channels: g.c,
        height: g.h,
        width: g.w,
        outputs: g.o,
        kernel: [g.kh, g.kw],
        stride: g.stride,
        dilation: g.dilation,
        padding: g.pad,
    };
    let conv = SliceConv::new(shape, w, kernel)?;
    if conv.output_size() != [g.oh, g.ow] {
        return None;
    }
    let (image, out_image) = (g.c * g.h * g.w, g.o * g.oh * g.ow);
    let mut out = super::conv::zeroed(g.n * out_image);
    // One image a task: the same sums on any thread count.
    out.par_chunks_mut(out_image)
        .zip(x.par_chunks(image))
        .for_each(|(y, x)| conv.run(x, y));
    Some(out)
}
