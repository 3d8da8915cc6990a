//! A small ONNX graph writer on top of the protobuf types that `tract_onnx::pb` exposes.
//!
//! Burn 0.22 has no ONNX export, so each layer of our model writes its own nodes through this
//! builder (see `model.rs`), mirroring its `forward`. Only the handful of operators our
//! DeepLabv3+ needs are provided; the opset is pinned so tract and ONNX Runtime read the same
//! semantics.

use prost::Message;
use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto, attribute_proto::AttributeType,
    tensor_proto::DataType, tensor_shape_proto, type_proto,
};

/// ONNX opset written (Resize-13 semantics, QLinearConv-10).
pub const OPSET: i64 = 13;

/// Builds one ONNX graph node by node.
#[derive(Default)]
pub struct Graph {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    counter: usize,
}

/// An attribute value for [`Graph::node`].
pub enum Attr {
    /// A single integer.
    Int(i64),
    /// A list of integers.
    Ints(Vec<i64>),
    /// A single float.
    Float(f32),
    /// A string.
    Str(&'static str),
}

fn attribute(name: &str, value: Attr) -> AttributeProto {
    let mut a = AttributeProto {
        name: name.to_string(),
        ..Default::default()
    };
    match value {
        Attr::Int(i) => {
            a.i = i;
            a.r#type = AttributeType::Int as i32;
        }
        Attr::Ints(v) => {
            a.ints = v;
            a.r#type = AttributeType::Ints as i32;
        }
        Attr::Float(f) => {
            a.f = f;
            a.r#type = AttributeType::Float as i32;
        }
        Attr::Str(s) => {
            a.s = s.as_bytes().to_vec();
            a.r#type = AttributeType::String as i32;
        }
    }
    a
}

fn value_info(name: &str, elem: DataType, shape: &[usize]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem as i32,
                shape: Some(TensorShapeProto {
                    dim: shape
                        .iter()
                        .map(|&d| tensor_shape_proto::Dimension {
                            value: Some(tensor_shape_proto::dimension::Value::DimValue(d as i64)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl Graph {
    /// A fresh, unique value name with the given prefix.
    pub fn fresh(&mut self, prefix: &str) -> String {
        self.counter += 1;
        format!("{prefix}_{}", self.counter)
    }

    /// Adds an f32 constant and returns its name.
    pub fn const_f32(&mut self, prefix: &str, dims: &[usize], data: Vec<f32>) -> String {
        assert_eq!(
            dims.iter().product::<usize>(),
            data.len(),
            "{prefix}: shape/data"
        );
        let name = self.fresh(prefix);
        self.initializers.push(TensorProto {
            name: name.clone(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: DataType::Float as i32,
            raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        name
    }

    /// Adds a u8 constant (scalar when `dims` is empty) and returns its name.
    pub fn const_u8(&mut self, prefix: &str, dims: &[usize], data: Vec<u8>) -> String {
        self.const_raw(prefix, dims, DataType::Uint8, data)
    }

    /// Adds an i8 constant and returns its name.
    pub fn const_i8(&mut self, prefix: &str, dims: &[usize], data: Vec<i8>) -> String {
        self.const_raw(
            prefix,
            dims,
            DataType::Int8,
            data.iter().map(|&v| v as u8).collect(),
        )
    }

    /// Adds an i32 constant and returns its name.
    pub fn const_i32(&mut self, prefix: &str, dims: &[usize], data: Vec<i32>) -> String {
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.const_raw(prefix, dims, DataType::Int32, raw)
    }

    fn const_raw(&mut self, prefix: &str, dims: &[usize], ty: DataType, raw: Vec<u8>) -> String {
        let name = self.fresh(prefix);
        self.initializers.push(TensorProto {
            name: name.clone(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: ty as i32,
            raw_data: raw,
            ..Default::default()
        });
        name
    }

    /// Adds a node with one output and returns the output's name.
    pub fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        let out = self.fresh(&op.to_ascii_lowercase());
        let name = format!("{out}_node");
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            name,
            op_type: op.to_string(),
            attribute: attrs.into_iter().map(|(n, v)| attribute(n, v)).collect(),
            ..Default::default()
        });
        out
    }

    /// A 2-D convolution with bias. `weight` is `[out, in/groups, k, k]`, row-major.
    #[allow(clippy::too_many_arguments)]
    pub fn conv(
        &mut self,
        x: &str,
        weight: Vec<f32>,
        wdims: [usize; 4],
        bias: Vec<f32>,
        stride: usize,
        padding: usize,
        dilation: usize,
        groups: usize,
    ) -> String {
        let w = self.const_f32("w", &wdims, weight);
        let b = self.const_f32("b", &[wdims[0]], bias);
        let p = padding as i64;
        self.node(
            "Conv",
            &[x, &w, &b],
            vec![
                (
                    "kernel_shape",
                    Attr::Ints(vec![wdims[2] as i64, wdims[3] as i64]),
                ),
                ("strides", Attr::Ints(vec![stride as i64; 2])),
                ("pads", Attr::Ints(vec![p, p, p, p])),
                ("dilations", Attr::Ints(vec![dilation as i64; 2])),
                ("group", Attr::Int(groups as i64)),
            ],
        )
    }

    /// Bilinear resize by integer factors, half-pixel centres (PyTorch `align_corners=False`).
    pub fn resize_bilinear(&mut self, x: &str, scale_h: f32, scale_w: f32) -> String {
        let scales = self.const_f32("scales", &[4], vec![1.0, 1.0, scale_h, scale_w]);
        self.node(
            "Resize",
            &[x, "", &scales],
            vec![
                ("mode", Attr::Str("linear")),
                ("coordinate_transformation_mode", Attr::Str("half_pixel")),
            ],
        )
    }

    /// Serialises the graph into an ONNX model with the f32 input `input` and the f32 output
    /// produced as `out`, which is renamed `output_name`.
    pub fn finish_renamed(
        mut self,
        out: &str,
        output_name: &str,
        input_shape: [usize; 4],
        output_shape: [usize; 4],
        doc: &str,
    ) -> Vec<u8> {
        for n in &mut self.nodes {
            for o in &mut n.output {
                if o == out {
                    *o = output_name.to_string();
                }
            }
        }
        let (input, output) = ("input", output_name);
        let graph = GraphProto {
            node: self.nodes,
            name: "polypwatch".into(),
            initializer: self.initializers,
            input: vec![value_info(input, DataType::Float, &input_shape)],
            output: vec![value_info(output, DataType::Float, &output_shape)],
            ..Default::default()
        };
        let model = ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
            }],
            producer_name: "polypwatch-train".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            doc_string: doc.into(),
            graph: Some(graph),
            ..Default::default()
        };
        model.encode_to_vec()
    }
}

/// Activation fused after a convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// None (linear).
    None,
    /// max(x, 0).
    Relu,
    /// min(max(x, 0), 6).
    Relu6,
}

/// A convolution with batch norm folded in, ready to write.
#[derive(Debug, Clone)]
pub struct Folded {
    /// Weights `[out, in/groups, k, k]`, row-major.
    pub weight: Vec<f32>,
    /// Weight shape.
    pub dims: [usize; 4],
    /// Bias per output channel.
    pub bias: Vec<f32>,
    /// Stride.
    pub stride: usize,
    /// Symmetric padding.
    pub pad: usize,
    /// Dilation.
    pub dilation: usize,
    /// Groups.
    pub groups: usize,
    /// Fused activation.
    pub act: Act,
}

/// The operations our DeepLabv3+ is made of. The model walks itself once through a writer;
/// the f32 and int8 writers turn the same walk into their graphs, so they cannot disagree on
/// the network's structure.
pub trait Writer {
    /// A value in the graph.
    type V: Clone;
    /// The network input (`[1, 3, H, W]`, normalised f32).
    fn input(&mut self) -> Self::V;
    /// Convolution (+ folded batch norm) + activation.
    fn conv(&mut self, c: &Folded, x: &Self::V) -> Self::V;
    /// Residual sum, optionally followed by ReLU.
    fn add(&mut self, a: &Self::V, b: &Self::V, relu: bool) -> Self::V;
    /// 3x3 max pooling, stride 2, padding 1.
    fn maxpool3x3s2(&mut self, x: &Self::V) -> Self::V;
    /// Global average pooling to 1x1.
    fn global_avg_pool(&mut self, x: &Self::V) -> Self::V;
    /// Bilinear resize (half-pixel) by an integer factor to `h` x `w`.
    fn upsample(&mut self, x: &Self::V, h: usize, w: usize) -> Self::V;
    /// Channel concatenation.
    fn concat(&mut self, xs: &[Self::V]) -> Self::V;
}

/// Writes the f32 graph, remembering each value's spatial size (for resize factors) and the
/// order in which values were produced (the int8 writer's calibration sites).
#[derive(Default)]
pub struct F32Writer {
    /// The graph under construction.
    pub g: Graph,
    /// Spatial size of every value, by name.
    sizes: std::collections::HashMap<String, (usize, usize)>,
    /// Names of the values produced by each writer call, in call order.
    pub sites: Vec<String>,
    input_hw: (usize, usize),
}

impl F32Writer {
    /// An f32 writer for an `h` x `w` input.
    pub fn new(h: usize, w: usize) -> Self {
        F32Writer {
            input_hw: (h, w),
            ..Default::default()
        }
    }

    fn site(&mut self, name: String, hw: (usize, usize)) -> String {
        self.sizes.insert(name.clone(), hw);
        self.sites.push(name.clone());
        name
    }

    fn hw(&self, x: &str) -> (usize, usize) {
        self.sizes[x]
    }

    /// Serialises the graph with `out` renamed `logits`.
    pub fn finish(self, out: &str, input: [usize; 4], output: [usize; 4], doc: &str) -> Vec<u8> {
        self.g.finish_renamed(out, "logits", input, output, doc)
    }
}

/// Output size of a convolution along one axis.
pub fn conv_out(size: usize, c: &Folded, k: usize) -> usize {
    (size + 2 * c.pad - c.dilation * (k - 1) - 1) / c.stride + 1
}

impl Writer for F32Writer {
    type V = String;

    fn input(&mut self) -> String {
        self.site("input".into(), self.input_hw)
    }

    fn conv(&mut self, c: &Folded, x: &String) -> String {
        let (h, w) = self.hw(x);
        let hw = (conv_out(h, c, c.dims[2]), conv_out(w, c, c.dims[3]));
        let y = self.g.conv(
            x,
            c.weight.clone(),
            c.dims,
            c.bias.clone(),
            c.stride,
            c.pad,
            c.dilation,
            c.groups,
        );
        let y = match c.act {
            Act::Relu => self.g.node("Relu", &[&y], vec![]),
            Act::Relu6 => {
                let lo = self.g.const_f32("min", &[], vec![0.0]);
                let hi = self.g.const_f32("max", &[], vec![6.0]);
                self.g.node("Clip", &[&y, &lo, &hi], vec![])
            }
            Act::None => y,
        };
        self.site(y, hw)
    }

    fn add(&mut self, a: &String, b: &String, relu: bool) -> String {
        let hw = self.hw(a);
        let mut y = self.g.node("Add", &[a, b], vec![]);
        if relu {
            y = self.g.node("Relu", &[&y], vec![]);
        }
        self.site(y, hw)
    }

    fn maxpool3x3s2(&mut self, x: &String) -> String {
        let (h, w) = self.hw(x);
        let y = self.g.node(
            "MaxPool",
            &[x],
            vec![
                ("kernel_shape", Attr::Ints(vec![3, 3])),
                ("strides", Attr::Ints(vec![2, 2])),
                ("pads", Attr::Ints(vec![1, 1, 1, 1])),
            ],
        );
        self.site(y, ((h - 1) / 2 + 1, (w - 1) / 2 + 1))
    }

    fn global_avg_pool(&mut self, x: &String) -> String {
        let y = self.g.node("GlobalAveragePool", &[x], vec![]);
        self.site(y, (1, 1))
    }

    fn upsample(&mut self, x: &String, h: usize, w: usize) -> String {
        let (xh, xw) = self.hw(x);
        let y = self
            .g
            .resize_bilinear(x, h as f32 / xh as f32, w as f32 / xw as f32);
        self.site(y, (h, w))
    }

    fn concat(&mut self, xs: &[String]) -> String {
        let hw = self.hw(&xs[0]);
        let refs: Vec<&str> = xs.iter().map(|s| s.as_str()).collect();
        let y = self.g.node("Concat", &refs, vec![("axis", Attr::Int(1))]);
        self.site(y, hw)
    }
}
