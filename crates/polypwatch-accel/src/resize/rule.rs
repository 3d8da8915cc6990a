//! The rule: which of tract's `Resize` nodes a [`Bilinear`] replaces, with tract's own plan.

use tract_onnx::tract_core::ops::nn::resize::{Interpolator, Resize};

use super::*;

/// The replacement for `node` if it is a linear `Resize` of the last two axes of a static f32
/// NCHW tensor.
pub(crate) fn replacement(model: &TypedModel, node: &TypedNode) -> Option<Box<dyn TypedOp>> {
    let op = node.op_as::<Resize>()?;
    if !matches!(op.interpolator, Interpolator::Linear) {
        return None;
    }
    let input = model.outlet_fact(node.inputs[0]).ok()?;
    let output = &node.outputs[0].fact;
    if input.datum_type != f32::datum_type() || output.datum_type != f32::datum_type() {
        return None;
    }
    let (i, o) = (input.shape.as_concrete()?, output.shape.as_concrete()?);
    if i.len() != 4 || o.len() != 4 || i[..2] != o[..2] {
        return None;
    }
    // The scales tract's eval would use: the scales input when it names every axis, else the
    // ratio of sizes.
    let given: Option<Vec<f32>> = op
        .optional_scales_input
        .and_then(|ix| node.inputs.get(ix))
        .and_then(|&outlet| model.outlet_fact(outlet).ok()?.konst.clone())
        .filter(|t| t.len() == 4)
        .and_then(|t| {
            let t = t.cast_to::<f32>().ok()?;
            Some(t.try_as_plain_ram().ok()?.as_slice::<f32>().ok()?.to_vec())
        });
    let scales = given.unwrap_or_else(|| (0..4).map(|a| o[a] as f32 / i[a] as f32).collect());
    if scales[0] != 1.0 || scales[1] != 1.0 {
        return None;
    }
    let rows = Axis::from_plan(&op.plan_axis(scales[2], i[2], o[2]))?;
    let cols = Axis::from_plan(&op.plan_axis(scales[3], i[3], o[3]))?;
    Some(Box::new(Bilinear::new(rows, cols, i[3])))
}
