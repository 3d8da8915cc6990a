//! [`FConv`] against tract's convolutions: every geometry the model has and more, the parts of
//! a concatenation, and the shipped f32 model.

use super::*;
use crate::testing::fixture_input;
use tract_onnx::tract_core::ops::array::TypedConcat;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::cnn::{PaddingSpec, PoolSpec};
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::math;
use tract_onnx::tract_core::ops::nn::DataFormat;

/// A convolution's shape: input `c x h x w`, `m` outputs, kernel, strides, dilations and
/// padding (top, left, bottom, right).
#[derive(Debug, Clone, Copy)]
struct Shape {
    c: usize,
    h: usize,
    w: usize,
    m: usize,
    k: (usize, usize),
    s: (usize, usize),
    d: (usize, usize),
    pad: (usize, usize, usize, usize),
}

/// Reproducible values in -1..1.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// `relu(conv(x) + bias [+ skip])` as a decluttered tract model, its inputs, and the
/// output's shape.
fn conv_model(s: Shape, residual: bool, relu: bool) -> (TypedModel, TVec<TValue>) {
    conv_model_split(s, residual, relu, None)
}

/// [`conv_model`] whose input is the channel concatenation of two inputs, the first of
/// `split` channels, where `split` is given.
fn conv_model_split(
    s: Shape,
    residual: bool,
    relu: bool,
    split: Option<usize>,
) -> (TypedModel, TVec<TValue>) {
    let mut model = TypedModel::default();
    let x = match split {
        None => model
            .add_source("x", f32::fact([1, s.c, s.h, s.w]))
            .unwrap(),
        Some(c1) => {
            let a = model.add_source("a", f32::fact([1, c1, s.h, s.w])).unwrap();
            let b = model
                .add_source("b", f32::fact([1, s.c - c1, s.h, s.w]))
                .unwrap();
            let cat = TypedConcat { axis: 1 };
            model.wire_node("cat", cat, &[a, b]).unwrap()[0]
        }
    };
    let w = Tensor::from_shape(
        &[s.m, s.c, s.k.0, s.k.1],
        &values(s.m * s.c * s.k.0 * s.k.1, 1),
    )
    .unwrap();
    let b = Tensor::from_shape(&[s.m], &values(s.m, 2)).unwrap();
    let w = model.add_const("w", w).unwrap();
    let b = model.add_const("b", b).unwrap();
    let conv = Conv {
        pool_spec: PoolSpec {
            data_format: DataFormat::NCHW,
            kernel_shape: tvec!(s.k.0, s.k.1),
            padding: PaddingSpec::Explicit(tvec!(s.pad.0, s.pad.1), tvec!(s.pad.2, s.pad.3)),
            dilations: Some(tvec!(s.d.0, s.d.1)),
            strides: Some(tvec!(s.s.0, s.s.1)),
            input_channels: s.c,
            output_channels: s.m,
        },
        kernel_fmt: KernelFormat::OIHW,
        group: 1,
        q_params: None,
    };
    let mut y = model.wire_node("conv", conv, &[x, w, b]).unwrap()[0];
    let out_shape = model
        .outlet_fact(y)
        .unwrap()
        .shape
        .as_concrete()
        .unwrap()
        .to_vec();
    let x = values(s.c * s.h * s.w, 3);
    let mut inputs = match split {
        None => tvec!(
            Tensor::from_shape(&[1, s.c, s.h, s.w], &x)
                .unwrap()
                .into_tvalue()
        ),
        Some(c1) => {
            let (a, b) = x.split_at(c1 * s.h * s.w);
            tvec!(
                Tensor::from_shape(&[1, c1, s.h, s.w], a)
                    .unwrap()
                    .into_tvalue(),
                Tensor::from_shape(&[1, s.c - c1, s.h, s.w], b)
                    .unwrap()
                    .into_tvalue()
            )
        }
    };
    if residual {
        let skip = model.add_source("skip", f32::fact(&out_shape)).unwrap();
        y = model.wire_node("add", math::add(), &[y, skip]).unwrap()[0];
        let len = out_shape.iter().product();
        inputs.push(
            Tensor::from_shape(&out_shape, &values(len, 4))
                .unwrap()
                .into_tvalue(),
        );
    }
    if relu {
        let zero = model.add_const("zero", tensor4(&[[[[0f32]]]])).unwrap();
        y = model.wire_node("relu", math::max(), &[y, zero]).unwrap()[0];
    }
    model.select_output_outlets(&[y]).unwrap();
    (model.into_decluttered().unwrap(), inputs)
}

