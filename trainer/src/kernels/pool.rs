//! Max pooling with its argmax kept for the backward.
//!
//! Burn's Flex max pooling runs every 2-D pool as a 3-D one through a per-output closure that
//! recomputes each axis's valid window and records an i64 index: the stem's 3x3 stride-2 pool
//! was 4.4 % of a one-thread training step (perf), for about nine comparisons per output.
//! Here each image plane is one task, pooled separably along contiguous values (see
//! [`pool_plane`]), the argmax a u32 inside the plane; the backward adds each output's
//! gradient at its argmax. Ties go to the first maximum in row-major window order and NaN
//! wins, as in Burn, so the gradients are Burn's. On the stem's 8 x 32 x 96 x 96 ReLU'd
//! activation, one thread: forward 3.8 ms against Burn's 29.2, backward 1.7 against 5.9
//! (`examples/pool_timing.rs`).

use std::mem::MaybeUninit;

use multiversion::multiversion;

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Dispatch, Flex};
use burn::nn::PaddingConfig2d;
use burn::nn::pool::MaxPool2d;
use burn::tensor::{DType, Shape, Tensor, TensorData};
use rayon::prelude::*;

use super::TrainOps;

/// A max pool's window: kernel, stride and symmetric padding (rows, columns), no dilation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolShape {
    /// Window height and width.
    pub kernel: [usize; 2],
    /// Step between windows.
    pub stride: [usize; 2],
    /// Padding on each side, smaller than the kernel (no window is padding only).
    pub pad: [usize; 2],
}

impl PoolShape {
    /// `pool`'s window where this kernel takes it: explicit symmetric or no padding narrower
    /// than the kernel, no dilation, floor mode.
    fn of(pool: &MaxPool2d) -> Option<Self> {
        let pad = match pool.padding {
            PaddingConfig2d::Valid => [0, 0],
            PaddingConfig2d::Explicit(top, left, bottom, right)
                if top == bottom && left == right =>
            {
                [top, left]
            }
            _ => return None,
        };
        let ok = pool.dilation == [1, 1]
            && !pool.ceil_mode
            && (0..2).all(|a| pad[a] < pool.kernel_size[a] && pool.stride[a] > 0);
        ok.then_some(PoolShape {
            kernel: pool.kernel_size,
            stride: pool.stride,
            pad,
        })
    }

    /// Output height and width for an input of `h` x `w`, if any.
    fn output(&self, h: usize, w: usize) -> Option<[usize; 2]> {
        let side = |a: usize, n: usize| {
            (n + 2 * self.pad[a])
                .checked_sub(self.kernel[a])
                .map(|r| r / self.stride[a] + 1)
        };
        Some([side(0, h)?, side(1, w)?])
    }

    /// The input positions `[from, to)` of output position `o`'s window on axis `a`, clipped
    /// to the input's `n` positions.
    fn window(&self, a: usize, o: usize, n: usize) -> (usize, usize) {
        let start = (o * self.stride[a]) as isize - self.pad[a] as isize;
        let end = (start + self.kernel[a] as isize).min(n as isize);
        (start.max(0) as usize, end.max(0) as usize)
    }
}

/// `pool` applied to `x`: this kernel on the Flex autodiff backend where the kernels are
/// [`enabled`](super::enabled) and the window is one it takes, else Burn's.
pub fn max_pool2d(pool: &MaxPool2d, x: Tensor<4>) -> Tensor<4> {
    let [_, _, h, w] = x.dims();
    let shape = PoolShape::of(pool).filter(|s| s.output(h, w).is_some());
    match shape {
        Some(shape) if super::enabled() && x.device().is_autodiff() && x.dtype() == DType::F32 => {
            Tensor::from_dispatch(<Dispatch as TrainOps>::max_pool2d_argmax(
                x.into_dispatch(),
                shape,
            ))
        }
        _ => pool.forward(x),
    }
}

