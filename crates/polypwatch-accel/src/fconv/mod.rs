//! Float convolutions on polypwatch's own direct kernel (AVX-512 FMA on x86-64, NEON on
//! aarch64).
//!
//! tract runs an f32 convolution as its matrix product over a lazy im2col (the product gathers
//! each patch column as it packs it) and the ReLU and residual addition after it as separate
//! passes; on our model that reached 65 GFLOP/s of this CPU's 116 and left the f32 model 1.8x
//! behind ONNX Runtime. ONNX Runtime's direct (NCHWc) convolutions also skip taps that read
//! only padding, which the ASPP's dilated convolutions on a 16x16 map are mostly made of.
//!
//! [`FConv`] reads a padded copy of its input in place: `[c][row][column phase][column]`, in
//! which one tap of one channel over 16 neighbouring output pixels is 16 neighbouring floats,
//! whatever the stride (columns are split by phase) or dilation. A tile is 8 output channels by
//! 3 such vectors of 16 pixels (24 accumulators); per input channel and tap it loads 3 vectors
//! and broadcasts 8 weights into 24 fused multiply-adds. Taps that read only padding for a
//! whole tile are skipped (they add zero). Bias, the residual input and the ReLU that follow
//! the convolution in the graph are applied to the accumulators before the store.
//!
//! 3x3 stride-1 convolutions (all but the ASPP's widest dilations) run instead by Winograd's
//! F(2x2, 3x3) ([`winograd`]): 16 products on the same tile kernel per 2x2 outputs instead of
//! 36, the transforms being additions.
//!
//! The sums come in another order than tract's, so the output differs from tract's in the last
//! bits; the tests bound the difference and the shipped model's test metrics were measured
//! again (BENCHMARKS.md).
//!
//! This is a rewrite of the decluttered model ([`fuse`]), before tract's optimiser lowers
//! convolutions to matrix products. It is applied where the CPU has AVX-512 F or NEON (every
//! aarch64 CPU); the portable kernel beside it computes the same fused multiply-adds in the
//! same order, so that the layout, tap skipping and epilogue are tested on any CPU, and both
//! fast kernels are compared with it to the bit (the NEON one under qemu in CI).
//!
//! Here: the operator, its portable kernel and the padded layout; `rule` matches tract's
//! convolutions and builds the [`FConv`]; `x86_64` holds the AVX-512 kernel, `aarch64` the
//! NEON one; `winograd` the F(2x2, 3x3) path (its vector lanes in `winograd/x86_64.rs` and
//! `winograd/aarch64.rs`); `tests` checks them against tract.

use std::mem::MaybeUninit;
use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use crate::im2col::Geometry;
use crate::threads::SendPtr;

#[cfg(target_arch = "aarch64")]
mod aarch64;
mod rule;
mod slices;
#[cfg(test)]
mod tests;
mod winograd;
#[cfg(target_arch = "x86_64")]
mod x86_64;

pub use rule::fuse;
pub use slices::{ConvShape, SliceConv};

/// Output channels per tile.
const MR: usize = 8;
/// Pixels per vector: one 512-bit register of f32 lanes (four NEON registers).
const LANES: usize = 16;
/// Vectors of `LANES` pixels per tile.
const NV: usize = 3;

/// Floats compared bit by bit (tract's operators must be `Eq`).
#[derive(Debug, Clone)]
struct Floats(Arc<Vec<f32>>);

impl PartialEq for Floats {
    fn eq(&self, other: &Floats) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .zip(other.0.iter())
                .all(|(a, b)| a.to_bits() == b.to_bits())
    }
}

impl Eq for Floats {}

/// Which tile kernel an [`FConv`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Plain Rust, the same fused multiply-adds in the same order: for tests on any CPU.
    Portable,
    /// AVX-512 F.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// NEON (every aarch64 CPU has it).
    #[cfg(target_arch = "aarch64")]
    Neon,
}

impl Kernel {
    /// The kernel faster than tract's product on this CPU, if there is one.
    pub fn fast() -> Option<Kernel> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Some(Kernel::Avx512);
        }
        #[cfg(target_arch = "aarch64")]
        return Some(Kernel::Neon);
        #[allow(unreachable_code)]
        None
    }
}

