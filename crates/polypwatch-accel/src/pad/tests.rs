//! [`Pad`] against tract's, on the shipped f32 model.

use super::*;
use tract_onnx::tract_core::ops::array::{Pad as TractPad, PadMode};
/// Every pad of the shipped f32 model, by tract and by us, and one with a nonzero value.
#[test]
fn pads_like_tract() {
    let model = crate::testing::shipped_model("polypwatch-edge-f32.onnx");
    // (tract's op, ours, input shape)
    type Case = (Box<dyn TypedOp>, Box<dyn TypedOp>, TVec<usize>);
    let mut cases: Vec<Case> = vec![];
    for node in model.nodes() {
        if let Some(ours) = replacement(&model, node) {
            let shape = model
                .outlet_fact(node.inputs[0])
                .unwrap()
                .shape
                .as_concrete()
                .unwrap()
                .into();
            cases.push((node.op.clone(), ours, shape));
        }
    }
    assert!(cases.len() > 10, "only {} pads", cases.len());
    let odd = TractPad {
        pads: vec![(0, 0), (0, 0), (2, 1), (0, 3)],
        mode: PadMode::Constant(Arc::new(tensor0(-1.5f32))),
    };
    cases.push((
        Box::new(odd.clone()),
        Box::new(Pad {
            pads: [(2, 1), (0, 3)],
            value: Arc::new(tensor0(-1.5f32)),
        }),
        tvec!(2, 3, 5, 4),
    ));
    for (theirs, mine, shape) in cases {
        let len: usize = shape.iter().product();
        let data: Vec<f32> = (0..len)
            .map(|i| ((i * 7919) % 1009) as f32 - 500.0)
            .collect();
        let input: TVec<TValue> = tvec!(Tensor::from_shape(&shape, &data).unwrap().into_tvalue());
        let a = theirs.eval_out_of_plan(input.clone()).unwrap().unwrap();
        let b = mine.eval_out_of_plan(input).unwrap().unwrap();
        assert_eq!(a[0].shape(), b[0].shape());
        assert!(a[0].as_bytes() == b[0].as_bytes(), "{shape:?}");
    }
}
