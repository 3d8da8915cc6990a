//! Max pooling on the int8 model's bytes, and dequantization.
//!
//! The int8 export max-pools in float: `QConv -> DequantizeLinear -> MaxPool`, 0.7 ms of a
//! frame in tract's generic pooling over 32 x 128 x 128 floats. Dequantization
//! (`(q - zero_point) * scale`, `scale > 0`) is non-decreasing, so the maximum of dequantized
//! values is the dequantized maximum, to the bit: [`MaxPoolU8`] pools the bytes and the
//! dequantization follows, on a quarter of the values. [`Dequantize`] is tract's
//! `DequantizeLinearF32` on u8, vectorised and shared between threads.
//!
//! Here: the operators; `rule` matches tract's pools and dequantizations; `tests` checks them
//! against tract.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use crate::im2col::Geometry;

mod rule;
#[cfg(test)]
mod tests;

pub(crate) use rule::{dequantize, max_pool_f32, swap_max_pool};

/// Max pooling of a u8 NCHW tensor (2-D, one image); taps outside the image are skipped, as
/// tract's float pooling skips them (they read minus infinity).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MaxPoolU8 {
    geo: Geometry,
}

/// Pools the planes of `input` into the planes of `out`; `lowest` is below every value (what
/// taps outside the image read).
#[inline(always)]
fn pool<T: Copy + PartialOrd>(g: &Geometry, input: &[T], out: &mut [T], lowest: T) {
    let max = |a: T, b: T| if b > a { b } else { a };
    // The column maxima of a window's rows, padded with `lowest` so that every tap of every
    // output reads inside.
    let pl = g.pad_left.max(0) as usize;
    // A negative left padding (cropping) shifts every tap right.
    let shift = (-g.pad_left).max(0) as usize;
    let width = ((g.ow - 1) * g.sx + (g.kw - 1) * g.dx + 1 + shift).max(pl + g.w);
    let mut column = vec![lowest; width];
    for (src, dst) in input
        .chunks_exact(g.h * g.w)
        .zip(out.chunks_exact_mut(g.oh * g.ow))
    {
        for (oy, row) in dst.chunks_exact_mut(g.ow).enumerate() {
            column.fill(lowest);
            for ky in 0..g.kh {
                let y = (oy * g.sy + ky * g.dy) as isize - g.pad_top;
                if (0..g.h as isize).contains(&y) {
                    let line = &src[y as usize * g.w..][..g.w];
                    let col = &mut column[pl..pl + g.w];
                    col.iter_mut().zip(line).for_each(|(c, &v)| *c = max(*c, v));
                }
            }
            if (g.sx, g.kw, g.dx) == (2, 3, 1) {
                // The model's pooling (3x3, stride 2), with constant steps the compiler turns
                // into vector loads and shuffles: with the AVX-512 copy, 0.26 -> 0.10 ms for
                // the int8 model's bytes, 0.31 -> 0.14 for the f32 model's floats.
                let c = &column[shift..][..2 * g.ow + 1];
                for (ox, o) in row.iter_mut().enumerate() {
                    *o = max(max(c[2 * ox], c[2 * ox + 1]), c[2 * ox + 2]);
                }
                continue;
            }
            for (ox, o) in row.iter_mut().enumerate() {
                let at = ox * g.sx + shift;
                *o = (0..g.kw).fold(lowest, |m, kx| max(m, column[at + kx * g.dx]));
            }
        }
    }
}

/// The output of pooling `input` (`[1, c, h, w]` of `T`) with `run` on its planes, shared
/// between tract's threads; `op` names the operator in the error for an input it was not
/// planned for.
fn pool_planes<T: Datum + Copy>(
    op: &str,
    g: &Geometry,
    input: &Tensor,
    run: impl Fn(&[T], &mut [T]) + Sync,
) -> TractResult<TVec<TValue>> {
    ensure!(
        input.datum_type() == T::datum_type() && input.shape() == [1, g.c, g.h, g.w],
        "{op}: input {:?} {:?} does not match the planned pooling",
        input.datum_type(),
        input.shape()
    );
    let src = input.try_as_plain_ram()?;
    let src = src.as_slice::<T>()?;
    // SAFETY: `run` writes every element of every plane.
    let mut out = unsafe { Tensor::uninitialized::<T>(&[1, g.c, g.oh, g.ow])? };
    let mut ram = out.try_as_plain_ram_mut()?;
    crate::threads::parallel_parts(ram.as_slice_mut::<T>()?, g.oh * g.ow, |planes, part| {
        run(&src[planes.start * g.h * g.w..planes.end * g.h * g.w], part)
    });
    Ok(tvec!(out.into_tvalue()))
}

