//! Bilinear upsampling of NCHW feature maps.
//!
//! tract's `Resize` resamples one axis at a time through a generic loop that, on the last axis,
//! handles a single float per inner iteration: upsampling the 128-channel ASPP output 4x cost
//! about 10% of a frame. [`Bilinear`] runs the same two passes with the same interpolation
//! plan (tract's own `plan_axis`), rows at a time, and adds the taps in tract's order, so its
//! output is identical to the bit.
//!
//! Here: the operator and its portable passes; `rule` matches tract's `Resize`; `x86_64` holds
//! the AVX-512 column pass, `aarch64` the NEON one; `tests` checks them against tract.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::nn::resize::AxisPlan;

#[cfg(target_arch = "aarch64")]
mod aarch64;
mod rule;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86_64;

pub(crate) use rule::replacement;

/// One axis of the plan: `window` source indices and weights per output index.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Axis {
    window: usize,
    indices: Vec<usize>,
    /// Weights as bit patterns, so the op can be hashed and compared.
    weights: Vec<u32>,
}

impl Axis {
    fn from_plan(plan: &AxisPlan) -> Option<Axis> {
        // An extrapolated output reads no input; tract fills it with a constant. Not ours.
        (!plan.extrapolated.iter().any(|&e| e)).then(|| Axis {
            window: plan.window,
            indices: plan.indices.clone(),
            weights: plan.weights.iter().map(|w| w.to_bits()).collect(),
        })
    }

    fn len_out(&self) -> usize {
        self.indices.len() / self.window
    }

    /// The nonzero taps of output index `o`, in plan order.
    fn taps(&self, o: usize) -> impl Iterator<Item = (usize, f32)> + '_ {
        let at = o * self.window..(o + 1) * self.window;
        self.indices[at.clone()]
            .iter()
            .zip(&self.weights[at])
            .map(|(&i, &w)| (i, f32::from_bits(w)))
            .filter(|&(_, w)| w != 0.0)
    }
}

/// Resamples the last two axes of an f32 `[N, C, H, W]` tensor by a precomputed plan; a
/// drop-in replacement for tract's linear `Resize` on such tensors.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Bilinear {
    rows: Axis,
    cols: Axis,
    /// The column taps split by position, for the two-tap (linear) case.
    pairs: Option<Pairs>,
    /// The same taps by 16 outputs at a time, where each 16 read within 16 neighbouring inputs.
    lanes: Option<Lanes>,
}

/// Two-tap columns 16 outputs at a time: output `x0 + l` is `w0[l] * in[lo + idx0[l]] +
/// w1[l] * in[lo + idx1[l]]` (a permutation of one 16-float load), for inputs `w` wide.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Lanes {
    w: usize,
    chunks: Vec<Chunk>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Chunk {
    lo: usize,
    idx0: [u32; 16],
    idx1: [u32; 16],
    /// Weights as bit patterns; lanes past `len` weigh nothing.
    w0: [u32; 16],
    w1: [u32; 16],
    /// Lanes whose weight is not zero (tract skips the others).
    nz0: u16,
    nz1: u16,
    len: usize,
    /// `idx0`, `idx1` as byte indices into the 64-byte window (`4 i + 0..4`), for `tbl`.
    bytes0: [u8; 64],
    bytes1: [u8; 64],
    /// `nz0`, `nz1` as lane masks (all ones where the weight is not zero).
    mask0: [u32; 16],
    mask1: [u32; 16],
}