/// A float convolution (group 1, NCHW, batch 1) with its bias, and optionally the residual
/// addition and the ReLU after it, as one operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FConv {
    geo: Geometry,
    /// Output channels.
    m: usize,
    /// `[panel][channel][tap][MR]`: `MR` output channels a panel, rows past `m` zero; empty
    /// where `winograd` runs the convolution.
    weights: Floats,
    /// Per output channel, zero past `m`.
    bias: Floats,
    /// Inputs the convolution's input is made of: more than one where they are the parts of a
    /// channel concatenation, read where they are instead of copied together first.
    parts: usize,
    /// Whether one more input (the output's shape), after the parts, is added before the ReLU.
    residual: bool,
    relu: bool,
    /// Padded rows of the input copy.
    hp: usize,
    /// Columns of each phase of a padded row.
    wq: usize,
    /// Set for the 3x3 stride-1 convolutions Winograd's algorithm suits
    /// ([`winograd::Winograd::new`]), which run by it instead of the direct kernel.
    winograd: Option<winograd::Winograd>,
    kernel: Kernel,
}

/// A tile: up to `NV` vectors of output pixels and the taps that read some of the image.
struct Tile {
    /// Offset of each vector's top-left tap in the padded input.
    at: [usize; NV],
    /// Each vector's first output pixel (`y * ow + x`) and its pixels inside the row.
    out: [(usize, usize); NV],
    vectors: usize,
    /// Per live tap: its offset from `at` in the padded input, and its weights' offset in a
    /// channel's (`tap * MR`).
    taps: Vec<(usize, usize)>,
}

/// A convolution's input as channel planes of `h x w` floats, from one tensor or from the
/// parts of a channel concatenation.
#[derive(Clone, Copy)]
pub(super) struct Planes<'a> {
    parts: &'a [&'a [f32]],
    plane: usize,
}

impl<'a> Planes<'a> {
    /// Channel `ci`'s plane.
    fn plane(&self, mut ci: usize) -> &'a [f32] {
        for part in self.parts {
            let channels = part.len() / self.plane;
            if ci < channels {
                return &part[ci * self.plane..][..self.plane];
            }
            ci -= channels;
        }
        panic!("channel {ci} past the input's last")
    }
}

impl FConv {
    /// Output pixels a row rounded up to whole vectors.
    fn vectors_per_row(&self) -> usize {
        self.geo.ow.div_ceil(LANES)
    }

    fn tiles(&self) -> usize {
        (self.geo.oh * self.vectors_per_row()).div_ceil(NV)
    }

    fn panels(&self) -> usize {
        self.m.div_ceil(MR)
    }

    fn row_len(&self) -> usize {
        self.geo.sx * self.wq
    }

    fn plane(&self) -> usize {
        self.hp * self.row_len()
    }

    fn padded_len(&self) -> usize {
        self.geo.c * self.plane()
    }

    /// The operator for geometry `geo`, `m` outputs, weights `[m][c][kh][kw]` and `m` biases.
    fn with_weights(
        geo: Geometry,
        m: usize,
        w: &[f32],
        b: &[f32],
        kernel: Kernel,
    ) -> Option<FConv> {
        let (c, kh, kw, taps) = (geo.c, geo.kh, geo.kw, geo.taps());
        if geo.oh == 0 || geo.ow == 0 || w.len() != m * c * taps || b.len() != m {
            return None;
        }
        let panels = m.div_ceil(MR);
        let winograd = winograd::Winograd::new(&geo, m, w);
        // The direct kernel's panels, only where it runs (up to 2.4 MB a convolution).
        let direct = if winograd.is_some() { 0 } else { m };
        let mut weights = vec![0f32; panels.min(direct.div_ceil(MR)) * taps * c * MR];
        for mi in 0..direct {
            let (p, r) = (mi / MR, mi % MR);
            for ci in 0..c {
                for t in 0..taps {
                    weights[((p * c + ci) * taps + t) * MR + r] = w[(mi * c + ci) * taps + t];
                }
            }
        }
        let mut bias = vec![0f32; panels * MR];
        bias[..m].copy_from_slice(b);
        let hp = (geo.oh - 1) * geo.sy + (kh - 1) * geo.dy + 1;
        let wq = geo.ow.div_ceil(LANES) * LANES + ((kw - 1) * geo.dx) / geo.sx;
        Some(FConv {
            geo,
            m,
            weights: Floats(Arc::new(weights)),
            bias: Floats(Arc::new(bias)),
            parts: 1,
            residual: false,
            relu: false,
            hp,
            wq,
            winograd,
            kernel,
        })
    }

