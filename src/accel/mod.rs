//! Rewrites of tract's optimised plan that make our models run faster, each a drop-in
//! replacement for one tract operator, written against tract's public API.
//!
//! They exist because tract spent most of a frame in a few generic operators: the int8
//! convolutions' im2col ([`im2col`]), bilinear upsampling ([`resize`]) and float-to-int8
//! quantization ([`quantize`]). Each replacement is checked against the operator it replaces
//! on the shipped models, and an operator outside what a replacement covers is left to tract.

pub mod im2col;
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
}

/// Applies every rewrite to a model tract has optimised.
pub fn rewrite(model: &mut TypedModel) -> TractResult<Rewrites> {
    Ok(Rewrites {
        im2col: replace_each(model, im2col::replacement)?,
        resize: replace_each(model, resize::replacement)?,
        quantize: replace_each(model, quantize::replacement)?,
    })
}

/// Replaces every node for which `replacement` offers an operator (same inputs, same output).
fn replace_each(
    model: &mut TypedModel,
    replacement: impl Fn(&TypedModel, &TypedNode) -> Option<Box<dyn TypedOp>>,
) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(op) = replacement(model, node) else {
            continue;
        };
        let inputs = node.inputs.clone();
        TypedModelPatch::replace_single_op(model, node, &inputs, op)?.apply(model)?;
        replaced += 1;
    }
    if replaced > 0 {
        model.compact()?;
    }
    Ok(replaced)
}
