//! int8 convolutions on polypwatch's own matrix-product kernel.
//!
//! tract lowers an int8 convolution to an `OptMatMul` (the product of the packed weights with
//! the packed input patches, requantization fused in: bias, zero-point correction, fixed-point
//! scale, clamp) fed by an im2col (3x3, 7x7; [`super::im2col`]) or by a packing of the input
//! (1x1). On our model that was 20 of the 27 ms of an int8 frame, the product running tract's
//! VNNI kernel on 8x8 tiles of 256-bit registers and gaining nothing from a second thread.
//!
//! [`QConv`] replaces the product and what feeds it with one operator that reads its input in
//! place, without im2col: the input is interleaved by four channels (and split by column
//! phase where the x stride is 2) once (`im2col::Geometry::interleaved`), after which
//! one tap of four channels over 16 neighbouring output pixels is 64 neighbouring bytes.
//! Tiles are 16 channels by 16 pixels; tract's fused steps follow with tract's integer
//! arithmetic, so the output is tract's to the bit, and the output rows are shared between
//! tract's threads.
//!
//! The tile kernel is AVX-512 VNNI (`vpdpbusd`) on x86-64; [`super::rewrite`] only swaps
//! [`QConv`] in where the CPU has it. The portable kernel beside it exists so that the layouts
//! and the fused steps are tested on any CPU (aarch64 under qemu in CI); an aarch64 dot-product
//! kernel would slot in beside it.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::change_axes::IntoShape;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::matmul::optimized::{MatMulOperand, OptMatMul, ProtoFusedSpec};
use tract_onnx::tract_core::ops::quant::OffsetU8asI8;
use tract_onnx::tract_core::tract_linalg::BinOp;
use tract_onnx::tract_core::tract_linalg::mmm::{
    EagerPackedInput, MMMInputValue, OutputStoreSpec, PackedMatrixStorage, RoundingPolicy,
};
use tract_onnx::tract_core::tract_linalg::pack::PackedI8K4;

use crate::im2col::{Geometry, Interleaved, PackedIm2Col};
use crate::threads::SendPtr;

/// Output channels per tile (rows of the weight panels).
const MR: usize = 16;
/// Output pixels per tile: one 512-bit register of i32 lanes.
const NR: usize = 16;

/// One fused step after the product, as tract's kernels apply it: `op(operand, accumulator)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Step {
    /// A value per output channel.
    PerRow(BinOp, Vec<i32>),
    Scalar(BinOp, i32),
    /// tract's `Scaler` on i32: `x * mult >> (shift + 31)` rounded by `policy` (`mult: None`:
    /// a plain rounding shift, or a left shift where `shift <= 0`).
    Scale {
        mult: Option<i32>,
        shift: isize,
        policy: RoundingPolicy,
    },
}

/// The int8 convolution `PackedIm2col -> OptMatMul` as one operator.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QConv {
    geo: Geometry,
    /// The input's zero point, as the byte the padding takes.
    pad: u8,
    /// XORed into every input byte to make it the unsigned `x + 128` the kernel multiplies:
    /// 0x80 for i8 input, 0 where the op reads the u8 tensor before tract's `OffsetU8asI8`.
    flip: u8,
    m: usize,
    k: usize,
    /// Groups of four products per output: taps times groups of four channels.
    groups: usize,
    /// Weights as `MR`-channel panels of `groups x MR x 4` bytes, tap-major, then channel;
    /// rows past `m` and channels past the input's zero.
    weights: Arc<Vec<u8>>,
    /// `sum_c w[m][c][t]` for every channel `m` and tap `t`: what a tap that reads only
    /// padding adds, times the padding's unsigned value; such taps are skipped.
    tap_sums: Vec<i32>,
    /// Added to every product of channel `m` before `steps`: `-128 * sum_k w[m][k]` (the
    /// kernel multiplies `x + 128`, unsigned, by the weights), plus tract's leading additive
    /// steps (bias, zero-point correction), folded in (i32 wrapping sums commute).
    offset: Vec<i32>,
    steps: Vec<Step>,
    /// `steps` when they are the usual requantization, for a branch-free epilogue.
    requant: Option<Requant>,
    out_shape: TVec<usize>,
    /// The output is `[channel][pixel]` in memory (`geo.n()` pixels a channel), whatever its
    /// unit axes.
    out_dt: DatumType,
    /// `(zero_point, scale bits)` where the op also does the `DequantizeLinear` that was the
    /// output's only reader: it stores `(q - zero_point) as f32 * scale` (tract's arithmetic)
    /// instead of the u8 `q`.
    dequantize: Option<(i32, u32)>,
    /// With `dequantize`: the op also does the `Add` of a second input (a float tensor of the
    /// output's shape) and the ReLU (`Max` with 0) that follow it, storing
    /// `max(dequantized + residual, 0)`: a residual block's end.
    residual_relu: bool,
    kernel: Kernel,
}

/// Where a [`QConv`] stores: the output's data, and the residual it adds (null for none).
#[derive(Clone, Copy)]
struct Out {
    data: *mut u8,
    residual: *const f32,
}

