//! The NEON quantization: `fcvtns` rounds half to even, turns NaN into 0 and saturates, so
//! the selects of the portable loop are not needed.

use super::*;
use std::arch::aarch64::*;

impl Quantize {
    /// Quantizes the leading multiple of 16 values of `xs` into `ys`; returns how many.
    pub(super) fn run_neon(&self, xs: &[f32], ys: &mut [u8]) -> usize {
        let n = xs.len().min(ys.len()) / 16 * 16;
        // SAFETY: NEON is part of aarch64; every load and store is within the first `n`.
        unsafe {
            let scale = vdupq_n_f32(f32::from_bits(self.scale_bits));
            let zp = vdupq_n_s32(self.zero_point as i32);
            // round_half_even(x * scale) (0 for NaN, saturated beyond i32) + zero point,
            // saturating, then clamped to 0..=255 by the saturating narrowings.
            let q =
                |at: *const f32| vqaddq_s32(vcvtnq_s32_f32(vmulq_f32(vld1q_f32(at), scale)), zp);
            for i in (0..n).step_by(16) {
                let x = xs.as_ptr().add(i);
                let lo = vqmovun_high_s32(vqmovun_s32(q(x)), q(x.add(4)));
                let hi = vqmovun_high_s32(vqmovun_s32(q(x.add(8))), q(x.add(12)));
                vst1q_u8(ys.as_mut_ptr().add(i), vqmovn_high_u16(vqmovn_u16(lo), hi));
            }
        }
        n
    }
}
