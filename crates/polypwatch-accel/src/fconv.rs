//! Float convolutions on polypwatch's own direct kernel (AVX-512 FMA).
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
//! convolutions to matrix products. It is only applied where the CPU has AVX-512 F; the
//! portable kernel beside it computes the same fused multiply-adds in the same order, so that
//! the layout, tap skipping and epilogue are tested on any CPU (aarch64 under qemu in CI).

use std::mem::MaybeUninit;
use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::TypedConcat;
use tract_onnx::tract_core::ops::binary::{BinMiniOp, TypedBinOp};
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::math::{Add, Max};
use tract_onnx::tract_core::ops::nn::DataFormat;

use crate::im2col::Geometry;
use crate::threads::SendPtr;

mod winograd;

/// Output channels per tile.
const MR: usize = 8;
/// Pixels per vector: one 512-bit register of f32 lanes.
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
}

impl Kernel {
    /// The kernel faster than tract's product on this CPU, if there is one.
    pub fn fast() -> Option<Kernel> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Some(Kernel::Avx512);
        }
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
        let g = &self.geo;
        let in_place = self.reads_in_place() && slices.len() == 1;
        if let Some(wg) = &self.winograd {
            // SAFETY: `run_winograd` writes every element.
            let mut out = unsafe { Tensor::uninitialized::<f32>(&out_shape)? };
            let mut ram = out.try_as_plain_ram_mut()?;
            self.run_winograd(wg, planes, residual, ram.as_slice_mut::<f32>()?);
            return Ok(out);
        }
        let x = if in_place {
            std::borrow::Cow::Borrowed(slices[0])
        } else {
            std::borrow::Cow::Owned(self.padded(planes))
        };
        // SAFETY: every tile of every panel stores all its pixels: the whole output.
        let mut out = unsafe { Tensor::uninitialized::<f32>(&out_shape)? };
        let ptr = SendPtr(
            out.try_as_plain_ram_mut()?
                .as_slice_mut::<f32>()?
                .as_mut_ptr(),
        );
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
        Ok(out)
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
                Kernel::Avx512 => avx512::tile(&job, bias, &store),
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

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Job, LANES, MR, Store};
    use std::arch::x86_64::*;

    /// The AVX-512 tile: `N` vectors in registers, the 8 x `N` accumulators too.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_n<const N: usize>(job: &Job, bias: &[f32], store: &Store) {
        // SAFETY: the caller's: every read and write is inside its slice.
        unsafe {
            let mut a = [[_mm512_setzero_ps(); N]; MR];
            for (a, &b) in a.iter_mut().zip(bias) {
                *a = [_mm512_set1_ps(b); N];
            }
            let mut at = [0usize; N];
            at.copy_from_slice(&job.at[..N]);
            let (mut x, mut w) = (job.x.as_ptr(), job.w.as_ptr());
            for _ in 0..job.channels {
                // A channel's taps read the same few cache lines: they stay in L1, where a
                // sweep of one tap over all channels did not.
                for &(tap, tap_w) in job.taps {
                    let (x, w) = (x.add(tap), w.add(tap_w));
                    let v = at.map(|at| _mm512_loadu_ps(x.add(at)));
                    for (m, a) in a.iter_mut().enumerate() {
                        let wm = _mm512_set1_ps(*w.add(m));
                        for (a, &v) in a.iter_mut().zip(&v) {
                            *a = _mm512_fmadd_ps(wm, v, *a);
                        }
                    }
                }
                x = x.add(job.plane);
                w = w.add(job.channel_w);
            }
            finish(&a, store);
        }
    }

    /// The epilogue, out of line: with its loop over a variable number of channels inlined,
    /// LLVM kept the accumulators in memory throughout the product.
    #[target_feature(enable = "avx512f")]
    #[inline(never)]
    unsafe fn finish<const N: usize>(a: &[[__m512; N]; MR], store: &Store) {
        // SAFETY: the caller's: every read and write is inside its slice.
        unsafe {
            for (i, rows) in a.iter().enumerate().take(store.rows) {
                let channel = (store.first + i) * store.pixels;
                for (&y, &(at, len)) in rows.iter().zip(store.at) {
                    let mask: __mmask16 = if len >= LANES { !0 } else { (1 << len) - 1 };
                    let mut y = y;
                    if let Some(r) = store.residual {
                        let r = _mm512_maskz_loadu_ps(mask, r.as_ptr().add(channel + at));
                        y = _mm512_add_ps(y, r);
                    }
                    if store.relu {
                        y = _mm512_max_ps(y, _mm512_setzero_ps());
                    }
                    _mm512_mask_storeu_ps(store.out.add(channel + at), mask, y);
                }
            }
        }
    }

    /// # Safety
    /// As [`super::TileKernel::tile`]; the CPU has AVX-512 F.
    pub(super) unsafe fn tile(job: &Job, bias: &[f32], store: &Store) {
        // SAFETY: the caller's.
        unsafe {
            match job.at.len() {
                3 => tile_n::<3>(job, bias, store),
                2 => tile_n::<2>(job, bias, store),
                _ => tile_n::<1>(job, bias, store),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::fixture_input;
    use tract_onnx::tract_core::ops::cnn::{PaddingSpec, PoolSpec};
    use tract_onnx::tract_core::ops::math;

    /// A convolution's shape: input `c x h x w`, `m` outputs, kernel, strides, dilations and
    /// padding (top, left, bottom, right).
    #[derive(Debug, Clone, Copy)]
    struct Shape {
        c: usize,
        h: usize,
        w: usize,
        m: usize,
        k: (usize, usize),
        s: (usize, usize),
        d: (usize, usize),
        pad: (usize, usize, usize, usize),
    }

    /// Reproducible values in -1..1.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// `relu(conv(x) + bias [+ skip])` as a decluttered tract model, its inputs, and the
    /// output's shape.
    fn conv_model(s: Shape, residual: bool, relu: bool) -> (TypedModel, TVec<TValue>) {
        conv_model_split(s, residual, relu, None)
    }

    /// [`conv_model`] whose input is the channel concatenation of two inputs, the first of
    /// `split` channels, where `split` is given.
    fn conv_model_split(
        s: Shape,
        residual: bool,
        relu: bool,
        split: Option<usize>,
    ) -> (TypedModel, TVec<TValue>) {
        let mut model = TypedModel::default();
        let x = match split {
            None => model
                .add_source("x", f32::fact([1, s.c, s.h, s.w]))
                .unwrap(),
            Some(c1) => {
                let a = model.add_source("a", f32::fact([1, c1, s.h, s.w])).unwrap();
                let b = model
                    .add_source("b", f32::fact([1, s.c - c1, s.h, s.w]))
                    .unwrap();
                let cat = TypedConcat { axis: 1 };
                model.wire_node("cat", cat, &[a, b]).unwrap()[0]
            }
        };
        let w = Tensor::from_shape(
            &[s.m, s.c, s.k.0, s.k.1],
            &values(s.m * s.c * s.k.0 * s.k.1, 1),
        )
        .unwrap();
        let b = Tensor::from_shape(&[s.m], &values(s.m, 2)).unwrap();
        let w = model.add_const("w", w).unwrap();
        let b = model.add_const("b", b).unwrap();
        let conv = Conv {
            pool_spec: PoolSpec {
                data_format: DataFormat::NCHW,
                kernel_shape: tvec!(s.k.0, s.k.1),
                padding: PaddingSpec::Explicit(tvec!(s.pad.0, s.pad.1), tvec!(s.pad.2, s.pad.3)),
                dilations: Some(tvec!(s.d.0, s.d.1)),
                strides: Some(tvec!(s.s.0, s.s.1)),
                input_channels: s.c,
                output_channels: s.m,
            },
            kernel_fmt: KernelFormat::OIHW,
            group: 1,
            q_params: None,
        };
        let mut y = model.wire_node("conv", conv, &[x, w, b]).unwrap()[0];
        let out_shape = model
            .outlet_fact(y)
            .unwrap()
            .shape
            .as_concrete()
            .unwrap()
            .to_vec();
        let x = values(s.c * s.h * s.w, 3);
        let mut inputs = match split {
            None => tvec!(
                Tensor::from_shape(&[1, s.c, s.h, s.w], &x)
                    .unwrap()
                    .into_tvalue()
            ),
            Some(c1) => {
                let (a, b) = x.split_at(c1 * s.h * s.w);
                tvec!(
                    Tensor::from_shape(&[1, c1, s.h, s.w], a)
                        .unwrap()
                        .into_tvalue(),
                    Tensor::from_shape(&[1, s.c - c1, s.h, s.w], b)
                        .unwrap()
                        .into_tvalue()
                )
            }
        };
        if residual {
            let skip = model.add_source("skip", f32::fact(&out_shape)).unwrap();
            y = model.wire_node("add", math::add(), &[y, skip]).unwrap()[0];
            let len = out_shape.iter().product();
            inputs.push(
                Tensor::from_shape(&out_shape, &values(len, 4))
                    .unwrap()
                    .into_tvalue(),
            );
        }
        if relu {
            let zero = model.add_const("zero", tensor4(&[[[[0f32]]]])).unwrap();
            y = model.wire_node("relu", math::max(), &[y, zero]).unwrap()[0];
        }
        model.select_output_outlets(&[y]).unwrap();
        (model.into_decluttered().unwrap(), inputs)
    }

    /// Largest difference between two float tensors, relative to the largest magnitude.
    fn relative_difference(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.shape(), b.shape());
        let (a, b) = (floats(a), floats(b));
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        a.iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
            / scale
    }

    fn floats(t: &Tensor) -> Vec<f32> {
        t.try_as_plain_ram()
            .unwrap()
            .as_slice::<f32>()
            .unwrap()
            .to_vec()
    }

    fn run(model: TypedModel, inputs: &TVec<TValue>) -> Tensor {
        let plan = model.into_runnable().unwrap();
        plan.run(inputs.clone()).unwrap()[0].clone().into_tensor()
    }

    const SHAPES: [Shape; 11] = [
        // A residual block's 3x3, width a whole number of vectors.
        Shape {
            c: 5,
            h: 8,
            w: 32,
            m: 16,
            k: (3, 3),
            s: (1, 1),
            d: (1, 1),
            pad: (1, 1, 1, 1),
        },
        // Partial vectors and a partial channel panel.
        Shape {
            c: 3,
            h: 9,
            w: 20,
            m: 11,
            k: (3, 3),
            s: (1, 1),
            d: (1, 1),
            pad: (1, 1, 1, 1),
        },
        // The stem: 7x7, stride 2, odd size.
        Shape {
            c: 3,
            h: 23,
            w: 37,
            m: 8,
            k: (7, 7),
            s: (2, 2),
            d: (1, 1),
            pad: (3, 3, 3, 3),
        },
        // Dilated as the ASPP: most taps read only padding, whole tiles skip some.
        Shape {
            c: 4,
            h: 16,
            w: 16,
            m: 9,
            k: (3, 3),
            s: (1, 1),
            d: (6, 6),
            pad: (6, 6, 6, 6),
        },
        Shape {
            c: 4,
            h: 16,
            w: 16,
            m: 8,
            k: (3, 3),
            s: (1, 1),
            d: (18, 18),
            pad: (18, 18, 18, 18),
        },
        // Asymmetric padding, different strides and dilations per axis.
        Shape {
            c: 2,
            h: 12,
            w: 40,
            m: 7,
            k: (3, 5),
            s: (2, 1),
            d: (1, 2),
            pad: (0, 3, 2, 1),
        },
        // Stride 3, no padding.
        Shape {
            c: 6,
            h: 14,
            w: 50,
            m: 8,
            k: (2, 2),
            s: (3, 3),
            d: (1, 1),
            pad: (0, 0, 0, 0),
        },
        // Output narrower than one vector.
        Shape {
            c: 3,
            h: 5,
            w: 6,
            m: 4,
            k: (3, 3),
            s: (1, 1),
            d: (1, 1),
            pad: (1, 1, 1, 1),
        },
        // 1x1, which tract declutters to a product (through `Downsample`s where strided).
        Shape {
            c: 7,
            h: 4,
            w: 32,
            m: 10,
            k: (1, 1),
            s: (1, 1),
            d: (1, 1),
            pad: (0, 0, 0, 0),
        },
        Shape {
            c: 5,
            h: 9,
            w: 35,
            m: 8,
            k: (1, 1),
            s: (2, 2),
            d: (1, 1),
            pad: (0, 0, 0, 0),
        },
        // A map smaller than the kernel.
        Shape {
            c: 16,
            h: 2,
            w: 1,
            m: 8,
            k: (3, 3),
            s: (1, 1),
            d: (1, 1),
            pad: (1, 1, 1, 1),
        },
    ];

    /// Every shape, with and without the residual addition and ReLU, gives tract's output to
    /// float rounding, on the portable kernel and (where the CPU has it) the fast one, which
    /// agree to the bit.
    #[test]
    fn gives_tracts_convolutions() {
        for shape in SHAPES {
            for (residual, relu) in [(false, false), (false, true), (true, true)] {
                let (model, inputs) = conv_model(shape, residual, relu);
                let reference = run(model.clone(), &inputs);
                let mut kernels = vec![Kernel::Portable];
                kernels.extend(Kernel::fast());
                let mut outputs = vec![];
                for kernel in kernels {
                    let mut ours = model.clone();
                    assert_eq!(fuse(&mut ours, kernel).unwrap(), 1, "{shape:?}");
                    // The convolution, the addition and the ReLU are one node.
                    assert_eq!(
                        ours.nodes().len(),
                        1 + inputs.len(),
                        "{shape:?} {residual} {relu}"
                    );
                    let out = run(ours, &inputs);
                    let diff = relative_difference(&reference, &out);
                    assert!(
                        diff < 1e-5,
                        "{shape:?} {residual} {relu} {kernel:?}: {diff}"
                    );
                    outputs.push(out);
                }
                for out in &outputs[1..] {
                    assert!(out.as_bytes() == outputs[0].as_bytes(), "{shape:?}");
                }
            }
        }
    }

    /// A convolution of a channel concatenation reads the parts where they are (the
    /// concatenation is gone) and gives, to the bit, what it gives on the joined input; one
    /// that reads its input in place (1x1) keeps the concatenation.
    #[test]
    fn reads_the_parts_of_a_concatenation() {
        // Direct (the stem), Winograd, direct and dilated, and 1x1 (read in place).
        for (i, shape) in [SHAPES[2], SHAPES[0], SHAPES[3], SHAPES[7]]
            .into_iter()
            .enumerate()
        {
            let c1 = shape.c / 2;
            let mut kernels = vec![Kernel::Portable];
            kernels.extend(Kernel::fast());
            for kernel in kernels {
                let (joined, x) = conv_model(shape, true, true);
                let (parts, xs) = conv_model_split(shape, true, true, Some(c1));
                let (mut joined, mut parts) = (joined, parts);
                fuse(&mut joined, kernel).unwrap();
                fuse(&mut parts, kernel).unwrap();
                let fused = parts
                    .nodes()
                    .iter()
                    .find_map(|n| n.op_as::<FConv>())
                    .unwrap();
                let in_place = fused.reads_in_place();
                let has_concat = parts.nodes().iter().any(|n| n.op_is::<TypedConcat>());
                assert_eq!(has_concat, in_place, "{i} {shape:?}");
                assert_eq!(fused.parts, if in_place { 1 } else { 2 }, "{i}");
                let (a, b) = (run(joined, &x), run(parts, &xs));
                assert!(a.as_bytes() == b.as_bytes(), "{i} {shape:?} {kernel:?}");
            }
        }
    }

    /// The shipped f32 model with every convolution it covers on [`FConv`]: tract's logits to
    /// float rounding, the same mask, on a real frame.
    #[test]
    fn shipped_model_keeps_its_logits() {
        let path = crate::testing::workspace_root().join("models/polypwatch-edge-f32.onnx");
        let model = tract_onnx::onnx()
            .model_for_path(path)
            .and_then(|m| m.into_typed()?.into_decluttered())
            .unwrap();
        let input = tvec!(fixture_input().into_tvalue());
        let reference = run(model.clone().into_optimized().unwrap(), &input);
        let mut ours = model;
        // Every 3x3 and 7x7 convolution (22) and every 1x1 one in the NCHW form (9: the ASPP's
        // projection is four of them, tract having split it over the concatenation it reads).
        assert_eq!(fuse(&mut ours, Kernel::Portable).unwrap(), 31);
        assert!(!ours.nodes().iter().any(|n| n.op_is::<Conv>()));
        let einsums = ours.nodes().iter().filter(|n| n.op_is::<EinSum>()).count();
        assert_eq!(
            einsums, 3,
            "the ASPP branches tract split to [c][h][w] products"
        );
        let fused: Vec<_> = ours
            .nodes()
            .iter()
            .filter_map(|n| n.op_as::<FConv>())
            .collect();
        // 8 residual blocks, and the ASPP projection's partial sums.
        assert_eq!(fused.iter().filter(|c| c.residual).count(), 12);
        assert_eq!(fused.iter().filter(|c| c.relu).count(), 24);
        let out = run(ours.into_optimized().unwrap(), &input);
        let diff = relative_difference(&reference, &out);
        assert!(diff < 1e-4, "{diff}");
        let (a, b) = (floats(&reference), floats(&out));
        let flipped = a
            .iter()
            .zip(&b)
            .filter(|(x, y)| (**x > 0.0) != (**y > 0.0))
            .count();
        assert!(
            flipped * 1000 <= a.len(),
            "{flipped} of {} pixels changed class",
            a.len()
        );
    }
}
