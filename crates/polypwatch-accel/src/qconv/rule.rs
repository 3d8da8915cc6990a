//! The rule: which of tract's int8 products (and what feeds and follows them) a [`QConv`]
//! replaces, and the [`QConv`] built from them: the weights repacked into our panels, tract's
//! fused steps read back.

use tract_onnx::tract_core::ops::change_axes::IntoShape;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::matmul::optimized::{MatMulOperand, OptMatMul, ProtoFusedSpec};
use tract_onnx::tract_core::ops::quant::OffsetU8asI8;
use tract_onnx::tract_core::tract_linalg::mmm::{
    EagerPackedInput, MMMInputValue, OutputStoreSpec, PackedMatrixStorage,
};
use tract_onnx::tract_core::tract_linalg::pack::PackedI8K4;

use super::*;
use crate::im2col::PackedIm2Col;

impl Step {
    /// The step for one of tract's fused ops, or `None` where it is not covered.
    fn of(
        spec: &ProtoFusedSpec,
        model: &TypedModel,
        node: &TypedNode,
        m: usize,
        weights_are_a: bool,
    ) -> Option<Step> {
        let konst = |i: &usize| -> Option<Vec<i32>> {
            let fact = model.outlet_fact(*node.inputs.get(*i)?).ok()?;
            let t = fact.konst.as_ref()?;
            (t.datum_type() == i32::datum_type()).then(|| {
                t.try_as_plain_ram()
                    .ok()?
                    .as_slice::<i32>()
                    .ok()
                    .map(|s| s.to_vec())
            })?
        };
        match spec {
            // Per output channel: rows when the weights are the left operand, else columns.
            ProtoFusedSpec::BinPerRow(i, op, _) if weights_are_a => {
                let v = konst(i)?;
                (v.len() == m).then_some(Step::PerRow(*op, v))
            }
            ProtoFusedSpec::BinPerCol(i, op, _) if !weights_are_a => {
                let v = konst(i)?;
                (v.len() == m).then_some(Step::PerRow(*op, v))
            }
            ProtoFusedSpec::BinScalar(i, op) => match konst(i)?[..] {
                [v] => Some(Step::Scalar(*op, v)),
                _ => None,
            },
            ProtoFusedSpec::Scaler(s) => (s.policy != RoundingPolicy::Native && s.shift.abs() < 32)
                .then_some(Step::Scale {
                    mult: s.mult,
                    shift: s.shift,
                    policy: s.policy,
                }),
            _ => None,
        }
    }
}

impl QConv {
    /// Whether a matrix-product operand is a constant.
    fn is_const(model: &TypedModel, node: &TypedNode, operand: &MatMulOperand) -> bool {
        match operand {
            MatMulOperand::Const(_) => true,
            MatMulOperand::Input(i) => node
                .inputs
                .get(*i)
                .and_then(|o| model.outlet_fact(*o).ok())
                .is_some_and(|f| f.konst.is_some()),
        }
    }

    /// The u8 tensor behind `x` if `x` is tract's `OffsetU8asI8` of it (`x = u8 - 128` as i8),
    /// through reshapes, and whether it is; else `x`.
    fn before_offset(model: &TypedModel, x: OutletId) -> (OutletId, bool) {
        let mut at = x;
        loop {
            let node = model.node(at.node);
            if node.op_is::<IntoShape>() {
                at = node.inputs[0];
                continue;
            }
            let offset = node
                .op_as::<ElementWiseOp>()
                .is_some_and(|e| e.0.downcast_ref::<OffsetU8asI8>().is_some());
            let input = node
                .inputs
                .first()
                .and_then(|i| Some((*i, model.outlet_fact(*i).ok()?)));
            return match input {
                Some((i, fact)) if offset && fact.datum_type == u8::datum_type() => (i, true),
                _ => (x, false),
            };
        }
    }

