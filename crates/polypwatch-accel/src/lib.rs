//! Rewrites of tract's optimised plan that make our models run faster, each a drop-in
//! replacement for one tract operator or a short chain of them, written against tract's public
//! API.
//!
//! They exist because tract spent most of a frame in a few generic operators: the int8
//! convolutions, now on our own kernel where the CPU has AVX-512 VNNI or the Armv8.2 dot
//! product ([`qconv`]) and through a faster im2col elsewhere ([`im2col`]); the float
//! convolutions, on our own AVX-512 or NEON kernel, direct or by Winograd's algorithm
//! ([`fconv`]); max pooling and dequantization ([`pool`]);
//! float-to-u8 quantization, alone or of a concatenation ([`quantize`]); bilinear upsampling
//! ([`resize`]) and the float convolutions' padding ([`pad`]). Each gives tract's output to the
//! bit, checked against the operators it replaces on the shipped models, but [`fconv`], whose
//! sums come in another order (its tests bound the difference), and an operator outside what a
//! replacement covers is left to tract.
//!
//! The map:
//! - [`passes`]: the rewrites as a named, ordered list ([`PASSES`]), [`optimize`] and
//!   [`rewrite`] that run it, each pass's count keyed by name ([`Rewrites`]), and passes switched
//!   off by name for profiling (`POLYPWATCH_ACCEL_OFF=qconv,fconv`).
//! - One folder per operator, laid out as tract lays out its own: [`qconv`], [`im2col`],
//!   [`fconv`], [`pool`], [`quantize`], [`resize`], [`pad`]. In each, `mod.rs` is the operator
//!   (and its portable kernel), `rule.rs` the rewrite rule (match tract's nodes, then build the
//!   operator), `x86_64.rs` (and `aarch64.rs`) the kernels for one architecture, `tests.rs` the
//!   comparisons with tract.
//! - Shared helpers: `patch` (applying a rule to every node), `threads` (sharing work between
//!   tract's threads; [`on_tract_threads`]), `simd` (run-time dispatch to AVX-512 copies) and,
//!   for the tests, `testing` (the shipped models and a real frame).

#![deny(missing_docs)]

pub mod fconv;
pub mod im2col;
pub mod pad;
pub mod passes;
pub mod pool;
pub mod qconv;
pub mod quantize;
pub mod resize;

mod patch;
mod simd;
#[cfg(test)]
mod testing;
mod threads;

pub use passes::{OFF_VAR, PASSES, Rewrites, optimize, optimize_with, rewrite};
pub use threads::on_tract_threads;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::shipped_model;
    use tract_onnx::prelude::*;

    /// Both shipped models, rewritten, give tract's logits to the bit.
    #[test]
    fn rewritten_models_give_tracts_logits() {
        for name in ["polypwatch-edge-f32.onnx", "polypwatch-edge-int8.onnx"] {
            let model = shipped_model(name);
            let reference = model.clone().into_runnable().unwrap();
            let mut ours = model;
            let done = rewrite(&mut ours).unwrap();
            let expected = if name.contains("int8") {
                // On aarch64 tract packs the 64 -> 1 classifier's weights in its plain layout,
                // which `QConv` leaves.
                let qconv = match qconv::Kernel::fast() {
                    Some(_) if cfg!(target_arch = "aarch64") => 28,
                    Some(_) => 29,
                    None => 0,
                };
                done["im2col"] > 10
                    && done["quantize"] > 5
                    && done["resize"] >= 2
                    && done["quantize_concat"] == 2
                    && done["max_pool"] == 1
                    && done["dequantize"] > 10
                    && done["qconv"] == qconv
                    // Every dequantization of a QConv output that nothing else reads (the
                    // other two read the max pool and tract's product on the pooled ASPP map).
                    && done["qconv_dequantize"] == if qconv > 0 { 18 - (29 - qconv) } else { 0 }
                    // Every residual block's `Add -> ReLU`.
                    && done["qconv_residual"] == if qconv > 0 { 8 } else { 0 }
            } else {
                done["pad"] > 10 && done["resize"] >= 2
            };
            assert!(expected, "{name}: {done:?}");
            let ours = ours.into_runnable().unwrap();
            let input =
                tract_ndarray::Array4::<f32>::from_shape_fn((1, 3, 256, 256), |(_, c, y, x)| {
                    (((c * 131 + y * 17 + x * 5) % 97) as f32 / 48.0) - 1.0
                });
            let input: Tensor = input.into();
            let a = reference.run(tvec!(input.clone().into())).unwrap();
            let b = ours.run(tvec!(input.into())).unwrap();
            assert!(a[0].as_bytes() == b[0].as_bytes(), "{name}");
        }
    }
}
