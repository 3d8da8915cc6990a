//! The NEON lanes of the transforms: one 128-bit register, so that a vector of tiles runs a
//! quarter at a time and a 4x4 patch is 16 registers.

use super::{K, Lanes};
use std::arch::aarch64::*;

impl Lanes for float32x4_t {
    const WIDTH: usize = 4;

    #[inline(always)]
    unsafe fn load(p: *const f32, n: usize) -> Self {
        // SAFETY: the caller's: `n` floats at `p`; NEON is part of aarch64.
        unsafe {
            if n >= 4 {
                return vld1q_f32(p);
            }
            let mut v = [0f32; 4];
            std::ptr::copy_nonoverlapping(p, v.as_mut_ptr(), n);
            vld1q_f32(v.as_ptr())
        }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32, n: usize) {
        // SAFETY: the caller's: `n` floats at `p`; NEON is part of aarch64.
        unsafe {
            if n >= 4 {
                return vst1q_f32(p, self);
            }
            let mut v = [0f32; 4];
            vst1q_f32(v.as_mut_ptr(), self);
            std::ptr::copy_nonoverlapping(v.as_ptr(), p, n);
        }
    }
    #[inline(always)]
    unsafe fn load16(p: *const f32, step: usize) -> [Self; K] {
        // By hand: the compiler kept 16 addresses on the stack and loaded each before its
        // load; here one walks by the step.
        let v: [Self; K];
        // SAFETY: the caller's: 4 floats at every `p + k step`.
        unsafe {
            macro_rules! load16 {
                ($($r:ident)*) => {{
                    $(let $r: float32x4_t;)*
                    std::arch::asm!(
                        $(concat!("ld1 {{{", stringify!($r), ":v}.4s}}, [{p}], {s}"),)*
                        p = inout(reg) p => _,
                        s = in(reg) step * 4,
                        $($r = out(vreg) $r,)*
                        options(nostack, readonly, preserves_flags),
                    );
                    v = [$($r),*];
                }};
            }
            load16!(r0 r1 r2 r3 r4 r5 r6 r7 r8 r9 r10 r11 r12 r13 r14 r15);
        }
        v
    }
    #[inline(always)]
    unsafe fn store16(v: [Self; K], p: *mut f32, step: usize) {
        // By hand, as `load16`.
        // SAFETY: the caller's: 4 floats writable at every `p + k step`.
        unsafe {
            macro_rules! store16 {
                ($($r:ident)*) => {{
                    let [$($r),*] = v;
                    std::arch::asm!(
                        $(concat!("st1 {{{", stringify!($r), ":v}.4s}}, [{p}], {s}"),)*
                        p = inout(reg) p => _,
                        s = in(reg) step * 4,
                        $($r = in(vreg) $r,)*
                        options(nostack, preserves_flags),
                    );
                }};
            }
            store16!(r0 r1 r2 r3 r4 r5 r6 r7 r8 r9 r10 r11 r12 r13 r14 r15);
        }
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        // SAFETY: NEON is part of aarch64.
        unsafe { vaddq_f32(self, o) }
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        // SAFETY: NEON is part of aarch64.
        unsafe { vsubq_f32(self, o) }
    }
    #[inline(always)]
    fn splat(v: f32) -> Self {
        // SAFETY: NEON is part of aarch64.
        unsafe { vdupq_n_f32(v) }
    }
    #[inline(always)]
    fn relu(self) -> Self {
        crate::fconv::aarch64::relu(self)
    }
    #[inline(always)]
    unsafe fn gather(x: &[f32], at: &[i32]) -> Self {
        // NEON has no gather: lane by lane.
        let mut v = [0f32; 4];
        for (v, &i) in v.iter_mut().zip(&at[..4]) {
            if i >= 0 {
                // SAFETY: the caller's: `i` is inside `x`.
                *v = unsafe { *x.get_unchecked(i as usize) };
            }
        }
        // SAFETY: NEON is part of aarch64.
        unsafe { vld1q_f32(v.as_ptr()) }
    }
    #[inline(always)]
    unsafe fn scatter(self, x: &mut [f32], at: &[i32]) {
        let mut v = [0f32; 4];
        // SAFETY: NEON is part of aarch64.
        unsafe { vst1q_f32(v.as_mut_ptr(), self) };
        for (v, &i) in v.into_iter().zip(&at[..4]) {
            if i >= 0 {
                // SAFETY: the caller's: `i` is inside `x`.
                unsafe { *x.get_unchecked_mut(i as usize) = v };
            }
        }
    }
    #[inline(always)]
    fn even_odd(row: &[f32], first: isize) -> (Self, Self) {
        if row.len() < 8 {
            let mut copy = [0f32; 8];
            for (l, c) in copy.iter_mut().enumerate() {
                if let Some(&x) = usize::try_from(first + l as isize)
                    .ok()
                    .and_then(|i| row.get(i))
                {
                    *c = x;
                }
            }
            // SAFETY: 8 floats.
            return unsafe { Self::even_odd_inside(copy.as_ptr()) };
        }
        // The 8 floats from `at`, the nearest start inside the row, then a table lookup that
        // shifts them by `first - at` floats: lanes shifted in from outside the 8 index past
        // the table and read as zero, and they are exactly the floats outside the row.
        let at = first.clamp(0, row.len() as isize - 8);
        let shift = (4 * (first - at)) as i8;
        // SAFETY: NEON is part of aarch64; `at..at + 8` is inside `row`.
        unsafe {
            let r = vld1q_u8_x2(row.as_ptr().add(at as usize).cast());
            let even: [i8; 16] = [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27];
            let even = vaddq_s8(vld1q_s8(even.as_ptr()), vdupq_n_s8(shift));
            let odd = vaddq_s8(even, vdupq_n_s8(4));
            (
                vreinterpretq_f32_u8(vqtbl2q_u8(r, vreinterpretq_u8_s8(even))),
                vreinterpretq_f32_u8(vqtbl2q_u8(r, vreinterpretq_u8_s8(odd))),
            )
        }
    }
    #[inline(always)]
    unsafe fn even_odd_inside(p: *const f32) -> (Self, Self) {
        // SAFETY: the caller's: 8 floats at `p`; NEON is part of aarch64.
        unsafe {
            let r = vld1q_f32_x2(p);
            (vuzp1q_f32(r.0, r.1), vuzp2q_f32(r.0, r.1))
        }
    }
    #[inline(always)]
    fn interleave(a: Self, b: Self) -> (Self, Self) {
        // SAFETY: NEON is part of aarch64.
        unsafe { (vzip1q_f32(a, b), vzip2q_f32(a, b)) }
    }
}