impl Lanes {
    /// `row` (`self.w` wide) as the column passes read it: at least 16 floats, a narrower row
    /// copied into `padded`. Checks that `out` holds the chunks' outputs.
    #[cfg_attr(
        not(any(target_arch = "x86_64", target_arch = "aarch64")),
        allow(dead_code)
    )]
    fn window<'a>(&self, row: &'a [f32], out: &[f32], padded: &'a mut [f32; 16]) -> &'a [f32] {
        assert!(row.len() == self.w && out.len() >= self.chunks.iter().map(|c| c.len).sum());
        if self.w < 16 {
            padded[..self.w].copy_from_slice(row);
            &padded[..]
        } else {
            row
        }
    }

    fn new(p: &Pairs, w: usize) -> Option<Lanes> {
        let ow = p.i0.len();
        let chunks = (0..ow)
            .step_by(16)
            .map(|x0| {
                let len = 16.min(ow - x0);
                let all = p.i0[x0..x0 + len].iter().chain(&p.i1[x0..x0 + len]);
                let lo = if w <= 16 {
                    0
                } else {
                    all.clone().min().copied()?.min(w - 16)
                };
                if all.clone().any(|&i| i < lo || i >= lo + 16 || i >= w) {
                    return None;
                }
                let mut c = Chunk {
                    lo,
                    idx0: [0; 16],
                    idx1: [0; 16],
                    w0: [0; 16],
                    w1: [0; 16],
                    nz0: 0,
                    nz1: 0,
                    len,
                    bytes0: [0; 64],
                    bytes1: [0; 64],
                    mask0: [0; 16],
                    mask1: [0; 16],
                };
                for l in 0..len {
                    let x = x0 + l;
                    c.idx0[l] = (p.i0[x] - lo) as u32;
                    c.idx1[l] = (p.i1[x] - lo) as u32;
                    (c.w0[l], c.w1[l]) = (p.w0[x], p.w1[x]);
                    c.nz0 |= ((f32::from_bits(p.w0[x]) != 0.0) as u16) << l;
                    c.nz1 |= ((f32::from_bits(p.w1[x]) != 0.0) as u16) << l;
                }
                for l in 0..16 {
                    for (j, byte) in (0..4).zip(4 * l..) {
                        c.bytes0[byte] = (4 * c.idx0[l] + j) as u8;
                        c.bytes1[byte] = (4 * c.idx1[l] + j) as u8;
                    }
                    c.mask0[l] = if c.nz0 >> l & 1 == 1 { u32::MAX } else { 0 };
                    c.mask1[l] = if c.nz1 >> l & 1 == 1 { u32::MAX } else { 0 };
                }
                Some(c)
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Lanes { w, chunks })
    }
}

/// First and second taps of every output column.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Pairs {
    i0: Vec<usize>,
    i1: Vec<usize>,
    /// Weights as bit patterns, as in [`Axis`].
    w0: Vec<u32>,
    w1: Vec<u32>,
}

impl Bilinear {
    /// The plan for inputs `w` wide.
    fn new(rows: Axis, cols: Axis, w: usize) -> Bilinear {
        let pairs = (cols.window == 2).then(|| {
            let every = |v: &[usize], k: usize| v.iter().skip(k).step_by(2).copied().collect();
            let bits = |v: &[u32], k: usize| v.iter().skip(k).step_by(2).copied().collect();
            Pairs {
                i0: every(&cols.indices, 0),
                i1: every(&cols.indices, 1),
                w0: bits(&cols.weights, 0),
                w1: bits(&cols.weights, 1),
            }
        });
        let lanes = pairs.as_ref().and_then(|p| Lanes::new(p, w));
        Bilinear {
            rows,
            cols,
            pairs,
            lanes,
        }
    }

    /// Resamples the `h x w` planes of `input` into the planes of `out`.
    fn run(&self, input: &[f32], h: usize, w: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::has_avx512() {
            // SAFETY: the CPU has AVX-512 F and BW.
            return unsafe { self.run_avx512(input, h, w, out) };
        }
        self.run_any::<false>(input, h, w, out)
    }

