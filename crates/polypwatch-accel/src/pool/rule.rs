//! The rules: which of tract's max pools and dequantizations the operators here replace, and
//! the swap of a dequantization and the max pool after it.

use tract_onnx::tract_core::ops::cnn::OptMaxPool;
use tract_onnx::tract_core::ops::quant::DequantizeLinearF32;

use super::*;

/// [`MaxPoolF32`] for tract's 2-D float max pooling at `node` (no index output).
pub(crate) fn max_pool_f32(model: &TypedModel, node: &TypedNode) -> Option<Box<dyn TypedOp>> {
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
pub(crate) fn dequantize(model: &TypedModel, node: &TypedNode) -> Option<Box<dyn TypedOp>> {
    dequantize_of(model, node).map(|op| Box::new(op) as _)
}

/// Swaps `Dequantize -> MaxPool` for `MaxPoolU8 -> Dequantize` at `node`, a max pooling whose
/// input is a dequantization (positive scale) that feeds nothing else. Returns whether it did.
pub(crate) fn swap_max_pool(model: &mut TypedModel, node: usize) -> TractResult<bool> {
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
