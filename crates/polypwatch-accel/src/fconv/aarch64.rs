//! The NEON tile kernel.
//!
//! A 128-bit register holds 4 floats, so a tile's `NV` vectors of `LANES` pixels are
//! `NV * LANES / 4` registers of pixels ("columns"); the kernel runs them 3 at a time: 8
//! channels x 3 columns is 24 accumulator registers, which leaves 8 of the 32 for one
//! channel's 3 input registers and 8 weights (`fmla` by element). The loops are assembly, so
//! that the accumulators stay in registers and each tap costs its two address additions and
//! loads, 24 `fmla`s and the loop's compare (where every tap is live, the weights follow their
//! pointer instead of the tap table); a tile of one tap whose columns are neighbours (every
//! Winograd product, most 1x1 convolutions) loads its 12 pixels with one `ld1` that also
//! steps to the next channel, and two channels' weights with one more, four channels an
//! iteration. The sums are the portable kernel's, in its order (channels outer, taps inner,
//! one fused multiply-add each), so the results agree to the bit.

use super::{Job, LANES, MR, Store};
use std::arch::aarch64::*;
use std::arch::asm;

/// Floats a register.
const Q: usize = 4;
/// Columns a pass.
const COLS: usize = 3;

/// The 24 `fmla`s of one channel and tap: pixels in v0-v2, weights in `$w0` (channels 0-3)
/// and `$w1` (4-7; v3 and v4 unless named), into v8-v31 (channel `r`, column `k` in `v(8 + 3 r
/// + k)`).
macro_rules! fmla24 {
    () => {
        fmla24!("v3", "v4")
    };
    ($w0:literal, $w1:literal) => {
        concat!(
            "fmla v8.4s, v0.4s, ",
            $w0,
            ".s[0]\n",
            "fmla v9.4s, v1.4s, ",
            $w0,
            ".s[0]\n",
            "fmla v10.4s, v2.4s, ",
            $w0,
            ".s[0]\n",
            "fmla v11.4s, v0.4s, ",
            $w0,
            ".s[1]\n",
            "fmla v12.4s, v1.4s, ",
            $w0,
            ".s[1]\n",
            "fmla v13.4s, v2.4s, ",
            $w0,
            ".s[1]\n",
            "fmla v14.4s, v0.4s, ",
            $w0,
            ".s[2]\n",
            "fmla v15.4s, v1.4s, ",
            $w0,
            ".s[2]\n",
            "fmla v16.4s, v2.4s, ",
            $w0,
            ".s[2]\n",
            "fmla v17.4s, v0.4s, ",
            $w0,
            ".s[3]\n",
            "fmla v18.4s, v1.4s, ",
            $w0,
            ".s[3]\n",
            "fmla v19.4s, v2.4s, ",
            $w0,
            ".s[3]\n",
            "fmla v20.4s, v0.4s, ",
            $w1,
            ".s[0]\n",
            "fmla v21.4s, v1.4s, ",
            $w1,
            ".s[0]\n",
            "fmla v22.4s, v2.4s, ",
            $w1,
            ".s[0]\n",
            "fmla v23.4s, v0.4s, ",
            $w1,
            ".s[1]\n",
            "fmla v24.4s, v1.4s, ",
            $w1,
            ".s[1]\n",
            "fmla v25.4s, v2.4s, ",
            $w1,
            ".s[1]\n",
            "fmla v26.4s, v0.4s, ",
            $w1,
            ".s[2]\n",
            "fmla v27.4s, v1.4s, ",
            $w1,
            ".s[2]\n",
            "fmla v28.4s, v2.4s, ",
            $w1,
            ".s[2]\n",
            "fmla v29.4s, v0.4s, ",
            $w1,
            ".s[3]\n",
            "fmla v30.4s, v1.4s, ",
            $w1,
            ".s[3]\n",
            "fmla v31.4s, v2.4s, ",
            $w1,
            ".s[3]\n",
        )
    };
}

