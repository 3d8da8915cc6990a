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
//! The tile kernel is AVX-512 VNNI (`vpdpbusd`) on x86-64 and the dot product (`sdot`) on
//! aarch64; [`super::rewrite`] only swaps [`QConv`] in where the CPU has one of them. The
//! portable kernel beside them exists so that the layouts and the fused steps are tested on
//! any CPU.
//!
//! Here: the operator and its portable kernel; `rule` matches tract's nodes and builds the
//! [`QConv`]; `x86_64` holds the VNNI kernel, `aarch64` the dot-product one; `tests` checks
//! them against tract.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::tract_linalg::BinOp;
use tract_onnx::tract_core::tract_linalg::mmm::RoundingPolicy;

use crate::im2col::{Geometry, Interleaved};
use crate::threads::SendPtr;

#[cfg(target_arch = "aarch64")]
mod aarch64;
mod rule;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86_64;

pub(crate) use rule::{fuse_dequantize, fuse_residual, replacement};

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
    /// Weights as `MR`-channel panels of `groups x MR x 4` bytes, groups tap-major, then
    /// channel, laid out in a panel as [`Kernel::weight_at`] says; rows past `m` and channels
    /// past the input's zero.
    weights: Arc<Vec<u8>>,
    /// `sum_c w[m][c][t]` for every channel `m` and tap `t`: what a tap that reads only
    /// padding adds, times the padding's unsigned value; such taps are skipped.
    tap_sums: Vec<i32>,
    /// `sum_t tap_sums[m][t]` (wrapping): what a signed kernel's `x - 128` takes from channel
    /// `m`, over 128.
    row_sums: Vec<i32>,
    /// Added to every product of channel `m` before `steps`: `-128 * sum_k w[m][k]` (the
    /// kernel multiplies `x + 128`, unsigned, by the weights), plus tract's leading additive
    /// steps (bias, zero-point correction), folded in (i32 wrapping sums commute).
    offset: Vec<i32>,
    steps: Vec<Step>,
    /// `steps` when they are the usual requantization, for a branch-free epilogue.
    requant: Option<Requant>,
    /// The largest `|sum + offset|` any output can reach: `128 sum_k |w| + |128 sum_k w +
    /// offset|` over the channels. Where a vector requantization is exact up to it, it checks
    /// no row (the NEON one; AVX-512 checks 16 lanes in one instruction).
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    sum_bound: i64,
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

impl QConv {
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
        // A signed kernel multiplies `x - 128` (`K::SIGNED`): `128 * w` over the taps it reads
        // comes back through `extra`, as `128 * (all taps) - 128 * (dead taps)`.
        let (dead_mul, all_mul) = if K::SIGNED {
            (pad - 128, 128)
        } else {
            (pad, 0)
        };
        let mut live: Vec<[usize; 2]> = Vec::with_capacity(offsets.len());
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
                        live.push([offset, t * input.c4]);
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
                        *e = dead
                            .iter()
                            .map(|&t| sums[t])
                            .sum::<i32>()
                            .wrapping_mul(dead_mul);
                        if K::SIGNED {
                            *e = e.wrapping_add(self.row_sums[m0 + i].wrapping_mul(all_mul));
                        }
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
        // SAFETY: the caller's; `Kernel::Avx512Vnni` and `Kernel::Dot` are only chosen where
        // the CPU has them.
        unsafe {
            match self.kernel {
                Kernel::Portable => self.run_rows_with::<Portable>(input, rows, out),
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512Vnni => x86_64::run_rows(self, input, rows, out),
                #[cfg(target_arch = "aarch64")]
                Kernel::Dot => aarch64::run_rows(self, input, rows, out),
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
        // `sdot` multiplies signed bytes: `(x ^ flip) - 128` is `x ^ flip ^ 0x80`.
        #[cfg(target_arch = "aarch64")]
        let flip = if self.kernel == Kernel::Dot {
            self.flip ^ 0x80
        } else {
            0
        };
        #[cfg(not(target_arch = "aarch64"))]
        let flip = 0;
        let input = self.geo.interleaved(x, self.pad, flip);
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
    /// (Arrays, not tuples: the aarch64 kernel walks them in assembly.)
    taps: &'a [[usize; 2]],
    groups: usize,
    stride: usize,
}

impl Patches<'_> {
    /// Whether every run is inside `data` and every weight group inside `a_len` bytes.
    fn fits(&self, a_len: usize) -> bool {
        let span = self.groups.saturating_sub(1) * self.stride;
        self.groups > 0
            && self.taps.iter().all(|&[b, a]| {
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
    /// The aarch64 dot product (`sdot` on 128-bit registers; Armv8.2 DotProd).
    #[cfg(target_arch = "aarch64")]
    Dot,
}

impl Kernel {
    /// Where weight byte `byte` of group `group` (of `groups`) of panel row `row` lies in its
    /// panel. Row-major groups of `MR x 4` bytes, except for `Dot`: two halves of 8 rows, each
    /// `groups x 8 x 4` bytes, so that two neighbouring groups of a quadrant are one 64-byte
    /// load.
    #[cfg_attr(not(target_arch = "aarch64"), allow(unused_variables))]
    pub(crate) fn weight_at(self, groups: usize, group: usize, row: usize, byte: usize) -> usize {
        match self {
            #[cfg(target_arch = "aarch64")]
            Kernel::Dot => ((row / 8 * groups + group) * 8 + row % 8) * 4 + byte,
            _ => (group * MR + row) * 4 + byte,
        }
    }

    /// A kernel faster than tract's on this CPU, if there is one.
    pub fn fast() -> Option<Kernel> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
        {
            return Some(Kernel::Avx512Vnni);
        }
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            return Some(Kernel::Dot);
        }
        None
    }
}

/// One tile of a [`QConv`]: `acc[i][j] = sum_k (b[k][j] + 128) * a[i][k]` over a panel of
/// weights (`MR` channels, groups of `MR x 4` signed bytes) and the patches of `NR` pixels
/// (groups of `NR x 4` signed bytes, made unsigned by adding 128), then the correction, the
/// fused steps and the store of output channels `m0..` at pixels `n0..`.
trait TileKernel {
    /// The kernel multiplies the signed `(x ^ flip) - 128` (the input bytes made so once,
    /// before the tiles) instead of the unsigned `x ^ flip`; `extra` then holds `128 * w` of
    /// the taps the tile reads too, so the sums are the same.
    const SIGNED: bool = false;

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
        for &[tb, ta] in b.taps {
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
