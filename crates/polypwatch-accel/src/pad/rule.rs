//! The rule: which of tract's `Pad` nodes a [`Pad`] replaces.

use tract_onnx::tract_core::ops::array::{Pad as TractPad, PadMode};

use super::*;

/// The replacement for `node` if it is a constant `Pad` of the last two axes of a plain 4-D
/// tensor of numbers.
pub(crate) fn replacement(model: &TypedModel, node: &TypedNode) -> Option<Box<dyn TypedOp>> {
    let pad = node.op_as::<TractPad>()?;
    let PadMode::Constant(value) = &pad.mode else {
        return None;
    };
    let input = model.outlet_fact(node.inputs[0]).ok()?;
    let plain = !input.is_exotic()
        && input.datum_type.is_number()
        && input.datum_type == value.datum_type()
        && value.len() == 1;
    let only_planes = pad.pads.len() == 4 && pad.pads[0] == (0, 0) && pad.pads[1] == (0, 0);
    (plain && only_planes).then(|| {
        Box::new(Pad {
            pads: [pad.pads[2], pad.pads[3]],
            value: value.clone(),
        }) as _
    })
}
