//! [`FConv`] on plain slices, outside a tract model: `polypwatch-train` runs its forward and
//! stride-1 input-gradient convolutions on it, one image per task (the decoder's 176 -> 64
//! 3x3 on a batch of 8 at 48x48, one thread: 21 ms here, 34 ms on the trainer's implicit GEMM).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::cnn::{PaddingSpec, PoolSpec};
use tract_onnx::tract_core::ops::nn::DataFormat;

use super::{FConv, Kernel, Planes};
use crate::im2col::Geometry;

/// A bias-free 2-D convolution of one `channels x height x width` image (one group).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    /// Input channels.
    pub channels: usize,
    /// Input height.
    pub height: usize,
    /// Input width.
    pub width: usize,
    /// Output channels.
    pub outputs: usize,
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Strides along height and width.
    pub stride: [usize; 2],
    /// Dilations along height and width.
    pub dilation: [usize; 2],
    /// Zero padding along height and width, the same before and after.
    pub padding: [usize; 2],
}

/// A planned convolution with its weights, run on one image at a time: [`FConv`]'s kernels,
/// Winograd's F(2x2, 3x3) where it plans the 3x3 stride-1 ones. Its sums come in another
/// order than a matrix product's, so results differ from one in the last bits.
#[derive(Debug, Clone)]
pub struct SliceConv {
    op: FConv,
}

impl SliceConv {
    /// The convolution of `shape` with `weights` (`[outputs][channels][kh][kw]`) on `kernel`;
    /// `None` where the weights' length or the geometry does not fit (an output of no pixels).
    pub fn new(shape: ConvShape, weights: &[f32], kernel: Kernel) -> Option<SliceConv> {
        let s = shape;
        let spec = PoolSpec {
            data_format: DataFormat::NCHW,
            kernel_shape: tvec!(s.kernel[0], s.kernel[1]),
            padding: PaddingSpec::Explicit(
                tvec!(s.padding[0], s.padding[1]),
                tvec!(s.padding[0], s.padding[1]),
            ),
            dilations: Some(tvec!(s.dilation[0], s.dilation[1])),
            strides: Some(tvec!(s.stride[0], s.stride[1])),
            input_channels: s.channels,
            output_channels: s.outputs,
        };
        let reach = |i: usize| s.dilation[i] * (s.kernel[i].max(1) - 1) + 1;
        let fits = [s.height, s.width]
            .iter()
            .enumerate()
            .all(|(i, &len)| len + 2 * s.padding[i] >= reach(i));
        if !fits || s.stride.contains(&0) || s.dilation.contains(&0) || s.kernel.contains(&0) {
            return None;
        }
        let geo = Geometry::new(&spec, &[1, s.channels, s.height, s.width]).ok()?;
        let bias = vec![0f32; s.outputs];
        FConv::with_weights(geo, s.outputs, weights, &bias, kernel).map(|op| SliceConv { op })
    }

    /// Output height and width.
    pub fn output_size(&self) -> [usize; 2] {
        [self.op.geo.oh, self.op.geo.ow]
    }

    /// Convolves `input` (`channels x height x width`) into `out` (`outputs x oh x ow`, every
    /// value overwritten), on the calling thread unless tract's executor has threads.
    ///
    /// # Panics
    /// Where `input` or `out` is not of the planned length.
    pub fn run(&self, input: &[f32], out: &mut [f32]) {
        let g = &self.op.geo;
        assert_eq!(input.len(), g.input_len(), "SliceConv: input length");
        assert_eq!(out.len(), self.op.m * g.n(), "SliceConv: output length");
        let parts = [input];
        let planes = Planes {
            parts: &parts,
            plane: g.h * g.w,
        };
        self.op.run_into(planes, None, out);
    }
}