    /// For a 1x1 convolution of tract's `Downsample` of `x` (every other row and column: a
    /// strided 1x1 convolution), the strided convolution of the tensor before it, which reads
    /// it in place; else `(geo, x)` unchanged.
    fn before_downsample(model: &TypedModel, geo: Geometry, x: OutletId) -> (Geometry, OutletId) {
        let unit = geo.kh == 1 && geo.kw == 1 && geo.sy == 1 && geo.sx == 1;
        let (at, strides) = crate::patch::through_downsample(model, x);
        let Some(shape) = model
            .outlet_fact(at)
            .ok()
            .and_then(|f| f.shape.as_concrete())
        else {
            return (geo, x);
        };
        if !unit || at == x {
            return (geo, x);
        }
        match Geometry::pointwise(shape, strides) {
            Ok(g) if g.out_hw() == geo.out_hw() && g.c == geo.c => (g, at),
            _ => (geo, x),
        }
    }

    /// The geometry, input and padding byte behind the patches at `outlet`: our im2col, or
    /// tract's packing of an NCHW input with `k` channels for a 1x1 convolution.
    fn patches_source(
        model: &TypedModel,
        outlet: OutletId,
        k: usize,
    ) -> Option<(Geometry, OutletId, u8)> {
        let node = model.node(outlet.node);
        let x_outlet = *node.inputs.first()?;
        let x = model.outlet_fact(x_outlet).ok()?;
        let shape = x.shape.as_concrete()?;
        if x.datum_type != i8::datum_type() {
            return None;
        }
        if let Some(im2col) = node.op_as::<PackedIm2Col>() {
            let geo = im2col.geometry(shape).ok()?;
            let pad = match node.inputs.get(1) {
                Some(p) => {
                    let t = model.outlet_fact(*p).ok()?.konst.clone()?;
                    t.cast_to_scalar::<i32>().ok()? as i8 as u8
                }
                None => 0,
            };
            return Some((geo, x_outlet, pad));
        }
        if node.op.name() != "OptMatMulPack" {
            return None;
        }
        // tract does not expose the packed axes; its Debug output names them. Anything but the
        // channels as k and the columns as mn of an NCHW input is left to tract.
        let debug = format!("{:?}", node.op);
        let field = |name: &str| -> Option<usize> {
            let rest = debug.split(&format!("{name}: ")).nth(1)?;
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        };
        let &[1, c, _, _] = shape else {
            return None;
        };
        if field("k_axis")? != 1 || field("mn_axis")? != 3 || c != k {
            return None;
        }
        let geo = Geometry::pointwise(shape, [1, 1]).ok()?;
        Some((geo, x_outlet, 0))
    }
}

impl Requant {
    /// The largest `|acc|` whose `|acc| * mult` is below 2^53, so exact in an f64: up to it a
    /// vector requantization multiplies in f64 instead of tract's i64 steps.
    pub(super) fn exact_limit(&self) -> u32 {
        (((1u64 << 53) - 1) / self.mult as u64).min(i32::MAX as u64) as u32
    }

    pub(super) fn of(steps: &[Step]) -> Option<Requant> {
        // `mult > 0` (tract's multipliers are), so that the f64 path's scale is positive.
        let [
            Step::Scale {
                mult: Some(mult),
                shift,
                policy: RoundingPolicy::Even,
            },
            adds @ ..,
            Step::Scalar(BinOp::Min, hi),
            Step::Scalar(BinOp::Max, lo),
        ] = steps
        else {
            return None;
        };
        let shift = u32::try_from(shift + 31)
            .ok()
            .filter(|s| (1..63).contains(s))?;
        let mut add = 0i32;
        for step in adds {
            add = match step {
                Step::Scalar(BinOp::Add, v) => add.wrapping_add(*v),
                Step::Scalar(BinOp::SubF, v) => add.wrapping_sub(*v),
                _ => return None,
            };
        }
        Some(Requant {
            mult: *mult,
            shift,
            add,
            hi: *hi,
            lo: *lo,
        })
    }
}

