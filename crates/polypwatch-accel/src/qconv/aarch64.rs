//! The aarch64 tile kernel on the dot-product instructions (`sdot`, Armv8.2 DotProd: the
//! Orin's Cortex-A78AE has them, i8mm's mixed-sign `usdot` it lacks) and its NEON
//! requantization.
//!
//! `sdot` multiplies signed bytes by signed bytes, so the kernel multiplies the signed
//! `x ^ flip ^ 0x80` (`= (x ^ flip) - 128`, the unsigned value [`QConv`] defines, less 128;
//! the interleaved input is XORed so once) and `128 * sum w` over the taps it reads comes in
//! with the tile's starting sums ([`TileKernel::SIGNED`]): the same i32 sums, exact.
//! A 16 x 16 tile is four quadrants of 8 channels x 8 pixels, 16 accumulator registers each;
//! the inner loop over groups of four channels is assembly (the dot-product intrinsics are
//! not stable Rust): 16 `sdot`s a group, four groups an iteration (the remainder of one and
//! two first), the taps walked in the same assembly. A quadrant's weights for two groups are
//! contiguous ([`Kernel::weight_at`]), so four groups take six loads, not eight.

use super::*;
use std::arch::aarch64::*;
use std::arch::asm;

pub(super) struct Dot;

impl TileKernel for Dot {
    const SIGNED: bool = true;

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
        // SAFETY: the caller's; `Kernel::Dot` is only chosen where the CPU has DotProd.
        unsafe {
            let acc = product(a, b, extra);
            finish(conv, &acc, m0, n0, out)
        }
    }
}

/// The 16 products of one group of four channels: patches in `$x0`, `$x1` (pixels 0-3,
/// 4-7), weights in `$w0`, `$w1` (channels 0-3, 4-7), into v0-v15 (channel `r`'s pixels 0-3
/// in `2r`, 4-7 in `2r + 1`).
macro_rules! group {
    ($x0:literal, $x1:literal, $w0:literal, $w1:literal) => {
        concat!(
            "sdot v0.4s, ",
            $x0,
            ".16b, ",
            $w0,
            ".4b[0]\n",
            "sdot v1.4s, ",
            $x1,
            ".16b, ",
            $w0,
            ".4b[0]\n",
            "sdot v2.4s, ",
            $x0,
            ".16b, ",
            $w0,
            ".4b[1]\n",
            "sdot v3.4s, ",
            $x1,
            ".16b, ",
            $w0,
            ".4b[1]\n",
            "sdot v4.4s, ",
            $x0,
            ".16b, ",
            $w0,
            ".4b[2]\n",
            "sdot v5.4s, ",
            $x1,
            ".16b, ",
            $w0,
            ".4b[2]\n",
            "sdot v6.4s, ",
            $x0,
            ".16b, ",
            $w0,
            ".4b[3]\n",
            "sdot v7.4s, ",
            $x1,
            ".16b, ",
            $w0,
            ".4b[3]\n",
            "sdot v8.4s, ",
            $x0,
            ".16b, ",
            $w1,
            ".4b[0]\n",
            "sdot v9.4s, ",
            $x1,
            ".16b, ",
            $w1,
            ".4b[0]\n",
            "sdot v10.4s, ",
            $x0,
            ".16b, ",
            $w1,
            ".4b[1]\n",
            "sdot v11.4s, ",
            $x1,
            ".16b, ",
            $w1,
            ".4b[1]\n",
            "sdot v12.4s, ",
            $x0,
            ".16b, ",
            $w1,
            ".4b[2]\n",
            "sdot v13.4s, ",
            $x1,
            ".16b, ",
            $w1,
            ".4b[2]\n",
            "sdot v14.4s, ",
            $x0,
            ".16b, ",
            $w1,
            ".4b[3]\n",
            "sdot v15.4s, ",
            $x1,
            ".16b, ",
            $w1,
            ".4b[3]\n",
        )
    };
}