/// `op(operand, acc)`, as tract's fused kernels define it (`Sub` is operand minus accumulator).
#[inline(always)]
fn bin(op: BinOp, operand: i32, acc: i32) -> i32 {
    match op {
        BinOp::Add => operand.wrapping_add(acc),
        BinOp::Sub => operand.wrapping_sub(acc),
        BinOp::SubF => acc.wrapping_sub(operand),
        BinOp::Mul => operand.wrapping_mul(acc),
        BinOp::Min => operand.min(acc),
        BinOp::Max => operand.max(acc),
    }
}

/// tract's rounding of `val / 2^shift` (`shift > 0`) under `policy`, written with the policy
/// chosen once per row so the loop vectorises.
#[inline(always)]
fn round_shift<const N: usize>(vals: &[i64; N], shift: u32, policy: RoundingPolicy) -> [i64; N] {
    let half = 1i64 << (shift - 1);
    let mut out = [0i64; N];
    macro_rules! each {
        (|$v:ident, $abs:ident| $nudge:expr) => {
            for (o, &$v) in out.iter_mut().zip(vals) {
                let $abs = $v.abs();
                *o = $v.signum() * (($abs + half + $nudge) >> shift);
            }
        };
    }
    match policy {
        RoundingPolicy::Zero => each!(|v, a| -1),
        RoundingPolicy::MinusInf => each!(|v, a| -((v >= 0) as i64)),
        RoundingPolicy::PlusInf => each!(|v, a| -((v <= 0) as i64)),
        RoundingPolicy::Away => each!(|v, a| 0),
        RoundingPolicy::Even => each!(|v, a| ((a >> shift) & 1) - 1),
        RoundingPolicy::Odd => each!(|v, a| -((a >> shift) & 1)),
        // Not accepted by `Step::of`.
        RoundingPolicy::Native => {}
    }
    out
}

impl Step {
    #[inline(always)]
    fn apply(&self, row: usize, acc: &mut [i32; NR]) {
        match self {
            Step::PerRow(op, values) => {
                let v = values[row];
                acc.iter_mut().for_each(|a| *a = bin(*op, v, *a));
            }
            Step::Scalar(op, v) => acc.iter_mut().for_each(|a| *a = bin(*op, *v, *a)),
            Step::Scale {
                mult: Some(mult),
                shift,
                policy,
            } => {
                let shift = shift + 31;
                let wide = acc.map(|a| a as i64 * *mult as i64);
                let scaled = if shift > 0 {
                    round_shift(&wide, shift as u32, *policy)
                } else {
                    wide.map(|v| v << -shift)
                };
                *acc = scaled.map(|v| v as i32);
            }
            Step::Scale {
                mult: None,
                shift,
                policy,
            } => {
                if *shift > 0 {
                    // tract's i32 `q_shr`: the same rounding, on i32.
                    let wide = acc.map(|a| a as i64);
                    *acc = round_shift(&wide, *shift as u32, *policy).map(|v| v as i32);
                } else {
                    acc.iter_mut()
                        .for_each(|a| *a = a.wrapping_shl(-shift as u32));
                }
            }
        }
    }

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

/// tract's usual requantization steps: `max(min(round_even(x * mult >> (shift + 31)) + add,
/// hi), lo)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Requant {
    mult: i32,
    shift: u32,
    add: i32,
    hi: i32,
    lo: i32,
}

