//! [`PackedIm2Col`] against tract's packers, byte for byte, and on the shipped model.

use super::*;
use tract_onnx::tract_core::ops::cnn::PaddingSpec;
use tract_onnx::tract_core::ops::cnn::conv::Im2Col;

fn packed_bytes(t: &Tensor) -> Vec<u8> {
    let storage = t.try_storage_as::<PackedMatrixStorage>().unwrap();
    assert_eq!(storage.values().len(), 1);
    let eager = storage.value().downcast_ref::<EagerPackedInput>().unwrap();
    eager.packed.as_bytes().to_vec()
}

/// The im2col matrix `[k, n]` computed the obvious way.
fn naive(geo: &Geometry, input: &[u8], pad: u8) -> Vec<u8> {
    let (k, n) = (geo.k(), geo.n());
    let mut m = vec![0u8; k * n];
    for c in 0..geo.c {
        for ky in 0..geo.kh {
            for kx in 0..geo.kw {
                let t = (c * geo.kh + ky) * geo.kw + kx;
                for oy in 0..geo.oh {
                    for ox in 0..geo.ow {
                        let y = (oy * geo.sy + ky * geo.dy) as isize - geo.pad_top;
                        let x = (ox * geo.sx + kx * geo.dx) as isize - geo.pad_left;
                        let inside =
                            y >= 0 && x >= 0 && (y as usize) < geo.h && (x as usize) < geo.w;
                        m[t * n + oy * geo.ow + ox] = if inside {
                            input[(c * geo.h + y as usize) * geo.w + x as usize]
                        } else {
                            pad
                        };
                    }
                }
            }
        }
    }
    m
}

fn spec(k: usize, stride: usize, dilation: usize, pad: usize) -> PoolSpec {
    PoolSpec {
        data_format: DataFormat::NCHW,
        kernel_shape: tvec!(k, k),
        padding: PaddingSpec::Explicit(tvec!(pad, pad), tvec!(pad, pad)),
        dilations: Some(tvec!(dilation, dilation)),
        strides: Some(tvec!(stride, stride)),
        input_channels: 0,
        output_channels: 0,
    }
}

/// `(channels, height, width, kernel, stride, dilation, padding)`: every kind of
/// convolution in our models (7x7 stride 2, 3x3 padded, dilated past the image, 1x1) and
/// sizes that leave partial panels, tap groups, channel groups and runs of 8 or 16.
const GEOMETRIES: [(usize, usize, usize, usize, usize, usize, usize); 12] = [
    (3, 19, 23, 7, 2, 1, 3),
    (5, 9, 11, 3, 1, 1, 1),
    (4, 8, 8, 3, 1, 6, 6),
    (2, 6, 5, 3, 1, 12, 12),
    (6, 7, 7, 1, 1, 1, 0),
    (3, 10, 9, 3, 2, 1, 1),
    (3, 16, 16, 3, 1, 1, 1),
    (2, 32, 32, 3, 2, 1, 1),
    (8, 16, 32, 3, 1, 2, 2),
    (7, 40, 37, 3, 2, 1, 1),
    (4, 12, 29, 5, 3, 1, 2),
    (9, 33, 35, 1, 1, 1, 0),
];

