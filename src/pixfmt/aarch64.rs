//! NEON colour conversion: 16 pixels an iteration, the scalar path's integer arithmetic on
//! 32-bit lanes (so the same bytes), for the camera-sized frames the capture thread converts
//! 30 times a second (the scalar loop was 89 M instructions a 1920x1080 YUYV frame).

use std::arch::aarch64::*;

/// Eight pixel pairs: the even and odd pixels' Y, their shared U and V, to 16 RGB pixels at
/// `out` (48 bytes), as `super::yuv_to_rgb` computes each.
///
/// # Safety
/// 48 bytes writable at `out`.
#[inline(always)]
unsafe fn pairs(y0: uint8x8_t, y1: uint8x8_t, u: uint8x8_t, v: uint8x8_t, out: *mut u8) {
    // SAFETY: NEON is part of aarch64; the caller's for the store.
    unsafe {
        let half = vdupq_n_s32(32_768);
        // u - 128, v - 128 (in -128..=127: exact as i16 after the wrapping u16 difference).
        let d = vreinterpretq_s16_u16(vsubl_u8(u, vdup_n_u8(128)));
        let e = vreinterpretq_s16_u16(vsubl_u8(v, vdup_n_u8(128)));
        let wide = |x: int16x8_t| [vmovl_s16(vget_low_s16(x)), vmovl_high_s16(x)];
        let (d, e) = (wide(d), wide(e));
        // The chroma terms, rounding half included, per pair (lanes 0-3 and 4-7).
        // (Arrays written out: `map`s over them stayed calls.)
        let r = [
            vmlaq_n_s32(half, e[0], 104_597),
            vmlaq_n_s32(half, e[1], 104_597),
        ];
        let g = [
            vmlaq_n_s32(vmlaq_n_s32(half, d[0], -25_675), e[0], -53_279),
            vmlaq_n_s32(vmlaq_n_s32(half, d[1], -25_675), e[1], -53_279),
        ];
        let b = [
            vmlaq_n_s32(half, d[0], 132_201),
            vmlaq_n_s32(half, d[1], 132_201),
        ];
        // One channel of 8 pixels: (c + term) >> 16, clamped to 0..=255 by the saturating
        // narrowings.
        let channel = |c: &[int32x4_t; 2], t: &[int32x4_t; 2]| {
            let lo = vshrq_n_s32::<16>(vaddq_s32(c[0], t[0]));
            let hi = vshrq_n_s32::<16>(vaddq_s32(c[1], t[1]));
            vqmovn_u16(vqmovun_high_s32(vqmovun_s32(lo), hi))
        };
        let pixels = |y: uint8x8_t| {
            // max(y - 16, 0) * 76309.
            let c = vmaxq_s16(
                vreinterpretq_s16_u16(vsubl_u8(y, vdup_n_u8(16))),
                vdupq_n_s16(0),
            );
            let c = wide(c);
            let c = [vmulq_n_s32(c[0], 76_309), vmulq_n_s32(c[1], 76_309)];
            [channel(&c, &r), channel(&c, &g), channel(&c, &b)]
        };
        let (even, odd) = (pixels(y0), pixels(y1));
        let zip = |k: usize| vcombine_u8(vzip1_u8(even[k], odd[k]), vzip2_u8(even[k], odd[k]));
        vst3q_u8(out, uint8x16x3_t(zip(0), zip(1), zip(2)));
    }
}

/// The leading whole runs of 16 pixels of a YUYV line of `w` pixels into `out` (RGB);
/// returns the pixels done.
pub(super) fn yuyv(line: &[u8], out: &mut [u8], w: usize) -> usize {
    let mut x = 0;
    while x + 16 <= w && 2 * (x + 16) <= line.len() && 3 * (x + 16) <= out.len() {
        // SAFETY: NEON is part of aarch64; 32 bytes read from `line`, 48 written to `out`
        // (checked above).
        unsafe {
            let q = vld4_u8(line.as_ptr().add(2 * x));
            pairs(q.0, q.2, q.1, q.3, out.as_mut_ptr().add(3 * x));
        }
        x += 16;
    }
    x
}

/// The leading whole runs of 16 pixels of an NV12 line (`y`, and its chroma line `uv`) of
/// `w` pixels into `out` (RGB); returns the pixels done.
pub(super) fn nv12(y: &[u8], uv: &[u8], out: &mut [u8], w: usize) -> usize {
    let mut x = 0;
    while x + 16 <= w && x + 16 <= y.len() && x + 16 <= uv.len() && 3 * (x + 16) <= out.len() {
        // SAFETY: NEON is part of aarch64; 16 bytes read from each line, 48 written to
        // `out` (checked above).
        unsafe {
            let l = vld2_u8(y.as_ptr().add(x));
            let c = vld2_u8(uv.as_ptr().add(x));
            pairs(l.0, l.1, c.0, c.1, out.as_mut_ptr().add(3 * x));
        }
        x += 16;
    }
    x
}