/// The tile's 16 x 16 sums, as [`Portable`]'s (the input bytes are signed already and
/// `extra` holds the rest: [`TileKernel::SIGNED`]).
#[target_feature(enable = "dotprod")]
#[inline]
unsafe fn product(a: &[u8], b: &Patches, extra: &[i32; MR]) -> [[i32; NR]; MR] {
    // `fits` also asserts `groups > 0`.
    assert!(b.fits(a.len()));
    // A quadrant's weights are `groups x 8 x 4` bytes from `h * a.len() / 2`
    // ([`Kernel::weight_at`]): tap `ta` starts `ta << 5` bytes in.
    const _: () = assert!(MR == 16);
    let mut acc = [[0i32; NR]; MR];
    for h in 0..2 {
        for v in 0..2 {
            let mut c = [vdupq_n_s32(0); 16];
            for (r, pair) in c.chunks_exact_mut(2).enumerate() {
                let e = vdupq_n_s32(extra[8 * h + r]);
                pair[0] = e;
                pair[1] = e;
            }
            // SAFETY: every run and weight group is inside its slice (asserted above: the
            // half of `a` quadrant `h` reads holds `ta + groups` groups of 32 bytes); for each
            // tap the loop reads `groups` runs of this quadrant's 32 bytes of each: one group
            // where their number is odd, two where bit 1 is set, then four at a time. (A tile
            // whose taps all read padding has only `extra`.)
            if !b.taps.is_empty() {
                unsafe {
                    asm!(
                        "5:",
                        "ldp {pb}, {pa}, [{tap}], #16",
                        "add {pb}, {xbase}, {pb}",
                        "add {pa}, {abase}, {pa}, lsl #5",
                        "tbz {groups}, #0, 3f",
                        "ld1 {{v16.16b, v17.16b}}, [{pb}], {stride}",
                        "ld1 {{v24.16b, v25.16b}}, [{pa}], #32",
                        group!("v16", "v17", "v24", "v25"),
                        "3:",
                        "tbz {groups}, #1, 6f",
                        "ld1 {{v16.16b, v17.16b}}, [{pb}], {stride}",
                        "ld1 {{v24.16b, v25.16b, v26.16b, v27.16b}}, [{pa}], #64",
                        "ld1 {{v18.16b, v19.16b}}, [{pb}], {stride}",
                        group!("v16", "v17", "v24", "v25"),
                        group!("v18", "v19", "v26", "v27"),
                        "6:",
                        "lsr {n}, {groups}, #2",
                        "cbz {n}, 4f",
                        "2:",
                        "ld1 {{v16.16b, v17.16b}}, [{pb}], {stride}",
                        "ld1 {{v24.16b, v25.16b, v26.16b, v27.16b}}, [{pa}], #64",
                        "ld1 {{v18.16b, v19.16b}}, [{pb}], {stride}",
                        "ld1 {{v20.16b, v21.16b}}, [{pb}], {stride}",
                        "ld1 {{v28.16b, v29.16b, v30.16b, v31.16b}}, [{pa}], #64",
                        "ld1 {{v22.16b, v23.16b}}, [{pb}], {stride}",
                        group!("v16", "v17", "v24", "v25"),
                        group!("v18", "v19", "v26", "v27"),
                        group!("v20", "v21", "v28", "v29"),
                        group!("v22", "v23", "v30", "v31"),
                        "subs {n}, {n}, #1",
                        "b.ne 2b",
                        "4:",
                        "subs {taps}, {taps}, #1",
                        "b.ne 5b",
                        tap = inout(reg) b.taps.as_ptr() => _,
                        taps = inout(reg) b.taps.len() => _,
                        xbase = in(reg) b.data.as_ptr().add(b.base + 32 * v),
                        abase = in(reg) a.as_ptr().add(h * a.len() / 2),
                        groups = in(reg) b.groups,
                        pb = out(reg) _,
                        pa = out(reg) _,
                        n = out(reg) _,
                        stride = in(reg) b.stride,
                        inout("v0") c[0],
                        inout("v1") c[1],
                        inout("v2") c[2],
                        inout("v3") c[3],
                        inout("v4") c[4],
                        inout("v5") c[5],
                        inout("v6") c[6],
                        inout("v7") c[7],
                        inout("v8") c[8],
                        inout("v9") c[9],
                        inout("v10") c[10],
                        inout("v11") c[11],
                        inout("v12") c[12],
                        inout("v13") c[13],
                        inout("v14") c[14],
                        inout("v15") c[15],
                        out("v16") _,
                        out("v17") _,
                        out("v18") _,
                        out("v19") _,
                        out("v20") _,
                        out("v21") _,
                        out("v22") _,
                        out("v23") _,
                        out("v24") _,
                        out("v25") _,
                        out("v26") _,
                        out("v27") _,
                        out("v28") _,
                        out("v29") _,
                        out("v30") _,
                        out("v31") _,
                        options(nostack, readonly),
                    );
                }
            }
            for (r, pair) in c.chunks_exact(2).enumerate() {
                let row = &mut acc[8 * h + r][8 * v..8 * v + 8];
                // SAFETY: 8 i32 of the row.
                unsafe {
                    vst1q_s32(row.as_mut_ptr(), pair[0]);
                    vst1q_s32(row.as_mut_ptr().add(4), pair[1]);
                }
            }
        }
    }
    acc
}

