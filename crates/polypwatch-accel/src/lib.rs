//! Rewrites of tract's optimised plan that make our models run faster, each a drop-in
//! replacement for one tract operator or a short chain of them, written against tract's public
//! API.
//!
//! They exist because tract spent most of a frame in a few generic operators: the int8
//! convolutions, now on our own kernel where the CPU has AVX-512 VNNI ([`qconv`]) and through a
//! faster im2col elsewhere ([`im2col`]); the float convolutions, on our own AVX-512 kernel,
//! direct or by Winograd's algorithm ([`fconv`]); max pooling and dequantization ([`pool`]);
//! float-to-u8 quantization, alone or of a concatenation ([`quantize`]); bilinear upsampling
//! ([`resize`]) and the float convolutions' padding ([`pad`]). Each gives tract's output to the
//! bit, checked against the operators it replaces on the shipped models, but [`fconv`], whose
//! sums come in another order (its tests bound the difference), and an operator outside what a
//! replacement covers is left to tract.

#![deny(missing_docs)]

pub mod fconv;
pub mod im2col;
pub mod pad;
pub mod pool;
pub mod qconv;
pub mod quantize;
pub mod resize;

use tract_onnx::prelude::*;

/// How many nodes [`rewrite`] replaced, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rewrites {
    /// `Im2col` nodes now [`im2col::PackedIm2Col`].
    pub im2col: usize,
    /// Bilinear `Resize` nodes now [`resize::Bilinear`].
    pub resize: usize,
    /// `QuantizeLinearU8` nodes now [`quantize::Quantize`].
    pub quantize: usize,
    /// Quantized concatenations now [`quantize::QuantizeConcat`].
    pub quantize_concat: usize,
    /// Constant `Pad` nodes (float convolutions) now [`pad::Pad`].
    pub pad: usize,
    /// int8 `PackedIm2col -> OptMatMul` pairs now [`qconv::QConv`] (CPUs with a kernel for it).
    pub qconv: usize,
    /// Float max pools of dequantized bytes now [`pool::MaxPoolU8`] before the dequantization.
    pub max_pool: usize,
    /// Other float max pools now [`pool::MaxPoolF32`].
    pub max_pool_f32: usize,
    /// u8 `DequantizeLinearF32` nodes now [`pool::Dequantize`].
    pub dequantize: usize,
    /// `QConv -> Dequantize` pairs now one [`qconv::QConv`] storing floats.
    pub qconv_dequantize: usize,
    /// Residual additions and the ReLUs after them folded into the dequantizing
    /// [`qconv::QConv`] that feeds them.
    pub qconv_residual: usize,
    /// Float convolutions (with their residual additions and ReLUs) now [`fconv::FConv`]
    /// (CPUs with a kernel for it).
    pub fconv: usize,
}

/// tract's optimisation with every rewrite: float convolutions become [`fconv::FConv`] before
/// tract lowers them to matrix products, the other rewrites apply to tract's optimised plan.
pub fn optimize(model: TypedModel) -> TractResult<(TypedModel, Rewrites)> {
    let mut model = model.into_decluttered()?;
    let fconv = match fconv::Kernel::fast() {
        Some(kernel) => fconv::fuse(&mut model, kernel)?,
        None => 0,
    };
    let mut model = model.into_optimized()?;
    let done = rewrite(&mut model)?;
    Ok((model, Rewrites { fconv, ..done }))
}

/// Applies every rewrite to a model tract has optimised.
pub fn rewrite(model: &mut TypedModel) -> TractResult<Rewrites> {
    Ok(Rewrites {
        im2col: replace_each(model, im2col::replacement)?,
        resize: replace_each(model, resize::replacement)?,
        quantize: replace_each(model, quantize::replacement)?,
        quantize_concat: replace_each_wired(model, quantize::fuse_concat)?,
        pad: replace_each(model, pad::replacement)?,
        // After `im2col`: it fuses our im2col with the product that reads it.
        qconv: replace_each_wired(model, qconv::replacement)?,
        max_pool: swap_each(model, pool::swap_max_pool)?,
        // After `max_pool`, which takes the int8 model's float pooling of bytes.
        max_pool_f32: replace_each(model, pool::max_pool_f32)?,
        dequantize: replace_each(model, pool::dequantize)?,
        // After `dequantize` and `qconv`.
        qconv_dequantize: replace_each_wired(model, qconv::fuse_dequantize)?,
        // After `qconv_dequantize`.
        qconv_residual: replace_each_wired(model, qconv::fuse_residual)?,
        fconv: 0,
    })
}

