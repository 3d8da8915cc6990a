//! Constant padding of feature maps.
//!
//! tract pads the input of every float 3x3 convolution through a generic n-dimensional `Pad`
//! (5 ms of a frame of the f32 model). [`Pad`] fills the output once and copies the image
//! rows into place.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::{Pad as TractPad, PadMode};

/// Constant padding of the last two axes of a 4-D tensor; a drop-in replacement for tract's
/// `Pad` in that case.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pad {
    /// (before, after) for the last two axes.
    pads: [(usize, usize); 2],
    value: Arc<Tensor>,
}

impl Pad {
    fn run(&self, input: &Tensor) -> TractResult<Tensor> {
        let &[n, c, h, w] = input.shape() else {
            bail!("Pad: input shape {:?} is not 4-D", input.shape());
        };
        let dt = input.datum_type();
        let size = dt.size_of();
        let [(top, bottom), (left, right)] = self.pads;
        let (oh, ow) = (h + top + bottom, w + left + right);
        let value = self.value.cast_to_dt(dt)?;
        let fill = value.as_bytes();
        ensure!(fill.len() == size, "Pad: the padding value is not a scalar");
        let mut out = Tensor::zero_dt(dt, &[n, c, oh, ow])?;
        let (src, dst) = (input.as_bytes(), out.as_bytes_mut());
        if fill.iter().any(|&b| b != 0) {
            for d in dst.chunks_exact_mut(size) {
                d.copy_from_slice(fill);
            }
        }
        for (plane_in, plane_out) in src
            .chunks_exact(h * w * size)
            .zip(dst.chunks_exact_mut(oh * ow * size))
        {
            for (y, row) in plane_in.chunks_exact(w * size).enumerate() {
                let at = ((y + top) * ow + left) * size;
                plane_out[at..at + w * size].copy_from_slice(row);
            }
        }
        Ok(out)
    }
}

impl Op for Pad {
    fn name(&self) -> StaticName {
        "PadPlanes".into()
    }

    op_as_typed_op!();
}

impl EvalOp for Pad {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        Ok(tvec!(self.run(&inputs[0])?.into_tvalue()))
    }
}

impl TypedOp for Pad {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let s = &inputs[0].shape;
        ensure!(s.rank() == 4, "Pad takes 4-D tensors");
        let [(t, b), (l, r)] = self.pads;
        Ok(tvec!(inputs[0].datum_type.fact(&[
            s[0].clone(),
            s[1].clone(),
            s[2].clone() + t + b,
            s[3].clone() + l + r,
        ])))
    }
}

/// The replacement for `node` if it is a constant `Pad` of the last two axes of a plain 4-D
/// tensor of numbers.
pub(super) fn replacement(model: &TypedModel, node: &TypedNode) -> Option<Box<dyn TypedOp>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    /// Every pad of the shipped f32 model, by tract and by us, and one with a nonzero value.
    #[test]
    fn pads_like_tract() {
        let model = crate::testing::shipped_model("polypwatch-edge-f32.onnx");
        // (tract's op, ours, input shape)
        type Case = (Box<dyn TypedOp>, Box<dyn TypedOp>, TVec<usize>);
        let mut cases: Vec<Case> = vec![];
        for node in model.nodes() {
            if let Some(ours) = replacement(&model, node) {
                let shape = model
                    .outlet_fact(node.inputs[0])
                    .unwrap()
                    .shape
                    .as_concrete()
                    .unwrap()
                    .into();
                cases.push((node.op.clone(), ours, shape));
            }
        }
        assert!(cases.len() > 10, "only {} pads", cases.len());
        let odd = TractPad {
            pads: vec![(0, 0), (0, 0), (2, 1), (0, 3)],
            mode: PadMode::Constant(Arc::new(tensor0(-1.5f32))),
        };
        cases.push((
            Box::new(odd.clone()),
            Box::new(Pad {
                pads: [(2, 1), (0, 3)],
                value: Arc::new(tensor0(-1.5f32)),
            }),
            tvec!(2, 3, 5, 4),
        ));
        for (theirs, mine, shape) in cases {
            let len: usize = shape.iter().product();
            let data: Vec<f32> = (0..len)
                .map(|i| ((i * 7919) % 1009) as f32 - 500.0)
                .collect();
            let input: TVec<TValue> =
                tvec!(Tensor::from_shape(&shape, &data).unwrap().into_tvalue());
            let a = theirs.eval_out_of_plan(input.clone()).unwrap().unwrap();
            let b = mine.eval_out_of_plan(input).unwrap().unwrap();
            assert_eq!(a[0].shape(), b[0].shape());
            assert!(a[0].as_bytes() == b[0].as_bytes(), "{shape:?}");
        }
    }
}