/// A [`Requant`]'s constants in registers.
pub(super) struct RequantLanes {
    /// Whether a row's lanes can be beyond `exact`; where they cannot, no row is checked.
    checked: bool,
    /// Whether every sum is below 2^24 in magnitude, so exact as an f32: one conversion
    /// instruction for four lanes instead of two for two.
    small: bool,
    /// `Some(unsigned)` where `lo..=hi` is a byte's whole range (`0..=255` or `-128..=127`):
    /// the stored byte is then a saturating narrow of the unclamped value.
    saturates: Option<bool>,
    exact: uint32x4_t,
    scale: float64x2_t,
    add: int32x4_t,
    hi: int32x4_t,
    lo: int32x4_t,
}

impl RequantLanes {
    /// The lanes for sums no larger than `bound` in magnitude ([`QConv`]'s `sum_bound`;
    /// `i64::MAX` checks every row).
    #[inline(always)]
    pub(super) fn for_bound(rq: &Requant, bound: i64) -> RequantLanes {
        let exact = rq.exact_limit();
        // SAFETY: NEON is part of aarch64.
        unsafe {
            RequantLanes {
                checked: bound > i64::from(exact),
                small: bound < 1 << 24,
                saturates: match (rq.lo, rq.hi) {
                    (0, 255) => Some(true),
                    (-128, 127) => Some(false),
                    _ => None,
                },
                exact: vdupq_n_u32(exact),
                scale: vdupq_n_f64(rq.mult as f64 / (1u64 << rq.shift) as f64),
                add: vdupq_n_s32(rq.add),
                hi: vdupq_n_s32(rq.hi),
                lo: vdupq_n_s32(rq.lo),
            }
        }
    }

    /// The requantization of one channel's 16 sums (offset added): the f64 path where every
    /// lane is exact in it, else tract's i64 arithmetic as the portable kernel does it
    /// (`steps` are the steps `self` was made from, `mi` the channel).
    #[inline(always)]
    pub(super) fn row(&self, steps: &[Step], mi: usize, v: [int32x4_t; 4]) -> [int32x4_t; 4] {
        if !self.checked || self.exact(&v) {
            // SAFETY: NEON is part of aarch64.
            return v.map(|x| unsafe { vmaxq_s32(vminq_s32(self.added(x), self.hi), self.lo) });
        }
        let mut r = [0i32; NR];
        // SAFETY: NEON is part of aarch64; 16 i32 out and in.
        unsafe {
            for (k, &x) in v.iter().enumerate() {
                vst1q_s32(r.as_mut_ptr().add(4 * k), x);
            }
            for step in steps {
                step.apply(mi, &mut r);
            }
            [0, 4, 8, 12].map(|k| vld1q_s32(r.as_ptr().add(k)))
        }
    }

    /// The 16 bytes tract stores for [`RequantLanes::row`]: the low byte of each result.
    #[inline(always)]
    pub(super) fn bytes(&self, steps: &[Step], mi: usize, v: [int32x4_t; 4]) -> int8x16_t {
        // SAFETY: NEON is part of aarch64.
        unsafe {
            if let Some(unsigned) = self.saturates
                && (!self.checked || self.exact(&v))
            {
                // Saturating to the byte's range is the clamp to `lo..=hi`.
                let s = v.map(|x| self.added(x));
                let h0 = vqmovn_high_s32(vqmovn_s32(s[0]), s[1]);
                let h1 = vqmovn_high_s32(vqmovn_s32(s[2]), s[3]);
                return if unsigned {
                    vreinterpretq_s8_u8(vqmovun_high_s16(vqmovun_s16(h0), h1))
                } else {
                    vqmovn_high_s16(vqmovn_s16(h0), h1)
                };
            }
            let v = self.row(steps, mi, v);
            let h0 = vmovn_high_s32(vmovn_s32(v[0]), v[1]);
            let h1 = vmovn_high_s32(vmovn_s32(v[2]), v[3]);
            vmovn_high_s16(vmovn_s16(h0), h1)
        }
    }

