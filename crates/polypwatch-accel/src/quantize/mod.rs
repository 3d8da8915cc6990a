//! Float to u8 quantization.
//!
//! tract's `QuantizeLinearU8` rounds each value through a bit-twiddling function the compiler
//! cannot vectorise (about 3 ns a value here; 5 ms of a frame over the decoder's feature maps).
//! [`Quantize`] computes the same `clamp(round_half_even(x * scale) + zero_point, 0, 255)` with
//! the add-and-subtract-1.5*2^23 rounding trick, which vectorises on any SIMD level; on
//! aarch64 with NEON's rounding conversion and saturating narrowings (a third of the
//! instructions).
//!
//! Here: the operators; `rule` matches tract's quantizations; `aarch64` the NEON loop; `tests`
//! checks them against tract.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

#[cfg(target_arch = "aarch64")]
mod aarch64;
mod rule;
#[cfg(test)]
mod tests;

pub(crate) use rule::{fuse_concat, replacement};

/// `1.5 * 2^23`: adding then subtracting it rounds an f32 below 2^22 in magnitude to the
/// nearest integer, ties to even (the default rounding mode).
const ROUNDER: f32 = 12_582_912.0;

/// Beyond this magnitude every value saturates to 0 or 255 anyway.
const LIMIT: f32 = 1_048_576.0;

/// `u8(clamp(round_half_even(x * scale) + zero_point, 0, 255))` over an f32 tensor; a drop-in
/// replacement for tract's `QuantizeLinearU8` on f32 input (`scale` is the reciprocal of the
/// ONNX scale, as tract stores it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Quantize {
    scale_bits: u32,
    zero_point: u8,
}

crate::simd::with_avx512_copy!(Quantize, run, run_any, xs: &[f32], ys: &mut [u8]);

impl Quantize {
    #[inline(always)]
    fn run_any(&self, xs: &[f32], ys: &mut [u8]) {
        #[cfg(target_arch = "aarch64")]
        let (xs, ys) = {
            let done = self.run_neon(xs, ys);
            (&xs[done..], &mut ys[done..])
        };
        let scale = f32::from_bits(self.scale_bits);
        let zp = self.zero_point as i32;
        for (y, &x) in ys.iter_mut().zip(xs) {
            // Written as selects, which vectorise (f32::clamp and `as i32` do not): NaN
            // becomes 0 (tract's result), magnitudes beyond LIMIT saturate anyway, and the
            // rounded integer is read off the mantissa of v + 1.5 * 2^23.
            let v = x * scale;
            let v = if v.is_nan() { 0.0 } else { v };
            let v = if v < -LIMIT { -LIMIT } else { v };
            let v = if v > LIMIT { LIMIT } else { v };
            let q = ((v + ROUNDER).to_bits() as i32 - ROUNDER.to_bits() as i32) + zp;
            let q = if q < 0 { 0 } else { q };
            *y = if q > 255 { 255 } else { q as u8 };
        }
    }
}

impl Op for Quantize {
    fn name(&self) -> StaticName {
        "QuantizeU8".into()
    }

    op_as_typed_op!();
}

impl EvalOp for Quantize {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = &inputs[0];
        let xs = input.try_as_plain_ram()?.as_slice::<f32>()?;
        // SAFETY: every element is written by `run`.
        let mut out = unsafe { Tensor::uninitialized::<u8>(input.shape())? };
        let mut ram = out.try_as_plain_ram_mut()?;
        let ys = ram.as_slice_mut::<u8>()?;
        crate::threads::parallel_parts(ys, 1 << 14, |rows, part| {
            let from = rows.start << 14;
            self.run(&xs[from..from + part.len()], part)
        });
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for Quantize {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(u8::fact(inputs[0].shape.clone())))
    }
}

/// `Quantize(Concat(inputs))` in one pass, each input quantized straight into its block of the
/// output: the same bytes (quantization is elementwise) without writing and reading back the
/// concatenated floats. Only for concatenations whose blocks are contiguous (nothing but unit
/// axes before the concatenation axis).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QuantizeConcat {
    quantize: Quantize,
    axis: usize,
}

impl Op for QuantizeConcat {
    fn name(&self) -> StaticName {
        "QuantizeConcatU8".into()
    }

    op_as_typed_op!();
}

impl EvalOp for QuantizeConcat {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let first = inputs.first().context("QuantizeConcat: no input")?;
        let mut shape: TVec<usize> = first.shape().into();
        ensure!(
            shape.len() > self.axis && shape[..self.axis].iter().all(|&d| d == 1),
            "QuantizeConcat: input {shape:?} is not split along axis {}",
            self.axis
        );
        shape[self.axis] = inputs.iter().map(|t| t.shape()[self.axis]).sum();
        // SAFETY: every element is written, block by block.
        let mut out = unsafe { Tensor::uninitialized::<u8>(&shape)? };
        let mut ram = out.try_as_plain_ram_mut()?;
        let mut rest = ram.as_slice_mut::<u8>()?;
        for input in &inputs {
            let same = input.rank() == shape.len()
                && (0..shape.len()).all(|a| a == self.axis || input.shape()[a] == shape[a]);
            ensure!(
                same,
                "QuantizeConcat: input {:?} does not fit",
                input.shape()
            );
            let xs = input.try_as_plain_ram()?;
            let xs = xs.as_slice::<f32>()?;
            let (block, tail) = std::mem::take(&mut rest).split_at_mut(xs.len());
            crate::threads::parallel_parts(block, 1 << 14, |rows, part| {
                let from = rows.start << 14;
                self.quantize.run(&xs[from..from + part.len()], part)
            });
            rest = tail;
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for QuantizeConcat {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape = inputs[0].shape.clone();
        let sum: TDim = inputs.iter().map(|f| f.shape[self.axis].clone()).sum();
        shape.set(self.axis, sum);
        Ok(tvec!(u8::fact(shape)))
    }
}
