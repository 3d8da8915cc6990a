//! [`Quantize`] against tract's quantizer, value for value.

use super::*;
use proptest::prelude::*;
use tract_onnx::tract_core::ops::quant::quantize_linear_f32_u8;

proptest! {
    /// Equal to tract's scalar quantizer for every finite value, halves included.
    #[test]
    fn equals_tracts_quantizer(
        xs in proptest::collection::vec(-1e6f32..1e6, 1..64),
        halves in proptest::collection::vec(-600i32..600, 1..64),
        scale in 0.001f32..100.0,
        zp in 0u8..=255,
    ) {
        let op = Quantize { scale_bits: scale.to_bits(), zero_point: zp };
        let mut xs = xs;
        // Values that land exactly on .5 after scaling, where ties-to-even matters.
        xs.extend(halves.iter().map(|&h| (h as f32 + 0.5) / scale));
        let mut ys = vec![0u8; xs.len()];
        op.run(&xs, &mut ys);
        for (x, y) in xs.iter().zip(&ys) {
            prop_assert_eq!(*y, quantize_linear_f32_u8(*x, scale, zp as i32), "x = {}", x);
        }
    }
}

/// NaN, infinities and huge values, through the vector loop (runs of 16) and its tail: tract's
/// results, except where tract's `x as i32 + zero_point` overflows (x * scale at or beyond
/// 2^31 - zero_point: it wraps negative and clamps to 0), where ours saturate to 255 as every
/// other large value does.
#[test]
fn nan_maps_to_the_zero_point_like_tract() {
    let op = Quantize {
        scale_bits: 0.5f32.to_bits(),
        zero_point: 17,
    };
    let specials = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        3e38,
        -3e38,
        -0.0,
        0.0,
        2e9,
    ];
    let xs: Vec<f32> = (0..37).map(|i| specials[i % specials.len()]).collect();
    let mut ys = vec![0u8; xs.len()];
    op.run(&xs, &mut ys);
    for (&x, &y) in xs.iter().zip(&ys) {
        if x * 0.5 >= (i32::MAX - 17) as f32 {
            assert_eq!(quantize_linear_f32_u8(x, 0.5, 17), 0, "x = {x}");
            assert_eq!(y, 255, "x = {x}");
        } else {
            assert_eq!(y, quantize_linear_f32_u8(x, 0.5, 17), "x = {x}");
        }
    }
    assert_eq!(ys[0], 17);
}