/// The weights `w[m][k]` of a packed `PackedI8K4` operand.
fn unpack_weights(value: &dyn MMMInputValue) -> Option<(usize, usize, Vec<i8>)> {
    let eager = value.downcast_ref::<EagerPackedInput>()?;
    let format = eager.fact.format.downcast_ref::<PackedI8K4>()?;
    let (m, k, r) = (eager.mn, eager.fact.k, format.r);
    let bytes = eager.packed.as_bytes();
    let mut w = vec![0i8; m * k];
    for mi in 0..m {
        for ki in 0..k {
            let at = (mi / r) * eager.panel_bytes + (ki / 4) * r * 4 + (mi % r) * 4 + ki % 4;
            w[mi * k + ki] = *bytes.get(at)? as i8;
        }
    }
    Some((m, k, w))
}

impl QConv {
    /// The replacement for `node`, an int8 convolution's `OptMatMul`, where every part of it is
    /// covered: i8 x i8 with i32 accumulators, constant packed weights on one side, on the
    /// other the patches of our im2col or the packed input of a 1x1 convolution, consumed only
    /// here; constant fused operands; a plain NCHW output. Returns the op and the input it reads.
    pub(super) fn replacing(
        model: &TypedModel,
        node: &TypedNode,
        kernel: Kernel,
    ) -> Option<(QConv, OutletId)> {
        let op = node.op_as::<OptMatMul>()?;
        let [
            ProtoFusedSpec::AddMatMul { a, b, packings, .. },
            steps @ ..,
            ProtoFusedSpec::Store(store),
        ] = &op.micro_ops[..]
        else {
            return None;
        };
        if op.mmm.len() != 1
            || op.mmm[0].internal_type() != i32::datum_type()
            || packings.len() != 1
            || packings[0].1.is_some()
        {
            return None;
        }
        // Which side the weights are on: tract puts them on either.
        let (weights, patches, weights_are_a) = match (a, b) {
            (_, MatMulOperand::Input(bi)) if Self::is_const(model, node, a) => (a, *bi, true),
            (MatMulOperand::Input(ai), _) if Self::is_const(model, node, b) => (b, *ai, false),
            _ => return None,
        };
        let (m, k, w) = match weights {
            MatMulOperand::Const(v) => unpack_weights(&**v)?,
            MatMulOperand::Input(i) => {
                let t = model
                    .outlet_fact(*node.inputs.get(*i)?)
                    .ok()?
                    .konst
                    .clone()?;
                let storage = t.try_storage_as::<PackedMatrixStorage>().ok()?;
                (storage.values().len() == 1).then_some(())?;
                unpack_weights(storage.value())?
            }
        };
        // The patches: our im2col, or tract's packing of a 1x1 convolution's input.
        let p_outlet = *node.inputs.get(patches)?;
        if model.outlet_successors(p_outlet).len() != 1 {
            return None;
        }
        let (geo, x_outlet, pad) = Self::patches_source(model, p_outlet, k)?;
        let (x_outlet, unsigned) = Self::before_offset(model, x_outlet);
        let (geo, x_outlet) = Self::before_downsample(model, geo, x_outlet);
        let (pad, flip) = if unsigned {
            (pad ^ 0x80, 0)
        } else {
            (pad, 0x80)
        };
        if k != geo.k() || !geo.out_hw().1.is_multiple_of(NR) {
            return None;
        }
        // The output: N = 1, then the channels, then the pixels (`[n]` or `[oh, ow]`).
        let [
            OutputStoreSpec::View {
                m_axis: Some(ma),
                n_axis: Some(na),
                ..
            },
        ] = store[..]
        else {
            return None;
        };
        let channel_axis = if weights_are_a { ma } else { na };
        let out_shape: TVec<usize> = op.c_fact.shape.as_concrete()?.into();
        let out_dt = op.c_fact.datum_type;
        let (oh, ow) = geo.out_hw();
        let before = out_shape.get(..channel_axis)?;
        let after = out_shape.get(channel_axis + 1..)?;
        let pixels: TVec<usize> = after.iter().copied().filter(|&d| d != 1).collect();
        let pixels_ok =
            pixels.is_empty() && geo.n() == 1 || pixels[..] == [geo.n()] || pixels[..] == [oh, ow];
        if out_shape.get(channel_axis) != Some(&m)
            || before.iter().any(|&d| d != 1)
            || !pixels_ok
            || after.iter().product::<usize>() != geo.n()
            || ![u8::datum_type(), i8::datum_type(), i32::datum_type()].contains(&out_dt)
        {
            return None;
        }
        let steps = steps
            .iter()
            .map(|s| Step::of(s, model, node, m, weights_are_a))
            .collect::<Option<Vec<_>>>()?;
        let (taps, c) = (geo.taps(), geo.channels());
        let c4 = c.div_ceil(4);
        let groups = taps * c4;
        // Where product `ki` (tract's order: channel, then tap) of channel `mi` goes in its
        // panel.
        let place = |mi: usize, ki: usize| {
            let (ci, t) = (ki / taps, ki % taps);
            kernel.weight_at(groups, t * c4 + ci / 4, mi % MR, ci % 4)
        };
        let mut weights = vec![0u8; m.div_ceil(MR) * groups * MR * 4];
        let mut correction = vec![0i32; m];
        let mut abs_sums = vec![0i64; m];
        let mut tap_sums = vec![0i32; m * taps];
        for mi in 0..m {
            let panel = (mi / MR) * groups * MR * 4;
            for ki in 0..k {
                let v = w[mi * k + ki];
                weights[panel + place(mi, ki)] = v as u8;
                correction[mi] += 128 * v as i32;
                abs_sums[mi] += i64::from(v).abs();
                tap_sums[mi * taps + ki % taps] += v as i32;
            }
        }
        let row_sums = tap_sums
            .chunks_exact(taps)
            .map(|t| t.iter().fold(0i32, |a, &v| a.wrapping_add(v)))
            .collect();
        let mut offset: Vec<i32> = correction.iter().map(|c| c.wrapping_neg()).collect();
        let mut steps = steps;
        let additive = steps
            .iter()
            .take_while(|s| {
                matches!(
                    s,
                    Step::PerRow(BinOp::Add | BinOp::SubF, _)
                        | Step::Scalar(BinOp::Add | BinOp::SubF, _)
                )
            })
            .count();
        for step in steps.drain(..additive) {
            for (mi, o) in offset.iter_mut().enumerate() {
                *o = match &step {
                    Step::PerRow(BinOp::Add, v) => o.wrapping_add(v[mi]),
                    Step::PerRow(_, v) => o.wrapping_sub(v[mi]),
                    Step::Scalar(BinOp::Add, v) => o.wrapping_add(*v),
                    Step::Scalar(_, v) => o.wrapping_sub(*v),
                    Step::Scale { .. } => unreachable!("not additive"),
                };
            }
        }
        let requant = Requant::of(&steps);
        // `sum + offset` is `sum_k w (u - 128) + (128 sum_k w + offset)` for the unsigned
        // inputs `u`.
        let sum_bound = (0..m)
            .map(|mi| {
                128 * abs_sums[mi] + (i64::from(correction[mi]) + i64::from(offset[mi])).abs()
            })
            .max()
            .unwrap_or(0);
        let qconv = QConv {
            geo,
            pad,
            flip,
            m,
            k,
            groups,
            weights: Arc::new(weights),
            tap_sums,
            row_sums,
            offset,
            steps,
            requant,
            sum_bound,
            out_shape,
            out_dt,
            dequantize: None,
            residual_relu: false,
            kernel,
        };
        Some((qconv, x_outlet))
    }
}