impl Requant {
    fn of(steps: &[Step]) -> Option<Requant> {
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
    fn replacing(
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
        // Where product `ki` (tract's order: channel, then tap) goes in a panel.
        let place = |ki: usize| {
            let (ci, t) = (ki / taps, ki % taps);
            (t * c4 + ci / 4) * MR * 4 + ci % 4
        };
        let mut weights = vec![0u8; m.div_ceil(MR) * groups * MR * 4];
        let mut correction = vec![0i32; m];
        let mut tap_sums = vec![0i32; m * taps];
        for mi in 0..m {
            let panel = (mi / MR) * groups * MR * 4;
            for ki in 0..k {
                let v = w[mi * k + ki];
                weights[panel + place(ki) + (mi % MR) * 4] = v as u8;
                correction[mi] += 128 * v as i32;
                tap_sums[mi * taps + ki % taps] += v as i32;
            }
        }
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
        let qconv = QConv {
            geo,
            pad,
            flip,
            m,
            k,
            groups,
            weights: Arc::new(weights),
            tap_sums,
            offset,
            steps,
            requant,
            out_shape,
            out_dt,
            dequantize: None,
            residual_relu: false,
            kernel,
        };
        Some((qconv, x_outlet))
    }

    /// Multiplies and finishes output rows `rows` into `out` (the whole output), on tile
    /// kernel `K`; inlined into one function per kernel so that the fused steps are compiled
    /// for the kernel's instruction set too.
    ///
    /// # Safety
    /// `out` must point to the output tensor's data, of `out_dt` and `out_shape`; threads
    /// calling this at once must be given disjoint `rows`; `K` must run on this CPU.
    #[inline(always)]
    unsafe fn run_rows_with<K: TileKernel>(
        &self,
        input: &Interleaved,
        rows: std::ops::Range<usize>,
        out: Out,
    ) {
        let (_, ow) = self.geo.out_hw();
        let panel_weights = self.groups * MR * 4;
        let offsets = self.geo.interleaved_taps(input);
        let (kh, kw) = (self.geo.kh, self.geo.kw);
        let pad = (self.pad ^ self.flip) as i32;
        let mut live: Vec<(usize, usize)> = Vec::with_capacity(offsets.len());
        let mut dead: Vec<usize> = Vec::with_capacity(offsets.len());
        for oy in rows {
            for ox in (0..ow).step_by(NR) {
                // Taps that read only padding for the whole tile add a constant: skipped, and
                // their sum added to the accumulators instead (exact integer arithmetic).
                live.clear();
                dead.clear();
                for (t, &offset) in offsets.iter().enumerate() {
                    if self.geo.tap_in_padding(oy, ox, NR, t / kw, t % kw) {
                        dead.push(t);
                    } else {
                        live.push((offset, t * input.c4));
                    }
                }
                let b = Patches {
                    data: input.bytes(),
                    base: self.geo.interleaved_base(input, oy, ox),
                    taps: &live,
                    groups: input.c4,
                    stride: input.group_stride(),
                };
                for (mp, a) in self.weights.chunks_exact(panel_weights).enumerate() {
                    let m0 = mp * MR;
                    let mut extra = [0i32; MR];
                    for (i, e) in extra.iter_mut().enumerate().take(self.m.saturating_sub(m0)) {
                        let sums = &self.tap_sums[(m0 + i) * kh * kw..];
                        *e = dead.iter().map(|&t| sums[t]).sum::<i32>().wrapping_mul(pad);
                    }
                    // SAFETY: the tile (m0.., oy * ow + ox..) is this row's.
                    unsafe { K::tile(self, a, &b, &extra, m0, oy * ow + ox, out) };
                }
            }
        }
    }

    /// The fused steps and the store of a tile's accumulators, one channel at a time.
    ///
    /// # Safety
    /// As [`QConv::store`].
    #[inline(always)]
    unsafe fn finish(&self, acc: &mut [[i32; NR]; MR], m0: usize, n0: usize, out: Out) {
        for (i, row) in acc.iter_mut().enumerate() {
            let mi = m0 + i;
            if mi >= self.m {
                break;
            }
            let o = self.offset[mi];
            row.iter_mut().for_each(|a| *a = a.wrapping_add(o));
            for step in &self.steps {
                step.apply(mi, row);
            }
            // SAFETY: the caller's.
            unsafe { self.store(out, mi, n0, row) };
        }
    }

    /// # Safety
    /// `out` is the output's data and `(mi, n0..n0 + NR)` inside it.
    #[inline(always)]
    unsafe fn store(&self, out: Out, mi: usize, n0: usize, row: &[i32; NR]) {
        let at = mi * self.geo.n() + n0;
        // SAFETY: the caller's. tract stores the low byte for 8-bit outputs.
        unsafe {
            if let Some((zero_point, scale)) = self.dequantize {
                let scale = f32::from_bits(scale);
                let mut floats = row.map(|v| (v as u8 as i32 - zero_point) as f32 * scale);
                if !out.residual.is_null() {
                    let residual = std::slice::from_raw_parts(out.residual.add(at), NR);
                    for (f, r) in floats.iter_mut().zip(residual) {
                        *f = (*f + r).max(0.0);
                    }
                }
                std::ptr::copy_nonoverlapping(floats.as_ptr(), out.data.cast::<f32>().add(at), NR);
            } else if self.out_dt == i32::datum_type() {
                let o = out.data.cast::<i32>().add(at);
                std::ptr::copy_nonoverlapping(row.as_ptr(), o, NR);
            } else {
                let bytes = row.map(|v| v as u8);
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), out.data.add(at), NR);
            }
        }
    }

    /// The output tensor's type: f32 where the op dequantizes, else the product's.
    fn stored_dt(&self) -> DatumType {
        match self.dequantize {
            Some(_) => f32::datum_type(),
            None => self.out_dt,
        }
    }

    /// # Safety
    /// As [`QConv::run_rows_with`].
    unsafe fn run_rows(&self, input: &Interleaved, rows: std::ops::Range<usize>, out: Out) {
        // SAFETY: the caller's; `Kernel::Avx512Vnni` is only chosen where the CPU has it.
        unsafe {
            match self.kernel {
                Kernel::Portable => self.run_rows_with::<Portable>(input, rows, out),
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512Vnni => vnni::run_rows(self, input, rows, out),
            }
        }
    }

    fn run(&self, input: &Tensor, residual: Option<&Tensor>) -> TractResult<Tensor> {
        let dt = if self.flip == 0 {
            u8::datum_type()
        } else {
            i8::datum_type()
        };
        ensure!(
            input.datum_type() == dt && input.len() == self.geo.input_len(),
            "QConv: input {:?} {:?} does not match the planned convolution",
            input.datum_type(),
            input.shape()
        );
        let input = input.try_as_plain_ram()?;
        // Bytes either way: the kernel flips them to unsigned with `flip`.
        let x = input.as_bytes();
        let input = self.geo.interleaved(x, self.pad);
        // SAFETY: `run_rows` writes every element (all rows, all channels).
        let mut out = unsafe { Tensor::uninitialized_dt(self.stored_dt(), &self.out_shape)? };
        let residual = match (self.residual_relu, residual) {
            (false, None) => None,
            (true, Some(r)) => {
                ensure!(
                    r.datum_type() == f32::datum_type() && r.len() == out.len(),
                    "QConv: residual {:?} {:?} does not match the output {:?}",
                    r.datum_type(),
                    r.shape(),
                    self.out_shape
                );
                Some(r.try_as_plain_ram()?)
            }
            _ => bail!("QConv: a residual input where the op adds none, or none where it does"),
        };
        let residual = match &residual {
            Some(r) => r.as_slice::<f32>()?.as_ptr(),
            None => std::ptr::null(),
        };
        let ptr = SendPtr(out.as_bytes_mut().as_mut_ptr());
        let residual = SendPtr(residual.cast_mut());
        let (oh, _) = self.geo.out_hw();
        crate::threads::parallel_rows(oh, |rows| {
            let (ptr, residual) = (&ptr, &residual);
            let out = Out {
                data: ptr.0,
                residual: residual.0,
            };
            // SAFETY: `parallel_rows` hands out disjoint row ranges of this output; the
            // residual, when there is one, has the output's length and is only read.
            unsafe { self.run_rows(&input, rows, out) }
        });
        Ok(out)
    }
}