/// Largest difference between two float tensors, relative to the largest magnitude.
fn relative_difference(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.shape(), b.shape());
    let (a, b) = (floats(a), floats(b));
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

fn floats(t: &Tensor) -> Vec<f32> {
    t.try_as_plain_ram()
        .unwrap()
        .as_slice::<f32>()
        .unwrap()
        .to_vec()
}

fn run(model: TypedModel, inputs: &TVec<TValue>) -> Tensor {
    let plan = model.into_runnable().unwrap();
    plan.run(inputs.clone()).unwrap()[0].clone().into_tensor()
}

const SHAPES: [Shape; 11] = [
    // A residual block's 3x3, width a whole number of vectors.
    Shape {
        c: 5,
        h: 8,
        w: 32,
        m: 16,
        k: (3, 3),
        s: (1, 1),
        d: (1, 1),
        pad: (1, 1, 1, 1),
    },
    // Partial vectors and a partial channel panel.
    Shape {
        c: 3,
        h: 9,
        w: 20,
        m: 11,
        k: (3, 3),
        s: (1, 1),
        d: (1, 1),
        pad: (1, 1, 1, 1),
    },
    // The stem: 7x7, stride 2, odd size.
    Shape {
        c: 3,
        h: 23,
        w: 37,
        m: 8,
        k: (7, 7),
        s: (2, 2),
        d: (1, 1),
        pad: (3, 3, 3, 3),
    },
    // Dilated as the ASPP: most taps read only padding, whole tiles skip some.
    Shape {
        c: 4,
        h: 16,
        w: 16,
        m: 9,
        k: (3, 3),
        s: (1, 1),
        d: (6, 6),
        pad: (6, 6, 6, 6),
    },
    Shape {
        c: 4,
        h: 16,
        w: 16,
        m: 8,
        k: (3, 3),
        s: (1, 1),
        d: (18, 18),
        pad: (18, 18, 18, 18),
    },
    // Asymmetric padding, different strides and dilations per axis.
    Shape {
        c: 2,
        h: 12,
        w: 40,
        m: 7,
        k: (3, 5),
        s: (2, 1),
        d: (1, 2),
        pad: (0, 3, 2, 1),
    },
    // Stride 3, no padding.
    Shape {
        c: 6,
        h: 14,
        w: 50,
        m: 8,
        k: (2, 2),
        s: (3, 3),
        d: (1, 1),
        pad: (0, 0, 0, 0),
    },
    // Output narrower than one vector.
    Shape {
        c: 3,
        h: 5,
        w: 6,
        m: 4,
        k: (3, 3),
        s: (1, 1),
        d: (1, 1),
        pad: (1, 1, 1, 1),
    },
    // 1x1, which tract declutters to a product (through `Downsample`s where strided).
    Shape {
        c: 7,
        h: 4,
        w: 32,
        m: 10,
        k: (1, 1),
        s: (1, 1),
        d: (1, 1),
        pad: (0, 0, 0, 0),
    },
    Shape {
        c: 5,
        h: 9,
        w: 35,
        m: 8,
        k: (1, 1),
        s: (2, 2),
        d: (1, 1),
        pad: (0, 0, 0, 0),
    },
    // A map smaller than the kernel.
    Shape {
        c: 16,
        h: 2,
        w: 1,
        m: 8,
        k: (3, 3),
        s: (1, 1),
        d: (1, 1),
        pad: (1, 1, 1, 1),
    },
];

