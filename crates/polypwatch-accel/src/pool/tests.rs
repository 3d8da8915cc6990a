//! The operators here against tract's, on the shipped int8 model and on odd geometries.

use super::*;
use crate::testing::shipped_model;
use tract_onnx::tract_core::ops::cnn::OptMaxPool;
use tract_onnx::tract_core::ops::quant::DequantizeLinearF32;

/// Our pooling then dequantization gives tract's dequantization then pooling, on the
/// shipped int8 model's pooling and on other geometries, for every byte value.
#[test]
fn pooled_bytes_dequantize_to_tracts_pooled_floats() {
    let model = shipped_model("polypwatch-edge-int8.onnx");
    let specs: Vec<_> = model
        .nodes()
        .iter()
        .filter_map(|n| n.op_as::<OptMaxPool>().map(|p| p.pool_spec.clone()))
        .collect();
    assert_eq!(specs.len(), 1, "the shipped model pools once");
    let mut cases = vec![(specs[0].clone(), [1usize, 5, 13, 11])];
    for (k, s, p) in [(2, 2, 0), (3, 1, 1), (3, 2, 0), (5, 3, 2)] {
        let mut spec = specs[0].clone();
        spec.kernel_shape = tvec!(k, k);
        spec.strides = Some(tvec!(s, s));
        spec.padding =
            tract_onnx::tract_core::ops::cnn::PaddingSpec::Explicit(tvec!(p, p), tvec!(p, p));
        cases.push((spec, [1, 3, 17, 20]));
    }
    let dq = DequantizeLinearF32 {
        scale: 0.0496747,
        zero_point: 3,
    };
    for (mut spec, shape) in cases {
        (spec.input_channels, spec.output_channels) = (shape[1], shape[1]);
        let n = shape.iter().product::<usize>();
        let bytes: Vec<u8> = (0..n).map(|i| ((i * 97 + i / 7) % 256) as u8).collect();
        let x = Tensor::from_shape(&shape, &bytes).unwrap();
        let theirs = dequantize_then_pool(&spec, shape, &dq);
        let expected = theirs.clone().into_runnable().unwrap();
        let expected = expected.run(tvec!(x.clone().into())).unwrap();
        let mut ours = theirs;
        let pool = ours
            .nodes()
            .iter()
            .find(|n| n.op_is::<OptMaxPool>())
            .map(|n| n.id)
            .unwrap();
        assert!(swap_max_pool(&mut ours, pool).unwrap(), "{spec:?}");
        let got = ours.into_runnable().unwrap().run(tvec!(x.into())).unwrap();
        assert_eq!(expected[0].shape(), got[0].shape(), "{spec:?}");
        assert!(expected[0].as_bytes() == got[0].as_bytes(), "{spec:?}");
    }
}

/// Our float pooling gives tract's, negative values and padding included.
#[test]
fn float_pooling_is_tracts() {
    use tract_onnx::tract_core::ops::cnn::{MaxPool, PaddingSpec, PoolSpec};
    use tract_onnx::tract_core::ops::nn::DataFormat;
    for (k, s, p, shape) in [
        (3, 2, 1, [1, 4, 16, 16]),
        (2, 2, 0, [1, 3, 17, 20]),
        (3, 1, 1, [1, 2, 9, 7]),
        (5, 3, 2, [1, 3, 17, 20]),
    ] {
        let spec = PoolSpec {
            data_format: DataFormat::NCHW,
            kernel_shape: tvec!(k, k),
            padding: PaddingSpec::Explicit(tvec!(p, p), tvec!(p, p)),
            dilations: None,
            strides: Some(tvec!(s, s)),
            input_channels: shape[1],
            output_channels: shape[1],
        };
        let mut m = TypedModel::default();
        let x = m.add_source("x", f32::fact(shape)).unwrap();
        let o = m.wire_node("pool", MaxPool::new(spec, None), &[x]).unwrap();
        m.select_output_outlets(&o).unwrap();
        let theirs = m.into_optimized().unwrap();
        let n = shape.iter().product::<usize>();
        let values: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 70.0) / 9.0)
            .collect();
        let x = Tensor::from_shape(&shape, &values).unwrap();
        let expected = theirs.clone().into_runnable().unwrap();
        let expected = expected.run(tvec!(x.clone().into())).unwrap();
        let mut ours = theirs;
        assert_eq!(
            crate::patch::replace_each(&mut ours, max_pool_f32).unwrap(),
            1
        );
        let got = ours.into_runnable().unwrap().run(tvec!(x.into())).unwrap();
        assert_eq!(expected[0].shape(), got[0].shape(), "{k} {s} {p}");
        assert!(expected[0].as_bytes() == got[0].as_bytes(), "{k} {s} {p}");
    }
}

/// tract's plan for `MaxPool(DequantizeLinear(x))`.
fn dequantize_then_pool(
    spec: &tract_onnx::tract_core::ops::cnn::PoolSpec,
    shape: [usize; 4],
    dq: &DequantizeLinearF32,
) -> TypedModel {
    let mut m = TypedModel::default();
    let s = m.add_source("x", u8::fact(shape)).unwrap();
    let d = m.wire_node("dq", dq.clone(), &[s]).unwrap();
    let pool = tract_onnx::tract_core::ops::cnn::MaxPool::new(spec.clone(), None);
    let o = m.wire_node("pool", pool, &d).unwrap();
    m.select_output_outlets(&o).unwrap();
    m.into_optimized().unwrap()
}
