//! A faster im2col for tract's quantized convolutions.
//!
//! tract lowers an int8 convolution into `Im2col` (gather every kernel tap of every output pixel
//! into the matrix-product kernel's packed layout) followed by its int8 matrix product. On our
//! model tract's `Im2col` took half of the frame: it feeds its packers one value at a time
//! through a generic writer. [`PackedIm2Col`] writes the same bytes straight into the packed
//! panels, a whole panel of output pixels per kernel tap, and [`super::rewrite`] swaps it in for
//! tract's op in an optimised model. The matrix product that reads the panels is tract's own,
//! except where [`super::qconv`] replaces the pair; `Geometry::interleaved` is the layout it
//! reads instead.
//!
//! Only the two layouts tract's kernels use for these convolutions are written
//! ([`PackedFormat`]: `k * r + lane` per panel; [`PackedI8K4`]: four taps per lane, for the
//! VNNI / dot-product kernels); any other `Im2col` is left to tract. The unit tests check every
//! byte against tract's own packers and the model tests against tract's `Im2col`.
//!
//! Here: the geometry, the layouts and the operator; `rule` matches tract's `Im2col`; the
//! byte interleaves per architecture in `x86_64` and `aarch64`; `tests` checks every byte
//! against tract.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::{PaddingSpec, PoolSpec};
use tract_onnx::tract_core::ops::nn::DataFormat;
use tract_onnx::tract_core::tract_linalg::mmm::{
    EagerPackedInput, MMMInputFormat, PackedExoticFact, PackedMatrixStorage,
};
use tract_onnx::tract_core::tract_linalg::pack::{PackedFormat, PackedI8K4};

#[cfg(target_arch = "aarch64")]
mod aarch64;
mod rule;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86_64;

#[cfg(target_arch = "aarch64")]
use aarch64::store4x8;
pub(crate) use rule::replacement;
#[cfg(target_arch = "x86_64")]
use x86_64::{has_avx512_vbmi, interleave4x16, store4x8};

/// The packed layout [`PackedIm2Col`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Layout {
    /// `PackedFormat`: panel of `r` pixels, tap-major (`k * r + lane`), panels `panel_len`
    /// elements apart.
    KMajor { r: usize, panel_len: usize },
    /// `PackedI8K4`: panel of `r` pixels, groups of four taps per lane
    /// (`(k / 4) * 4r + 4 lane + k % 4`), taps padded to a multiple of 4 with zeros.
    K4 { r: usize },
}

impl Layout {
    fn of(format: &dyn MMMInputFormat, dt: DatumType, k: usize) -> Option<Layout> {
        if let Some(pf) = format.downcast_ref::<PackedFormat>() {
            (pf.dt.size_of() == dt.size_of()).then(|| Layout::KMajor {
                r: pf.r,
                panel_len: pf.single_panel_len(k),
            })
        } else if let Some(p4) = format.downcast_ref::<PackedI8K4>() {
            (dt.size_of() == 1).then_some(Layout::K4 { r: p4.r })
        } else {
            None
        }
    }

    fn r(&self) -> usize {
        match *self {
            Layout::KMajor { r, .. } | Layout::K4 { r } => r,
        }
    }

    fn panel_len(&self, k: usize) -> usize {
        match *self {
            Layout::KMajor { panel_len, .. } => panel_len,
            Layout::K4 { r } => k.div_ceil(4) * 4 * r,
        }
    }

    fn alignment(&self, format: &dyn MMMInputFormat) -> usize {
        if let Some(pf) = format.downcast_ref::<PackedFormat>() {
            pf.alignment()
        } else if let Some(p4) = format.downcast_ref::<PackedI8K4>() {
            p4.alignment()
        } else {
            64
        }
    }
}

/// Convolution geometry of one 2-D, single-group im2col on a concrete input.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Geometry {
    pub(super) c: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) sy: usize,
    pub(super) sx: usize,
    pub(super) dy: usize,
    pub(super) dx: usize,
    pub(super) pad_top: isize,
    pub(super) pad_left: isize,
    pub(super) oh: usize,
    pub(super) ow: usize,
}