/// Where a tile's patches are: for each tap read, `groups` runs of `NR x 4` bytes (one per
/// group of four channels), `stride` apart, from `base` plus the tap's offset in `data`.
struct Patches<'a> {
    data: &'a [u8],
    base: usize,
    /// Per tap read: its byte offset from `base` and its first weight group.
    taps: &'a [(usize, usize)],
    groups: usize,
    stride: usize,
}

impl Patches<'_> {
    /// Whether every run is inside `data` and every weight group inside `a_len` bytes.
    fn fits(&self, a_len: usize) -> bool {
        let span = self.groups.saturating_sub(1) * self.stride;
        self.groups > 0
            && self.taps.iter().all(|&(b, a)| {
                self.base + b + span + NR * 4 <= self.data.len()
                    && (a + self.groups) * MR * 4 <= a_len
            })
    }
}

/// Which tile kernel a [`QConv`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Plain Rust: for the tests on any CPU, not faster than tract.
    Portable,
    /// AVX-512 VNNI (`vpdpbusd` on 512-bit registers).
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

impl Kernel {
    /// A kernel faster than tract's on this CPU, if there is one.
    pub fn fast() -> Option<Kernel> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
        {
            return Some(Kernel::Avx512Vnni);
        }
        None
    }
}

/// One tile of a [`QConv`]: `acc[i][j] = sum_k (b[k][j] + 128) * a[i][k]` over a panel of
/// weights (`MR` channels, groups of `MR x 4` signed bytes) and the patches of `NR` pixels
/// (groups of `NR x 4` signed bytes, made unsigned by adding 128), then the correction, the
/// fused steps and the store of output channels `m0..` at pixels `n0..`.
trait TileKernel {
    /// # Safety
    /// `out` is the output's data and the tile inside it; the kernel's instructions exist on
    /// this CPU.
    unsafe fn tile(
        conv: &QConv,
        a: &[u8],
        b: &Patches,
        extra: &[i32; MR],
        m0: usize,
        n0: usize,
        out: Out,
    );
}

struct Portable;

