//! The AVX-512 F lanes of the transforms.

use super::{LANES, Lanes};
use std::arch::x86_64::*;

fn mask(n: usize) -> __mmask16 {
    if n >= LANES { !0 } else { (1 << n) - 1 }
}

// Only called from functions compiled with AVX-512 F (`FConv::transform_*`), into which
// these inline.
impl Lanes for __m512 {
    const WIDTH: usize = LANES;
    #[inline(always)]
    unsafe fn load(p: *const f32, n: usize) -> Self {
        // SAFETY: the caller's; masked lanes are not read.
        unsafe { _mm512_maskz_loadu_ps(mask(n), p) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32, n: usize) {
        // SAFETY: the caller's; masked lanes are not written.
        unsafe { _mm512_mask_storeu_ps(p, mask(n), self) }
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        // SAFETY: AVX-512 F, as above.
        unsafe { _mm512_add_ps(self, o) }
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        // SAFETY: AVX-512 F, as above.
        unsafe { _mm512_sub_ps(self, o) }
    }
    #[inline(always)]
    fn splat(v: f32) -> Self {
        // SAFETY: AVX-512 F, as above.
        unsafe { _mm512_set1_ps(v) }
    }
    #[inline(always)]
    fn relu(self) -> Self {
        // SAFETY: AVX-512 F, as above. `max(x, 0)` returns the second operand unless
        // `x > 0`.
        unsafe { _mm512_max_ps(self, _mm512_setzero_ps()) }
    }
    #[inline(always)]
    unsafe fn gather(x: &[f32], at: &[i32]) -> Self {
        // SAFETY: the caller's: lanes with `at >= 0` are inside `x`, the others masked.
        unsafe {
            let idx = _mm512_loadu_si512(at.as_ptr().cast());
            let live = _mm512_cmpge_epi32_mask(idx, _mm512_setzero_si512());
            _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), live, idx, x.as_ptr())
        }
    }
    #[inline(always)]
    unsafe fn scatter(self, x: &mut [f32], at: &[i32]) {
        // SAFETY: the caller's: lanes with `at >= 0` are inside `x`, the others masked.
        unsafe {
            let idx = _mm512_loadu_si512(at.as_ptr().cast());
            let live = _mm512_cmpge_epi32_mask(idx, _mm512_setzero_si512());
            _mm512_mask_i32scatter_ps::<4>(x.as_mut_ptr(), live, idx, self)
        }
    }
    #[inline(always)]
    fn even_odd(row: &[f32], first: isize) -> (Self, Self) {
        // Lanes of the 32 floats from `first` that are inside `row`.
        let inside = |from: isize| -> __mmask16 {
            let lo = (-from).clamp(0, LANES as isize);
            let hi = (row.len() as isize - from).clamp(lo, LANES as isize);
            if hi <= lo {
                0
            } else {
                mask(hi as usize) & !mask(lo as usize)
            }
        };
        let p = row.as_ptr().wrapping_offset(first);
        // SAFETY: AVX-512 F, as above; masked lanes are not read, the others are inside
        // `row`.
        unsafe {
            let a = _mm512_maskz_loadu_ps(inside(first), p);
            let b = _mm512_maskz_loadu_ps(inside(first + 16), p.wrapping_add(16));
            let even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
            let odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
            (
                _mm512_permutex2var_ps(a, even, b),
                _mm512_permutex2var_ps(a, odd, b),
            )
        }
    }
    #[inline(always)]
    fn interleave(a: Self, b: Self) -> (Self, Self) {
        // SAFETY: AVX-512 F, as above.
        unsafe {
            let lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
            let hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
            (
                _mm512_permutex2var_ps(a, lo, b),
                _mm512_permutex2var_ps(a, hi, b),
            )
        }
    }
}
