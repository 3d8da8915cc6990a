//! The AVX-512 F tile kernel.

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
