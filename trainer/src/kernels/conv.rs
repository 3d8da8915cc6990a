//! Convolution with a direct weight gradient.
//!
//! Burn's generic `conv2d_weight_backward` runs the weight gradient as a convolution of the
//! input by the output gradient with batch and channels swapped: a very thin product plus
//! transposes, 39 % of a training step on Flex. Here it is one matrix product,
//! `dW[o, (c, kh, kw)] = sum_(n, p) dY[o, (n, p)] * cols[(c, kh, kw), (n, p)]`, with `cols` the
//! input's column (im2col) layout, so the product's inner dimension is batch x output pixels.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::ops::ModuleOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{AutodiffBackend, Flex};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Shape, TensorData};
use rayon::prelude::*;

use super::{AdamScalars, PoolShape, TrainOps};

impl TrainOps for Flex {
    fn conv2d_direct(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        forward(x, weight, &options)
    }

    fn batch_norm_fused(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
        relu: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        super::batch_norm::forward(x, gamma, beta, epsilon, relu)
    }

    fn adam_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        scalars: AdamScalars,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        super::adam::step(param, grad, moment_1, moment_2, scalars)
    }

    fn max_pool2d_argmax(x: FloatTensor<Self>, shape: PoolShape) -> FloatTensor<Self> {
        super::pool::forward_untracked(x, shape)
    }
}

#[derive(Debug)]
struct Conv2dDirect;

impl Backward<Flex, 2> for Conv2dDirect {
    type State = (FlexTensor, FlexTensor, ConvOptions<2>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (x, w, options) = ops.state;
        if let Some(node) = node_w {
            let gw = weight_grad(&x, &w, &grad, &options);
            grads.register::<Flex>(node.id, gw);
        }
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, input_grad(x, w, grad, &options));
        }
    }
}

impl<C: CheckpointStrategy> TrainOps for Autodiff<Flex, C> {
    fn conv2d_direct(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        match Conv2dDirect
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, w) = (x.into_primitive(), weight.into_primitive());
                let y = forward(x.clone(), w.clone(), &options);
                prep.finish((x, w, options), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(
                x.into_primitive(),
                weight.into_primitive(),
                &options,
            )),
        }
    }

    fn batch_norm_fused(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
        relu: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        super::batch_norm::autodiff_forward::<C>(x, gamma, beta, epsilon, relu)
    }

    // Optimizers see the parameters' inner tensors; a tracked one is updated as a new leaf.
    fn adam_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        scalars: AdamScalars,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (p, m, v) = super::adam::step(
            param.into_primitive(),
            grad.into_primitive(),
            moment_1.into_primitive(),
            moment_2.into_primitive(),
            scalars,
        );
        let leaf = <Self as AutodiffBackend>::from_inner;
        (leaf(p), leaf(m), leaf(v))
    }

    fn max_pool2d_argmax(x: FloatTensor<Self>, shape: PoolShape) -> FloatTensor<Self> {
        super::pool::autodiff_forward::<C>(x, shape)
    }
}

/// The weight gradient of a bias-free convolution on Flex; grouped convolutions go to Burn's.
pub fn weight_grad(
    x: &FlexTensor,
    w: &FlexTensor,
    dy: &FlexTensor,
    options: &ConvOptions<2>,
) -> FlexTensor {
    let asymmetric = options.padding.iter().any(|(a, b)| a != b);
    if options.groups != 1 || asymmetric || x.dtype() != DType::F32 {
        return Flex::conv2d_weight_backward(x.clone(), w.clone(), dy.clone(), options.clone());
    }
    let x = x.to_contiguous();
    let dy = dy.to_contiguous();
    let xs: [usize; 4] = x.layout().shape().dims();
    let ws: [usize; 4] = w.layout().shape().dims();
    let ys: [usize; 4] = dy.layout().shape().dims();
    let geom = Geometry::new(xs, ws, [ys[2], ys[3]], options);
    let out = weight_grad_f32(x.storage::<f32>(), dy.storage::<f32>(), &geom);
    FlexTensor::from_data(TensorData::new(out, Shape::new(ws)))
}

/// Shapes of one convolution.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub kh: usize,
    pub kw: usize,
    pub oh: usize,
    pub ow: usize,
    pub stride: [usize; 2],
    pub pad: [usize; 2],
    pub dilation: [usize; 2],
}

