//! The rule: which of tract's `Im2col` nodes a [`PackedIm2Col`] replaces.

use tract_onnx::tract_core::ops::cnn::conv::Im2Col;

use super::*;

impl PackedIm2Col {
    /// The replacement for an `Im2col` whose output fact is `output`, or `None` where this op
    /// does not cover it (groups, 1-D or 3-D kernels, another packing).
    pub fn replacing(op: &Im2Col, input: &TypedFact, output: &TypedFact) -> Option<Self> {
        let pof = output
            .exotic_fact
            .as_ref()?
            .downcast_ref::<PackedExoticFact>()?;
        let spec = &op.pool_spec;
        let shape = input.shape.as_concrete()?;
        let geo = Geometry::new(spec, shape).ok()?;
        let layout = Layout::of(&*pof.format, input.datum_type, pof.k)?;
        (op.group == 1 && geo.k() == pof.k && pof.mn.to_usize().ok() == Some(geo.n())).then(|| {
            PackedIm2Col {
                pool_spec: spec.clone(),
                format: pof.format.clone(),
                layout,
                k: pof.k,
            }
        })
    }
}

/// The replacement for `node` if it is an `Im2col` that [`PackedIm2Col`] covers.
pub(crate) fn replacement(model: &TypedModel, node: &TypedNode) -> Option<Box<dyn TypedOp>> {
    let op = node.op_as::<Im2Col>()?;
    let input = model.outlet_fact(node.inputs[0]).ok()?;
    PackedIm2Col::replacing(op, input, &node.outputs[0].fact).map(|op| Box::new(op) as _)
}
