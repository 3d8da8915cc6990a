//! The AVX-512 VNNI tile kernel (`vpdpbusd` on 512-bit registers) and its vector
//! requantization.

use super::*;
use std::arch::x86_64::*;

pub(super) struct Vnni;

impl TileKernel for Vnni {
    #[inline(always)]
    unsafe fn tile(
        conv: &QConv,
        a: &[u8],
        b: &Patches,
        extra: &[i32; MR],
        m0: usize,
        n0: usize,
        out: Out,
    ) {
        // SAFETY: the caller's.
        unsafe { finish(conv, &product(a, b, conv.flip, extra), m0, n0, out) }
    }
}

/// The tile's 16 x 16 products, a register per channel.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn product(a: &[u8], b: &Patches, flip: u8, extra: &[i32; MR]) -> [__m512i; MR] {
    assert!(b.fits(a.len()));
    let flip = _mm512_set1_epi8(flip as i8);
    let mut c = [_mm512_setzero_si512(); MR];
    for (ci, &e) in c.iter_mut().zip(extra) {
        *ci = _mm512_set1_epi32(e);
    }
    for &[tb, ta] in b.taps {
        // SAFETY: every run and weight group is inside its slice (asserted above);
        // unaligned loads.
        unsafe {
            let pb = b.data.as_ptr().add(b.base + tb);
            let mut pa = a.as_ptr().add(ta * MR * 4);
            for g in 0..b.groups {
                let x = _mm512_loadu_si512(pb.add(g * b.stride).cast());
                let x = _mm512_xor_si512(x, flip);
                let w = pa.cast::<i32>();
                for (i, ci) in c.iter_mut().enumerate() {
                    let wi = _mm512_set1_epi32(w.add(i).read_unaligned());
                    *ci = _mm512_dpbusd_epi32(*ci, x, wi);
                }
                pa = pa.add(MR * 4);
            }
        }
    }
    c
}

/// `op(operand, acc)` lane-wise, as [`super::bin`].
#[target_feature(enable = "avx512f")]
#[inline]
fn bin(op: BinOp, operand: i32, acc: __m512i) -> __m512i {
    let v = _mm512_set1_epi32(operand);
    match op {
        BinOp::Add => _mm512_add_epi32(v, acc),
        BinOp::Sub => _mm512_sub_epi32(v, acc),
        BinOp::SubF => _mm512_sub_epi32(acc, v),
        BinOp::Mul => _mm512_mullo_epi32(v, acc),
        BinOp::Min => _mm512_min_epi32(v, acc),
        BinOp::Max => _mm512_max_epi32(v, acc),
    }
}

/// [`super::round_shift`] on eight i64 lanes (`0 < shift < 64`).
#[target_feature(enable = "avx512f")]
#[inline]
fn round_shift(val: __m512i, shift: u32, policy: RoundingPolicy) -> __m512i {
    let count = _mm_cvtsi32_si128(shift as i32);
    let abs = _mm512_abs_epi64(val);
    let one = _mm512_set1_epi64(1);
    let minus_one = _mm512_set1_epi64(-1);
    let zero = _mm512_setzero_si512();
    let parity = || _mm512_and_si512(_mm512_srl_epi64(abs, count), one);
    let nudge = match policy {
        RoundingPolicy::Zero => minus_one,
        RoundingPolicy::Away | RoundingPolicy::Native => zero,
        RoundingPolicy::MinusInf => {
            _mm512_maskz_mov_epi64(_mm512_cmpge_epi64_mask(val, zero), minus_one)
        }
        RoundingPolicy::PlusInf => {
            _mm512_maskz_mov_epi64(_mm512_cmple_epi64_mask(val, zero), minus_one)
        }
        RoundingPolicy::Even => _mm512_sub_epi64(parity(), one),
        RoundingPolicy::Odd => _mm512_sub_epi64(zero, parity()),
    };
    let half = _mm512_set1_epi64(1i64 << (shift - 1));
    let q = _mm512_srl_epi64(_mm512_add_epi64(_mm512_add_epi64(abs, half), nudge), count);
    // signum(val) * q: q is 0 where val is.
    _mm512_mask_sub_epi64(q, _mm512_cmplt_epi64_mask(val, zero), zero, q)
}

/// [`scale`] for the tests.
#[cfg(test)]
#[target_feature(enable = "avx512f")]
pub(super) fn scale_lanes(
    acc: __m512i,
    mult: Option<i32>,
    shift: isize,
    policy: RoundingPolicy,
) -> __m512i {
    scale(acc, mult, shift, policy)
}

/// The steps over i64 lanes, applied to the even and odd i32 lanes of `acc` apart.
#[target_feature(enable = "avx512f")]
#[inline]
fn scale(acc: __m512i, mult: Option<i32>, shift: isize, policy: RoundingPolicy) -> __m512i {
    let (even, odd) = match mult {
        // Sign-extended products of the even lanes, then of the odd ones.
        Some(m) => {
            let m = _mm512_set1_epi64(m as i64);
            (
                _mm512_mul_epi32(acc, m),
                _mm512_mul_epi32(_mm512_srli_epi64(acc, 32), m),
            )
        }
        None => (
            _mm512_srai_epi64(_mm512_slli_epi64(acc, 32), 32),
            _mm512_srai_epi64(acc, 32),
        ),
    };
    let shift = if mult.is_some() { shift + 31 } else { shift };
    let (even, odd) = if shift > 0 {
        (
            round_shift(even, shift as u32, policy),
            round_shift(odd, shift as u32, policy),
        )
    } else {
        let count = _mm_cvtsi32_si128(-shift as i32);
        (_mm512_sll_epi64(even, count), _mm512_sll_epi64(odd, count))
    };
    // Low halves back into i32 lanes.
    _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32))
}