/// Every tap of every pixel read from the interleaved layout is the im2col matrix's value
/// (XORed with the flip asked for, padding too), for x strides 1, 2 and 3, dilations,
/// padding, channel counts that leave a partial group of four and widths that leave partial
/// runs of eight and sixteen.
#[test]
fn interleaved_layout_holds_every_tap() {
    for (c, h, w, k, stride, dilation, pad) in GEOMETRIES {
        let geo = Geometry::new(&spec(k, stride, dilation, pad), &[1, c, h, w]).unwrap();
        let input: Vec<u8> = (0..c * h * w).map(|i| (i * 37 % 251) as u8 + 1).collect();
        let matrix = naive(&geo, &input, 0xEE);
        for flip in [0, 0x80, 0x5A] {
            let x = geo.interleaved(&input, 0xEE, flip);
            let taps = geo.interleaved_taps(&x);
            for oy in 0..geo.oh {
                for ox in 0..geo.ow {
                    let base = geo.interleaved_base(&x, oy, ox);
                    for ci in 0..c {
                        for (t, &tap) in taps.iter().enumerate() {
                            let at = base + tap + (ci / 4) * x.group_stride() + ci % 4;
                            let want = matrix[(ci * taps.len() + t) * geo.n() + oy * geo.ow + ox];
                            assert_eq!(
                                x.bytes()[at],
                                want ^ flip,
                                "{:?} flip {flip:#x} pixel {oy},{ox} c {ci} tap {t}",
                                (c, h, w, k, stride, dilation, pad)
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Every layout byte against tract's own packers fed the naive matrix, over the kinds of
/// convolution in our models: 7x7 stride 2, 3x3 padded, dilated past the image, 1x1, and
/// sizes that leave partial panels and partial tap groups.
#[test]
fn packs_the_same_bytes_as_tracts_packers() {
    for (c, h, w, k, stride, dilation, pad) in GEOMETRIES {
        let geo = Geometry::new(&spec(k, stride, dilation, pad), &[1, c, h, w]).unwrap();
        let input: Vec<u8> = (0..c * h * w).map(|i| (i * 37 % 251) as u8 + 1).collect();
        let matrix = naive(&geo, &input, 0xEE);
        let t = Tensor::from_shape(&[geo.k(), geo.n()], &matrix).unwrap();
        let formats: Vec<Box<dyn MMMInputFormat>> = vec![
            Box::new(PackedI8K4::new(8)),
            Box::new(PackedI8K4::new(16)),
            Box::new(PackedFormat::new(DatumType::U8, 8, 16)),
            Box::new(PackedFormat::new(DatumType::U8, 4, 4)),
        ];
        for format in formats {
            let layout = Layout::of(&*format, DatumType::U8, geo.k()).unwrap();
            let len = geo.n().div_ceil(layout.r()) * layout.panel_len(geo.k());
            let mut ours = vec![0x55u8; len];
            geo.write(&input, 0xEE, layout, &mut ours);
            let theirs = format.prepare_one(&t, 0, 1).unwrap();
            let theirs = theirs.downcast_ref::<EagerPackedInput>().unwrap();
            let theirs = theirs.packed.as_bytes();
            // tract's PackedFormat pads the panel for alignment; those bytes are not read.
            let rk = match layout {
                Layout::KMajor { r, .. } => geo.k() * r,
                Layout::K4 { .. } => layout.panel_len(geo.k()),
            };
            for (p, (a, b)) in ours
                .chunks(layout.panel_len(geo.k()))
                .zip(theirs.chunks(layout.panel_len(geo.k())))
                .enumerate()
            {
                assert_eq!(a[..rk], b[..rk], "{geo:?} {format} panel {p}");
            }
        }
    }
}

/// Every im2col of the shipped int8 model, run by tract and by us on the same input.
#[test]
fn matches_tract_on_every_im2col_of_the_shipped_model() {
    let model = crate::testing::shipped_model("polypwatch-edge-int8.onnx");
    let mut seen = 0;
    for node in model.nodes() {
        let Some(op) = node.op_as::<Im2Col>() else {
            continue;
        };
        let fact = model.outlet_fact(node.inputs[0]).unwrap();
        let ours = PackedIm2Col::replacing(op, fact, &node.outputs[0].fact)
            .unwrap_or_else(|| panic!("{} not covered", node.name));
        let shape = fact.shape.as_concrete().unwrap();
        let len: usize = shape.iter().product();
        let data: Vec<i8> = (0..len).map(|i| (i * 7919 % 251) as i8).collect();
        let mut inputs: TVec<TValue> =
            tvec!(Tensor::from_shape(shape, &data).unwrap().into_tvalue());
        if let Some(pad) = node.inputs.get(1) {
            let k = model.outlet_fact(*pad).unwrap().konst.clone().unwrap();
            inputs.push(k.into_tvalue());
        }
        let theirs = op.eval_out_of_plan(inputs.clone()).unwrap().unwrap();
        let mine = ours.eval_out_of_plan(inputs).unwrap().unwrap();
        assert_eq!(
            packed_bytes(&theirs[0]),
            packed_bytes(&mine[0]),
            "{}",
            node.name
        );
        seen += 1;
    }
    assert!(seen > 10, "only {seen} im2col nodes");
}