/// The assembly of one pass with the accumulators bound to v8-v31 (`$a` is `[[float32x4_t;
/// COLS]; MR]`) and v0-v6 clobbered.
macro_rules! pass_asm {
    ($a:ident, $($t:tt)*) => {
        asm!(
            $($t)*
            inout("v8") $a[0][0],
            inout("v9") $a[0][1],
            inout("v10") $a[0][2],
            inout("v11") $a[1][0],
            inout("v12") $a[1][1],
            inout("v13") $a[1][2],
            inout("v14") $a[2][0],
            inout("v15") $a[2][1],
            inout("v16") $a[2][2],
            inout("v17") $a[3][0],
            inout("v18") $a[3][1],
            inout("v19") $a[3][2],
            inout("v20") $a[4][0],
            inout("v21") $a[4][1],
            inout("v22") $a[4][2],
            inout("v23") $a[5][0],
            inout("v24") $a[5][1],
            inout("v25") $a[5][2],
            inout("v26") $a[6][0],
            inout("v27") $a[6][1],
            inout("v28") $a[6][2],
            inout("v29") $a[7][0],
            inout("v30") $a[7][1],
            inout("v31") $a[7][2],
            out("v0") _,
            out("v1") _,
            out("v2") _,
            out("v3") _,
            out("v4") _,
            out("v5") _,
            out("v6") _,
            options(nostack, readonly),
        )
    };
}