    /// The input, zero-padded, columns split by phase: [`padded`].
    /// Whether the padded layout is the input's own (1x1, stride 1, whole vectors a row): the
    /// kernel then reads the input itself.
    fn reads_in_place(&self) -> bool {
        let g = &self.geo;
        self.padded_len() == g.input_len()
            && (self.hp, self.wq, g.sx, g.pad_top, g.pad_left) == (g.h, g.w, 1, 0, 0)
    }

    fn padded(&self, input: Planes) -> Vec<f32> {
        padded(&self.geo, self.hp, self.wq, input)
    }

    /// Offsets of tap `(ky, kx)` in the padded input, from a vector's top-left tap.
    fn tap_offset(&self, ky: usize, kx: usize) -> usize {
        let x = kx * self.geo.dx;
        ky * self.geo.dy * self.row_len() + (x % self.geo.sx) * self.wq + x / self.geo.sx
    }

    /// Tile `t`'s vectors and live taps (written into `tile`, reusing its buffer).
    fn tile(&self, t: usize, tile: &mut Tile) {
        let g = &self.geo;
        let vw = self.vectors_per_row();
        let first = t * NV;
        tile.vectors = (g.oh * vw - first).min(NV);
        for n in 0..tile.vectors {
            let (oy, ox) = ((first + n) / vw, (first + n) % vw * LANES);
            tile.at[n] = oy * g.sy * self.row_len() + ox;
            tile.out[n] = (oy * g.ow + ox, (g.ow - ox).min(LANES));
        }
        tile.taps.clear();
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let live = (0..tile.vectors).any(|n| {
                    let (oy, ox) = ((first + n) / vw, (first + n) % vw * LANES);
                    !g.tap_in_padding(oy, ox, tile.out[n].1, ky, kx)
                });
                if live {
                    let w = (ky * g.kw + kx) * MR;
                    tile.taps.push((self.tap_offset(ky, kx), w));
                }
            }
        }
    }

    fn run(&self, parts: &[&Tensor], residual: Option<&Tensor>) -> TractResult<Tensor> {
        let g = &self.geo;
        let out_shape = [1, self.m, g.oh, g.ow];
        ensure!(
            parts
                .iter()
                .all(|p| p.datum_type() == f32::datum_type() && p.len().is_multiple_of(g.h * g.w))
                && parts.iter().map(|p| p.len()).sum::<usize>() == g.input_len(),
            "FConv: input {:?} does not match the planned convolution",
            parts
                .iter()
                .map(|p| (p.datum_type(), p.shape()))
                .collect::<Vec<_>>()
        );
        let residual = residual.map(|r| r.try_as_plain_ram()).transpose()?;
        let residual = match &residual {
            Some(r) => {
                ensure!(
                    r.datum_type() == f32::datum_type() && r.shape() == out_shape,
                    "FConv: residual {:?} {:?} does not match the output {out_shape:?}",
                    r.datum_type(),
                    r.shape()
                );
                Some(r.as_slice::<f32>()?)
            }
            None => None,
        };
        let rams = parts
            .iter()
            .map(|p| p.try_as_plain_ram())
            .collect::<TractResult<TVec<_>>>()?;
        let slices = rams
            .iter()
            .map(|r| r.as_slice::<f32>())
            .collect::<TractResult<TVec<_>>>()?;
        let planes = Planes {
            parts: &slices,
            plane: g.h * g.w,
        };
        // SAFETY: `run_into` writes every element.
        let mut out = unsafe { Tensor::uninitialized::<f32>(&out_shape)? };
        self.run_into(
            planes,
            residual,
            out.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?,
        );
        Ok(out)
    }

    /// The convolution of `input` into `out` (`m x oh x ow`, every element written).
    fn run_into(&self, planes: Planes, residual: Option<&[f32]>, out: &mut [f32]) {
        let g = &self.geo;
        assert_eq!(out.len(), self.m * g.n());
        if let Some(wg) = &self.winograd {
            self.run_winograd(wg, planes, residual, out);
            return;
        }
        let x = if self.reads_in_place() && planes.parts.len() == 1 {
            std::borrow::Cow::Borrowed(planes.parts[0])
        } else {
            std::borrow::Cow::Owned(self.padded(planes))
        };
        // Every tile of every panel stores all its pixels: the whole output.
        let ptr = SendPtr(out.as_mut_ptr());
        let (tiles, panels) = (self.tiles(), self.panels());
        // Whichever of the input and the weights is larger is read once, the other once per
        // tile or panel (from cache).
        let tiles_outer = x.len() >= self.weights.0.len();
        crate::threads::parallel_rows(tiles * panels, |items| {
            let ptr = &ptr;
            let mut tile = Tile {
                at: [0; NV],
                out: [(0, 0); NV],
                vectors: 0,
                taps: Vec::with_capacity(g.kh * g.kw),
            };
            let mut current = usize::MAX;
            for i in items {
                let (t, p) = if tiles_outer {
                    (i / panels, i % panels)
                } else {
                    (i % tiles, i / tiles)
                };
                if t != current {
                    self.tile(t, &mut tile);
                    current = t;
                }
                // SAFETY: items are disjoint between threads, so are their (tile, panel)
                // outputs; `run_tile` checks its reads.
                unsafe { self.run_tile(&x, &tile, p, residual, ptr.0) };
            }
        });
    }

    /// # Safety
    /// `out` is the output's data, and no other thread writes `tile`'s pixels of panel `p`.
    unsafe fn run_tile(
        &self,
        x: &[f32],
        tile: &Tile,
        p: usize,
        residual: Option<&[f32]>,
        out: *mut f32,
    ) {
        let c = self.geo.c;
        let panel = self.weights.0.len() / self.panels();
        let w = &self.weights.0[p * panel..][..panel];
        let plane = self.plane();
        // Every read of the kernel inside `x` and `w`.
        let last = tile.at[..tile.vectors].iter().max().copied().unwrap_or(0)
            + tile.taps.iter().map(|t| t.0).max().unwrap_or(0)
            + (c - 1) * plane
            + LANES;
        assert!(last <= x.len());
        assert!(tile.taps.iter().all(|t| t.1 + MR <= self.geo.taps() * MR));
        assert!(w.len() == c * self.geo.taps() * MR);
        let job = Job {
            x,
            w,
            taps: &tile.taps,
            at: &tile.at[..tile.vectors],
            channels: c,
            plane,
            channel_w: self.geo.taps() * MR,
        };
        let m0 = p * MR;
        let n = self.geo.n();
        if let Some(r) = residual {
            assert!(
                tile.out[..tile.vectors]
                    .iter()
                    .all(|&(at, len)| { (self.m - 1) * n + at + len <= r.len() })
            );
        }
        let store = Store {
            out,
            residual,
            relu: self.relu,
            pixels: n,
            first: m0,
            rows: (self.m - m0).min(MR),
            at: &tile.out[..tile.vectors],
        };
        let bias = &self.bias.0[m0..m0 + MR];
        // SAFETY: the reads are checked above, the writes are the caller's; the kernel exists
        // on this CPU (`Kernel::fast`).
        unsafe {
            match self.kernel {
                Kernel::Portable => Portable::tile(&job, bias, &store),
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512 => x86_64::tile(&job, bias, &store),
                #[cfg(target_arch = "aarch64")]
                Kernel::Neon => aarch64::tile(&job, bias, &store),
            }
        }
    }
}

