//! The rule: which convolutions of the decluttered model an [`FConv`] replaces (tract's `Conv`,
//! and the 1x1 ones tract declutters to an `EinSum`), with the residual addition and ReLU that
//! follow them, and the [`FConv`] built from them.

use tract_onnx::tract_core::ops::array::TypedConcat;
use tract_onnx::tract_core::ops::binary::{BinMiniOp, TypedBinOp};
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::math::{Add, Max};
use tract_onnx::tract_core::ops::nn::DataFormat;

use super::*;

impl FConv {
    /// The operator for `conv` of an input of `shape`, its weights `[m][c][kh][kw]` and bias
    /// (`m` values or one); `None` outside what it covers.
    fn new(
        conv: &Conv,
        shape: &[usize],
        kernel_w: &Tensor,
        bias: &Tensor,
        kernel: Kernel,
    ) -> Option<FConv> {
        if conv.group != 1
            || conv.q_params.is_some()
            || conv.kernel_fmt != KernelFormat::OIHW
            || conv.pool_spec.data_format != DataFormat::NCHW
        {
            return None;
        }
        let geo = Geometry::new(&conv.pool_spec, shape).ok()?;
        let &[m, c, kh, kw] = kernel_w.shape() else {
            return None;
        };
        if c != geo.c || kh != geo.kh || kw != geo.kw {
            return None;
        }
        let w = floats(kernel_w)?;
        let b = floats(bias)?;
        let b = match b.len() {
            1 => vec![b[0]; m],
            n if n == m => b.to_vec(),
            _ => return None,
        };
        FConv::with_weights(geo, m, &w, &b, kernel)
    }

    /// The operator for a 1x1 convolution as tract declutters it, `NIHW,OI->NOHW`, of
    /// `x` through `Downsample`s (a strided 1x1 convolution, read in place), and the outlet it
    /// reads.
    fn from_einsum(
        model: &TypedModel,
        node: &TypedNode,
        kernel: Kernel,
    ) -> Option<(FConv, OutletId)> {
        let op = node.op_as::<EinSum>()?;
        if op.q_params.is_some()
            || op.operating_dt != f32::datum_type()
            || op.axes.to_string() != "NIHW,OI->NOHW"
        {
            return None;
        }
        let [x, w] = node.inputs[..] else {
            return None;
        };
        let w = konst(model, w)?;
        let &[m, c] = w.shape() else {
            return None;
        };
        let (at, strides) = crate::patch::through_downsample(model, x);
        let fact = model.outlet_fact(at).ok()?;
        let shape = fact.shape.as_concrete()?;
        let out = model
            .outlet_fact(node.id.into())
            .ok()?
            .shape
            .as_concrete()?
            .to_vec();
        if fact.datum_type != f32::datum_type() || shape.get(1) != Some(&c) {
            return None;
        }
        let geo = Geometry::pointwise(shape, strides).ok()?;
        if out != [1, m, geo.oh, geo.ow] {
            return None;
        }
        let op = FConv::with_weights(geo, m, &floats(&w)?, &vec![0.0; m], kernel)?;
        Some((op, at))
    }
}

/// A float tensor's values.
fn floats(t: &Tensor) -> Option<Vec<f32>> {
    if t.datum_type() != f32::datum_type() {
        return None;
    }
    Some(t.try_as_plain_ram().ok()?.as_slice::<f32>().ok()?.to_vec())
}

/// The constant behind `outlet`, if any.
fn konst(model: &TypedModel, outlet: OutletId) -> Option<Arc<Tensor>> {
    model.outlet_fact(outlet).ok()?.konst.clone()
}

/// The only node reading `outlet`, if exactly one does (and it is not a model output).
fn sole_successor(model: &TypedModel, outlet: OutletId) -> Option<&TypedNode> {
    let succ = &model.node(outlet.node).outputs[outlet.slot].successors;
    if succ.len() != 1 || model.outputs.contains(&outlet) {
        return None;
    }
    Some(model.node(succ[0].node))
}

/// `node`'s other input if it is the binary operator `B` of `from` and another outlet.
fn binary_with<B: BinMiniOp>(node: &TypedNode, from: OutletId) -> Option<OutletId> {
    let op = node.op_as::<TypedBinOp>()?;
    if !op.0.is::<B>() || node.inputs.len() != 2 {
        return None;
    }
    match (node.inputs[0] == from, node.inputs[1] == from) {
        (true, false) => Some(node.inputs[1]),
        (false, true) => Some(node.inputs[0]),
        _ => None,
    }
}