/// The sums of 8 channels at the 3 columns that start `cols` floats into each channel's
/// taps, from `bias`.
///
/// # Safety
/// As [`super::TileKernel::tile`], for these columns.
#[inline(always)]
unsafe fn pass(job: &Job, bias: &[f32], cols: [usize; COLS]) -> [[float32x4_t; COLS]; MR] {
    // SAFETY: NEON is part of aarch64; every read is inside `x` and `w` (the caller's), the
    // loops running `channels > 0` times over `taps.len() > 0` taps.
    unsafe {
        let mut a = [[vdupq_n_f32(0.0); COLS]; MR];
        for (a, &b) in a.iter_mut().zip(bias) {
            *a = [vdupq_n_f32(b); COLS];
        }
        if job.channels == 0 || job.taps.is_empty() {
            return a;
        }
        let (x, w) = (job.x.as_ptr(), job.w.as_ptr());
        let (plane, channel_w) = (job.plane * 4, job.channel_w * 4);
        if let [(tap, tap_w)] = *job.taps
            && cols[1] == cols[0] + Q
            && cols[2] == cols[1] + Q
            && job.channel_w == MR
        {
            // Neighbouring channels' weights are neighbours: two channels' are one load. Four
            // channels an iteration (the remainder of one and two first).
            pass_asm!(
                a,
                "tbz {n}, #0, 3f",
                "ld1 {{v0.4s, v1.4s, v2.4s}}, [{x}], {plane}",
                "ld1 {{v3.4s, v4.4s}}, [{w}], #32",
                fmla24!(),
                "3:",
                "tbz {n}, #1, 4f",
                "ld1 {{v0.4s, v1.4s, v2.4s}}, [{x}], {plane}",
                "ld1 {{v3.4s, v4.4s, v5.4s, v6.4s}}, [{w}], #64",
                fmla24!(),
                "ld1 {{v0.4s, v1.4s, v2.4s}}, [{x}], {plane}",
                fmla24!("v5", "v6"),
                "4:",
                "lsr {n}, {n}, #2",
                "cbz {n}, 5f",
                "2:",
                "ld1 {{v0.4s, v1.4s, v2.4s}}, [{x}], {plane}",
                "ld1 {{v3.4s, v4.4s, v5.4s, v6.4s}}, [{w}], #64",
                fmla24!(),
                "ld1 {{v0.4s, v1.4s, v2.4s}}, [{x}], {plane}",
                fmla24!("v5", "v6"),
                "ld1 {{v0.4s, v1.4s, v2.4s}}, [{x}], {plane}",
                "ld1 {{v3.4s, v4.4s, v5.4s, v6.4s}}, [{w}], #64",
                fmla24!(),
                "ld1 {{v0.4s, v1.4s, v2.4s}}, [{x}], {plane}",
                fmla24!("v5", "v6"),
                "subs {n}, {n}, #1",
                "b.ne 2b",
                "5:",
                x = inout(reg) x.add(tap + cols[0]) => _,
                w = inout(reg) w.add(tap_w) => _,
                n = inout(reg) job.channels => _,
                plane = in(reg) plane,
            );
        } else if let [(tap, tap_w)] = *job.taps
            && cols[1] == cols[0] + Q
            && cols[2] == cols[1] + Q
        {
            pass_asm!(
                a,
                "2:",
                "ld1 {{v0.4s, v1.4s, v2.4s}}, [{x}], {plane}",
                "ld1 {{v3.4s, v4.4s}}, [{w}], {cw}",
                fmla24!(),
                "subs {n}, {n}, #1",
                "b.ne 2b",
                x = inout(reg) x.add(tap + cols[0]) => _,
                w = inout(reg) w.add(tap_w) => _,
                n = inout(reg) job.channels => _,
                plane = in(reg) plane,
                cw = in(reg) channel_w,
            );
        } else if job.taps.len() * MR == job.channel_w
            && job.taps.iter().enumerate().all(|(i, t)| t.1 == i * MR)
        {
            // Every tap live (a tile inside the map): a channel's weights are read in order,
            // so they follow the pointer and only the input's offsets come from the table.
            const _: () = assert!(std::mem::size_of::<(usize, usize)>() == 16);
            pass_asm!(
                a,
                "1:",
                "mov {tp}, {taps}",
                "mov {tn}, {ntaps}",
                "2:",
                "ldr {px}, [{tp}], #16",
                "add {px}, {x}, {px}, lsl #2",
                "ldr q0, [{px}, {c0}]",
                "ldr q1, [{px}, {c1}]",
                "ldr q2, [{px}, {c2}]",
                "ldp q3, q4, [{w}], #32",
                fmla24!(),
                "subs {tn}, {tn}, #1",
                "b.ne 2b",
                "add {x}, {x}, {plane}",
                "subs {n}, {n}, #1",
                "b.ne 1b",
                x = inout(reg) x => _,
                w = inout(reg) w => _,
                n = inout(reg) job.channels => _,
                taps = in(reg) job.taps.as_ptr(),
                ntaps = in(reg) job.taps.len(),
                tp = out(reg) _,
                tn = out(reg) _,
                px = out(reg) _,
                c0 = in(reg) cols[0] * 4,
                c1 = in(reg) cols[1] * 4,
                c2 = in(reg) cols[2] * 4,
                plane = in(reg) plane,
            );
        } else {
            // Pairs of usizes, walked as such.
            const _: () = assert!(std::mem::size_of::<(usize, usize)>() == 16);
            pass_asm!(
                a,
                "1:",
                "mov {tp}, {taps}",
                "mov {tn}, {ntaps}",
                "2:",
                "ldp {px}, {pw}, [{tp}], #16",
                "add {px}, {x}, {px}, lsl #2",
                "add {pw}, {w}, {pw}, lsl #2",
                "ldr q0, [{px}, {c0}]",
                "ldr q1, [{px}, {c1}]",
                "ldr q2, [{px}, {c2}]",
                "ldp q3, q4, [{pw}]",
                fmla24!(),
                "subs {tn}, {tn}, #1",
                "b.ne 2b",
                "add {x}, {x}, {plane}",
                "add {w}, {w}, {cw}",
                "subs {n}, {n}, #1",
                "b.ne 1b",
                x = inout(reg) x => _,
                w = inout(reg) w => _,
                n = inout(reg) job.channels => _,
                taps = in(reg) job.taps.as_ptr(),
                ntaps = in(reg) job.taps.len(),
                tp = out(reg) _,
                tn = out(reg) _,
                px = out(reg) _,
                pw = out(reg) _,
                c0 = in(reg) cols[0] * 4,
                c1 = in(reg) cols[1] * 4,
                c2 = in(reg) cols[2] * 4,
                plane = in(reg) plane,
                cw = in(reg) channel_w,
            );
        }
        a
    }
}

