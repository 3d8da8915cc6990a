//! Stride-1 convolutions on the large maps without a column layout (an "implicit GEMM").
//!
//! Pad a tile of input rows once (`C x TR x WP`, WP the padded width). If the output is
//! computed on the padded width too (each output row's last `WP - OW` values are thrown away),
//! tap `(ky, kx)` of every output pixel of the tile reads the padded tile at one and the same
//! offset, `ky * dy * WP + kx * dx`. So the convolution is `KH * KW` products of the tap's
//! weights (`O x C`) with an offset view of the tile (`C x L`, unit stride), accumulated; the
//! weight gradient is `KH * KW` products of the output gradient (zeros in the thrown-away
//! columns) with the same views. The column layout, nine times the input, written and read
//! again in every pass, is never built: on the 48x48 maps that copy cost as much as a third
//! of the product. The thrown-away columns are `(WP - OW) / WP` more arithmetic (4 % at
//! 48x48), which is why the small maps keep the column layout.

use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;

use super::conv::{Geometry, PARTIAL_SUMS, SCRATCH, SharedOut, TILE_VALUES, scratch, zeroed};
use super::wgrad;

/// Narrower outputs keep the column layout: the thrown-away columns would cost more than the
/// copy saves (17 % extra arithmetic at 12x12 with padding 1, 33 % with padding 2).
const MIN_WIDTH: usize = 24;

static ON: AtomicBool = AtomicBool::new(true);

