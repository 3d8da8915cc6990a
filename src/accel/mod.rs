//! Rewrites of tract's optimised plan that make our models run faster, each a drop-in
//! replacement for one tract operator, written against tract's public API.
//!
//! They exist because tract spent most of a frame in a few generic operators: the int8
//! convolutions' im2col ([`im2col`]), bilinear upsampling ([`resize`]), float-to-int8
//! quantization ([`quantize`]) and the float convolutions' padding ([`pad`]). Each replacement
//! is checked against the operator it replaces on the shipped models, and an operator outside
//! what a replacement covers is left to tract.

pub mod im2col;
pub mod pad;
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
    /// Constant `Pad` nodes (float convolutions) now [`pad::Pad`].
    pub pad: usize,
}

/// Applies every rewrite to a model tract has optimised.
pub fn rewrite(model: &mut TypedModel) -> TractResult<Rewrites> {
    Ok(Rewrites {
        im2col: replace_each(model, im2col::replacement)?,
        resize: replace_each(model, resize::replacement)?,
        quantize: replace_each(model, quantize::replacement)?,
        pad: replace_each(model, pad::replacement)?,
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

/// A shipped model (`models/NAME`), optimised by tract, for the tests of the rewrites.
#[cfg(test)]
pub(crate) fn shipped_model(name: &str) -> TypedModel {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(name);
    tract_onnx::onnx()
        .model_for_path(path)
        .and_then(|m| m.into_optimized())
        .expect("the shipped model loads")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both shipped models, rewritten, give tract's logits to the bit.
    #[test]
    fn rewritten_models_give_tracts_logits() {
        for name in ["polypwatch-edge-f32.onnx", "polypwatch-edge-int8.onnx"] {
            let model = shipped_model(name);
            let reference = model.clone().into_runnable().unwrap();
            let mut ours = model;
            let done = rewrite(&mut ours).unwrap();
            let expected = if name.contains("int8") {
                done.im2col > 10 && done.quantize > 5 && done.resize >= 2
            } else {
                done.pad > 10 && done.resize >= 2
            };
            assert!(expected, "{name}: {done:?}");
            let ours = ours.into_runnable().unwrap();
            let input =
                tract_ndarray::Array4::<f32>::from_shape_fn((1, 3, 256, 256), |(_, c, y, x)| {
                    (((c * 131 + y * 17 + x * 5) % 97) as f32 / 48.0) - 1.0
                });
            let input: Tensor = input.into();
            let a = reference.run(tvec!(input.clone().into())).unwrap();
            let b = ours.run(tvec!(input.into())).unwrap();
            assert!(a[0].as_bytes() == b[0].as_bytes(), "{name}");
        }
    }
}
