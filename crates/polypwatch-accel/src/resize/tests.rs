//! [`Bilinear`] against tract's `Resize`, on the shipped models, to the bit.

use super::*;
/// Every bilinear resize of the shipped f32 and int8 models, run by tract and by us.
#[test]
fn matches_tract_on_the_shipped_models_to_the_bit() {
    for name in ["polypwatch-edge-f32.onnx", "polypwatch-edge-int8.onnx"] {
        let model = crate::testing::shipped_model(name);
        let mut seen = 0;
        for node in model.nodes() {
            let Some(ours) = replacement(&model, node) else {
                continue;
            };
            let fact = model.outlet_fact(node.inputs[0]).unwrap();
            let shape = fact.shape.as_concrete().unwrap();
            let len: usize = shape.iter().product();
            let data: Vec<f32> = (0..len)
                .map(|i| ((i * 7919) % 1009) as f32 / 97.0 - 5.0)
                .collect();
            let mut inputs: TVec<TValue> =
                tvec!(Tensor::from_shape(shape, &data).unwrap().into_tvalue());
            for extra in &node.inputs[1..] {
                let k = model.outlet_fact(*extra).unwrap().konst.clone().unwrap();
                inputs.push(k.into_tvalue());
            }
            let theirs = node.op.eval_out_of_plan(inputs.clone()).unwrap().unwrap();
            let mine = ours.eval_out_of_plan(inputs[..1].into()).unwrap().unwrap();
            assert_eq!(theirs[0].shape(), mine[0].shape(), "{}", node.name);
            assert!(
                theirs[0].as_bytes() == mine[0].as_bytes(),
                "{} differs",
                node.name
            );
            seen += 1;
        }
        assert!(seen >= 2, "{name}: only {seen} resizes");
    }
}
