//! [`QConv`] against tract: both kernels on the shipped int8 model, the vector steps against
//! the scalar ones.

use super::*;
use crate::im2col;
use crate::patch::{replace_each, replace_each_wired};
use crate::testing::{fixture_input, shipped_model};
use proptest::prelude::*;
use tract_onnx::tract_core::tract_linalg::Scaler;

const POLICIES: [RoundingPolicy; 6] = [
    RoundingPolicy::Zero,
    RoundingPolicy::Away,
    RoundingPolicy::MinusInf,
    RoundingPolicy::PlusInf,
    RoundingPolicy::Even,
    RoundingPolicy::Odd,
];

/// Whether this CPU has the fast kernel (the vector tests have nothing to compare without).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn has_fast_kernel() -> bool {
    let has = Kernel::fast().is_some();
    if !has {
        eprintln!("no AVX-512 VNNI or DotProd on this CPU: nothing to compare");
    }
    has
}

/// A xorshift64 generator: test inputs that cover the i32 range, reproducibly.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

/// The shipped int8 model with every convolution on `kernel` gives tract's logits to the
/// bit, on a real frame.
fn matches_tract_on(kernel: Kernel) {
    let model = shipped_model("polypwatch-edge-int8.onnx");
    let reference = model.clone().into_runnable().unwrap();
    let mut ours = model;
    replace_each(&mut ours, im2col::replacement).unwrap();
    let replaced = replace_each_wired(&mut ours, |model, node| {
        let (op, x) = QConv::replacing(model, node, kernel)?;
        Some((Box::new(op) as Box<dyn TypedOp>, tvec!(x)))
    })
    .unwrap();
    // Every convolution but the ASPP's on the pooled 1x1 map: 22 through im2col (3x3,
    // 7x7) and 7 1x1 ones (two with the weights on the right, one the 64 -> 1 classifier).
    // On aarch64 tract packs the classifier's weights in its plain layout, which we leave.
    let expected = if cfg!(target_arch = "x86_64") { 29 } else { 28 };
    assert_eq!(replaced, expected, "{kernel:?}");
    // And with the dequantizations they feed folded in (the kernel's float store).
    replace_each(&mut ours, crate::pool::dequantize).unwrap();
    let folded = replace_each_wired(&mut ours, fuse_dequantize).unwrap();
    assert!(folded >= 17, "{kernel:?}: {folded}");
    // And the residual additions and ReLUs those feed (the float epilogue).
    let residuals = replace_each_wired(&mut ours, fuse_residual).unwrap();
    assert_eq!(residuals, 8, "{kernel:?}");
    let ours = ours.into_runnable().unwrap();
    let input = fixture_input();
    let a = reference.run(tvec!(input.clone().into())).unwrap();
    let b = ours.run(tvec!(input.into())).unwrap();
    assert!(a[0].as_bytes() == b[0].as_bytes(), "{kernel:?}");
}

#[test]
fn portable_kernel_gives_tracts_logits() {
    matches_tract_on(Kernel::Portable);
}

/// Where this CPU has a fast kernel (AVX-512 VNNI on the x86-64 CI machines); elsewhere
/// the rewrite leaves tract's operators, which `rewritten_models_give_tracts_logits`
/// covers.
#[test]
fn fast_kernel_gives_tracts_logits() {
    match Kernel::fast() {
        Some(kernel) => matches_tract_on(kernel),
        None => eprintln!("no fast kernel on this CPU: nothing to compare"),
    }
}

/// 4000 requantization cases, reproducibly: the usual steps at a random scale and zero point,
/// the `Requant` they make, 16 accumulators (random, small, or within 2 of the f64 path's
/// limit on either side), and what the scalar steps make of them.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn requantization_cases() -> impl Iterator<Item = (Vec<Step>, Requant, [i32; NR], [i32; NR])> {
    let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
    (0..4000).filter_map(move |round| {
        let scale = 0.5f32.powi((next() % 14) as i32) * (1.0 + (next() % 1000) as f32 / 1000.0);
        let s = Scaler::new(scale, RoundingPolicy::Even);
        let steps = vec![
            Step::Scale {
                mult: s.mult,
                shift: s.shift,
                policy: RoundingPolicy::Even,
            },
            Step::Scalar(BinOp::Add, (next() % 256) as i32 - 128),
            // A u8 output's range, an i8 one's, and one narrower than a byte.
            Step::Scalar(BinOp::Min, [255, 127, 100][round % 3]),
            Step::Scalar(BinOp::Max, [0, -128, -20][round % 3]),
        ];
        let rq = Requant::of(&steps)?;
        let limit = i64::from(rq.exact_limit());
        let lanes: [i32; NR] = std::array::from_fn(|_| {
            let v = match round % 4 {
                0 => next() as i32 as i64,
                1 => (next() as i32 >> 10) as i64,
                2 => limit - 2 + (next() % 5) as i64,
                _ => -limit - 2 + (next() % 5) as i64,
            };
            v.clamp(i32::MIN as i64, i32::MAX as i64) as i32
        });
        let mut scalar = lanes;
        for step in &steps {
            step.apply(0, &mut scalar);
        }
        Some((steps, rq, lanes, scalar))
    })
}

