//! The aarch64 byte interleave (NEON, always present).

/// `dst[4 l + j] = rows[j][l]` for `l < 8`: one `st4` (NEON, part of aarch64).
#[inline(always)]
pub(super) fn store4x8(rows: [std::arch::aarch64::uint8x8_t; 4], dst: &mut [u8; 32]) {
    use std::arch::aarch64::*;
    let [r0, r1, r2, r3] = rows;
    // SAFETY: NEON is part of aarch64; the store writes the 32 bytes of `dst`.
    unsafe { vst4_u8(dst.as_mut_ptr(), uint8x8x4_t(r0, r1, r2, r3)) }
}