/// The operator for convolution `node` and the input it reads, if [`FConv`] covers it.
fn from_conv(
    model: &TypedModel,
    node: &TypedNode,
    conv: &Conv,
    kernel: Kernel,
) -> TractResult<Option<(FConv, OutletId)>> {
    let [x, w, b] = node.inputs[..] else {
        return Ok(None);
    };
    let fact = model.outlet_fact(x)?;
    let (Some(shape), Some(w), Some(b)) =
        (fact.shape.as_concrete(), konst(model, w), konst(model, b))
    else {
        return Ok(None);
    };
    if fact.datum_type != f32::datum_type() {
        return Ok(None);
    }
    Ok(FConv::new(conv, shape, &w, &b, kernel).map(|op| (op, x)))
}

/// Replaces every float convolution [`FConv`] covers in a decluttered model, with the
/// residual addition and ReLU that follow it where there are; returns how many.
pub fn fuse(model: &mut TypedModel, kernel: Kernel) -> TractResult<usize> {
    let mut fused = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let found = match node.op_as::<Conv>() {
            Some(conv) => from_conv(model, node, conv, kernel)?,
            None => FConv::from_einsum(model, node, kernel),
        };
        let Some((mut op, x)) = found else {
            continue;
        };
        let out_shape = [1, op.m, op.geo.oh, op.geo.ow];
        let mut last = OutletId::new(id, 0);
        let mut inputs = tvec!(x);
        // A channel concatenation only this convolution reads: its parts are read in place
        // (the decoder's 128 + 48 channels at 64x64, a 2.9 MB copy fewer).
        let plane = [op.geo.h, op.geo.w];
        if !op.reads_in_place()
            && let Some(cat) = model.node(x.node).op_as::<TypedConcat>()
            && cat.axis == 1
            && model.outlet_successors(x).len() == 1
            && !model.outputs.contains(&x)
            && model.node(x.node).inputs.iter().all(|&i| {
                model.outlet_fact(i).is_ok_and(|f| {
                    f.datum_type == f32::datum_type()
                        && f.shape
                            .as_concrete()
                            .is_some_and(|s| s.len() == 4 && s[0] == 1 && s[2..] == plane)
                })
            })
        {
            inputs = model.node(x.node).inputs.iter().copied().collect();
            op.parts = inputs.len();
        }
        // tract declutters a 1x1 convolution's bias into an addition after the product.
        if node.op_is::<EinSum>()
            && let Some(add) = sole_successor(model, last)
            && let Some(b) = binary_with::<Add>(add, last)
            && let Some(b) = konst(model, b)
            && b.shape() == [1, op.m, 1, 1]
            && let Some(b) = floats(&b)
        {
            let mut bias = op.bias.0.to_vec();
            bias[..op.m].copy_from_slice(&b);
            op.bias = Floats(Arc::new(bias));
            last = add.id.into();
        }
        if let Some(add) = sole_successor(model, last)
            && let Some(r) = binary_with::<Add>(add, last)
            && model.outlet_fact(r)?.shape.as_concrete() == Some(&out_shape[..])
            && model.outlet_fact(r)?.datum_type == f32::datum_type()
        {
            op.residual = true;
            inputs.push(r);
            last = add.id.into();
        }
        if let Some(max) = sole_successor(model, last)
            && let Some(zero) = binary_with::<Max>(max, last)
            && let Some(zero) = konst(model, zero)
            && zero.datum_type() == f32::datum_type()
            && zero.len() == 1
            && zero.cast_to_scalar::<f32>()? == 0.0
        {
            op.relu = true;
            last = max.id.into();
        }
        let mut patch = TypedModelPatch::default();
        let taps = inputs
            .iter()
            .map(|&i| patch.tap_model(model, i))
            .collect::<TractResult<TVec<_>>>()?;
        let name = model.node(last.node).name.clone();
        let wired = patch.wire_node(format!("{name}.fconv"), op, &taps)?;
        patch.shunt_outside(model, last, wired[0])?;
        patch.apply(model)?;
        fused += 1;
    }
    if fused > 0 {
        model.compact()?;
    }
    Ok(fused)
}
