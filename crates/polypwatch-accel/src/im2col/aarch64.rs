//! The aarch64 byte interleave (NEON, always present).

/// `dst[4 l + j] = rows[j][l]` for `l < 8`: one `st4` (NEON, part of aarch64).
#[inline(always)]
pub(super) fn store4x8(rows: [std::arch::aarch64::uint8x8_t; 4], dst: &mut [u8; 32]) {
    use std::arch::aarch64::*;
    let [r0, r1, r2, r3] = rows;
    // SAFETY: NEON is part of aarch64; the store writes the 32 bytes of `dst`.
    unsafe { vst4_u8(dst.as_mut_ptr(), uint8x8x4_t(r0, r1, r2, r3)) }
}

/// `dst[4 l + j] = src[at[j] + sx * l] ^ flip` for the whole runs of 16 of the first `n`
/// columns `l`, stride `sx` 1 or 2 (`ld2` keeps the even bytes), while the reads stay inside
/// `src`: four loads and one `st4` a run. Returns the columns done.
#[inline(always)]
pub(super) fn interleave4x16(
    src: &[u8],
    at: [usize; 4],
    sx: usize,
    n: usize,
    flip: u8,
    dst: &mut [u8],
) -> usize {
    use std::arch::aarch64::*;
    if sx > 2 {
        return 0;
    }
    let mut q = 0;
    while q + 16 <= n {
        // (Indices written out: array `map`s stayed calls.)
        let a = [
            at[0] + q * sx,
            at[1] + q * sx,
            at[2] + q * sx,
            at[3] + q * sx,
        ];
        if a.iter().any(|&a| a + 16 * sx > src.len()) {
            break;
        }
        let dst: &mut [u8; 64] = (&mut dst[q * 4..q * 4 + 64]).try_into().expect("64 bytes");
        // SAFETY: NEON is part of aarch64; each load reads `16 * sx` bytes inside `src`
        // (checked above), the store the 64 bytes of `dst`.
        unsafe {
            let f = vdupq_n_u8(flip);
            let p = src.as_ptr();
            let load = |a: usize| {
                let v = if sx == 1 {
                    vld1q_u8(p.add(a))
                } else {
                    vld2q_u8(p.add(a)).0
                };
                veorq_u8(v, f)
            };
            let rows = uint8x16x4_t(load(a[0]), load(a[1]), load(a[2]), load(a[3]));
            vst4q_u8(dst.as_mut_ptr(), rows);
        }
        q += 16;
    }
    q
}