/// # Safety
/// As [`super::TileKernel::tile`].
pub(super) unsafe fn tile(job: &Job, bias: &[f32], store: &Store) {
    let per_vector = LANES / Q;
    let n = job.at.len() * per_vector;
    // Column `k`: its offset in the input and, from `store.at`, in the output, with its
    // pixels (0 past the row's end).
    let column = |k: usize| {
        let (v, q) = (k / per_vector, k % per_vector * Q);
        let (at, len) = store.at[v];
        (job.at[v] + q, at + q, len.saturating_sub(q).min(Q))
    };
    for k in (0..n).step_by(COLS) {
        // A last pass of fewer columns repeats its last (computed, not stored).
        let cols: [_; COLS] = std::array::from_fn(|i| column((k + i).min(n - 1)));
        // SAFETY: the caller's; these columns are the tile's.
        let a = unsafe { pass(job, bias, [cols[0].0, cols[1].0, cols[2].0]) };
        let live = (n - k).min(COLS);
        // SAFETY: the caller's: these pixels are inside `out` (and `residual`), the tile's.
        unsafe { finish(&a, &cols[..live], store) };
    }
}

/// `if y > 0 { y } else { 0 }` on four lanes, as the portable kernel (NaN gives 0 too); the
/// Winograd lanes use it as well.
#[inline(always)]
pub(super) fn relu(y: float32x4_t) -> float32x4_t {
    // SAFETY: NEON is part of aarch64.
    unsafe {
        let positive = vcgtq_f32(y, vdupq_n_f32(0.0));
        vreinterpretq_f32_u32(vandq_u32(positive, vreinterpretq_u32_f32(y)))
    }
}

/// Residual, ReLU and store of one pass's columns (`(input, output, pixels)`).
///
/// # Safety
/// As [`super::TileKernel::tile`], for these pixels.
#[inline(always)]
unsafe fn finish(a: &[[float32x4_t; COLS]; MR], cols: &[(usize, usize, usize)], store: &Store) {
    // SAFETY: NEON is part of aarch64; every read and write is one of the tile's pixels.
    unsafe {
        // Three whole neighbouring columns (every Winograd product, the inside of a map):
        // one store a channel.
        if let [(_, at, Q), (_, a1, Q), (_, a2, Q)] = *cols
            && a1 == at + Q
            && a2 == a1 + Q
        {
            for (i, y) in a.iter().enumerate().take(store.rows) {
                let at = (store.first + i) * store.pixels + at;
                let mut y = *y;
                if let Some(r) = store.residual {
                    let r = vld1q_f32_x3(r.as_ptr().add(at));
                    y = [
                        vaddq_f32(y[0], r.0),
                        vaddq_f32(y[1], r.1),
                        vaddq_f32(y[2], r.2),
                    ];
                }
                if store.relu {
                    y = [relu(y[0]), relu(y[1]), relu(y[2])];
                }
                vst1q_f32_x3(store.out.add(at), float32x4x3_t(y[0], y[1], y[2]));
            }
            return;
        }
        for (i, rows) in a.iter().enumerate().take(store.rows) {
            let channel = (store.first + i) * store.pixels;
            for (&y, &(_, at, len)) in rows.iter().zip(cols) {
                let at = channel + at;
                let mut y = y;
                if len == Q {
                    if let Some(r) = store.residual {
                        y = vaddq_f32(y, vld1q_f32(r.as_ptr().add(at)));
                    }
                    if store.relu {
                        y = relu(y);
                    }
                    vst1q_f32(store.out.add(at), y);
                } else if len > 0 {
                    let mut v = [0f32; Q];
                    vst1q_f32(v.as_mut_ptr(), y);
                    for (j, v) in v.iter_mut().enumerate().take(len) {
                        if let Some(r) = store.residual {
                            *v += r[at + j];
                        }
                        if store.relu {
                            *v = if *v > 0.0 { *v } else { 0.0 };
                        }
                        *store.out.add(at + j) = *v;
                    }
                }
            }
        }
    }
}