/// Every shape, with and without the residual addition and ReLU, gives tract's output to
/// float rounding, on the portable kernel and (where the CPU has it) the fast one, which
/// agree to the bit.
#[test]
fn gives_tracts_convolutions() {
    for shape in SHAPES {
        for (residual, relu) in [(false, false), (false, true), (true, true)] {
            let (model, inputs) = conv_model(shape, residual, relu);
            let reference = run(model.clone(), &inputs);
            let mut kernels = vec![Kernel::Portable];
            kernels.extend(Kernel::fast());
            let mut outputs = vec![];
            for kernel in kernels {
                let mut ours = model.clone();
                assert_eq!(fuse(&mut ours, kernel).unwrap(), 1, "{shape:?}");
                // The convolution, the addition and the ReLU are one node.
                assert_eq!(
                    ours.nodes().len(),
                    1 + inputs.len(),
                    "{shape:?} {residual} {relu}"
                );
                let out = run(ours, &inputs);
                let diff = relative_difference(&reference, &out);
                assert!(
                    diff < 1e-5,
                    "{shape:?} {residual} {relu} {kernel:?}: {diff}"
                );
                outputs.push(out);
            }
            for out in &outputs[1..] {
                assert!(out.as_bytes() == outputs[0].as_bytes(), "{shape:?}");
            }
        }
    }
}

/// A convolution of a channel concatenation reads the parts where they are (the
/// concatenation is gone) and gives, to the bit, what it gives on the joined input; one
/// that reads its input in place (1x1) keeps the concatenation.
#[test]
fn reads_the_parts_of_a_concatenation() {
    // Direct (the stem), Winograd, direct and dilated, and 1x1 (read in place).
    for (i, shape) in [SHAPES[2], SHAPES[0], SHAPES[3], SHAPES[7]]
        .into_iter()
        .enumerate()
    {
        let c1 = shape.c / 2;
        let mut kernels = vec![Kernel::Portable];
        kernels.extend(Kernel::fast());
        for kernel in kernels {
            let (joined, x) = conv_model(shape, true, true);
            let (parts, xs) = conv_model_split(shape, true, true, Some(c1));
            let (mut joined, mut parts) = (joined, parts);
            fuse(&mut joined, kernel).unwrap();
            fuse(&mut parts, kernel).unwrap();
            let fused = parts
                .nodes()
                .iter()
                .find_map(|n| n.op_as::<FConv>())
                .unwrap();
            let in_place = fused.reads_in_place();
            let has_concat = parts.nodes().iter().any(|n| n.op_is::<TypedConcat>());
            assert_eq!(has_concat, in_place, "{i} {shape:?}");
            assert_eq!(fused.parts, if in_place { 1 } else { 2 }, "{i}");
            let (a, b) = (run(joined, &x), run(parts, &xs));
            assert!(a.as_bytes() == b.as_bytes(), "{i} {shape:?} {kernel:?}");
        }
    }
}

/// The shipped f32 model with every convolution it covers on [`FConv`]: tract's logits to
/// float rounding, the same mask, on a real frame.
#[test]
fn shipped_model_keeps_its_logits() {
    let path = crate::testing::workspace_root().join("models/polypwatch-edge-f32.onnx");
    let model = tract_onnx::onnx()
        .model_for_path(path)
        .and_then(|m| m.into_typed()?.into_decluttered())
        .unwrap();
    let input = tvec!(fixture_input().into_tvalue());
    let reference = run(model.clone().into_optimized().unwrap(), &input);
    let mut ours = model;
    // Every 3x3 and 7x7 convolution (22) and every 1x1 one in the NCHW form (9: the ASPP's
    // projection is four of them, tract having split it over the concatenation it reads).
    assert_eq!(fuse(&mut ours, Kernel::Portable).unwrap(), 31);
    assert!(!ours.nodes().iter().any(|n| n.op_is::<Conv>()));
    let einsums = ours.nodes().iter().filter(|n| n.op_is::<EinSum>()).count();
    assert_eq!(
        einsums, 3,
        "the ASPP branches tract split to [c][h][w] products"
    );
    let fused: Vec<_> = ours
        .nodes()
        .iter()
        .filter_map(|n| n.op_as::<FConv>())
        .collect();
    // 8 residual blocks, and the ASPP projection's partial sums.
    assert_eq!(fused.iter().filter(|c| c.residual).count(), 12);
    assert_eq!(fused.iter().filter(|c| c.relu).count(), 24);
    let out = run(ours.into_optimized().unwrap(), &input);
    let diff = relative_difference(&reference, &out);
    assert!(diff < 1e-4, "{diff}");
    let (a, b) = (floats(&reference), floats(&out));
    let flipped = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| (**x > 0.0) != (**y > 0.0))
        .count();
    assert!(
        flipped * 1000 <= a.len(),
        "{flipped} of {} pixels changed class",
        a.len()
    );
}

