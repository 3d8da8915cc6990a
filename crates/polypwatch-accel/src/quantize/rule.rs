//! The rules: which of tract's quantizations a [`Quantize`] replaces, and which quantized
//! concatenations a [`QuantizeConcat`].

use tract_onnx::tract_core::ops::array::TypedConcat;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::quant::QuantizeLinearU8;

use super::*;

/// The replacement for `node` if it is tract's `QuantizeLinearU8` on f32.
pub(crate) fn replacement(model: &TypedModel, node: &TypedNode) -> Option<Box<dyn TypedOp>> {
    let q = node
        .op_as::<ElementWiseOp>()?
        .0
        .downcast_ref::<QuantizeLinearU8>()?;
    let input = model.outlet_fact(*node.inputs.first()?).ok()?;
    let plain = input.datum_type == f32::datum_type()
        && !input.is_exotic()
        && node.outputs[0].fact.datum_type == u8::datum_type();
    plain.then(|| {
        Box::new(Quantize {
            scale_bits: q.scale.to_bits(),
            zero_point: q.zero_point,
        }) as _
    })
}

/// The fused op and its inputs for `node`, a [`Quantize`] of a concatenation of f32 tensors
/// that feeds nothing else, with contiguous blocks.
pub(crate) fn fuse_concat(
    model: &TypedModel,
    node: &TypedNode,
) -> Option<(Box<dyn TypedOp>, TVec<OutletId>)> {
    let quantize = node.op_as::<Quantize>()?;
    let concat_outlet = *node.inputs.first()?;
    let concat_node = model.node(concat_outlet.node);
    let concat = concat_node.op_as::<TypedConcat>()?;
    let fact = model.outlet_fact(concat_outlet).ok()?;
    let shape = fact.shape.as_concrete()?;
    let plain = |o: &OutletId| {
        model
            .outlet_fact(*o)
            .is_ok_and(|f| f.datum_type == f32::datum_type() && !f.is_exotic())
    };
    let fits = model.outlet_successors(concat_outlet).len() == 1
        && shape[..concat.axis].iter().all(|&d| d == 1)
        && concat_node.inputs.iter().all(plain);
    fits.then(|| {
        let op = QuantizeConcat {
            quantize: quantize.clone(),
            axis: concat.axis,
        };
        (
            Box::new(op) as _,
            concat_node.inputs.iter().copied().collect(),
        )
    })
}