/// What a tile kernel multiplies: for every channel and every live tap, `at.len()` vectors of
/// `LANES` floats at `x[at[v] + tap + channel * plane..]` by `MR` weights at
/// `w[tap_w + channel * channel_w..]`.
struct Job<'a> {
    x: &'a [f32],
    w: &'a [f32],
    taps: &'a [(usize, usize)],
    at: &'a [usize],
    channels: usize,
    plane: usize,
    /// Weights a channel: all its taps, live or not.
    channel_w: usize,
}

/// Where a tile's results go: channel `first + i` (`i < rows`) of vector `v` is `at[v].1`
/// pixels from `at[v].0` in channel `first + i` of `out` (`pixels` a channel), after adding
/// the same pixels of `residual` and the ReLU, as the operator says.
struct Store<'a> {
    out: *mut f32,
    residual: Option<&'a [f32]>,
    relu: bool,
    pixels: usize,
    first: usize,
    rows: usize,
    at: &'a [(usize, usize)],
}

/// `bias[m] + sum over taps, then channels, of w * x` for every channel `m` and pixel, each
/// step one fused multiply-add, then the residual, the ReLU (`if y > 0 { y } else { 0 }`) and
/// the store.
trait TileKernel {
    /// # Safety
    /// Every read `Job` and `Store` describe is inside `x`, `w` and `residual`; `Store`'s
    /// pixels are inside `out` and no other thread writes them; the kernel's instructions
    /// exist on this CPU.
    unsafe fn tile(job: &Job, bias: &[f32], store: &Store);
}

struct Portable;