/// `QConv -> [IntoShape] -> Dequantize` at `node` (the dequantization), where the dequantization
/// is all that reads the convolution's u8 output: one `QConv` storing the dequantized floats
/// (the same arithmetic, so tract's values to the bit), and the input it reads. A pass over
/// the output fewer, and a quarter of the bytes written then read back.
pub(crate) fn fuse_dequantize(
    model: &TypedModel,
    node: &TypedNode,
) -> Option<(Box<dyn TypedOp>, TVec<OutletId>)> {
    let dq = node.op_as::<crate::pool::Dequantize>()?;
    let mut at = *node.inputs.first()?;
    loop {
        if model.outlet_successors(at).len() != 1 || model.outputs.contains(&at) {
            return None;
        }
        let n = model.node(at.node);
        if n.op_is::<IntoShape>() {
            at = *n.inputs.first()?;
            continue;
        }
        break;
    }
    let conv_node = model.node(at.node);
    let conv = conv_node.op_as::<QConv>()?;
    if conv.out_dt != u8::datum_type() || conv.dequantize.is_some() {
        return None;
    }
    let out_shape = model
        .outlet_fact(node.id.into())
        .ok()?
        .shape
        .as_concrete()?;
    if out_shape.iter().product::<usize>() != conv.out_shape.iter().product::<usize>() {
        return None;
    }
    let mut op = conv.clone();
    op.dequantize = Some((dq.zero_point, dq.scale_bits));
    op.out_shape = out_shape.into();
    Some((Box::new(op), conv_node.inputs.iter().copied().collect()))
}