/// The tensor behind `x` through tract's `Downsample`s of rows and columns (every `s`-th from
/// the first), and the strides they make (`[1, 1]` where there are none): a 1x1 convolution of
/// a downsampled tensor is a strided one of the tensor before, which reads it in place.
pub(crate) fn through_downsample(model: &TypedModel, x: OutletId) -> (OutletId, [usize; 2]) {
    use tract_onnx::tract_core::ops::Downsample;
    let (mut at, mut strides) = (x, [1usize, 1]);
    while let Some(d) = model.node(at.node).op_as::<Downsample>() {
        match (d.axis, usize::try_from(d.stride), d.modulo) {
            (2 | 3, Ok(s @ 1..), 0) => strides[d.axis - 2] *= s,
            _ => break,
        }
        at = model.node(at.node).inputs[0];
    }
    (at, strides)
}

/// Applies `swap` (a patch of its own making) at every node; counts the nodes it changed.
fn swap_each(
    model: &mut TypedModel,
    swap: impl Fn(&mut TypedModel, usize) -> TractResult<bool>,
) -> TractResult<usize> {
    let mut swapped = 0;
    for id in model.eval_order()? {
        swapped += swap(model, id)? as usize;
    }
    if swapped > 0 {
        model.compact()?;
    }
    Ok(swapped)
}

/// Replaces every node for which `replacement` offers an operator (same inputs, same output).
fn replace_each(
    model: &mut TypedModel,
    replacement: impl Fn(&TypedModel, &TypedNode) -> Option<Box<dyn TypedOp>>,
) -> TractResult<usize> {
    replace_each_wired(model, |model, node| {
        replacement(model, node).map(|op| (op, node.inputs.iter().copied().collect()))
    })
}

/// Replaces every node for which `replacement` offers an operator and the outlets it reads
/// (same output); nodes left without a consumer are then removed.
fn replace_each_wired(
    model: &mut TypedModel,
    replacement: impl Fn(&TypedModel, &TypedNode) -> Option<(Box<dyn TypedOp>, TVec<OutletId>)>,
) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some((op, inputs)) = replacement(model, node) else {
            continue;
        };
        TypedModelPatch::replace_single_op(model, node, &inputs, op)?.apply(model)?;
        replaced += 1;
    }
    if replaced > 0 {
        model.compact()?;
    }
    Ok(replaced)
}

/// Runs `f` over `0..rows`, split into contiguous ranges shared between tract's threads (the
/// executor `polypwatch::bench::set_threads` and the daemon configure).
pub(crate) fn parallel_rows(rows: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    use tract_linalg::multithread::{Executor, current_tract_executor};
    match current_tract_executor() {
        Executor::MultiThread(pool) if pool.current_num_threads() > 1 && rows > 1 => {
            // A few ranges per thread, so that a thread slowed by another process on its core
            // does not hold the whole operator back.
            let chunks = (pool.current_num_threads() * 4).min(rows);
            let f = &f;
            pool.scope(|s| {
                for c in 0..chunks {
                    s.spawn(move |_| f(c * rows / chunks..(c + 1) * rows / chunks));
                }
            });
        }
        _ => f(0..rows),
    }
}

/// How many threads [`parallel_rows`] shares work between.
pub(crate) fn threads() -> usize {
    use tract_linalg::multithread::{Executor, current_tract_executor};
    match current_tract_executor() {
        Executor::MultiThread(pool) => pool.current_num_threads().max(1),
        _ => 1,
    }
}

/// Whether this CPU has AVX-512 F and BW, for the operators that have a copy compiled for them
/// (the same code, so the same results, on 16 lanes instead of 4).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
}

/// `impl $ty { fn $run(&self, ..) }` that calls `self.$any(..)` (an `#[inline(always)]` loop)
/// through a copy compiled for AVX-512 where the CPU has it: the same operations on 16 lanes
/// instead of 4, so the same results.
macro_rules! with_avx512_copy {
    ($ty:ty, $run:ident, $any:ident, $xs:ident: $xt:ty, $ys:ident: $yt:ty) => {
        impl $ty {
            fn $run(&self, $xs: $xt, $ys: $yt) {
                #[cfg(target_arch = "x86_64")]
                if super::has_avx512() {
                    #[target_feature(enable = "avx512f,avx512bw")]
                    unsafe fn wide(this: &$ty, $xs: $xt, $ys: $yt) {
                        this.$any($xs, $ys)
                    }
                    // SAFETY: the CPU has AVX-512 F and BW.
                    return unsafe { wide(self, $xs, $ys) };
                }
                self.$any($xs, $ys)
            }
        }
    };
}
pub(crate) use with_avx512_copy;

/// Below this many output elements an operator runs on one thread: waking the others costs more.
const PARALLEL_MIN: usize = 1 << 16;

/// A pointer shared by threads that write disjoint parts of what it points to.
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
// SAFETY: users only write disjoint elements, within the scope of the borrow it came from.
unsafe impl<T: Send> Sync for SendPtr<T> {}