/// `v` replaces the running maximum `(b, a)` if larger, or NaN (Burn's rule: the first of
/// equal maxima stays, the last NaN wins). Masks rather than a select, which LLVM turns into
/// a conditional store, one element at a time.
#[inline(always)]
fn keep_max(b: &mut f32, a: &mut u32, v: f32, i: u32) {
    let take = ((v > *b) | v.is_nan()) as u32;
    let keep = take.wrapping_sub(1);
    *b = f32::from_bits((v.to_bits() & !keep) | (b.to_bits() & keep));
    *a = (i & !keep) | (*a & keep);
}

/// The running maxima `(b, a)` against the values `v`, value `j` at index `first + j`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512bw", "x86_64+avx2"))]
fn merge_row(b: &mut [f32], a: &mut [u32], v: &[f32], first: u32) {
    for (((b, a), &v), j) in b.iter_mut().zip(a).zip(v).zip(0u32..) {
        keep_max(b, a, v, first + j);
    }
}

/// The running maxima `(b, a)` against the values `v` at indices `base + c`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512bw", "x86_64+avx2"))]
fn merge_rows(b: &mut [f32], a: &mut [u32], v: &[f32], c: &[u32], base: u32) {
    for (((b, a), &v), &c) in b.iter_mut().zip(a).zip(v).zip(c) {
        keep_max(b, a, v, base + c);
    }
}

/// One plane's pooled values, and its argmaxes (offsets in the plane) where `argmax` is given.
///
/// Separable, rows first: every input row's maximum over each output column's window, then
/// each output row's maximum over its window's rows. Within a row the first maximum stays,
/// then the topmost row's: the first in the window's row-major order, Burn's choice. Each
/// pass runs along contiguous values with selects, which vectorise; a loop over one window's
/// taps was a chain of dependent compare-and-selects, or branches that mispredicted half the
/// time on ReLU'd activations (about as slow as Burn's).
fn pool_plane(
    x: &[f32],
    [h, w]: [usize; 2],
    s: PoolShape,
    out: &mut [MaybeUninit<f32>],
    mut argmax: Option<&mut [MaybeUninit<u32>]>,
) {
    let [oh, ow] = s.output(h, w).expect("a checked shape");
    let k = s.kernel[1];
    // Windows wholly inside the row, by first column: the maximum over all k of them.
    let full = (w + 1).saturating_sub(k);
    let (mut dv, mut dc) = (vec![0f32; full], vec![0u32; full]);
    let (mut hv, mut hc) = (vec![0f32; h * ow], vec![0u32; h * ow]);
    for iy in 0..h {
        let row = &x[iy * w..][..w];
        dv.copy_from_slice(&row[..full]);
        dc.iter_mut().zip(0u32..).for_each(|(c, j)| *c = j);
        for t in 1..k {
            merge_row(&mut dv, &mut dc, &row[t..t + full], t as u32);
        }
        let (hv, hc) = (&mut hv[iy * ow..][..ow], &mut hc[iy * ow..][..ow]);
        for ox in 0..ow {
            let (c0, c1) = s.window(1, ox, w);
            if c1 - c0 == k {
                (hv[ox], hc[ox]) = (dv[c0], dc[c0]);
                continue;
            }
            // A window over the padding: its columns inside the row.
            let (mut b, mut a) = (row[c0], c0 as u32);
            for (&v, c) in row[c0 + 1..c1].iter().zip(c0 as u32 + 1..) {
                keep_max(&mut b, &mut a, v, c);
            }
            (hv[ox], hc[ox]) = (b, a);
        }
    }
    let (mut best, mut at) = (vec![0f32; ow], vec![0u32; ow]);
    for oy in 0..oh {
        let (r0, r1) = s.window(0, oy, h);
        best.copy_from_slice(&hv[r0 * ow..][..ow]);
        for (a, &c) in at.iter_mut().zip(&hc[r0 * ow..][..ow]) {
            *a = (r0 * w) as u32 + c;
        }
        for iy in r0 + 1..r1 {
            let base = (iy * w) as u32;
            merge_rows(
                &mut best,
                &mut at,
                &hv[iy * ow..][..ow],
                &hc[iy * ow..][..ow],
                base,
            );
        }
        for (o, &v) in out[oy * ow..][..ow].iter_mut().zip(&best) {
            o.write(v);
        }
        if let Some(a) = argmax.as_deref_mut() {
            for (a, &i) in a[oy * ow..][..ow].iter_mut().zip(&at) {
                a.write(i);
            }
        }
    }
}

