//! The NEON column pass of a bilinear resize: table lookups into one 16-float window.

use super::*;
use std::arch::aarch64::*;

impl Lanes {
    /// The two-tap column pass of one row, 16 outputs per window and 4 per step:
    /// `(0.0 + w0 * a) + w1 * b` with a zero weight's term made +0.0 (as tract, which leaves
    /// it out: adding +0.0 to a sum that cannot be -0.0 keeps its bits, and a masked term
    /// cannot turn an infinite input into NaN). `a` and `b` are gathered from the window by
    /// `tbl` on byte indices.
    ///
    /// `row` is `self.w` wide and `out` holds the chunks' outputs.
    pub(super) fn columns(&self, row: &[f32], out: &mut [f32]) {
        let mut padded = [0f32; 16];
        let row = self.window(row, out, &mut padded);
        for (c, x0) in self.chunks.iter().zip((0..).step_by(16)) {
            let mut res = [0f32; 16];
            // SAFETY: NEON is part of aarch64; lo + 16 <= row.len() (built so), and the
            // constant tables are 16 lanes (64 bytes) each.
            unsafe {
                let t = vld1q_u8_x4(row.as_ptr().add(c.lo).cast());
                let zero = vdupq_n_f32(0.0);
                for k in 0..4 {
                    let term = |bytes: &[u8; 64], w: &[u32; 16], mask: &[u32; 16]| {
                        let x = vreinterpretq_f32_u8(vqtbl4q_u8(
                            t,
                            vld1q_u8(bytes.as_ptr().add(16 * k)),
                        ));
                        let p =
                            vmulq_f32(vreinterpretq_f32_u32(vld1q_u32(w.as_ptr().add(4 * k))), x);
                        vreinterpretq_f32_u32(vandq_u32(
                            vreinterpretq_u32_f32(p),
                            vld1q_u32(mask.as_ptr().add(4 * k)),
                        ))
                    };
                    let acc = vaddq_f32(zero, term(&c.bytes0, &c.w0, &c.mask0));
                    let acc = vaddq_f32(acc, term(&c.bytes1, &c.w1, &c.mask1));
                    vst1q_f32(res.as_mut_ptr().add(4 * k), acc);
                }
            }
            out[x0..x0 + c.len].copy_from_slice(&res[..c.len]);
        }
    }
}