impl TileKernel for Portable {
    #[inline(always)]
    unsafe fn tile(
        conv: &QConv,
        a: &[u8],
        b: &Patches,
        extra: &[i32; MR],
        m0: usize,
        n0: usize,
        out: Out,
    ) {
        assert!(b.fits(a.len()));
        let mut acc = extra.map(|e| [e; NR]);
        for &(tb, ta) in b.taps {
            for g in 0..b.groups {
                let at = b.base + tb + g * b.stride;
                let ga = &a[(ta + g) * MR * 4..(ta + g + 1) * MR * 4];
                let gb = &b.data[at..at + NR * 4];
                for (row, wa) in acc.iter_mut().zip(ga.chunks_exact(4)) {
                    for (c, xb) in row.iter_mut().zip(gb.chunks_exact(4)) {
                        for q in 0..4 {
                            *c += (xb[q] ^ conv.flip) as i32 * wa[q] as i8 as i32;
                        }
                    }
                }
            }
        }
        // SAFETY: the caller's.
        unsafe { conv.finish(&mut acc, m0, n0, out) }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::*;
    use std::arch::x86_64::*;

    pub(super) struct Vnni;

    impl TileKernel for Vnni {
        #[inline(always)]
        unsafe fn tile(
            conv: &QConv,
            a: &[u8],
            b: &Patches,
            extra: &[i32; MR],
            m0: usize,
            n0: usize,
            out: Out,
        ) {
            // SAFETY: the caller's.
            unsafe { finish(conv, &product(a, b, conv.flip, extra), m0, n0, out) }
        }
    }

    /// The tile's 16 x 16 products, a register per channel.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn product(a: &[u8], b: &Patches, flip: u8, extra: &[i32; MR]) -> [__m512i; MR] {
        assert!(b.fits(a.len()));
        let flip = _mm512_set1_epi8(flip as i8);
        let mut c = [_mm512_setzero_si512(); MR];
        for (ci, &e) in c.iter_mut().zip(extra) {
            *ci = _mm512_set1_epi32(e);
        }
        for &(tb, ta) in b.taps {
            // SAFETY: every run and weight group is inside its slice (asserted above);
            // unaligned loads.
            unsafe {
                let pb = b.data.as_ptr().add(b.base + tb);
                let mut pa = a.as_ptr().add(ta * MR * 4);
                for g in 0..b.groups {
                    let x = _mm512_loadu_si512(pb.add(g * b.stride).cast());
                    let x = _mm512_xor_si512(x, flip);
                    let w = pa.cast::<i32>();
                    for (i, ci) in c.iter_mut().enumerate() {
                        let wi = _mm512_set1_epi32(w.add(i).read_unaligned());
                        *ci = _mm512_dpbusd_epi32(*ci, x, wi);
                    }
                    pa = pa.add(MR * 4);
                }
            }
        }
        c
    }

    /// `op(operand, acc)` lane-wise, as [`super::bin`].
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn bin(op: BinOp, operand: i32, acc: __m512i) -> __m512i {
        let v = _mm512_set1_epi32(operand);
        match op {
            BinOp::Add => _mm512_add_epi32(v, acc),
            BinOp::Sub => _mm512_sub_epi32(v, acc),
            BinOp::SubF => _mm512_sub_epi32(acc, v),
            BinOp::Mul => _mm512_mullo_epi32(v, acc),
            BinOp::Min => _mm512_min_epi32(v, acc),
            BinOp::Max => _mm512_max_epi32(v, acc),
        }
    }

