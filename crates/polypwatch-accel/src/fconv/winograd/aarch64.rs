//! The NEON lanes of the transforms: `LANES` floats as four 128-bit registers.

use super::{LANES, Lanes};
use std::arch::aarch64::*;

/// `LANES` floats in four NEON registers.
#[derive(Clone, Copy)]
pub(in crate::fconv) struct Neon([float32x4_t; 4]);

impl Neon {
    #[inline(always)]
    fn map(self, f: impl Fn(float32x4_t) -> float32x4_t) -> Neon {
        let a = self.0;
        Neon([f(a[0]), f(a[1]), f(a[2]), f(a[3])])
    }

    #[inline(always)]
    fn zip(self, o: Neon, f: impl Fn(float32x4_t, float32x4_t) -> float32x4_t) -> Neon {
        let (a, b) = (self.0, o.0);
        Neon([f(a[0], b[0]), f(a[1], b[1]), f(a[2], b[2]), f(a[3], b[3])])
    }

    #[inline(always)]
    fn from_array(v: &[f32; LANES]) -> Neon {
        // SAFETY: NEON is part of aarch64; 16 floats.
        unsafe { Neon::load(v.as_ptr(), LANES) }
    }

    #[inline(always)]
    fn to_array(self) -> [f32; LANES] {
        let mut v = [0f32; LANES];
        // SAFETY: NEON is part of aarch64; 16 floats.
        unsafe { self.store(v.as_mut_ptr(), LANES) };
        v
    }
}

impl Lanes for Neon {
    #[inline(always)]
    unsafe fn load(p: *const f32, n: usize) -> Self {
        // SAFETY: the caller's: `n` floats at `p`; NEON is part of aarch64.
        unsafe {
            if n >= LANES {
                let v = vld1q_f32_x4(p);
                return Neon([v.0, v.1, v.2, v.3]);
            }
            let mut v = [0f32; LANES];
            std::ptr::copy_nonoverlapping(p, v.as_mut_ptr(), n);
            Neon::from_array(&v)
        }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32, n: usize) {
        // SAFETY: the caller's: `n` floats at `p`; NEON is part of aarch64.
        unsafe {
            if n >= LANES {
                let v = self.0;
                return vst1q_f32_x4(p, float32x4x4_t(v[0], v[1], v[2], v[3]));
            }
            let v = self.to_array();
            std::ptr::copy_nonoverlapping(v.as_ptr(), p, n);
        }
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        // SAFETY: NEON is part of aarch64.
        self.zip(o, |a, b| unsafe { vaddq_f32(a, b) })
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        // SAFETY: NEON is part of aarch64.
        self.zip(o, |a, b| unsafe { vsubq_f32(a, b) })
    }
    #[inline(always)]
    fn splat(v: f32) -> Self {
        // SAFETY: NEON is part of aarch64.
        Neon([unsafe { vdupq_n_f32(v) }; 4])
    }
    #[inline(always)]
    fn relu(self) -> Self {
        self.map(crate::fconv::aarch64::relu)
    }
    #[inline(always)]
    unsafe fn gather(x: &[f32], at: &[i32; LANES]) -> Self {
        // NEON has no gather: lane by lane.
        let mut v = [0f32; LANES];
        for (v, &i) in v.iter_mut().zip(at) {
            if i >= 0 {
                // SAFETY: the caller's: `i` is inside `x`.
                *v = unsafe { *x.get_unchecked(i as usize) };
            }
        }
        Neon::from_array(&v)
    }
    #[inline(always)]
    unsafe fn scatter(self, x: &mut [f32], at: &[i32; LANES]) {
        for (v, &i) in self.to_array().into_iter().zip(at) {
            if i >= 0 {
                // SAFETY: the caller's: `i` is inside `x`.
                unsafe { *x.get_unchecked_mut(i as usize) = v };
            }
        }
    }
    #[inline(always)]
    fn even_odd(row: &[f32], first: isize) -> (Self, Self) {
        // The 32 floats from `first`, through a zeroed copy where some are outside `row` (at
        // the ends of a row; for narrow maps, most vectors).
        let (lo, hi) = (
            (-first).clamp(0, 2 * LANES as isize),
            (row.len() as isize - first).clamp(0, 2 * LANES as isize),
        );
        let mut copy = [0f32; 2 * LANES];
        let (row, first) = if (lo, hi) == (0, 2 * LANES as isize) {
            (row, first as usize)
        } else {
            if hi > lo {
                let (lo, hi) = (lo as usize, hi as usize);
                let from = (first + lo as isize) as usize;
                copy[lo..hi].copy_from_slice(&row[from..from + hi - lo]);
            }
            (&copy[..], 0)
        };
        assert!(first + 2 * LANES <= row.len());
        // SAFETY: NEON is part of aarch64; the 32 floats from `first` are inside `row`.
        unsafe {
            let p = row.as_ptr().add(first);
            // (Written out: `map` over indices stayed a call, with bounds checks.)
            let r = [vld1q_f32_x4(p), vld1q_f32_x4(p.add(16))];
            let even = [
                vuzp1q_f32(r[0].0, r[0].1),
                vuzp1q_f32(r[0].2, r[0].3),
                vuzp1q_f32(r[1].0, r[1].1),
                vuzp1q_f32(r[1].2, r[1].3),
            ];
            let odd = [
                vuzp2q_f32(r[0].0, r[0].1),
                vuzp2q_f32(r[0].2, r[0].3),
                vuzp2q_f32(r[1].0, r[1].1),
                vuzp2q_f32(r[1].2, r[1].3),
            ];
            (Neon(even), Neon(odd))
        }
    }
    #[inline(always)]
    fn interleave(a: Self, b: Self) -> (Self, Self) {
        let (a, b) = (a.0, b.0);
        // SAFETY: NEON is part of aarch64.
        unsafe {
            (
                Neon([
                    vzip1q_f32(a[0], b[0]),
                    vzip2q_f32(a[0], b[0]),
                    vzip1q_f32(a[1], b[1]),
                    vzip2q_f32(a[1], b[1]),
                ]),
                Neon([
                    vzip1q_f32(a[2], b[2]),
                    vzip2q_f32(a[2], b[2]),
                    vzip1q_f32(a[3], b[3]),
                    vzip2q_f32(a[3], b[3]),
                ]),
            )
        }
    }
}
