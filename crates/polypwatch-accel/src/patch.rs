//! Applying a rewrite rule to every node of a model, and graph helpers the rules share.

use tract_onnx::prelude::*;

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
pub(crate) fn swap_each(
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
pub(crate) fn replace_each(
    model: &mut TypedModel,
    replacement: impl Fn(&TypedModel, &TypedNode) -> Option<Box<dyn TypedOp>>,
) -> TractResult<usize> {
    replace_each_wired(model, |model, node| {
        replacement(model, node).map(|op| (op, node.inputs.iter().copied().collect()))
    })
}

/// Replaces every node for which `replacement` offers an operator and the outlets it reads
/// (same output); nodes left without a consumer are then removed.
pub(crate) fn replace_each_wired(
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
