//! Max pooling on the int8 model's bytes, and dequantization.
//!
//! The int8 export max-pools in float: `QConv -> DequantizeLinear -> MaxPool`, 0.7 ms of a
//! frame in tract's generic pooling over 32 x 128 x 128 floats. Dequantization
//! (`(q - zero_point) * scale`, `scale > 0`) is non-decreasing, so the maximum of dequantized
//! values is the dequantized maximum, to the bit: [`MaxPoolU8`] pools the bytes and the
//! dequantization follows, on a quarter of the values. [`Dequantize`] is tract's
//! `DequantizeLinearF32` on u8, vectorised and shared between threads.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::OptMaxPool;
use tract_onnx::tract_core::ops::quant::DequantizeLinearF32;

use crate::im2col::Geometry;

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

/// [`MaxPoolF32`] for tract's 2-D float max pooling at `node` (no index output).
pub(super) fn max_pool_f32(model: &TypedModel, node: &TypedNode) -> Option<Box<dyn TypedOp>> {
    let pool = node.op_as::<OptMaxPool>()?;
    let fact = model.outlet_fact(*node.inputs.first()?).ok()?;
    if pool.with_index_outputs.is_some()
        || pool.pool_spec.kernel_shape.len() != 2
        || fact.datum_type != f32::datum_type()
    {
        return None;
    }
    let geo = Geometry::new(&pool.pool_spec, fact.shape.as_concrete()?).ok()?;
    (geo.c * geo.h * geo.w * geo.oh * geo.ow > 0).then(|| Box::new(MaxPoolF32 { geo }) as _)
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

/// tract's dequantization at `node`, if it is one of a plain u8 tensor.
fn dequantize_of(model: &TypedModel, node: &TypedNode) -> Option<Dequantize> {
    let op = node.op_as::<DequantizeLinearF32>()?;
    let input = model.outlet_fact(*node.inputs.first()?).ok()?;
    (input.datum_type == u8::datum_type() && !input.is_exotic()).then_some(Dequantize {
        scale_bits: op.scale.to_bits(),
        zero_point: op.zero_point,
    })
}

/// The replacement for `node` if it is tract's dequantization of u8.
pub(super) fn dequantize(model: &TypedModel, node: &TypedNode) -> Option<Box<dyn TypedOp>> {
    dequantize_of(model, node).map(|op| Box::new(op) as _)
}

/// Swaps `Dequantize -> MaxPool` for `MaxPoolU8 -> Dequantize` at `node`, a max pooling whose
/// input is a dequantization (positive scale) that feeds nothing else. Returns whether it did.
pub(super) fn swap_max_pool(model: &mut TypedModel, node: usize) -> TractResult<bool> {
    let pool_node = model.node(node);
    let Some(pool) = pool_node.op_as::<OptMaxPool>() else {
        return Ok(false);
    };
    let dq_outlet = pool_node.inputs[0];
    let dq_node = model.node(dq_outlet.node);
    let Some(dq) = dequantize_of(model, dq_node) else {
        return Ok(false);
    };
    let x = dq_node.inputs[0];
    let shape = model
        .outlet_fact(x)?
        .shape
        .as_concrete()
        .map(|s| s.to_vec());
    let geo = shape.and_then(|s| Geometry::new(&pool.pool_spec, &s).ok());
    let single_use = model.outlet_successors(dq_outlet).len() == 1;
    let Some(geo) = geo.filter(|g| g.c * g.h * g.w > 0) else {
        return Ok(false);
    };
    if pool.with_index_outputs.is_some()
        || !single_use
        || f32::from_bits(dq.scale_bits) <= 0.0
        || pool.pool_spec.kernel_shape.len() != 2
    {
        return Ok(false);
    }
    let mut patch = TypedModelPatch::default();
    let input = patch.tap_model(model, x)?;
    let pooled = patch.wire_node(
        format!("{}.u8", pool_node.name),
        MaxPoolU8 { geo },
        &[input],
    )?;
    let out = patch.wire_node(format!("{}.dequantize", pool_node.name), dq, &pooled)?;
    patch.shunt_outside(model, OutletId::new(node, 0), out[0])?;
    patch.apply(model)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::shipped_model;

    /// Our pooling then dequantization gives tract's dequantization then pooling, on the
    /// shipped int8 model's pooling and on other geometries, for every byte value.
    #[test]
    fn pooled_bytes_dequantize_to_tracts_pooled_floats() {
        let model = shipped_model("polypwatch-edge-int8.onnx");
        let specs: Vec<_> = model
            .nodes()
            .iter()
            .filter_map(|n| n.op_as::<OptMaxPool>().map(|p| p.pool_spec.clone()))
            .collect();
        assert_eq!(specs.len(), 1, "the shipped model pools once");
        let mut cases = vec![(specs[0].clone(), [1usize, 5, 13, 11])];
        for (k, s, p) in [(2, 2, 0), (3, 1, 1), (3, 2, 0), (5, 3, 2)] {
            let mut spec = specs[0].clone();
            spec.kernel_shape = tvec!(k, k);
            spec.strides = Some(tvec!(s, s));
            spec.padding =
                tract_onnx::tract_core::ops::cnn::PaddingSpec::Explicit(tvec!(p, p), tvec!(p, p));
            cases.push((spec, [1, 3, 17, 20]));
        }
        let dq = DequantizeLinearF32 {
            scale: 0.0496747,
            zero_point: 3,
        };
        for (mut spec, shape) in cases {
            (spec.input_channels, spec.output_channels) = (shape[1], shape[1]);
            let n = shape.iter().product::<usize>();
            let bytes: Vec<u8> = (0..n).map(|i| ((i * 97 + i / 7) % 256) as u8).collect();
            let x = Tensor::from_shape(&shape, &bytes).unwrap();
            let theirs = dequantize_then_pool(&spec, shape, &dq);
            let expected = theirs.clone().into_runnable().unwrap();
            let expected = expected.run(tvec!(x.clone().into())).unwrap();
            let mut ours = theirs;
            let pool = ours
                .nodes()
                .iter()
                .find(|n| n.op_is::<OptMaxPool>())
                .map(|n| n.id)
                .unwrap();
            assert!(swap_max_pool(&mut ours, pool).unwrap(), "{spec:?}");
            let got = ours.into_runnable().unwrap().run(tvec!(x.into())).unwrap();
            assert_eq!(expected[0].shape(), got[0].shape(), "{spec:?}");
            assert!(expected[0].as_bytes() == got[0].as_bytes(), "{spec:?}");
        }
    }

    /// Our float pooling gives tract's, negative values and padding included.
    #[test]
    fn float_pooling_is_tracts() {
        use tract_onnx::tract_core::ops::cnn::{MaxPool, PaddingSpec, PoolSpec};
        use tract_onnx::tract_core::ops::nn::DataFormat;
        for (k, s, p, shape) in [
            (3, 2, 1, [1, 4, 16, 16]),
            (2, 2, 0, [1, 3, 17, 20]),
            (3, 1, 1, [1, 2, 9, 7]),
            (5, 3, 2, [1, 3, 17, 20]),
        ] {
            let spec = PoolSpec {
                data_format: DataFormat::NCHW,
                kernel_shape: tvec!(k, k),
                padding: PaddingSpec::Explicit(tvec!(p, p), tvec!(p, p)),
                dilations: None,
                strides: Some(tvec!(s, s)),
                input_channels: shape[1],
                output_channels: shape[1],
            };
            let mut m = TypedModel::default();
            let x = m.add_source("x", f32::fact(shape)).unwrap();
            let o = m.wire_node("pool", MaxPool::new(spec, None), &[x]).unwrap();
            m.select_output_outlets(&o).unwrap();
            let theirs = m.into_optimized().unwrap();
            let n = shape.iter().product::<usize>();
            let values: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 70.0) / 9.0)
                .collect();
            let x = Tensor::from_shape(&shape, &values).unwrap();
            let expected = theirs.clone().into_runnable().unwrap();
            let expected = expected.run(tvec!(x.clone().into())).unwrap();
            let mut ours = theirs;
            assert_eq!(
                crate::patch::replace_each(&mut ours, max_pool_f32).unwrap(),
                1
            );
            let got = ours.into_runnable().unwrap().run(tvec!(x.into())).unwrap();
            assert_eq!(expected[0].shape(), got[0].shape(), "{k} {s} {p}");
            assert!(expected[0].as_bytes() == got[0].as_bytes(), "{k} {s} {p}");
        }
    }

    /// tract's plan for `MaxPool(DequantizeLinear(x))`.
    fn dequantize_then_pool(
        spec: &tract_onnx::tract_core::ops::cnn::PoolSpec,
        shape: [usize; 4],
        dq: &DequantizeLinearF32,
    ) -> TypedModel {
        let mut m = TypedModel::default();
        let s = m.add_source("x", u8::fact(shape)).unwrap();
        let d = m.wire_node("dq", dq.clone(), &[s]).unwrap();
        let pool = tract_onnx::tract_core::ops::cnn::MaxPool::new(spec.clone(), None);
        let o = m.wire_node("pool", pool, &d).unwrap();
        m.select_output_outlets(&o).unwrap();
        m.into_optimized().unwrap()
    }
}