/// Turns this path on or off (on by default; off, every convolution builds its column
/// layout), to compare the two: `examples/conv_timing.rs`.
pub fn set_enabled(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// Whether `g` runs here: stride 1, a kernel wider than one tap, a wide enough output.
pub(crate) fn applies(g: &Geometry) -> bool {
    g.stride == [1, 1] && g.kh * g.kw > 1 && g.ow >= MIN_WIDTH && ON.load(Ordering::Relaxed)
}

/// The tiling of a convolution's output into row bands.
struct Tiles {
    /// Padded input width.
    wp: usize,
    /// Output rows per band (the last band may have fewer).
    rows: usize,
    /// Extra input rows a band reads below its last output row.
    reach: usize,
    /// (image, first output row) of every band.
    bands: Vec<(usize, usize)>,
}

impl Tiles {
    fn new(g: &Geometry) -> Self {
        let wp = g.w + 2 * g.pad[1];
        let reach = g.dilation[0] * (g.kh - 1);
        // A band's padded input and its wide output together about fill a core's L2.
        let fixed = g.c * reach * wp;
        let rows = (TILE_VALUES.saturating_sub(fixed) / ((g.c + g.o) * wp)).clamp(1, g.oh);
        let bands = (0..g.n)
            .flat_map(|n| (0..g.oh).step_by(rows).map(move |y0| (n, y0)))
            .collect();
        Tiles {
            wp,
            rows,
            reach,
            bands,
        }
    }

    /// Output rows of the band starting at `y0`, its input rows, and the number of wide output
    /// values computed (the last row stops at the output's width).
    fn band(&self, g: &Geometry, y0: usize) -> (usize, usize, usize) {
        let rows = self.rows.min(g.oh - y0);
        (rows, rows + self.reach, (rows - 1) * self.wp + g.ow)
    }

    /// The offset of tap `t` in a padded band.
    fn tap(&self, g: &Geometry, t: usize) -> usize {
        let (ky, kx) = (t / g.kw, t % g.kw);
        ky * g.dilation[0] * self.wp + kx * g.dilation[1]
    }

    /// Input rows `y0 - pad .. y0 - pad + tr` of image `n`, zero-padded to `wp`, as
    /// `C x tr x wp`.
    fn pad(&self, x: &[f32], g: &Geometry, n: usize, y0: usize, tr: usize, dst: &mut [f32]) {
        let px = g.pad[1];
        for c in 0..g.c {
            let plane = &x[(n * g.c + c) * g.h * g.w..][..g.h * g.w];
            for r in 0..tr {
                let d = &mut dst[(c * tr + r) * self.wp..][..self.wp];
                let iy = (y0 + r) as isize - g.pad[0] as isize;
                if iy < 0 || iy >= g.h as isize {
                    d.fill(0.0);
                    continue;
                }
                let (left, rest) = d.split_at_mut(px);
                let (mid, right) = rest.split_at_mut(g.w);
                left.fill(0.0);
                mid.copy_from_slice(&plane[iy as usize * g.w..][..g.w]);
                right.fill(0.0);
            }
        }
    }
}

/// Forward convolution without bias, a row band at a time.
pub(crate) fn forward(x: &[f32], w: &[f32], g: &Geometry) -> Vec<f32> {
    let t = Tiles::new(g);
    let taps = g.kh * g.kw;
    let mut out = zeroed(g.n * g.o * g.oh * g.ow);
    let dst = SharedOut(out.as_mut_ptr());
    t.bands.par_iter().for_each(|&(n, y0)| {
        let (rows, tr, l) = t.band(g, y0);
        SCRATCH.with(|s| {
            let (a, b) = &mut *s.borrow_mut();
            let xp = scratch(a, g.c * tr * t.wp);
            t.pad(x, g, n, y0, tr, xp);
            let wide = scratch(b, g.o * rows * t.wp);
            for tap in 0..taps {
                // SAFETY: `wide` is O rows of `rows * wp >= l` values; the weights' tap column
                // is O x C at strides (C * taps, taps) inside `w`; the view of `xp` is C rows
                // of `l` values `tr * wp` apart starting at the tap's offset, whose last value,
                // `(tr - 1) * wp + wp - 1`, is inside `xp`.
                unsafe {
                    gemm::gemm(
                        g.o,
                        l,
                        g.c,
                        wide.as_mut_ptr(),
                        1,
                        (rows * t.wp) as isize,
                        tap > 0,
                        w.as_ptr().add(tap),
                        taps as isize,
                        (g.c * taps) as isize,
                        xp.as_ptr().add(t.tap(g, tap)),
                        1,
                        (tr * t.wp) as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
            for o in 0..g.o {
                for r in 0..rows {
                    let src = &wide[(o * rows + r) * t.wp..][..g.ow];
                    let at = ((n * g.o + o) * g.oh + y0 + r) * g.ow;
                    // SAFETY: row `y0 + r` of channel `o` of image `n` is inside `out` and
                    // belongs to this band only.
                    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.at(at), g.ow) };
                }
            }
        });
    });
    out
}

/// Weight gradient, `dW[:, :, tap] = sum over bands of dY_wide x view(tap)'`, in a fixed
/// number of partial sums added in a fixed order (the same bits at any thread count).
pub(crate) fn weight_grad(x: &[f32], dy: &[f32], g: &Geometry) -> Vec<f32> {
    if g.kh * g.kw == wgrad::TAPS && wgrad::available() {
        return weight_grad_pixel_major(x, dy, g);
    }
    let t = Tiles::new(g);
    let taps = g.kh * g.kw;
    let len = g.o * g.c * taps;
    let partials = band_partials(x, g, &t, len, |acc, n, y0, xp, b| {
        let (_, tr, l) = t.band(g, y0);
        // The band's output gradient on the padded width, zero where the forward
        // threw values away.
        let dyw = scratch(b, g.o * l);
        for o in 0..g.o {
            let band = &mut dyw[o * l..][..l];
            for (r, row) in band.chunks_mut(t.wp).enumerate() {
                let src = &dy[((n * g.o + o) * g.oh + y0 + r) * g.ow..][..g.ow];
                let (real, pad) = row.split_at_mut(g.ow);
                real.copy_from_slice(src);
                pad.fill(0.0);
            }
        }
        for tap in 0..taps {
            // SAFETY: `acc` holds O x C x taps values, written at strides
            // (C * taps, taps) from the tap's offset; `dyw` is O x l; the view of
            // `xp` is l x C (strides 1, tr * wp) from the tap's offset, inside `xp`
            // as in `forward`.
            unsafe {
                gemm::gemm(
                    g.o,
                    g.c,
                    l,
                    acc.as_mut_ptr().add(tap),
                    taps as isize,
                    (g.c * taps) as isize,
                    true,
                    dyw.as_ptr(),
                    1,
                    l as isize,
                    xp.as_ptr().add(t.tap(g, tap)),
                    (tr * t.wp) as isize,
                    1,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
    });
    let mut out = vec![0f32; len];
    for part in &partials {
        out.iter_mut().zip(part).for_each(|(x, y)| *x += y);
    }
    out
}

/// [`weight_grad`] for 3x3 kernels on [`wgrad`]'s kernel: the band's output gradient laid out
/// pixel-major, accumulated as `C x taps x O'` (O' the output channels rounded up to a
/// vector), then summed and reordered to OIHW. Partial sums as in [`weight_grad`].
fn weight_grad_pixel_major(x: &[f32], dy: &[f32], g: &Geometry) -> Vec<f32> {
    let t = Tiles::new(g);
    let op = g.o.next_multiple_of(wgrad::LANES);
    let taps: [usize; wgrad::TAPS] = std::array::from_fn(|tap| t.tap(g, tap));
    let len = g.c * wgrad::TAPS * op;
    let partials = band_partials(x, g, &t, len, |acc, n, y0, xp, b| {
        let (rows, tr, l) = t.band(g, y0);
        // In blocks of channels, pixel-major; zero in the thrown-away columns and
        // the rounding-up channels.
        let dyt = scratch(b, l * op);
        dyt.fill(0.0);
        for o in 0..g.o {
            for r in 0..rows {
                let src = &dy[((n * g.o + o) * g.oh + y0 + r) * g.ow..][..g.ow];
                for (i, &v) in src.iter().enumerate() {
                    dyt[wgrad::at(o, r * t.wp + i, l, op)] = v;
                }
            }
        }
        wgrad::accumulate(acc, xp, tr * t.wp, dyt, op, l, &taps);
    });
    wgrad::to_oihw(&partials, g.o, op)
}

/// [`PARTIAL_SUMS`] partial sums of `len` values over the bands of `t`, each band's share added
/// by `add(sum, image, first output row, padded input rows, scratch buffer)`: a fixed split and
/// order, so the same bits on any thread count.
fn band_partials(
    x: &[f32],
    g: &Geometry,
    t: &Tiles,
    len: usize,
    add: impl Fn(&mut [f32], usize, usize, &[f32], &mut Vec<f32>) + Sync,
) -> Vec<Vec<f32>> {
    let per = t.bands.len().div_ceil(PARTIAL_SUMS);
    t.bands
        .par_chunks(per)
        .map(|chunk| {
            let mut acc = vec![0f32; len];
            for &(n, y0) in chunk {
                let (_, tr, _) = t.band(g, y0);
                SCRATCH.with(|s| {
                    let (a, b) = &mut *s.borrow_mut();
                    let xp = scratch(a, g.c * tr * t.wp);
                    t.pad(x, g, n, y0, tr, xp);
                    add(&mut acc, n, y0, xp, b);
                });
            }
            acc
        })
        .collect()
}