/// The vector requantization (its exact-f64 path and its i64 path) gives the scalar steps'
/// results, around the f64 path's limit too.
#[cfg(target_arch = "x86_64")]
#[test]
fn vector_requantization_equals_scalar_steps() {
    use std::arch::x86_64::*;
    if !has_fast_kernel() {
        return;
    }
    for (steps, rq, lanes, scalar) in requantization_cases() {
        let mut vector = [0i32; NR];
        // SAFETY: AVX-512 is present (checked above); 16 i32 in and out.
        unsafe {
            let rq = x86_64::RequantLanes::new(&rq);
            let v = rq.apply(_mm512_loadu_si512(lanes.as_ptr().cast()));
            _mm512_storeu_si512(vector.as_mut_ptr().cast(), v);
        }
        assert_eq!(scalar, vector, "{steps:?} on {lanes:?}");
    }
}

/// The NEON requantization (its exact-f64 path, its fallback to the steps, and the choice
/// between them around the f64 path's limit, checked per row or trusted from a bound) gives
/// the scalar steps' results.
#[cfg(target_arch = "aarch64")]
#[test]
fn neon_requantization_equals_scalar_steps() {
    use std::arch::aarch64::*;
    if !has_fast_kernel() {
        return;
    }
    for (steps, rq, lanes, scalar) in requantization_cases() {
        // Checked row by row, and unchecked where the lanes' bound allows it.
        let bound = lanes.iter().map(|&l| i64::from(l).abs()).max().unwrap();
        for rq in [
            aarch64::RequantLanes::for_bound(&rq, i64::MAX),
            aarch64::RequantLanes::for_bound(&rq, bound),
        ] {
            let (mut vector, mut bytes) = ([0i32; NR], [0i8; NR]);
            // SAFETY: NEON is part of aarch64; 16 i32 in and out, 16 bytes out.
            unsafe {
                let v = [0, 4, 8, 12].map(|k| vld1q_s32(lanes.as_ptr().add(k)));
                for (k, x) in rq.row(&steps, 0, v).into_iter().enumerate() {
                    vst1q_s32(vector.as_mut_ptr().add(4 * k), x);
                }
                vst1q_s8(bytes.as_mut_ptr(), rq.bytes(&steps, 0, v));
            }
            assert_eq!(scalar, vector, "{steps:?} on {lanes:?}");
            // tract stores the low byte.
            assert_eq!(scalar.map(|x| x as i8), bytes, "{steps:?} on {lanes:?}");
        }
    }
}

proptest! {
    /// The scalar steps round like tract's `Scaler` under every policy.
    #[test]
    fn scale_step_is_tracts_scaler(
        x in any::<i32>(),
        scale in 1e-6f32..4.0,
        p in 0usize..6,
    ) {
        let policy = POLICIES[p];
        let scaler = Scaler::new(scale, policy);
        let step = Step::Scale { mult: scaler.mult, shift: scaler.shift, policy };
        let mut acc = [x; NR];
        step.apply(0, &mut acc);
        prop_assert_eq!(acc[0], x * scaler);
    }
}

/// The AVX-512 steps give the scalar steps' results lane by lane, every policy, with and
/// without a multiplier, right and left shifts.
#[cfg(target_arch = "x86_64")]
#[test]
fn vector_steps_equal_scalar_steps() {
    use std::arch::x86_64::*;
    if !has_fast_kernel() {
        return;
    }
    let mut next = xorshift(0x2545_f491_4f6c_dd1d);
    for round in 0..2000 {
        let lanes: [i32; NR] = std::array::from_fn(|_| match round % 3 {
            0 => next() as i32,
            1 => (next() as i32) >> 12,
            _ => (next() % 2001) as i32 - 1000,
        });
        let policy = POLICIES[round % 6];
        let step = match round % 4 {
            0 | 1 => {
                let s = Scaler::new(0.5f32.powi((next() % 20) as i32) * 1.37, policy);
                Step::Scale {
                    mult: s.mult,
                    shift: s.shift,
                    policy,
                }
            }
            2 => Step::Scale {
                mult: None,
                shift: (next() % 12 + 1) as isize,
                policy,
            },
            _ => Step::Scale {
                mult: None,
                shift: -((next() % 4) as isize),
                policy,
            },
        };
        let Step::Scale { mult, shift, .. } = step else {
            unreachable!()
        };
        let mut scalar = lanes;
        step.apply(0, &mut scalar);
        let mut vector = [0i32; NR];
        // SAFETY: AVX-512 is present (checked above); 16 i32 in and out.
        unsafe {
            let v = x86_64::scale_lanes(
                _mm512_loadu_si512(lanes.as_ptr().cast()),
                mult,
                shift,
                policy,
            );
            _mm512_storeu_si512(vector.as_mut_ptr().cast(), v);
        }
        assert_eq!(scalar, vector, "{step:?} on {lanes:?}");
    }
}