    /// [`super::round_shift`] on eight i64 lanes (`0 < shift < 64`).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn round_shift(val: __m512i, shift: u32, policy: RoundingPolicy) -> __m512i {
        let count = _mm_cvtsi32_si128(shift as i32);
        let abs = _mm512_abs_epi64(val);
        let one = _mm512_set1_epi64(1);
        let minus_one = _mm512_set1_epi64(-1);
        let zero = _mm512_setzero_si512();
        let parity = || _mm512_and_si512(_mm512_srl_epi64(abs, count), one);
        let nudge = match policy {
            RoundingPolicy::Zero => minus_one,
            RoundingPolicy::Away | RoundingPolicy::Native => zero,
            RoundingPolicy::MinusInf => {
                _mm512_maskz_mov_epi64(_mm512_cmpge_epi64_mask(val, zero), minus_one)
            }
            RoundingPolicy::PlusInf => {
                _mm512_maskz_mov_epi64(_mm512_cmple_epi64_mask(val, zero), minus_one)
            }
            RoundingPolicy::Even => _mm512_sub_epi64(parity(), one),
            RoundingPolicy::Odd => _mm512_sub_epi64(zero, parity()),
        };
        let half = _mm512_set1_epi64(1i64 << (shift - 1));
        let q = _mm512_srl_epi64(_mm512_add_epi64(_mm512_add_epi64(abs, half), nudge), count);
        // signum(val) * q: q is 0 where val is.
        _mm512_mask_sub_epi64(q, _mm512_cmplt_epi64_mask(val, zero), zero, q)
    }

    /// [`scale`] for the tests.
    #[cfg(test)]
    #[target_feature(enable = "avx512f")]
    pub(super) fn scale_lanes(
        acc: __m512i,
        mult: Option<i32>,
        shift: isize,
        policy: RoundingPolicy,
    ) -> __m512i {
        scale(acc, mult, shift, policy)
    }

    /// The steps over i64 lanes, applied to the even and odd i32 lanes of `acc` apart.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn scale(acc: __m512i, mult: Option<i32>, shift: isize, policy: RoundingPolicy) -> __m512i {
        let (even, odd) = match mult {
            // Sign-extended products of the even lanes, then of the odd ones.
            Some(m) => {
                let m = _mm512_set1_epi64(m as i64);
                (
                    _mm512_mul_epi32(acc, m),
                    _mm512_mul_epi32(_mm512_srli_epi64(acc, 32), m),
                )
            }
            None => (
                _mm512_srai_epi64(_mm512_slli_epi64(acc, 32), 32),
                _mm512_srai_epi64(acc, 32),
            ),
        };
        let shift = if mult.is_some() { shift + 31 } else { shift };
        let (even, odd) = if shift > 0 {
            (
                round_shift(even, shift as u32, policy),
                round_shift(odd, shift as u32, policy),
            )
        } else {
            let count = _mm_cvtsi32_si128(-shift as i32);
            (_mm512_sll_epi64(even, count), _mm512_sll_epi64(odd, count))
        };
        // Low halves back into i32 lanes.
        _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32))
    }

    /// A [`Requant`]'s constants in registers.
    pub(super) struct RequantLanes {
        mult: i32,
        shift: u32,
        scale: __m512d,
        exact: __m512i,
        add: __m512i,
        hi: __m512i,
        lo: __m512i,
    }

    impl RequantLanes {
        #[target_feature(enable = "avx512f")]
        #[inline]
        pub(super) fn new(rq: &Requant) -> RequantLanes {
            RequantLanes {
                mult: rq.mult,
                shift: rq.shift,
                scale: _mm512_set1_pd(rq.mult as f64 / (1u64 << rq.shift) as f64),
                // |acc| up to this keeps |acc| * mult below 2^53.
                exact: _mm512_set1_epi32(
                    (((1u64 << 53) - 1) / rq.mult as u64).min(i32::MAX as u64) as i32,
                ),
                add: _mm512_set1_epi32(rq.add),
                hi: _mm512_set1_epi32(rq.hi),
                lo: _mm512_set1_epi32(rq.lo),
            }
        }

        /// `max(min(round_even(acc * mult / 2^shift) + add, hi), lo)` on 16 lanes.
        #[target_feature(enable = "avx512f")]
        #[inline]
        pub(super) fn apply(&self, acc: __m512i) -> __m512i {
            // |i32::MIN| reads as 2^31 unsigned: never within `exact`.
            let scaled = if _mm512_cmpgt_epu32_mask(_mm512_abs_epi32(acc), self.exact) == 0 {
                // acc * (mult / 2^shift) is exact in f64 here, and converting it with
                // round-to-nearest-even is tract's rounding: half the instructions.
                const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
                let lo = _mm512_cvtepi32_pd(_mm512_castsi512_si256(acc));
                let hi = _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64::<1>(acc));
                let lo = _mm512_cvt_roundpd_epi32::<NEAREST>(_mm512_mul_pd(lo, self.scale));
                let hi = _mm512_cvt_roundpd_epi32::<NEAREST>(_mm512_mul_pd(hi, self.scale));
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
            } else {
                // tract's i64 arithmetic, as the general steps do it (`Requant::shift` counts
                // the multiplier's 31 bits, `Scaler::shift` does not).
                let shift = self.shift as isize - 31;
                scale(acc, Some(self.mult), shift, RoundingPolicy::Even)
            };
            let added = _mm512_add_epi32(scaled, self.add);
            _mm512_max_epi32(_mm512_min_epi32(added, self.hi), self.lo)
        }
    }

    /// Offset, steps and store of output channels `m0..m0 + 16` at pixels `n0..n0 + 16`.
    ///
    /// # Safety
    /// As [`QConv::store`].
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn finish(conv: &QConv, tile: &[__m512i; MR], m0: usize, n0: usize, out: Out) {
        let bytes = conv.out_dt != i32::datum_type();
        let rows = MR.min(conv.m - m0);
        if let (Some(rq), true) = (conv.requant, bytes) {
            let rq = RequantLanes::new(&rq);
            for (i, &acc) in tile.iter().enumerate().take(rows) {
                let mi = m0 + i;
                let acc = rq.apply(_mm512_add_epi32(acc, _mm512_set1_epi32(conv.offset[mi])));
                let at = mi * conv.geo.n() + n0;
                if let Some((zero_point, scale)) = conv.dequantize {
                    // The low byte, as tract stores it, then `(q - zero_point) as f32 * scale`.
                    let q = _mm512_and_si512(acc, _mm512_set1_epi32(0xff));
                    let q = _mm512_sub_epi32(q, _mm512_set1_epi32(zero_point));
                    let mut f =
                        _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(f32::from_bits(scale)));
                    if !out.residual.is_null() {
                        // SAFETY: 16 floats of the residual's same row (same layout).
                        let r = unsafe { _mm512_loadu_ps(out.residual.add(at)) };
                        f = _mm512_max_ps(_mm512_add_ps(f, r), _mm512_setzero_ps());
                    }
                    // SAFETY: 16 floats of this channel's row.
                    unsafe { _mm512_storeu_ps(out.data.cast::<f32>().add(at), f) }
                } else {
                    // SAFETY: 16 bytes of this channel's row; tract stores the low byte.
                    unsafe { _mm_storeu_si128(out.data.add(at).cast(), _mm512_cvtepi32_epi8(acc)) }
                }
            }
            return;
        }
        for (i, &acc) in tile.iter().enumerate().take(rows) {
            let mi = m0 + i;
            let mut acc = _mm512_add_epi32(acc, _mm512_set1_epi32(conv.offset[mi]));
            for step in &conv.steps {
                acc = match step {
                    Step::PerRow(op, values) => bin(*op, values[mi], acc),
                    Step::Scalar(op, v) => bin(*op, *v, acc),
                    Step::Scale {
                        mult,
                        shift,
                        policy,
                    } => scale(acc, *mult, *shift, *policy),
                };
            }
            let at = mi * conv.geo.n() + n0;
            if bytes {
                // SAFETY: 16 bytes of this channel's row; tract stores the low byte.
                unsafe { _mm_storeu_si128(out.data.add(at).cast(), _mm512_cvtepi32_epi8(acc)) }
            } else {
                let mut row = [0i32; NR];
                // SAFETY: a row is 16 i32; then the caller's.
                unsafe {
                    _mm512_storeu_si512(row.as_mut_ptr().cast(), acc);
                    conv.store(out, mi, n0, &row);
                }
            }
        }
    }

    /// # Safety
    /// As `QConv::run_rows_with`, on a CPU with AVX-512 F, BW and VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    pub(super) unsafe fn run_rows(
        conv: &QConv,
        input: &Interleaved,
        rows: std::ops::Range<usize>,
        out: Out,
    ) {
        // SAFETY: the caller's.
        unsafe { conv.run_rows_with::<Vnni>(input, rows, out) }
    }
}

