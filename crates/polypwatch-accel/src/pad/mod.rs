//! Constant padding of feature maps.
//!
//! tract pads the input of every float 3x3 convolution through a generic n-dimensional `Pad`
//! (5 ms of a frame of the f32 model). [`Pad`] fills the output once and copies the image
//! rows into place.
//!
//! Here: the operator; `rule` matches tract's `Pad`; `tests` checks it against tract.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

mod rule;
#[cfg(test)]
mod tests;

pub(crate) use rule::replacement;

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