thread_local! {
    // Column and transposed-gradient buffers, kept between calls: allocating them afresh costs
    // a page fault per 4 KiB and a zero fill, as much as the copy itself.
    pub(super) static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const {
        std::cell::RefCell::new((Vec::new(), Vec::new()))
    };
}

/// `len` zeros, the fill shared between the rayon threads. With the heap's freed blocks kept
/// (`keep_freed_memory`), `vec![0.0; len]` is a memset of a recycled block on the calling
/// thread while the others wait: 4 % of a 2-thread step's samples, all on that thread.
pub(crate) fn zeroed(len: usize) -> Vec<f32> {
    const CHUNK: usize = 1 << 15;
    if len <= CHUNK {
        return vec![0.0; len];
    }
    let mut v: Vec<f32> = Vec::with_capacity(len);
    v.spare_capacity_mut()
        .par_chunks_mut(CHUNK)
        .for_each(|c| c.fill(std::mem::MaybeUninit::new(0.0)));
    // SAFETY: the capacity's first `len` values were written just above.
    unsafe { v.set_len(len) };
    v
}

/// `len` values written by `fill` a `chunk` at a time on the rayon threads (chunk index, its
/// values), without the zero fill [`zeroed`] makes first: for outputs the kernel writes whole.
///
/// # Safety
/// `fill` writes every value of every chunk it is given.
pub(crate) unsafe fn written(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>]) + Sync + Send,
) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, c)| fill(i, c));
    // SAFETY: the caller's `fill` wrote the first `len` values.
    unsafe { v.set_len(len) };
    v
}