impl Op for QConv {
    fn name(&self) -> StaticName {
        "QConv".into()
    }

    op_as_typed_op!();
}

impl EvalOp for QConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        Ok(tvec!(
            self.run(&inputs[0], inputs.get(1).map(|r| &**r))?
                .into_tvalue()
        ))
    }
}

impl TypedOp for QConv {
    as_op!();

    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.stored_dt().fact(&*self.out_shape)))
    }
}

/// `QConv -> [IntoShape] -> Dequantize` at `node` (the dequantization), where the dequantization
/// is all that reads the convolution's u8 output: one `QConv` storing the dequantized floats
/// (the same arithmetic, so tract's values to the bit), and the input it reads. A pass over
/// the output fewer, and a quarter of the bytes written then read back.
pub(super) fn fuse_dequantize(
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
pub(super) fn fuse_residual(
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
pub(super) fn replacement(
    model: &TypedModel,
    node: &TypedNode,
) -> Option<(Box<dyn TypedOp>, TVec<OutletId>)> {
    let kernel = Kernel::fast()?;
    let (op, input) = QConv::replacing(model, node, kernel)?;
    Some((Box::new(op), tvec!(input)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::im2col;
    use crate::patch::{replace_each, replace_each_wired};
    use crate::testing::{fixture_input, shipped_model};
    use proptest::prelude::*;
    use tract_onnx::tract_core::tract_linalg::Scaler;

    const POLICIES: [RoundingPolicy; 6] = [
        RoundingPolicy::Zero,
        RoundingPolicy::Away,
        RoundingPolicy::MinusInf,
        RoundingPolicy::PlusInf,
        RoundingPolicy::Even,
        RoundingPolicy::Odd,
    ];

    /// Whether this CPU has the fast kernel (the vector tests have nothing to compare without).
    #[cfg(target_arch = "x86_64")]
    fn has_fast_kernel() -> bool {
        let has = Kernel::fast().is_some();
        if !has {
            eprintln!("no AVX-512 VNNI on this CPU: nothing to compare");
        }
        has
    }

    /// A xorshift64 generator: test inputs that cover the i32 range, reproducibly.
    #[cfg(target_arch = "x86_64")]
    fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        }
    }

    /// The shipped int8 model with every convolution on `kernel` gives tract's logits to the
    /// bit, on a real frame.
    fn matches_tract_on(kernel: Kernel) {
        let model = shipped_model("polypwatch-edge-int8.onnx");
        let reference = model.clone().into_runnable().unwrap();
        let mut ours = model;
        replace_each(&mut ours, im2col::replacement).unwrap();
        let replaced = replace_each_wired(&mut ours, |model, node| {
            let (op, x) = QConv::replacing(model, node, kernel)?;
            Some((Box::new(op) as Box<dyn TypedOp>, tvec!(x)))
        })
        .unwrap();
        // Every convolution but the ASPP's on the pooled 1x1 map: 22 through im2col (3x3,
        // 7x7) and 7 1x1 ones (two with the weights on the right, one the 64 -> 1 classifier).
        // On aarch64 tract packs the classifier's weights in its plain layout, which we leave.
        let expected = if cfg!(target_arch = "x86_64") { 29 } else { 28 };
        assert_eq!(replaced, expected, "{kernel:?}");
        // And with the dequantizations they feed folded in (the kernel's float store).
        replace_each(&mut ours, crate::pool::dequantize).unwrap();
        let folded = replace_each_wired(&mut ours, fuse_dequantize).unwrap();
        assert!(folded >= 17, "{kernel:?}: {folded}");
        // And the residual additions and ReLUs those feed (the float epilogue).
        let residuals = replace_each_wired(&mut ours, fuse_residual).unwrap();
        assert_eq!(residuals, 8, "{kernel:?}");
        let ours = ours.into_runnable().unwrap();
        let input = fixture_input();
        let a = reference.run(tvec!(input.clone().into())).unwrap();
        let b = ours.run(tvec!(input.into())).unwrap();
        assert!(a[0].as_bytes() == b[0].as_bytes(), "{kernel:?}");
    }

    #[test]
    fn portable_kernel_gives_tracts_logits() {
        matches_tract_on(Kernel::Portable);
    }

    /// Where this CPU has a fast kernel (AVX-512 VNNI on the x86-64 CI machines); elsewhere
    /// the rewrite leaves tract's operators, which `rewritten_models_give_tracts_logits`
    /// covers.
    #[test]
    fn fast_kernel_gives_tracts_logits() {
        match Kernel::fast() {
            Some(kernel) => matches_tract_on(kernel),
            None => eprintln!("no fast kernel on this CPU: nothing to compare"),
        }
    }

    /// The vector requantization (its exact-f64 path and its i64 path) gives the scalar steps'
    /// results, around the f64 path's limit too.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_requantization_equals_scalar_steps() {
        use std::arch::x86_64::*;
        if !has_fast_kernel() {
            return;
        }
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        for round in 0..4000 {
            let scale = 0.5f32.powi((next() % 14) as i32) * (1.0 + (next() % 1000) as f32 / 1000.0);
            let s = Scaler::new(scale, RoundingPolicy::Even);
            let steps = vec![
                Step::Scale {
                    mult: s.mult,
                    shift: s.shift,
                    policy: RoundingPolicy::Even,
                },
                Step::Scalar(BinOp::Add, (next() % 256) as i32 - 128),
                Step::Scalar(BinOp::Min, 255),
                Step::Scalar(BinOp::Max, 0),
            ];
            let Some(rq) = Requant::of(&steps) else {
                continue;
            };
            let limit = (((1u64 << 53) - 1) / rq.mult as u64).min(i32::MAX as u64) as i64;
            let lanes: [i32; NR] = std::array::from_fn(|_| {
                let v = match round % 4 {
                    0 => next() as i32 as i64,
                    1 => (next() as i32 >> 10) as i64,
                    2 => limit - 2 + (next() % 5) as i64,
                    _ => -limit - 2 + (next() % 5) as i64,
                };
                v.clamp(i32::MIN as i64, i32::MAX as i64) as i32
            });
            let mut scalar = lanes;
            for step in &steps {
                step.apply(0, &mut scalar);
            }
            let mut vector = [0i32; NR];
            // SAFETY: AVX-512 is present (checked above); 16 i32 in and out.
            unsafe {
                let rq = vnni::RequantLanes::new(&rq);
                let v = rq.apply(_mm512_loadu_si512(lanes.as_ptr().cast()));
                _mm512_storeu_si512(vector.as_mut_ptr().cast(), v);
            }
            assert_eq!(scalar, vector, "{steps:?} on {lanes:?}");
        }
    }

    proptest! {
        /// The scalar steps round like tract's `Scaler` under every policy.
        #[test]
        fn scale_step_is_tracts_scaler(
            x in any::<i32>(),
            scale in 1e-6f32..4.0,
            p in 0usize..6,
        ) {
            let policy = POLICIES[p];
            let scaler = Scaler::new(scale, policy);
            let step = Step::Scale { mult: scaler.mult, shift: scaler.shift, policy };
            let mut acc = [x; NR];
            step.apply(0, &mut acc);
            prop_assert_eq!(acc[0], x * scaler);
        }
    }

    /// The AVX-512 steps give the scalar steps' results lane by lane, every policy, with and
    /// without a multiplier, right and left shifts.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_steps_equal_scalar_steps() {
        use std::arch::x86_64::*;
        if !has_fast_kernel() {
            return;
        }
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        for round in 0..2000 {
            let lanes: [i32; NR] = std::array::from_fn(|_| match round % 3 {
                0 => next() as i32,
                1 => (next() as i32) >> 12,
                _ => (next() % 2001) as i32 - 1000,
            });
            let policy = POLICIES[round % 6];
            let step = match round % 4 {
                0 | 1 => {
                    let s = Scaler::new(0.5f32.powi((next() % 20) as i32) * 1.37, policy);
                    Step::Scale {
                        mult: s.mult,
                        shift: s.shift,
                        policy,
                    }
                }
                2 => Step::Scale {
                    mult: None,
                    shift: (next() % 12 + 1) as isize,
                    policy,
                },
                _ => Step::Scale {
                    mult: None,
                    shift: -((next() % 4) as isize),
                    policy,
                },
            };
            let Step::Scale { mult, shift, .. } = step else {
                unreachable!()
            };
            let mut scalar = lanes;
            step.apply(0, &mut scalar);
            let mut vector = [0i32; NR];
            // SAFETY: AVX-512 is present (checked above); 16 i32 in and out.
            unsafe {
                let v = vnni::scale_lanes(
                    _mm512_loadu_si512(lanes.as_ptr().cast()),
                    mult,
                    shift,
                    policy,
                );
                _mm512_storeu_si512(vector.as_mut_ptr().cast(), v);
            }
            assert_eq!(scalar, vector, "{step:?} on {lanes:?}");
        }
    }
}