/// Calls `f(rows, part)` on disjoint parts of `out`, `row_len` elements a row (the last part
/// may be short), shared between tract's threads when `out` is large enough to be worth it.
pub(crate) fn parallel_parts<T: Send>(
    out: &mut [T],
    row_len: usize,
    f: impl Fn(std::ops::Range<usize>, &mut [T]) + Sync,
) {
    let row_len = row_len.max(1);
    let rows = out.len().div_ceil(row_len);
    if out.len() < PARALLEL_MIN {
        return f(0..rows, out);
    }
    let (len, ptr) = (out.len(), SendPtr(out.as_mut_ptr()));
    parallel_rows(rows, |r| {
        let start = r.start * row_len;
        let end = (r.end * row_len).min(len);
        let ptr = &ptr;
        // SAFETY: `parallel_rows` hands out disjoint row ranges, so the parts are disjoint and
        // inside `out`, which is borrowed mutably for the whole call.
        let part = unsafe { std::slice::from_raw_parts_mut(ptr.0.add(start), end - start) };
        f(r, part)
    });
}

/// Runs `f` (a model run, or a loop of them) on one of tract's threads when there are several.
///
/// tract's multithreaded executor is a pool of `threads` workers besides the thread that asks
/// for a run; on a 2-core board that made three busy threads, and the caller's serial operators
/// ran slower while a worker spun on its core (int8 frame, 2 threads: 19.5 ms, not faster than
/// one thread). Inside the pool the caller's work is one of the `threads`. Called again from
/// inside (a run within a loop that is already there), it runs `f` in place: a loop of frames
/// on the pool hands nothing over per frame.
pub fn on_tract_threads<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    use tract_linalg::multithread::{Executor, current_tract_executor};
    match current_tract_executor() {
        Executor::MultiThread(pool) if pool.current_num_threads() > 1 => pool.install(f),
        _ => f(),
    }
}

/// The workspace's root, where the shipped models and the test fixtures lie (this crate is
/// `crates/polypwatch-accel`).
#[cfg(test)]
pub(crate) fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A shipped model (`models/NAME`), optimised by tract, for the tests of the rewrites.
#[cfg(test)]
pub(crate) fn shipped_model(name: &str) -> TypedModel {
    let path = workspace_root().join("models").join(name);
    tract_onnx::onnx()
        .model_for_path(path)
        .and_then(|m| m.into_optimized())
        .expect("the shipped model loads")
}

/// A real frame (a Kvasir-SEG fixture) preprocessed as the shipped int8 model's manifest says.
#[cfg(test)]
pub(crate) fn fixture_input() -> Tensor {
    let root = workspace_root();
    let manifest =
        polypwatch_model::manifest::Manifest::load(&root.join("models/polypwatch-edge-int8.toml"))
            .unwrap();
    let image = polypwatch_model::preprocess::load_rgb(
        &root.join("tests/fixtures/kvasir-mini/images/cju0qkwl35piu0993l0dewei2.jpg"),
    )
    .unwrap();
    let r = &manifest.preprocess;
    let x = r.tensor_from_rgb(&image);
    Tensor::from_shape(&[1, 3, r.height as usize, r.width as usize], &x).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both shipped models, rewritten, give tract's logits to the bit.
    #[test]
    fn rewritten_models_give_tracts_logits() {
        for name in ["polypwatch-edge-f32.onnx", "polypwatch-edge-int8.onnx"] {
            let model = shipped_model(name);
            let reference = model.clone().into_runnable().unwrap();
            let mut ours = model;
            let done = rewrite(&mut ours).unwrap();
            let expected = if name.contains("int8") {
                let qconv = if qconv::Kernel::fast().is_some() {
                    29
                } else {
                    0
                };
                done.im2col > 10
                    && done.quantize > 5
                    && done.resize >= 2
                    && done.quantize_concat == 2
                    && done.max_pool == 1
                    && done.dequantize > 10
                    && done.qconv == qconv
                    // Every dequantization of a QConv output that nothing else reads (the
                    // other two read the max pool and tract's product on the pooled ASPP map).
                    && done.qconv_dequantize == if qconv > 0 { 18 } else { 0 }
                    // Every residual block's `Add -> ReLU`.
                    && done.qconv_residual == if qconv > 0 { 8 } else { 0 }
            } else {
                done.pad > 10 && done.resize >= 2
            };
            assert!(expected, "{name}: {done:?}");
            let ours = ours.into_runnable().unwrap();
            let input =
                tract_ndarray::Array4::<f32>::from_shape_fn((1, 3, 256, 256), |(_, c, y, x)| {
                    (((c * 131 + y * 17 + x * 5) % 97) as f32 / 48.0) - 1.0
                });
            let input: Tensor = input.into();
            let a = reference.run(tvec!(input.clone().into())).unwrap();
            let b = ours.run(tvec!(input.into())).unwrap();
            assert!(a[0].as_bytes() == b[0].as_bytes(), "{name}");
        }
    }
}