/// A buffer of `len` values, every one of which the caller overwrites.
pub(super) fn scratch(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

/// Column buffers larger than this (in values) are built a tile at a time.
const WHOLE_BATCH_MAX: usize = 3 << 20;
/// A tile's column buffer holds about this many values (a core's L2 cache).
pub(super) const TILE_VALUES: usize = 1 << 17;
/// Partial weight-gradient sums of the tiled path (work for up to this many threads).
pub(super) const PARTIAL_SUMS: usize = 4;

impl Geometry {
    /// From NCHW input and OIHW weight shapes, the output's height and width, and symmetric
    /// options.
    fn new(x: [usize; 4], w: [usize; 4], out: [usize; 2], options: &ConvOptions<2>) -> Self {
        Geometry {
            n: x[0],
            c: x[1],
            h: x[2],
            w: x[3],
            o: w[0],
            kh: w[2],
            kw: w[3],
            oh: out[0],
            ow: out[1],
            stride: options.stride,
            pad: [options.padding[0].0, options.padding[1].0],
            dilation: options.dilation,
        }
    }
}

/// `dW = dY' x cols'`, with `dY'` `[O, N*P]` and `cols` `[C*KH*KW, N*P]` (P = output pixels).
/// Small layers build the whole column layout and make one product with the batch inside its
/// inner dimension; large ones (the stride-4 maps) go a pixel tile at a time, accumulating, so
/// the columns stay in cache instead of streaming hundreds of megabytes through memory.
pub(crate) fn weight_grad_f32(x: &[f32], dy: &[f32], g: &Geometry) -> Vec<f32> {
    if super::implicit::applies(g) {
        return super::implicit::weight_grad(x, dy, g);
    }
    let rows = g.c * g.kh * g.kw;
    if rows * g.n * g.oh * g.ow <= WHOLE_BATCH_MAX {
        weight_grad_whole(x, dy, g)
    } else {
        weight_grad_tiled(x, dy, g)
    }
}

fn weight_grad_whole(x: &[f32], dy: &[f32], g: &Geometry) -> Vec<f32> {
    let p = g.oh * g.ow;
    let np = g.n * p;
    let rows = g.c * g.kh * g.kw;
    let mut out = vec![0f32; g.o * rows];
    SCRATCH.with(|s| {
        let (cols_buf, dyt_buf) = &mut *s.borrow_mut();
        // The output gradient with the batch moved inside: [O, N, P].
        let dyt: &[f32] = if g.n == 1 {
            dy
        } else {
            let dyt = scratch(dyt_buf, g.o * np);
            dyt.par_chunks_mut(np).enumerate().for_each(|(o, row)| {
                for n in 0..g.n {
                    let src = &dy[(n * g.o + o) * p..(n * g.o + o + 1) * p];
                    row[n * p..(n + 1) * p].copy_from_slice(src);
                }
            });
            dyt
        };
        let cols = scratch(cols_buf, rows * np);
        cols.par_chunks_mut(np).enumerate().for_each(|(r, row)| {
            for n in 0..g.n {
                im2col_span(x, g, r, n, 0, &mut row[n * p..(n + 1) * p]);
            }
        });
        // SAFETY: `out` is o x rows, `dyt` o x np and `cols` rows x np (read as its transpose),
        // all row-major and alive for the call.
        unsafe { accumulate(&mut out, g.o, rows, np, dyt.as_ptr(), np, cols, false, true) };
    });
    out
}

fn weight_grad_tiled(x: &[f32], dy: &[f32], g: &Geometry) -> Vec<f32> {
    let p = g.oh * g.ow;
    let rows = g.c * g.kh * g.kw;
    let tile = (TILE_VALUES / rows).max(64).min(p);
    let tiles: Vec<(usize, usize)> = (0..g.n)
        .flat_map(|n| (0..p).step_by(tile).map(move |p0| (n, p0)))
        .collect();
    // A fixed number of partial sums added in a fixed order: the same bits on every run and
    // any thread count (a resumed run repeats the original).
    let per = tiles.len().div_ceil(PARTIAL_SUMS);
    let partials: Vec<Vec<f32>> = tiles
        .par_chunks(per)
        .map(|chunk| {
            let mut acc = vec![0f32; g.o * rows];
            for &(n, p0) in chunk {
                let len = tile.min(p - p0);
                SCRATCH.with(|s| {
                    let mut bufs = s.borrow_mut();
                    let cols = scratch(&mut bufs.0, rows * len);
                    for (r, row) in cols.chunks_mut(len).enumerate() {
                        im2col_span(x, g, r, n, p0, row);
                    }
                    // The tile of dY is addressable in place: row o starts at (n*O + o)*P + p0.
                    let lhs = dy[(n * g.o) * p + p0..].as_ptr();
                    // SAFETY: `acc` is o x rows, the lhs rows (stride P) hold `len` values each
                    // inside `dy`, and `cols` is rows x len; all alive for the call.
                    unsafe { accumulate(&mut acc, g.o, rows, len, lhs, p, cols, true, false) };
                });
            }
            acc
        })
        .collect();
    let mut out = vec![0f32; g.o * rows];
    for part in &partials {
        out.iter_mut().zip(part).for_each(|(x, y)| *x += y);
    }
    out
}

/// `out (m x n) [+]= lhs (m x k, row stride lhs_rs) x cols' (cols: n x k row-major)`.
///
/// # Safety
/// `lhs` must point at `m` rows of `k` values spaced `lhs_rs` apart; `out` must hold `m * n`
/// values and `cols` `n * k`.
#[allow(clippy::too_many_arguments)]
unsafe fn accumulate(
    out: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    lhs: *const f32,
    lhs_rs: usize,
    cols: &[f32],
    read_dst: bool,
    parallel: bool,
) {
    debug_assert!(out.len() >= m * n && cols.len() >= n * k);
    let par = if parallel {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            read_dst,
            lhs,
            1,
            lhs_rs as isize,
            cols.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// Output pixels `p0..p0 + row.len()` of image `n` in row `r = (c, ky, kx)` of the column
/// layout: the input pixel each reads through that tap, or 0 where it reads padding.
///
/// Called once per column row and tile, so on the 12x12 maps it copies only a dozen values
/// per output row: the per-row work is kept to a bounds test and short copies, with no
/// division (a whole training step did not measurably change with that alone).
fn im2col_span(x: &[f32], g: &Geometry, r: usize, n: usize, p0: usize, row: &mut [f32]) {
    let (c, k) = (r / (g.kh * g.kw), r % (g.kh * g.kw));
    let (ky, kx) = (k / g.kw, k % g.kw);
    let off_y = (ky * g.dilation[0]) as isize - g.pad[0] as isize;
    let off_x = (kx * g.dilation[1]) as isize - g.pad[1] as isize;
    let (sx, sy) = (g.stride[1] as isize, g.stride[0] as isize);
    // The output columns whose tap lands inside the input row, the same for every output row:
    // 0 <= ox * sx + off_x < w.
    let lo = ((-off_x).max(0) + sx - 1) / sx;
    let hi = ((g.w as isize - off_x).max(0) + sx - 1) / sx;
    let lo = lo.min(g.ow as isize) as usize;
    let hi = (hi.min(g.ow as isize) as usize).max(lo);
    let plane = &x[(n * g.c + c) * g.h * g.w..(n * g.c + c + 1) * g.h * g.w];
    let step = g.stride[1];
    let (mut oy, mut ox0) = (p0 / g.ow, p0 % g.ow);
    let mut done = 0;
    while done < row.len() {
        let len = (g.ow - ox0).min(row.len() - done);
        let dst = &mut row[done..done + len];
        done += len;
        let iy = oy as isize * sy + off_y;
        let (from, to) = (ox0, ox0 + len);
        oy += 1;
        ox0 = 0;
        if iy < 0 || iy >= g.h as isize {
            dst.fill(0.0);
            continue;
        }
        let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
        // This segment's part of [lo, hi).
        let (a, b) = (lo.max(from).min(to), hi.max(from).min(to));
        let (head, rest) = dst.split_at_mut(a - from);
        let (inner, tail) = rest.split_at_mut(b - a);
        head.fill(0.0);
        tail.fill(0.0);
        if inner.is_empty() {
            continue;
        }
        let first = (a as isize * sx + off_x) as usize;
        if step == 1 {
            inner.copy_from_slice(&src[first..first + inner.len()]);
        } else if step == 2 {
            // Pairs, so the loop vectorises as a deinterleave (the indexed loop below stays
            // scalar); the last value has no partner inside the row.
            let len = inner.len();
            let src = &src[first..first + 2 * len - 1];
            let (body, last) = inner.split_at_mut(len - 1);
            for (d, pair) in body.iter_mut().zip(src.chunks_exact(2)) {
                *d = pair[0];
            }
            last[0] = src[2 * (len - 1)];
        } else {
            let src = &src[first..first + (inner.len() - 1) * step + 1];
            for (i, d) in inner.iter_mut().enumerate() {
                *d = src[i * step];
            }
        }
    }
}

/// A raw output pointer shared by tiles that write disjoint parts of it.
#[derive(Clone, Copy)]
pub(super) struct SharedOut(pub(super) *mut f32);
// SAFETY: every tile writes its own rows-by-pixels block; no two tiles overlap.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer `offset` values in (a method, so closures capture the whole `Send` wrapper).
    ///
    /// # Safety
    /// `offset` must be inside the allocation.
    pub(super) unsafe fn at(self, offset: usize) -> *mut f32 {
        unsafe { self.0.add(offset) }
    }
}

/// Forward convolution without bias, `Y[n, :, tile] = W x cols(tile)`, a pixel tile at a time.
pub(crate) fn forward_f32(x: &[f32], w: &[f32], g: &Geometry) -> Vec<f32> {
    if let Some(out) = super::direct::forward(x, w, g) {
        return out;
    }
    if super::implicit::applies(g) {
        return super::implicit::forward(x, w, g);
    }
    let p = g.oh * g.ow;
    let rows = g.c * g.kh * g.kw;
    let tile = (TILE_VALUES / rows).max(64).min(p);
    let mut out = zeroed(g.n * g.o * p);
    let dst = SharedOut(out.as_mut_ptr());
    let tiles: Vec<(usize, usize)> = (0..g.n)
        .flat_map(|n| (0..p).step_by(tile).map(move |p0| (n, p0)))
        .collect();
    tiles.par_iter().for_each(|&(n, p0)| {
        let len = tile.min(p - p0);
        let pointwise = g.kh == 1 && g.kw == 1 && g.stride == [1, 1] && g.pad == [0, 0];
        SCRATCH.with(|s| {
            let mut bufs = s.borrow_mut();
            // A 1x1 convolution's columns are the input's own rows (stride P).
            let (cols, cols_rs): (&[f32], usize) = if pointwise {
                (&x[n * g.c * p + p0..], p)
            } else {
                let cols = scratch(&mut bufs.0, rows * len);
                for (r, row) in cols.chunks_mut(len).enumerate() {
                    im2col_span(x, g, r, n, p0, row);
                }
                (cols, len)
            };
            // SAFETY: the destination block (O rows of `len` values, stride P, starting at
            // (n*O)*P + p0) is inside `out` and written by this tile only; `w` is O x rows and
            // `cols` rows of `len` values `cols_rs` apart, both inside their slices.
            unsafe {
                gemm::gemm(
                    g.o,
                    len,
                    rows,
                    dst.at(n * g.o * p + p0),
                    1,
                    p as isize,
                    false,
                    w.as_ptr(),
                    1,
                    rows as isize,
                    cols.as_ptr(),
                    1,
                    cols_rs as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
    });
    out
}

/// Forward on Flex through [`forward_f32`] (f32, one group, symmetric padding), else Flex's.
pub fn forward(x: FlexTensor, w: FlexTensor, options: &ConvOptions<2>) -> FlexTensor {
    let asymmetric = options.padding.iter().any(|(a, b)| a != b);
    if options.groups != 1 || asymmetric || x.dtype() != DType::F32 {
        return Flex::conv2d(x, w, None, options.clone());
    }
    let x = x.to_contiguous();
    let w = w.to_contiguous();
    let xs: [usize; 4] = x.layout().shape().dims();
    let ws: [usize; 4] = w.layout().shape().dims();
    let out_size = |i: usize| {
        let reach = options.dilation[i] * (ws[2 + i] - 1) + 1;
        (xs[2 + i] + 2 * options.padding[i].0).saturating_sub(reach) / options.stride[i] + 1
    };
    let (oh, ow) = (out_size(0), out_size(1));
    let g = Geometry::new(xs, ws, [oh, ow], options);
    let out = forward_f32(x.storage::<f32>(), w.storage::<f32>(), &g);
    FlexTensor::from_data(TensorData::new(out, Shape::new([g.n, g.o, oh, ow])))
}

/// The input gradient on Flex. A stride-1 convolution's is itself a forward convolution: of the
/// output gradient by the weights flipped in space with in and out channels swapped, padded by
/// `dilation * (k - 1) - pad`; that runs through [`forward`]. Strided ones (and a kernel that
/// never reaches the input's last pixels) go to Flex's.
pub fn input_grad(
    x: FlexTensor,
    w: FlexTensor,
    dy: FlexTensor,
    options: &ConvOptions<2>,
) -> FlexTensor {
    let ws: [usize; 4] = w.layout().shape().dims();
    let xs: [usize; 4] = x.layout().shape().dims();
    let ys: [usize; 4] = dy.layout().shape().dims();
    let reach = |i: usize| (options.dilation[i] * (ws[2 + i] - 1)) as isize;
    let pads = [0, 1].map(|i| reach(i) - options.padding[i].0 as isize);
    let plain = options.groups == 1
        && options.stride == [1, 1]
        && options.padding.iter().all(|(a, b)| a == b)
        && pads.iter().all(|&p| p >= 0)
        // The flipped forward's output is exactly the input's size.
        && (0..2).all(|i| ys[2 + i] as isize + 2 * pads[i] - reach(i) == xs[2 + i] as isize)
        && w.dtype() == DType::F32;
    if !plain {
        return Flex::conv2d_x_backward(x, w, dy, options.clone());
    }
    let w = w.to_contiguous();
    let src = w.storage::<f32>();
    let (o, c, kh, kw) = (ws[0], ws[1], ws[2], ws[3]);
    let mut flipped = vec![0f32; src.len()];
    // Shared between the threads: serial, it was 0.7 % of a 2-thread step's samples.
    flipped
        .par_chunks_mut(o * kh * kw)
        .enumerate()
        .for_each(|(ic, dst)| {
            for oc in 0..o {
                for i in 0..kh {
                    for j in 0..kw {
                        dst[(oc * kh + (kh - 1 - i)) * kw + (kw - 1 - j)] =
                            src[((oc * c + ic) * kh + i) * kw + j];
                    }
                }
            }
        });
    let wt = FlexTensor::from_data(TensorData::new(flipped, Shape::new([c, o, kh, kw])));
    let opts = ConvOptions::new(
        [1, 1],
        [pads[0] as usize, pads[1] as usize],
        options.dilation,
        1,
    );
    forward(dy, wt, &opts)
}