    /// [`Bilinear::run_any`] compiled for 16 lanes, columns by permutation where possible.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn run_avx512(&self, input: &[f32], h: usize, w: usize, out: &mut [f32]) {
        self.run_any::<true>(input, h, w, out)
    }

    #[inline(always)]
    fn run_any<const AVX512: bool>(&self, input: &[f32], h: usize, w: usize, out: &mut [f32]) {
        let (oh, ow) = (self.rows.len_out(), self.cols.len_out());
        let mut tmp = vec![0f32; oh * w];
        let win = self.cols.window;
        for (src, dst) in input.chunks_exact(h * w).zip(out.chunks_exact_mut(oh * ow)) {
            // Rows first, as tract resamples axis 2 before axis 3.
            for (y, row) in tmp.chunks_exact_mut(w).enumerate() {
                row.fill(0.0);
                for (i, wt) in self.rows.taps(y) {
                    for (d, s) in row.iter_mut().zip(&src[i * w..(i + 1) * w]) {
                        *d += wt * s;
                    }
                }
            }
            for (row, out_row) in tmp.chunks_exact(w).zip(dst.chunks_exact_mut(ow)) {
                let row = &row[..w];
                #[cfg(target_arch = "x86_64")]
                if let (true, Some(lanes)) = (AVX512, &self.lanes)
                    && lanes.w == w
                {
                    // SAFETY: AVX512 is only true on CPUs with it; the row is `w` wide.
                    unsafe { lanes.columns(row, out_row) };
                    continue;
                }
                #[cfg(target_arch = "aarch64")]
                if let Some(lanes) = &self.lanes
                    && lanes.w == w
                {
                    lanes.columns(row, out_row);
                    continue;
                }
                if let Some(Pairs { i0, i1, w0, w1 }) = &self.pairs {
                    // Linear: two taps per output, added in tract's order from 0.0.
                    for ((((d, &i0), &i1), &w0), &w1) in
                        out_row.iter_mut().zip(i0).zip(i1).zip(w0).zip(w1)
                    {
                        let (w0, w1) = (f32::from_bits(w0), f32::from_bits(w1));
                        let mut acc = 0.0;
                        if w0 != 0.0 {
                            acc += w0 * row[i0];
                        }
                        if w1 != 0.0 {
                            acc += w1 * row[i1];
                        }
                        *d = acc;
                    }
                    continue;
                }
                for ((d, idx), wts) in out_row
                    .iter_mut()
                    .zip(self.cols.indices.chunks_exact(win))
                    .zip(self.cols.weights.chunks_exact(win))
                {
                    let mut acc = 0.0;
                    for (&i, &wt) in idx.iter().zip(wts) {
                        let wt = f32::from_bits(wt);
                        if wt != 0.0 {
                            acc += wt * row[i];
                        }
                    }
                    *d = acc;
                }
            }
        }
    }
}

impl Op for Bilinear {
    fn name(&self) -> StaticName {
        "BilinearUpsample".into()
    }

    op_as_typed_op!();
}

impl EvalOp for Bilinear {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = &inputs[0];
        let &[n, c, h, w] = input.shape() else {
            bail!(
                "BilinearUpsample: input shape {:?} is not NCHW",
                input.shape()
            );
        };
        let (oh, ow) = (self.rows.len_out(), self.cols.len_out());
        ensure!(
            self.rows.indices.iter().all(|&i| i < h) && self.cols.indices.iter().all(|&i| i < w),
            "BilinearUpsample: input {h}x{w} does not match the plan"
        );
        // SAFETY: `run` writes every element of every plane.
        let mut out = unsafe { Tensor::uninitialized::<f32>(&[n, c, oh, ow])? };
        let src = input.try_as_plain_ram()?.as_slice::<f32>()?;
        let mut ram = out.try_as_plain_ram_mut()?;
        let dst = ram.as_slice_mut::<f32>()?;
        crate::threads::parallel_parts(dst, oh * ow, |planes, part| {
            self.run(&src[planes.start * h * w..planes.end * h * w], h, w, part)
        });
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for Bilinear {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let s = &inputs[0].shape;
        ensure!(s.rank() == 4, "BilinearUpsample takes NCHW");
        Ok(tvec!(f32::fact(&[
            s[0].clone(),
            s[1].clone(),
            self.rows.len_out().to_dim(),
            self.cols.len_out().to_dim(),
        ])))
    }
}