/// A [`Requant`]'s constants in registers.
pub(super) struct RequantLanes {
    mult: i32,
    shift: u32,
    scale: __m512d,
    exact: __m512i,
    add: __m512i,
    hi: __m512i,
    lo: __m512i,
}

impl RequantLanes {
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) fn new(rq: &Requant) -> RequantLanes {
        RequantLanes {
            mult: rq.mult,
            shift: rq.shift,
            scale: _mm512_set1_pd(rq.mult as f64 / (1u64 << rq.shift) as f64),
            exact: _mm512_set1_epi32(rq.exact_limit() as i32),
            add: _mm512_set1_epi32(rq.add),
            hi: _mm512_set1_epi32(rq.hi),
            lo: _mm512_set1_epi32(rq.lo),
        }
    }

    /// `max(min(round_even(acc * mult / 2^shift) + add, hi), lo)` on 16 lanes.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) fn apply(&self, acc: __m512i) -> __m512i {
        // |i32::MIN| reads as 2^31 unsigned: never within `exact`.
        let scaled = if _mm512_cmpgt_epu32_mask(_mm512_abs_epi32(acc), self.exact) == 0 {
            // acc * (mult / 2^shift) is exact in f64 here, and converting it with
            // round-to-nearest-even is tract's rounding: half the instructions.
            const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
            let lo = _mm512_cvtepi32_pd(_mm512_castsi512_si256(acc));
            let hi = _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64::<1>(acc));
            let lo = _mm512_cvt_roundpd_epi32::<NEAREST>(_mm512_mul_pd(lo, self.scale));
            let hi = _mm512_cvt_roundpd_epi32::<NEAREST>(_mm512_mul_pd(hi, self.scale));
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
        } else {
            // tract's i64 arithmetic, as the general steps do it (`Requant::shift` counts
            // the multiplier's 31 bits, `Scaler::shift` does not).
            let shift = self.shift as isize - 31;
            scale(acc, Some(self.mult), shift, RoundingPolicy::Even)
        };
        let added = _mm512_add_epi32(scaled, self.add);
        _mm512_max_epi32(_mm512_min_epi32(added, self.hi), self.lo)
    }
}

/// Offset, steps and store of output channels `m0..m0 + 16` at pixels `n0..n0 + 16`.
///
/// # Safety
/// As [`QConv::store`].
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn finish(conv: &QConv, tile: &[__m512i; MR], m0: usize, n0: usize, out: Out) {
    let bytes = conv.out_dt != i32::datum_type();
    let rows = MR.min(conv.m - m0);
    if let (Some(rq), true) = (conv.requant, bytes) {
        let rq = RequantLanes::new(&rq);
        for (i, &acc) in tile.iter().enumerate().take(rows) {
            let mi = m0 + i;
            let acc = rq.apply(_mm512_add_epi32(acc, _mm512_set1_epi32(conv.offset[mi])));
            let at = mi * conv.geo.n() + n0;
            if let Some((zero_point, scale)) = conv.dequantize {
                // The low byte, as tract stores it, then `(q - zero_point) as f32 * scale`.
                let q = _mm512_and_si512(acc, _mm512_set1_epi32(0xff));
                let q = _mm512_sub_epi32(q, _mm512_set1_epi32(zero_point));
                let mut f =
                    _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(f32::from_bits(scale)));
                if !out.residual.is_null() {
                    // SAFETY: 16 floats of the residual's same row (same layout).
                    let r = unsafe { _mm512_loadu_ps(out.residual.add(at)) };
                    f = _mm512_max_ps(_mm512_add_ps(f, r), _mm512_setzero_ps());
                }
                // SAFETY: 16 floats of this channel's row.
                unsafe { _mm512_storeu_ps(out.data.cast::<f32>().add(at), f) }
            } else {
                // SAFETY: 16 bytes of this channel's row; tract stores the low byte.
                unsafe { _mm_storeu_si128(out.data.add(at).cast(), _mm512_cvtepi32_epi8(acc)) }
            }
        }
        return;
    }
    for (i, &acc) in tile.iter().enumerate().take(rows) {
        let mi = m0 + i;
        let mut acc = _mm512_add_epi32(acc, _mm512_set1_epi32(conv.offset[mi]));
        for step in &conv.steps {
            acc = match step {
                Step::PerRow(op, values) => bin(*op, values[mi], acc),
                Step::Scalar(op, v) => bin(*op, *v, acc),
                Step::Scale {
                    mult,
                    shift,
                    policy,
                } => scale(acc, *mult, *shift, *policy),
            };
        }
        let at = mi * conv.geo.n() + n0;
        if bytes {
            // SAFETY: 16 bytes of this channel's row; tract stores the low byte.
            unsafe { _mm_storeu_si128(out.data.add(at).cast(), _mm512_cvtepi32_epi8(acc)) }
        } else {
            let mut row = [0i32; NR];
            // SAFETY: a row is 16 i32; then the caller's.
            unsafe {
                _mm512_storeu_si512(row.as_mut_ptr().cast(), acc);
                conv.store(out, mi, n0, &row);
            }
        }
    }
}

/// # Safety
/// As `QConv::run_rows_with`, on a CPU with AVX-512 F, BW and VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
pub(super) unsafe fn run_rows(
    conv: &QConv,
    input: &Interleaved,
    rows: std::ops::Range<usize>,
    out: Out,
) {
    // SAFETY: the caller's.
    unsafe { conv.run_rows_with::<Vnni>(input, rows, out) }
}