    /// Whether every lane of `row` takes the exact f64 path.
    #[inline(always)]
    fn exact(&self, row: &[int32x4_t; 4]) -> bool {
        // SAFETY: NEON is part of aarch64. |i32::MIN| reads as 2^31 unsigned: never within.
        unsafe {
            let over = |v| vcgtq_u32(vreinterpretq_u32_s32(vabsq_s32(v)), self.exact);
            let any = vorrq_u32(
                vorrq_u32(over(row[0]), over(row[1])),
                vorrq_u32(over(row[2]), over(row[3])),
            );
            vmaxvq_u32(any) == 0
        }
    }

    /// `round_even(acc * mult / 2^shift) + add` on 4 lanes whose `acc * mult` is exact in f64
    /// ([`RequantLanes::exact`]): converting with round-to-nearest-even is then tract's
    /// rounding.
    #[inline(always)]
    fn added(&self, acc: int32x4_t) -> int32x4_t {
        // SAFETY: NEON is part of aarch64.
        unsafe {
            let (lo, hi) = if self.small {
                let f = vcvtq_f32_s32(acc);
                (vcvt_f64_f32(vget_low_f32(f)), vcvt_high_f64_f32(f))
            } else {
                (
                    vcvtq_f64_s64(vmovl_s32(vget_low_s32(acc))),
                    vcvtq_f64_s64(vmovl_high_s32(acc)),
                )
            };
            let lo = vcvtnq_s64_f64(vmulq_f64(lo, self.scale));
            let hi = vcvtnq_s64_f64(vmulq_f64(hi, self.scale));
            vaddq_s32(vmovn_high_s64(vmovn_s64(lo), hi), self.add)
        }
    }
}

/// Offset, steps and store of output channels `m0..m0 + 16` at pixels `n0..n0 + 16`.
///
/// # Safety
/// As [`QConv::store`].
#[inline]
unsafe fn finish(conv: &QConv, tile: &[[i32; NR]; MR], m0: usize, n0: usize, out: Out) {
    let bytes = conv.out_dt != i32::datum_type();
    let (Some(rq), true) = (conv.requant, bytes) else {
        // Other steps or an i32 output: the scalar steps.
        let mut tile = *tile;
        // SAFETY: the caller's.
        return unsafe { conv.finish(&mut tile, m0, n0, out) };
    };
    let lanes = RequantLanes::for_bound(&rq, conv.sum_bound);
    for (i, row) in tile.iter().enumerate().take(MR.min(conv.m - m0)) {
        let mi = m0 + i;
        // SAFETY: NEON is part of aarch64; 16 i32 of the row.
        let v = unsafe {
            let o = vdupq_n_s32(conv.offset[mi]);
            let p = row.as_ptr();
            [0, 4, 8, 12].map(|k| vaddq_s32(vld1q_s32(p.add(k)), o))
        };
        let at = mi * conv.geo.n() + n0;
        // SAFETY: NEON is part of aarch64; 16 elements of this channel's row (and of the
        // residual's, same layout).
        unsafe {
            if let Some((zero_point, scale)) = conv.dequantize {
                // The low byte, as tract stores it, then `(q - zero_point) as f32 * scale`.
                let (mask, zp) = (vdupq_n_s32(0xff), vdupq_n_s32(zero_point));
                let scale = vdupq_n_f32(f32::from_bits(scale));
                let o = out.data.cast::<f32>().add(at);
                for (k, &x) in lanes.row(&conv.steps, mi, v).iter().enumerate() {
                    let q = vsubq_s32(vandq_s32(x, mask), zp);
                    let mut f = vmulq_f32(vcvtq_f32_s32(q), scale);
                    if !out.residual.is_null() {
                        let r = vld1q_f32(out.residual.add(at + 4 * k));
                        f = vmaxq_f32(vaddq_f32(f, r), vdupq_n_f32(0.0));
                    }
                    vst1q_f32(o.add(4 * k), f);
                }
            } else {
                let b = lanes.bytes(&conv.steps, mi, v);
                vst1q_s8(out.data.cast::<i8>().add(at), b);
            }
        }
    }
}

/// # Safety
/// As `QConv::run_rows_with`, on a CPU with DotProd.
#[target_feature(enable = "dotprod")]
pub(super) unsafe fn run_rows(
    conv: &QConv,
    input: &Interleaved,
    rows: std::ops::Range<usize>,
    out: Out,
) {
    // SAFETY: the caller's.
    unsafe { conv.run_rows_with::<Dot>(input, rows, out) }
}
