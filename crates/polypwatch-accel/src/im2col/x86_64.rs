//! The x86-64 byte interleaves: SSE2 unpacks (always present) and an AVX-512 VBMI permutation.

/// `dst[4 l + j] = rows[j][l]` for `l < 8`, from the low 8 bytes of four registers: two unpack
/// steps (SSE2, part of x86-64).
#[inline(always)]
pub(super) fn store4x8(rows: [std::arch::x86_64::__m128i; 4], dst: &mut [u8; 32]) {
    use std::arch::x86_64::*;
    let [r0, r1, r2, r3] = rows;
    // SAFETY: SSE2 is part of x86-64; the stores are unaligned ones within `dst`.
    unsafe {
        let a = _mm_unpacklo_epi8(r0, r1);
        let b = _mm_unpacklo_epi8(r2, r3);
        _mm_storeu_si128(dst.as_mut_ptr().cast(), _mm_unpacklo_epi16(a, b));
        _mm_storeu_si128(dst.as_mut_ptr().add(16).cast(), _mm_unpackhi_epi16(a, b));
    }
}

/// Whether this CPU has AVX-512 VBMI (byte permutations), for [`interleave4x16`].
pub(super) fn has_avx512_vbmi() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vbmi")
}

/// `dst[4 l + j] = src[at[j] + sx * l]` for `l < 16`, `sx` 1 or 2: one byte permutation of the
/// four rows (two for stride 2, which keeps the even bytes).
///
/// # Safety
/// The CPU has AVX-512 F, BW and VBMI; `at[j] + 16 * sx <= src.len()`; `dst` is 64 bytes.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
#[inline]
pub(super) unsafe fn interleave4x16(src: &[u8], at: [usize; 4], sx: usize, dst: &mut [u8]) {
    use std::arch::x86_64::*;
    assert!(dst.len() == 64 && at.iter().all(|&a| a + 16 * sx <= src.len()));
    // Output byte 4 l + j reads row j's byte sx * l, rows `16 * sx` bytes apart in the table.
    const fn index(sx: usize) -> [u8; 64] {
        let mut idx = [0u8; 64];
        let mut b = 0;
        while b < 64 {
            idx[b] = ((b % 4) * 16 * sx + sx * (b / 4)) as u8;
            b += 1;
        }
        idx
    }
    const STRIDE1: [u8; 64] = index(1);
    const STRIDE2: [u8; 64] = index(2);
    let index = |idx: &[u8; 64]| -> __m512i {
        // SAFETY: 64 bytes.
        unsafe { _mm512_loadu_si512(idx.as_ptr().cast()) }
    };
    // SAFETY: the loads read `16 * sx` bytes from each `at[j]` (asserted), the store 64.
    unsafe {
        let p = src.as_ptr();
        let out = if sx == 1 {
            let rows = at.map(|a| _mm_loadu_si128(p.add(a).cast()));
            let lo = _mm256_set_m128i(rows[1], rows[0]);
            let hi = _mm256_set_m128i(rows[3], rows[2]);
            let z = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
            _mm512_permutexvar_epi8(index(&STRIDE1), z)
        } else {
            let rows = at.map(|a| _mm256_loadu_si256(p.add(a).cast()));
            let z0 = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(rows[0]), rows[1]);
            let z1 = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(rows[2]), rows[3]);
            // Rows 0-1 are table bytes 0..64, rows 2-3 bytes 64..128.
            _mm512_permutex2var_epi8(z0, index(&STRIDE2), z1)
        };
        _mm512_storeu_si512(dst.as_mut_ptr().cast(), out);
    }
}