impl Geometry {
    pub(super) fn new(spec: &PoolSpec, shape: &[usize]) -> TractResult<Geometry> {
        let (c, h, w) = match (spec.data_format, shape) {
            (DataFormat::NCHW, [1, c, h, w]) | (DataFormat::CHW, [c, h, w]) => (*c, *h, *w),
            _ => bail!(
                "PackedIm2Col: unsupported input {:?} {shape:?}",
                spec.data_format
            ),
        };
        ensure!(
            spec.kernel_shape.len() == 2,
            "PackedIm2Col: 2-D kernels only"
        );
        let pads = spec.computed_padding(&[h, w]);
        let (strides, dilations) = (spec.strides(), spec.dilations());
        Ok(Geometry {
            c,
            h,
            w,
            kh: spec.kernel_shape[0],
            kw: spec.kernel_shape[1],
            sy: strides[0],
            sx: strides[1],
            dy: dilations[0],
            dx: dilations[1],
            pad_top: pads[0].pad_before as isize,
            pad_left: pads[1].pad_before as isize,
            oh: pads[0].convoluted,
            ow: pads[1].convoluted,
        })
    }

    /// A 1x1 convolution's geometry, `strides` and no padding, on an NCHW input of `shape`.
    pub(super) fn pointwise(shape: &[usize], strides: [usize; 2]) -> TractResult<Geometry> {
        let spec = PoolSpec {
            data_format: DataFormat::NCHW,
            kernel_shape: tvec!(1, 1),
            padding: PaddingSpec::Valid,
            dilations: None,
            strides: Some(tvec!(strides[0], strides[1])),
            input_channels: shape.get(1).copied().unwrap_or(0),
            output_channels: 0,
        };
        Geometry::new(&spec, shape)
    }