/// `QConv (dequantizing) -> Add(residual) -> Max(0)` at `node` (tract's `OptBinChain` of the
/// two), where the chain is all that reads the convolution's floats: one `QConv` that adds the
/// residual and applies the ReLU as it stores (the same two float operations, so tract's
/// values to the bit). A pass that read two tensors and wrote a third is gone.
pub(crate) fn fuse_residual(
    model: &TypedModel,
    node: &TypedNode,
) -> Option<(Box<dyn TypedOp>, TVec<OutletId>)> {
    use tract_onnx::tract_core::ops::binary::OptBinChain;
    use tract_onnx::tract_core::tract_linalg::multithread::BShare;
    let chain = node.op_as::<OptBinChain>()?;
    let [add, max] = &chain.steps[..] else {
        return None;
    };
    if (add.linalg_op, add.share, max.linalg_op) != (BinOp::Add, BShare::Lockstep, BinOp::Max) {
        return None;
    }
    let [a, b, zero] = node.inputs[..] else {
        return None;
    };
    let zero = model.outlet_fact(zero).ok()?.konst.clone()?;
    if zero.datum_type() != f32::datum_type()
        || zero.len() != 1
        || zero.cast_to_scalar::<f32>().ok()? != 0.0
    {
        return None;
    }
    let out = model.outlet_fact(node.id.into()).ok()?;
    // Addition is commutative in floats too: the convolution may be either operand.
    [(a, b), (b, a)]
        .into_iter()
        .find_map(|(conv_out, residual)| {
            let conv_node = model.node(conv_out.node);
            let conv = conv_node.op_as::<QConv>()?;
            let rf = model.outlet_fact(residual).ok()?;
            let cf = model.outlet_fact(conv_out).ok()?;
            if conv.dequantize.is_none()
                || conv.residual_relu
                || model.outlet_successors(conv_out).len() != 1
                || model.outputs.contains(&conv_out)
                || rf.datum_type != f32::datum_type()
                || rf.shape != cf.shape
                || out.shape != cf.shape
            {
                return None;
            }
            let mut op = conv.clone();
            op.residual_relu = true;
            let inputs = tvec![conv_node.inputs[0], residual];
            Some((Box::new(op) as Box<dyn TypedOp>, inputs))
        })
}

/// The replacement for `node` and the input it reads, if `node` is an int8 matrix product fed
/// by our im2col that [`QConv`] covers, and this CPU has a kernel faster than tract's.
pub(crate) fn replacement(
    model: &TypedModel,
    node: &TypedNode,
) -> Option<(Box<dyn TypedOp>, TVec<OutletId>)> {
    let kernel = Kernel::fast()?;
    let (op, input) = QConv::replacing(model, node, kernel)?;
    Some((Box::new(op), tvec!(input)))
}
