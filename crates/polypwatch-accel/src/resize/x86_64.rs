//! The AVX-512 F column pass of a bilinear resize: a permutation of one 16-float load.

use super::*;

impl Lanes {
    /// The two-tap column pass of one row, 16 outputs per step: `(0.0 + w0 * a) + w1 * b`
    /// with a zero weight's term left out, as tract adds them (a left-out term adds +0.0 to a
    /// sum that cannot be -0.0, so the bits are the same).
    ///
    /// # Safety
    /// The CPU has AVX-512 F; `row` is `self.w` wide and `out` the chunks' outputs.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn columns(&self, row: &[f32], out: &mut [f32]) {
        use std::arch::x86_64::*;
        let mut padded = [0f32; 16];
        let row = self.window(row, out, &mut padded);
        for (c, x0) in self.chunks.iter().zip((0..).step_by(16)) {
            // SAFETY: lo + 16 <= row.len() (built so) and x0 + len <= out.len() (asserted by `window`).
            unsafe {
                let src = _mm512_loadu_ps(row.as_ptr().add(c.lo));
                let load = |v: &[u32; 16]| _mm512_loadu_si512(v.as_ptr().cast());
                let a = _mm512_permutexvar_ps(load(&c.idx0), src);
                let b = _mm512_permutexvar_ps(load(&c.idx1), src);
                let w0 = _mm512_castsi512_ps(load(&c.w0));
                let w1 = _mm512_castsi512_ps(load(&c.w1));
                let acc = _mm512_add_ps(_mm512_setzero_ps(), _mm512_maskz_mul_ps(c.nz0, w0, a));
                let acc = _mm512_add_ps(acc, _mm512_maskz_mul_ps(c.nz1, w1, b));
                let keep = if c.len == 16 {
                    u16::MAX
                } else {
                    (1u16 << c.len) - 1
                };
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(x0), keep, acc);
            }
        }
    }
}