    pub(super) fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }

    pub(super) fn n(&self) -> usize {
        self.oh * self.ow
    }

    /// Elements of the input this geometry reads.
    pub(super) fn input_len(&self) -> usize {
        self.c * self.h * self.w
    }

    /// Output height and width.
    pub(super) fn out_hw(&self) -> (usize, usize) {
        (self.oh, self.ow)
    }

    /// The padded input with channels interleaved by four and columns split by their phase
    /// modulo the x stride, `[hp][c4][sx][wq][4]` (`wq = ceil(wp / sx)`): the layout in which
    /// one tap of four channels over 16 neighbouring output pixels is 64 neighbouring bytes,
    /// so a convolution can read it in place instead of through im2col. Channels past `c`
    /// repeat the last one (their weights are zero). Every byte, image and padding alike, is
    /// XORed with `flip`: a kernel that wants them in the other signedness gets them so in
    /// the same pass (x86-64's kernels take them as they are: `flip` 0).
    pub(super) fn interleaved(&self, input: &[u8], pad: u8, flip: u8) -> Interleaved {
        let hp = (self.oh - 1) * self.sy + (self.kh - 1) * self.dy + 1;
        let wp = (self.ow - 1) * self.sx + (self.kw - 1) * self.dx + 1;
        let (c4, sx) = (self.c.div_ceil(4), self.sx);
        let wq = wp.div_ceil(sx);
        // SAFETY: every byte is written below: padding where the image is not.
        let mut data = unsafe { Tensor::uninitialized::<u8>(&[hp * c4 * sx * wq * 4]) }
            .expect("a byte buffer");
        // Columns of a padded row that come from the image.
        let x_lo = self.pad_left.max(0) as usize;
        let x_hi = ((self.w as isize + self.pad_left).min(wp as isize)).max(x_lo as isize) as usize;
        #[cfg(target_arch = "x86_64")]
        let vbmi = has_avx512_vbmi();
        // Padded rows are independent: shared between tract's threads.
        let row_len = c4 * sx * wq * 4;
        let mut ram = data.try_as_plain_ram_mut().expect("plain");
        let bytes = ram.as_slice_mut::<u8>().expect("u8");
        crate::threads::parallel_parts(bytes, row_len, |rows, part| {
            for (yp, out) in rows.zip(part.chunks_exact_mut(row_len)) {
                let y = yp as isize - self.pad_top;
                if y < 0 || y >= self.h as isize {
                    out.fill(pad ^ flip);
                    continue;
                }
                for g in 0..c4 {
                    let lines =
                        [0, 1, 2, 3].map(|j| ((g * 4 + j).min(self.c - 1) * self.h) + y as usize);
                    for phase in 0..sx {
                        // Phase columns q with padded column q * sx + phase in the image.
                        let q_lo = x_lo.saturating_sub(phase).div_ceil(sx).min(wq);
                        let q_hi = x_hi.saturating_sub(phase).div_ceil(sx).clamp(q_lo, wq);
                        let line = (g * sx + phase) * wq;
                        let line = &mut out[line * 4..(line + wq) * 4];
                        line[..q_lo * 4].fill(pad ^ flip);
                        line[q_hi * 4..].fill(pad ^ flip);
                        if q_hi == q_lo {
                            continue;
                        }
                        // Input column of q_lo.
                        let x0 = (q_lo * sx + phase) as isize - self.pad_left;
                        let at = lines.map(|r| r * self.w + x0 as usize);
                        let dst = &mut line[q_lo * 4..q_hi * 4];
                        let n = q_hi - q_lo;
                        #[cfg(not(target_arch = "aarch64"))]
                        let mut q = 0;
                        #[cfg(target_arch = "aarch64")]
                        let mut q = aarch64::interleave4x16(input, at, sx, n, flip, dst);
                        #[cfg(target_arch = "x86_64")]
                        if vbmi && flip == 0 {
                            while q + 16 <= n {
                                let a = at.map(|a| a + q * sx);
                                if sx > 2 || a.iter().any(|&a| a + 16 * sx > input.len()) {
                                    break;
                                }
                                // SAFETY: the CPU has AVX-512 VBMI; the reads are within
                                // `input` (checked) and the write within `dst` (16 pixels).
                                unsafe {
                                    interleave4x16(input, a, sx, &mut dst[q * 4..q * 4 + 64])
                                };
                                q += 16;
                            }
                        }
                        while q + 8 <= n {
                            let a = at.map(|a| a + q * sx);
                            match sx {
                                1 => interleave4x8(input, a, &mut dst[q * 4..]),
                                2 if a.iter().all(|&a| a + 16 <= input.len()) => {
                                    interleave4x8_stride2(input, a, &mut dst[q * 4..])
                                }
                                _ => break,
                            }
                            if flip != 0 {
                                dst[q * 4..q * 4 + 32].iter_mut().for_each(|b| *b ^= flip);
                            }
                            q += 8;
                        }
                        for q in q..n {
                            for j in 0..4 {
                                dst[q * 4 + j] = input[at[j] + q * sx] ^ flip;
                            }
                        }
                    }
                }
            }
        });
        Interleaved { c4, sx, wq, data }
    }

    /// Byte offsets in [`Geometry::interleaved`] of every tap `(ky, kx)`, row-major, from the
    /// pixel's top-left tap.
    pub(super) fn interleaved_taps(&self, input: &Interleaved) -> Vec<usize> {
        let row = input.c4 * input.group_stride();
        (0..self.kh)
            .flat_map(|ky| {
                (0..self.kw).map(move |kx| {
                    let x = kx * self.dx;
                    ky * self.dy * row + ((x % self.sx) * input.wq + x / self.sx) * 4
                })
            })
            .collect()
    }

    /// Byte offset in [`Geometry::interleaved`] of output pixel `(oy, ox)`'s top-left tap.
    pub(super) fn interleaved_base(&self, input: &Interleaved, oy: usize, ox: usize) -> usize {
        oy * self.sy * input.c4 * input.group_stride() + ox * 4
    }

    /// Whether tap `(ky, kx)` of the `n` output pixels from `(oy, ox)` on (one row) reads only
    /// padding, never the image.
    pub(super) fn tap_in_padding(
        &self,
        oy: usize,
        ox: usize,
        n: usize,
        ky: usize,
        kx: usize,
    ) -> bool {
        let y = (oy * self.sy + ky * self.dy) as isize - self.pad_top;
        let first = (ox * self.sx + kx * self.dx) as isize - self.pad_left;
        let last = first + ((n - 1) * self.sx) as isize;
        y < 0 || y >= self.h as isize || last < 0 || first >= self.w as isize
    }

    /// Kernel taps (`kh * kw`).
    pub(super) fn taps(&self) -> usize {
        self.kh * self.kw
    }

    /// Input channels.
    pub(super) fn channels(&self) -> usize {
        self.c
    }

    /// What every im2col of this geometry reads: the padded input and the offset of every tap.
    fn source<T: Copy>(&self, input: &[T], pad: T) -> Source<T> {
        let (hp, wp, src) = self.padded(input, pad);
        // Offset of every tap in the padded input, relative to the pixel's top-left tap.
        let taps: Vec<usize> = (0..self.c)
            .flat_map(|c| {
                (0..self.kh).flat_map(move |ky| {
                    (0..self.kw).map(move |kx| (c * hp + ky * self.dy) * wp + kx * self.dx)
                })
            })
            .collect();
        Source { wp, src, taps }
    }

    /// The input with its padding made explicit, so that every tap of every pixel reads inside
    /// it: `(channels, padded height, padded width)` plus the buffer.
    fn padded<T: Copy>(&self, input: &[T], pad: T) -> (usize, usize, Vec<T>) {
        let hp = (self.oh - 1) * self.sy + (self.kh - 1) * self.dy + 1;
        let wp = (self.ow - 1) * self.sx + (self.kw - 1) * self.dx + 1;
        let (pt, pl) = (self.pad_top, self.pad_left);
        let mut out = vec![pad; self.c * hp * wp];
        for c in 0..self.c {
            for yp in 0..hp {
                let y = yp as isize - pt;
                if y < 0 || y >= self.h as isize {
                    continue;
                }
                // Columns of the padded row that come from the image.
                let x_lo = pl.max(0) as usize;
                let x_hi = ((self.w as isize + pl).min(wp as isize)).max(x_lo as isize) as usize;
                let src0 = (c * self.h + y as usize) * self.w + (x_lo as isize - pl) as usize;
                let dst0 = (c * hp + yp) * wp;
                out[dst0 + x_lo..dst0 + x_hi].copy_from_slice(&input[src0..src0 + x_hi - x_lo]);
            }
        }
        (hp, wp, out)
    }

    /// The `K4` layout when panels never straddle two output rows (the width is a multiple of
    /// `r`): for each output row and group of four taps, the four input rows the taps read are
    /// interleaved into every panel of the row at once.
    fn write_k4_rows<T: Copy + Default>(
        &self,
        source: &Source<T>,
        r: usize,
        panel_len: usize,
        out: &mut [T],
    ) {
        let (src, wp, taps) = (&source.src[..], source.wp, &source.taps[..]);
        let per_row = self.ow / r;
        let sx = self.sx;
        for (oy, row) in out.chunks_mut(per_row * panel_len).enumerate() {
            let base = oy * self.sy * wp;
            for (g, group) in taps.chunks(4).enumerate() {
                let mut at = [usize::MAX; 4];
                for (a, &off) in at.iter_mut().zip(group) {
                    *a = base + off;
                }
                for q in 0..per_row {
                    let dst = &mut row[q * panel_len + g * 4 * r..][..4 * r];
                    let a = at.map(|a| a.wrapping_add(q * r * sx));
                    match (group.len(), sx, r, bytes(src), bytes_mut(dst)) {
                        (4, 1, 8, Some(s), Some(d)) => interleave4x8(s, a, d),
                        (4, 1, 16, Some(s), Some(d)) => {
                            interleave4x8(s, a, &mut d[..32]);
                            interleave4x8(s, a.map(|a| a + 8), &mut d[32..]);
                        }
                        (4, 2, 8, Some(s), Some(d)) if a.iter().all(|&a| a + 16 <= s.len()) => {
                            interleave4x8_stride2(s, a, d)
                        }
                        (4, 2, 16, Some(s), Some(d)) if a.iter().all(|&a| a + 32 <= s.len()) => {
                            interleave4x8_stride2(s, a, &mut d[..32]);
                            interleave4x8_stride2(s, a.map(|a| a + 16), &mut d[32..]);
                        }
                        _ => {
                            for (l, quad) in dst.chunks_exact_mut(4).enumerate() {
                                for (j, v) in quad.iter_mut().enumerate() {
                                    *v = if j < group.len() {
                                        src[a[j] + l * sx]
                                    } else {
                                        T::default()
                                    };
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Writes the im2col matrix (tap `k = (c, ky, kx)` row-major, pixel `n = (oy, ox)`
    /// row-major) into `out` in `layout`, padding lanes and taps included.
    fn write<T: Copy + Default>(&self, input: &[T], pad: T, layout: Layout, out: &mut [T]) {
        let (r, k, n) = (layout.r(), self.k(), self.n());
        let panel_len = layout.panel_len(k);
        let source = self.source(input, pad);
        if let Layout::K4 { r } = layout
            && self.ow.is_multiple_of(r)
        {
            self.write_k4_rows(&source, r, panel_len, out);
            return;
        }
        let Source { wp, src, taps } = source;
        let mut bases = vec![0usize; r];
        for (p, panel) in out.chunks_mut(panel_len).enumerate() {
            let first = p * r;
            let lanes = r.min(n - first);
            for (l, base) in bases.iter_mut().enumerate().take(lanes) {
                let (oy, ox) = ((first + l) / self.ow, (first + l) % self.ow);
                *base = oy * self.sy * wp + ox * self.sx;
            }
            // Lanes past the last pixel and taps past k are computed on by the kernel: zeros.
            if lanes < r {
                panel.fill(T::default());
            }
            let contiguous = (1..lanes).all(|l| bases[l] == bases[0] + l);
            match layout {
                Layout::KMajor { .. } => {
                    panel[k * r..].fill(T::default());
                    for (t, &off) in taps.iter().enumerate() {
                        let dst = &mut panel[t * r..t * r + lanes];
                        if contiguous {
                            let s = bases[0] + off;
                            dst.copy_from_slice(&src[s..s + lanes]);
                        } else {
                            for (d, &b) in dst.iter_mut().zip(&bases) {
                                *d = src[b + off];
                            }
                        }
                    }
                }
                Layout::K4 { .. } => {
                    for (g, group) in taps.chunks(4).enumerate() {
                        let dst = &mut panel[g * 4 * r..g * 4 * r + 4 * lanes];
                        for (quad, &b) in dst.chunks_exact_mut(4).zip(&bases) {
                            for (j, &off) in group.iter().enumerate() {
                                quad[j] = src[b + off];
                            }
                            for q in quad.iter_mut().skip(group.len()) {
                                *q = T::default();
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The padded input with channels interleaved by four (see [`Geometry::interleaved`]).
pub(super) struct Interleaved {
    /// Groups of four channels.
    pub(super) c4: usize,
    /// Column phases (the x stride).
    sx: usize,
    /// Columns per phase.
    wq: usize,
    data: Tensor,
}

impl Interleaved {
    /// The bytes.
    pub(super) fn bytes(&self) -> &[u8] {
        self.data.as_bytes()
    }

    /// Bytes from one group of four channels to the next, within a padded row.
    pub(super) fn group_stride(&self) -> usize {
        self.sx * self.wq * 4
    }
}

/// The padded input an im2col reads (`wp` wide) and the offset of every tap in it.
struct Source<T> {
    wp: usize,
    src: Vec<T>,
    taps: Vec<usize>,
}

/// `Some` when `T` is a byte type (the only case the `K4` layout is used for).
fn bytes<T: Copy>(s: &[T]) -> Option<&[u8]> {
    // SAFETY: T is plain copy data of size 1, so the slices cover the same bytes.
    (size_of::<T>() == 1).then(|| unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), s.len()) })
}

fn bytes_mut<T: Copy>(s: &mut [T]) -> Option<&mut [u8]> {
    // SAFETY: as in `bytes`.
    (size_of::<T>() == 1)
        .then(|| unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), s.len()) })
}

/// `dst[4 l + j] = src[at[j] + l]` for `l < 8`: four runs of 8 bytes, interleaved; two
/// unpack steps on x86-64 (SSE2, always present), one `st4` on aarch64.
#[inline(always)]
fn interleave4x8(src: &[u8], at: [usize; 4], dst: &mut [u8]) {
    let rows: [&[u8; 8]; 4] = at.map(|a| src[a..a + 8].try_into().expect("8 bytes"));
    let dst: &mut [u8; 32] = (&mut dst[..32]).try_into().expect("32 bytes");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE2 is part of x86-64; the unaligned loads read within `rows`.
    unsafe {
        use std::arch::x86_64::*;
        store4x8(rows.map(|r| _mm_loadl_epi64(r.as_ptr().cast())), dst);
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: NEON is part of aarch64; the loads read within `rows`.
    unsafe {
        use std::arch::aarch64::*;
        store4x8(rows.map(|r| vld1_u8(r.as_ptr())), dst);
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    for l in 0..8 {
        for j in 0..4 {
            dst[4 * l + j] = rows[j][l];
        }
    }
}

/// `dst[4 l + j] = src[at[j] + 2 l]` for `l < 8`: the even bytes of four runs of 16,
/// interleaved (a stride-2 convolution); every `at[j] + 16` must be within `src`.
#[inline(always)]
fn interleave4x8_stride2(src: &[u8], at: [usize; 4], dst: &mut [u8]) {
    let rows: [&[u8; 16]; 4] = at.map(|a| src[a..a + 16].try_into().expect("16 bytes"));
    let dst: &mut [u8; 32] = (&mut dst[..32]).try_into().expect("32 bytes");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE2 is part of x86-64; the unaligned loads read within `rows`.
    unsafe {
        use std::arch::x86_64::*;
        let low = _mm_set1_epi16(0x00ff);
        // Keep the even bytes (the low half of each 16-bit lane) and pack them into 8 bytes.
        let rows = rows.map(|r| {
            let v = _mm_and_si128(_mm_loadu_si128(r.as_ptr().cast()), low);
            _mm_packus_epi16(v, v)
        });
        store4x8(rows, dst);
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: NEON is part of aarch64; the loads read within `rows`.
    unsafe {
        use std::arch::aarch64::*;
        // ld2 splits even and odd bytes.
        store4x8(rows.map(|r| vld2_u8(r.as_ptr()).0), dst);
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    for l in 0..8 {
        for j in 0..4 {
            dst[4 * l + j] = rows[j][2 * l];
        }
    }
}

/// im2col into the packed panels of tract's matrix-product kernel; a drop-in replacement for
/// tract's `Im2col` node (same inputs, same output) on single-group 2-D convolutions.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PackedIm2Col {
    pool_spec: PoolSpec,
    format: Box<dyn MMMInputFormat>,
    layout: Layout,
    k: usize,
}

impl PackedIm2Col {
    /// The geometry of this im2col on an input of `shape`.
    pub(super) fn geometry(&self, shape: &[usize]) -> TractResult<Geometry> {
        Geometry::new(&self.pool_spec, shape)
    }

    fn pack(&self, input: &Tensor, pad: Option<&Tensor>) -> TractResult<Tensor> {
        let geo = Geometry::new(&self.pool_spec, input.shape())?;
        ensure!(
            geo.k() == self.k,
            "PackedIm2Col: input does not match the planned geometry"
        );
        let dt = input.datum_type();
        let (n, r) = (geo.n(), self.layout.r());
        let panel_len = self.layout.panel_len(self.k);
        let len = n.div_ceil(r) * panel_len;
        let align = self.layout.alignment(&*self.format);
        // SAFETY: `write` sets every element of every panel, padding included.
        let mut data = unsafe { Tensor::uninitialized_aligned_dt(dt, &[len], align)? };
        // tract hands the zero point as an i32 scalar; the padding is that value in the input type.
        let pad = match pad {
            Some(p) => p.cast_to_dt(dt)?.into_owned(),
            None => Tensor::zero_scalar_dt(dt)?,
        };
        ensure!(
            pad.len() == 1,
            "PackedIm2Col: padding {pad:?} is not a scalar"
        );
        // SAFETY: the slices reinterpret plain copy data of the same element size.
        unsafe {
            match dt.size_of() {
                1 => geo.write::<u8>(
                    input.as_slice_unchecked(),
                    *pad.as_slice_unchecked::<u8>().first().unwrap_or(&0),
                    self.layout,
                    data.as_slice_mut_unchecked(),
                ),
                4 => geo.write::<u32>(
                    input.as_slice_unchecked(),
                    *pad.as_slice_unchecked::<u32>().first().unwrap_or(&0),
                    self.layout,
                    data.as_slice_mut_unchecked(),
                ),
                s => bail!("PackedIm2Col: {s}-byte elements are not supported"),
            }
        }
        let value = EagerPackedInput {
            fact: PackedExoticFact {
                format: self.format.clone(),
                k: self.k,
                mn: n.to_dim(),
            },
            packed: Arc::new(data.into_blob()?),
            panel_bytes: panel_len * dt.size_of(),
            mn: n,
        };
        Ok(PackedMatrixStorage::new_batched(&[1, 1], tvec!(Box::new(value) as _)).into_tensor(dt))
    }
}

impl Op for PackedIm2Col {
    fn name(&self) -> StaticName {
        "PackedIm2col".into()
    }

    op_as_typed_op!();
}

impl EvalOp for PackedIm2Col {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let out = self.pack(&inputs[0], inputs.get(1).map(|t| &**t))?;
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for PackedIm2Col {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape = inputs[0]
            .shape
            .as_concrete()
            .context("PackedIm2Col needs a concrete input shape")?;
        let geo = Geometry::new(&self.pool_spec, shape)?;
        let fact = PackedExoticFact {
            format: self.format.clone(),
            k: self.k,
            mn: geo.n().to_dim(),
        };
        Ok(tvec!(
            inputs[0]
                .datum_type
                .fact([1usize, 1])
                .with_exotic_fact(fact)
        ))
    }
}
