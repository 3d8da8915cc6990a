//! The implicit GEMM's 3x3 weight gradient as an AVX-512 kernel of its own.
//!
//! Through the gemm crate, each tap of a band was a product with an inner dimension of the
//! band's pixels: both operands packed afresh for every tap, nine times a band, and the
//! product run at 60-100 GFLOP/s where the direct forward runs ~160 (`conv_timing`). Here the
//! band's output gradient is laid out pixel-major (`[pixel][output channel]`), so one
//! pixel's gradients for 32 output channels are two vectors; each input channel's padded row
//! is read in place, one broadcast per tap. A pixel then costs 2 vector loads and 9
//! broadcasts for 18 fused multiply-adds into accumulators that stay in registers for a
//! 128-pixel chunk: no packing, no horizontal sums.
//!
//! One thread, the step's 3x3 convolutions on the 48x48 and 24x24 maps, kernel on / off
//! (`examples/conv_timing.rs`, fastest of 5 interleaved): the decoder's 176 -> 64 28.0 / 38.3
//! ms, its 64 -> 64 11.5 / 13.3, layer 1's four 32 -> 32 3.6 / 5.1 each. The 12x12 maps keep
//! the column layout and the gemm crate: reading their column rows as taps through this kernel
//! was slower where the outputs are 128 or more (layer 4's 256 -> 256 13.6 ms against 11.9).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether this CPU has AVX-512 F.
fn cpu_has_it() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Lanes of a vector.
pub(super) const LANES: usize = 16;

/// Taps the kernel takes (a 3x3 kernel; others keep the gemm crate's products).
pub(super) const TAPS: usize = 9;

static ON: AtomicBool = AtomicBool::new(true);

/// Turns the kernel on or off (on by default where the CPU has AVX-512 F; off, the weight
/// gradients are the gemm crate's products), to compare the two: `examples/conv_timing.rs`.
pub fn set_enabled(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// Whether the kernel is on and this CPU runs it.
pub(super) fn available() -> bool {
    ON.load(Ordering::Relaxed) && cpu_has_it()
}

/// Output channels a block of the pixel-major gradient holds (two vectors).
pub(super) const BLOCK: usize = 2 * LANES;

/// Where output channel `o` of pixel `k` goes in [`accumulate`]'s pixel-major gradient of
/// `len` pixels and `op` channels.
pub(super) fn at(o: usize, k: usize, len: usize, op: usize) -> usize {
    let (o0, j) = (o - o % BLOCK, o % BLOCK);
    o0 * len + k * BLOCK.min(op - o0) + j
}

/// The weight gradient in OIHW from partial sums laid out as [`accumulate`]'s `acc`
/// (`C x TAPS x op`), added in their order.
pub(super) fn to_oihw(partials: &[Vec<f32>], o: usize, op: usize) -> Vec<f32> {
    let rows = partials.first().map_or(0, |p| p.len() / op);
    let mut out = vec![0f32; o * rows];
    for part in partials {
        for (o, w) in out.chunks_mut(rows).enumerate() {
            for (i, v) in w.iter_mut().enumerate() {
                *v += part[i * op + o];
            }
        }
    }
    out
}

/// Pixels a pass over the input channels covers: one block's output gradient for them
/// (16 KiB) stays in L1 while every channel's row streams past it.
const CHUNK: usize = 128;

/// One band's share of a weight gradient:
/// `acc[c][t][o] += sum over pixels k < len of dyt(o, k) * xp[c * row + k + taps[t]]`.
///
/// `acc` is `C x TAPS x op` (`op`, a multiple of [`LANES`], is the output channels rounded up,
/// the extra ones zero), `xp` `C` rows of `row` values. `dyt` holds the output gradient in
/// blocks of 32 channels (the last one 16 where `op` is an odd number of vectors), each block
/// `len` pixels of its channels: `dyt(o, k) = dyt[o0 * len + k * width + o - o0]`.
///
/// Panics where a tap would read past a row of `xp`, or the buffers are shorter than said.
pub(super) fn accumulate(
    acc: &mut [f32],
    xp: &[f32],
    row: usize,
    dyt: &[f32],
    op: usize,
    len: usize,
    taps: &[usize; TAPS],
) {
    assert!(op.is_multiple_of(LANES) && cpu_has_it());
    let c = acc.len() / (TAPS * op);
    assert!(acc.len() == c * TAPS * op && xp.len() >= c * row && dyt.len() >= len * op);
    assert!(taps.iter().all(|&t| len == 0 || t + len <= row));
    #[cfg(target_arch = "x86_64")]
    // Pixels outermost: a chunk of every channel's row (C x 9 x 128 values) stays in cache
    // while each block of the output gradient passes, instead of all rows once per block.
    for k0 in (0..len).step_by(CHUNK) {
        let n = CHUNK.min(len - k0);
        for o0 in (0..op).step_by(BLOCK) {
            let width = BLOCK.min(op - o0);
            let block = &dyt[o0 * len..][..width * len];
            for ch in 0..c {
                let a = &mut acc[ch * TAPS * op + o0..];
                let x = &xp[ch * row + k0..(ch + 1) * row];
                let d = &block[k0 * width..][..n * width];
                // SAFETY: AVX-512 F is present (asserted); the kernel reads the `n` pixels of
                // `d`, `width` values each, `x[k + taps[t]]` for `k < n` (`k0 + k + taps[t] <
                // row`, asserted), and reads and writes `a[t * op..][..width]` for `t < TAPS`,
                // inside `acc` since `o0 + width <= op`.
                unsafe {
                    if width == BLOCK {
                        band::<2>(a.as_mut_ptr(), op, x.as_ptr(), d.as_ptr(), n, taps);
                    } else {
                        band::<1>(a.as_mut_ptr(), op, x.as_ptr(), d.as_ptr(), n, taps);
                    }
                }
            }
        }
    }
}

/// `V` vectors of output channels times the nine taps, accumulated over `len` pixels.
///
/// # Safety
/// AVX-512 F; `acc + t * op` holds `16 V` values for each tap `t`, `dyt` `len` pixels of
/// `16 V` values, and `x + k + taps[t]` is readable for each `k < len`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn band<const V: usize>(
    acc: *mut f32,
    op: usize,
    x: *const f32,
    dyt: *const f32,
    len: usize,
    taps: &[usize; TAPS],
) {
    unsafe {
        let mut a = [[_mm512_setzero_ps(); V]; TAPS];
        for (t, at) in a.iter_mut().enumerate() {
            for (v, av) in at.iter_mut().enumerate() {
                *av = _mm512_loadu_ps(acc.add(t * op + v * LANES));
            }
        }
        let xs: [*const f32; TAPS] = std::array::from_fn(|t| x.add(taps[t]));
        for k in 0..len {
            let d: [__m512; V] =
                std::array::from_fn(|v| _mm512_loadu_ps(dyt.add((k * V + v) * LANES)));
            for t in 0..TAPS {
                let b = _mm512_set1_ps(*xs[t].add(k));
                for v in 0..V {
                    a[t][v] = _mm512_fmadd_ps(b, d[v], a[t][v]);
                }
            }
        }
        for (t, at) in a.iter().enumerate() {
            for (v, av) in at.iter().enumerate() {
                _mm512_storeu_ps(acc.add(t * op + v * LANES), *av);
            }
        }
    }
}