crate::simd::with_avx512_copy!(MaxPoolU8, run, run_any, input: &[u8], out: &mut [u8]);

impl MaxPoolU8 {
    /// Pools the planes of `input` into the planes of `out`.
    #[inline(always)]
    fn run_any(&self, input: &[u8], out: &mut [u8]) {
        pool(&self.geo, input, out, 0)
    }
}

/// Max pooling of an f32 NCHW tensor (2-D, one image), as tract's: taps outside the image
/// read minus infinity. tract's pooling ran on one thread (0.7-1.0 ms of an f32 frame).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MaxPoolF32 {
    geo: Geometry,
}

crate::simd::with_avx512_copy!(MaxPoolF32, run, run_any, input: &[f32], out: &mut [f32]);

impl MaxPoolF32 {
    /// Pools the planes of `input` into the planes of `out`.
    #[inline(always)]
    fn run_any(&self, input: &[f32], out: &mut [f32]) {
        pool(&self.geo, input, out, f32::NEG_INFINITY)
    }
}

impl Op for MaxPoolF32 {
    fn name(&self) -> StaticName {
        "MaxPoolF32".into()
    }

    op_as_typed_op!();
}

impl EvalOp for MaxPoolF32 {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        pool_planes("MaxPoolF32", &self.geo, &inputs[0], |src, out| {
            self.run(src, out)
        })
    }
}

impl TypedOp for MaxPoolF32 {
    as_op!();

    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let g = &self.geo;
        Ok(tvec!(f32::fact([1, g.c, g.oh, g.ow])))
    }
}

impl Op for MaxPoolU8 {
    fn name(&self) -> StaticName {
        "MaxPoolU8".into()
    }

    op_as_typed_op!();
}

impl EvalOp for MaxPoolU8 {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        pool_planes("MaxPoolU8", &self.geo, &inputs[0], |src, out| {
            self.run(src, out)
        })
    }
}

impl TypedOp for MaxPoolU8 {
    as_op!();

    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let g = &self.geo;
        Ok(tvec!(u8::fact([1, g.c, g.oh, g.ow])))
    }
}

/// `(q - zero_point) * scale` from u8 to f32, tract's `DequantizeLinearF32` to the bit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Dequantize {
    pub(super) scale_bits: u32,
    pub(super) zero_point: i32,
}

crate::simd::with_avx512_copy!(Dequantize, run, run_any, xs: &[u8], ys: &mut [f32]);

impl Dequantize {
    #[inline(always)]
    fn run_any(&self, xs: &[u8], ys: &mut [f32]) {
        let scale = f32::from_bits(self.scale_bits);
        for (y, &x) in ys.iter_mut().zip(xs) {
            *y = (x as i32 - self.zero_point) as f32 * scale;
        }
    }
}

impl Op for Dequantize {
    fn name(&self) -> StaticName {
        "DequantizeU8".into()
    }

    op_as_typed_op!();
}

impl EvalOp for Dequantize {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = &inputs[0];
        let xs = input.try_as_plain_ram()?;
        let xs = xs.as_slice::<u8>()?;
        // SAFETY: every element is written below.
        let mut out = unsafe { Tensor::uninitialized::<f32>(input.shape())? };
        let mut ram = out.try_as_plain_ram_mut()?;
        crate::threads::parallel_parts(ram.as_slice_mut::<f32>()?, 1 << 14, |rows, part| {
            let from = rows.start << 14;
            self.run(&xs[from..from + part.len()], part)
        });
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for Dequantize {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }
}