/// `SliceConv` against a plain loop over every output, tap and channel: direct and Winograd
/// plans, strides, dilations, padding, 1x1.
#[test]
fn slice_conv_matches_a_plain_convolution() {
    let cases = [
        // (c, h, w, m, k, stride, dilation, pad)
        (5, 20, 18, 11, 3, 1, 1, 1), // Winograd
        (7, 12, 12, 9, 3, 1, 2, 2),  // direct: phases too small for Winograd
        (3, 23, 37, 8, 7, 2, 1, 3),  // the stem
        (6, 16, 16, 10, 3, 1, 6, 6), // most taps in padding
        (4, 10, 10, 6, 1, 2, 1, 0),  // strided 1x1
        (9, 17, 40, 5, 3, 1, 1, 2),  // padding wider than the kernel reaches
    ];
    for (c, h, w, m, k, st, d, p) in cases {
        let shape = ConvShape {
            channels: c,
            height: h,
            width: w,
            outputs: m,
            kernel: [k, k],
            stride: [st, st],
            dilation: [d, d],
            padding: [p, p],
        };
        let weights = values(m * c * k * k, 5);
        let x = values(c * h * w, 6);
        let [oh, ow] = [h, w].map(|n| (n + 2 * p - d * (k - 1) - 1) / st + 1);
        let mut expected = vec![0f32; m * oh * ow];
        for o in 0..m {
            for y in 0..oh {
                for xo in 0..ow {
                    let mut sum = 0f64;
                    for ci in 0..c {
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (y * st + ky * d) as isize - p as isize;
                                let ix = (xo * st + kx * d) as isize - p as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                let xv = x[(ci * h + iy as usize) * w + ix as usize];
                                let wv = weights[((o * c + ci) * k + ky) * k + kx];
                                sum += f64::from(xv) * f64::from(wv);
                            }
                        }
                    }
                    expected[(o * oh + y) * ow + xo] = sum as f32;
                }
            }
        }
        let mut kernels = vec![Kernel::Portable];
        kernels.extend(Kernel::fast());
        for kernel in kernels {
            let conv = SliceConv::new(shape, &weights, kernel).unwrap();
            assert_eq!(conv.output_size(), [oh, ow], "{shape:?}");
            let mut out = vec![f32::NAN; m * oh * ow];
            conv.run(&x, &mut out);
            let scale = expected.iter().fold(0f32, |a, v| a.max(v.abs()));
            let diff = expected
                .iter()
                .zip(&out)
                .fold(0f32, |a, (e, o)| a.max((e - o).abs()));
            assert!(
                diff <= 1e-5 * scale,
                "{shape:?} {kernel:?}: {diff} of {scale}"
            );
        }
    }
    let bad = ConvShape {
        channels: 1,
        height: 2,
        width: 2,
        outputs: 1,
        kernel: [5, 5],
        stride: [1, 1],
        dilation: [1, 1],
        padding: [0, 0],
    };
    assert!(SliceConv::new(bad, &[0.0; 25], Kernel::Portable).is_none());
}
