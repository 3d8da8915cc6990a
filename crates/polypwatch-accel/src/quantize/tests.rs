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

#[test]
fn nan_maps_to_the_zero_point_like_tract() {
    let op = Quantize {
        scale_bits: 0.5f32.to_bits(),
        zero_point: 17,
    };
    let mut ys = [0u8; 1];
    op.run(&[f32::NAN], &mut ys);
    assert_eq!(ys[0], quantize_linear_f32_u8(f32::NAN, 0.5, 17));
}