/// The pooled output on Flex, and each output's argmax where `keep_argmax`.
fn forward(x: &FlexTensor, s: PoolShape, keep_argmax: bool) -> (FlexTensor, Vec<u32>) {
    let x = x.to_contiguous();
    let dims = x.layout().shape().to_vec();
    let (planes, h, w) = (dims[0] * dims[1], dims[2], dims[3]);
    let [oh, ow] = s.output(h, w).expect("a checked shape");
    let xs = x.storage::<f32>();
    let (len, plane) = (planes * oh * ow, oh * ow);
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let mut argmax: Vec<u32> = Vec::with_capacity(if keep_argmax { len } else { 0 });
    let outs = out.spare_capacity_mut()[..len].par_chunks_mut(plane.max(1));
    if keep_argmax {
        outs.zip(argmax.spare_capacity_mut()[..len].par_chunks_mut(plane.max(1)))
            .enumerate()
            .for_each(|(p, (o, a))| pool_plane(&xs[p * h * w..][..h * w], [h, w], s, o, Some(a)));
    } else {
        outs.enumerate()
            .for_each(|(p, o)| pool_plane(&xs[p * h * w..][..h * w], [h, w], s, o, None));
    }
    // SAFETY: `pool_plane` wrote every value of every plane (and argmax where kept).
    unsafe {
        out.set_len(len);
        if keep_argmax {
            argmax.set_len(len);
        }
    }
    let y = FlexTensor::from_data(TensorData::new(out, Shape::new([dims[0], dims[1], oh, ow])));
    (y, argmax)
}

/// Flex: the pooled output, no argmax kept.
pub(super) fn forward_untracked(x: FlexTensor, s: PoolShape) -> FlexTensor {
    forward(&x, s, false).0
}

#[derive(Debug)]
struct MaxPoolArgmax;

impl Backward<Flex, 1> for MaxPoolArgmax {
    /// The input's shape, the output plane size and each output's argmax in its plane.
    type State = ([usize; 4], usize, Vec<u32>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node).to_contiguous();
        let Some(node) = node else { return };
        let (dims, plane, argmax) = ops.state;
        let hw = dims[2] * dims[3];
        let dys = dy.storage::<f32>();
        let mut dx = super::conv::zeroed(dims.iter().product());
        dx.par_chunks_mut(hw.max(1))
            .zip(dys.par_chunks(plane.max(1)))
            .zip(argmax.par_chunks(plane.max(1)))
            .for_each(|((dx, dy), at)| {
                for (&g, &i) in dy.iter().zip(at) {
                    dx[i as usize] += g;
                }
            });
        let dx = FlexTensor::from_data(TensorData::new(dx, Shape::new(dims)));
        grads.register::<Flex>(node.id, dx);
    }
}

/// Forward on `Autodiff<Flex>`, recording [`MaxPoolArgmax`].
pub(super) fn autodiff_forward<C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<Flex, C>>,
    s: PoolShape,
) -> FloatTensor<Autodiff<Flex, C>> {
    match MaxPoolArgmax
        .prepare::<C>([x.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let x = x.into_primitive();
            let d = x.layout().shape().to_vec();
            let (y, argmax) = forward(&x, s, true);
            let plane = y.layout().shape()[2] * y.layout().shape()[3];
            prep.finish(([d[0], d[1], d[2], d[3]], plane, argmax), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward_untracked(x.into_primitive(), s)),
    }
}