impl TileKernel for Portable {
    unsafe fn tile(job: &Job, bias: &[f32], store: &Store) {
        let mut acc = [[[0f32; LANES]; NV]; MR];
        for (rows, &b) in acc.iter_mut().zip(bias) {
            *rows = [[b; LANES]; NV];
        }
        for ci in 0..job.channels {
            for &(tap, tap_w) in job.taps {
                let w = &job.w[tap_w + ci * job.channel_w..][..MR];
                for (v, &at) in job.at.iter().enumerate() {
                    let x = &job.x[at + tap + ci * job.plane..][..LANES];
                    for (rows, &w) in acc.iter_mut().zip(w) {
                        for (a, &x) in rows[v].iter_mut().zip(x) {
                            *a = w.mul_add(x, *a);
                        }
                    }
                }
            }
        }
        for (i, rows) in acc.iter_mut().enumerate().take(store.rows) {
            let channel = (store.first + i) * store.pixels;
            for (row, &(at, len)) in rows.iter_mut().zip(store.at) {
                let row = &mut row[..len];
                if let Some(r) = store.residual {
                    row.iter_mut()
                        .zip(&r[channel + at..][..len])
                        .for_each(|(a, r)| *a += r);
                }
                if store.relu {
                    row.iter_mut()
                        .for_each(|a| *a = if *a > 0.0 { *a } else { 0.0 });
                }
                // SAFETY: the caller's: these pixels are inside `out` and this tile's.
                unsafe {
                    std::ptr::copy_nonoverlapping(row.as_ptr(), store.out.add(channel + at), len)
                };
            }
        }
    }
}

impl Op for FConv {
    fn name(&self) -> StaticName {
        "FConv".into()
    }

    op_as_typed_op!();
}

impl EvalOp for FConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == self.parts + self.residual as usize);
        let parts: TVec<&Tensor> = inputs[..self.parts].iter().map(|t| &**t).collect();
        let residual = self.residual.then(|| &*inputs[self.parts]);
        Ok(tvec!(self.run(&parts, residual)?.into_tvalue()))
    }
}

impl TypedOp for FConv {
    as_op!();

    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact([1, self.m, self.geo.oh, self.geo.ow])))
    }
}

/// The input of a convolution of geometry `g`, zero-padded to `hp` rows and `wq` columns a
/// phase, columns split by phase modulo the x stride: `[c][hp][sx][wq]`, so that a tap over
/// `LANES` neighbouring output pixels of a row is `LANES` neighbouring floats.
fn padded(g: &Geometry, hp: usize, wq: usize, input: Planes) -> Vec<f32> {
    let (row_len, plane) = (g.sx * wq, hp * g.sx * wq);
    let len = g.c * plane;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let zero = |d: &mut [MaybeUninit<f32>]| d.iter_mut().for_each(|d| _ = d.write(0.0));
    // Every element is written once: no memset of the whole buffer first.
    crate::threads::parallel_parts(
        &mut out.spare_capacity_mut()[..len],
        plane,
        |channels, part| {
            for (ci, dst) in channels.zip(part.chunks_exact_mut(plane)) {
                let src = input.plane(ci);
                for (r, dst) in dst.chunks_exact_mut(row_len).enumerate() {
                    let y = r as isize - g.pad_top;
                    if y < 0 || y >= g.h as isize {
                        zero(dst);
                        continue;
                    }
                    let row = &src[y as usize * g.w..][..g.w];
                    for (ph, dst) in dst.chunks_exact_mut(wq).enumerate() {
                        // Padded column `j * sx + ph` is image column `j * sx - first`: inside
                        // the image for `j` in `lo..hi`.
                        let first = g.pad_left - ph as isize;
                        let (sx, wq) = (g.sx as isize, wq as isize);
                        let lo = ((first.max(0) + sx - 1) / sx).min(wq);
                        let hi = ((g.w as isize + first + sx - 1) / sx).clamp(lo, wq);
                        let (lo, hi) = (lo as usize, hi as usize);
                        zero(&mut dst[..lo]);
                        if hi > lo {
                            let x0 = (lo as isize * sx - first) as usize;
                            let src = row[x0..].iter().step_by(g.sx);
                            for (d, &v) in dst[lo..hi].iter_mut().zip(src) {
                                d.write(v);
                            }
                        }
                        zero(&mut dst[hi..]);
                    }
                }
            }
        },
    );
    // SAFETY: every element of every plane was written above.
    unsafe { out.set_len(len) };
    out
}
