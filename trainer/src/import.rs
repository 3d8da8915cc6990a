//! Starting a run from an exported f32 ONNX model (`train --init model-f32.onnx`).
//!
//! The export folds every batch norm into its convolution ([`crate::onnx::Folded`]):
//! `W' = W g / sigma`, `b' = beta - mu g / sigma`. That product cannot be split again, but any
//! batch norm that computes `W'x + b'` gives the same network, so the import keeps `W'` as the
//! convolution's weights and measures the batch norm's statistics instead: per output channel
//! the mean `m` and the biased variance `v` of `W'x` in batches of calibration images (the
//! mean over the batches of each batch's own statistics, as running statistics average
//! them), then `running_mean = m`, `running_var = v`, `gamma = sqrt(v + eps)`,
//! `beta = b' + m`.
//!
//! - Inference: `gamma (y - m) / sqrt(v + eps) + beta = y + b'`, exactly the exported network
//!   for any `m` and `v`.
//! - Training: a batch whose statistics are `m` and `v` gives the same `y + b'`.
//!
//! (`gamma = s`, `running_var = s^2 - eps` would make inference exact too, but training-mode
//! batch norm divides by `sqrt(s^2 + eps)`, not `s`, and a dead channel needs a clamp.)
//!
//! Passes: before the first, each batch norm is the identity plus `b'` (`gamma` 1,
//! `beta = b'`, mean 0, variance `1 - eps`), and the first pass runs in inference, so every
//! layer sees what the exported network computes. In training mode, though, a layer sees
//! its predecessors normalised by their batches' statistics, not by `m` and `v`, so a model
//! on an autodiff device then runs training-mode passes over the same batches, setting every
//! layer from what it saw, until no statistic moves by more than 1e-3 standard deviations
//! (each pass settles at least one more layer; the shipped model takes 12 to 14). That fixed point
//! is what a trained network's running statistics are, so the training-mode network is the
//! one the export started from, up to the noise of the running statistics it was exported
//! with. Training still moves the running statistics away from the calibrated ones.

use std::path::{Path, PathBuf};

use burn::module::{Module, Param, RunningState};
use burn::nn::BatchNorm;
use burn::prelude::*;
use burn::tensor::TensorData;
use image::RgbImage;
use polypwatch_model::preprocess::Recipe;
use prost::Message;
use tract_onnx::pb::{ModelProto, NodeProto, TensorProto, tensor_proto::DataType};

use crate::model::{ChannelStats, DeepLab};

/// Why an ONNX file cannot initialise the network. Each message is one line naming the file,
/// the tensor or layer and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file cannot be read.
    #[error("cannot read {}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The file is not an ONNX model (truncated, corrupt or another format).
    #[error(
        "{} is not a complete ONNX model ({detail}): it is truncated or corrupt; copy it again or re-export it with `polypwatch-train export`",
        path.display()
    )]
    Decode {
        /// The file.
        path: PathBuf,
        /// What the decoder said.
        detail: String,
    },
    /// The file is the int8 variant, whose weights are quantised.
    #[error(
        "{} is an int8 model (node {node} is {op}): give the f32 export instead (the -f32.onnx beside it)",
        path.display()
    )]
    Int8 {
        /// The file.
        path: PathBuf,
        /// The first quantised node's name.
        node: String,
        /// Its operator.
        op: String,
    },
    /// A convolution's weights, bias, stride, padding, dilation or groups differ from the
    /// layer this configuration builds in its place.
    #[error(
        "{}: tensor {} of Conv {} has {} {:?}, but [model] of this config needs {:?} for {}: the ONNX was exported from another architecture; train with the config it was exported with (for the shipped model, models/polypwatch-edge-train-config.toml)",
        .0.path.display(), .0.tensor, .0.index, .0.what, .0.got, .0.expected, .0.layer
    )]
    Architecture(Box<Mismatch>),
    /// The file has a different number of convolutions.
    #[error(
        "{} has {got} convolutions but [model] of this config builds {expected} (the first {matched} match): the ONNX was exported from another architecture; train with the config it was exported with (for the shipped model, models/polypwatch-edge-train-config.toml)",
        path.display()
    )]
    Count {
        /// The file.
        path: PathBuf,
        /// Convolutions in the file.
        got: usize,
        /// Convolutions of the configured network.
        expected: usize,
        /// How many matched in order before one side ran out.
        matched: usize,
    },
    /// A convolution's weights or bias are not among the initializers.
    #[error(
        "{}: tensor {tensor} (input {input} of Conv node {node}) is not an initializer: only files written by `polypwatch-train export` (f32) can initialise training; re-export the model",
        path.display()
    )]
    Missing {
        /// The file.
        path: PathBuf,
        /// The missing tensor's name.
        tensor: String,
        /// Which input of the node.
        input: usize,
        /// The node.
        node: String,
    },
    /// A tensor is not f32, or its data does not fill its shape.
    #[error(
        "{}: tensor {tensor} {problem}: only f32 files written by `polypwatch-train export` can initialise training; re-export the model",
        path.display()
    )]
    Data {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// What is wrong with it.
        problem: String,
    },
    /// No calibration images were given.
    #[error(
        "no images to calibrate the batch norms of {} with: the config's training sources are empty",
        path.display()
    )]
    NoImages {
        /// The file.
        path: PathBuf,
    },
}

/// Where one of the file's convolutions and the configured layer disagree.
#[derive(Debug)]
pub struct Mismatch {
    /// The file.
    pub path: PathBuf,
    /// The initializer (the weights, or the bias for a bias of the wrong length).
    pub tensor: String,
    /// The convolution's position among the file's convolutions.
    pub index: usize,
    /// The Burn layer it maps onto, e.g. `decoder.0`.
    pub layer: String,
    /// `shape`, `strides`, `dilations`, `pads` or `group`.
    pub what: &'static str,
    /// The file's value.
    pub got: Vec<i64>,
    /// The layer's value.
    pub expected: Vec<i64>,
}

/// One convolution as the ONNX file holds it: folded weights and bias, and its geometry.
#[derive(Debug, Clone)]
pub struct OnnxConv {
    /// The node's name.
    pub node: String,
    /// The weight initializer's name.
    pub tensor: String,
    /// The bias initializer's name (empty when the node has no bias).
    pub bias_tensor: String,
    /// Weights, row-major.
    pub weight: Vec<f32>,
    /// Weight shape as stored.
    pub dims: Vec<i64>,
    /// Bias per output channel (zeros when the node has none).
    pub bias: Vec<f32>,
    /// `strides` (default 1, 1).
    pub strides: Vec<i64>,
    /// `pads` (default 0, 0, 0, 0).
    pub pads: Vec<i64>,
    /// `dilations` (default 1, 1).
    pub dilations: Vec<i64>,
    /// `group` (default 1).
    pub group: i64,
}

/// Operators only the int8 variant has.
const QUANTISED_OPS: [&str; 5] = [
    "QLinearConv",
    "QuantizeLinear",
    "DequantizeLinear",
    "ConvInteger",
    "QLinearMatMul",
];

fn f32_data(path: &Path, t: &TensorProto) -> Result<Vec<f32>, ImportError> {
    let bad = |problem: String| ImportError::Data {
        path: path.to_path_buf(),
        tensor: t.name.clone(),
        problem,
    };
    if t.data_type != DataType::Float as i32 {
        let ty = DataType::try_from(t.data_type)
            .map(|d| d.as_str_name().to_string())
            .unwrap_or_else(|_| t.data_type.to_string());
        return Err(bad(format!("is {ty}, not FLOAT")));
    }
    if t.data_location == Some(1) {
        return Err(bad("keeps its data in an external file".into()));
    }
    let len = t
        .dims
        .iter()
        .try_fold(1usize, |a, &d| usize::try_from(d).ok().map(|d| a * d))
        .ok_or_else(|| bad(format!("has a negative dimension in {:?}", t.dims)))?;
    let v: Vec<f32> = if t.raw_data.is_empty() {
        t.float_data.clone()
    } else {
        t.raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    let bytes = if t.raw_data.is_empty() {
        4 * t.float_data.len()
    } else {
        t.raw_data.len()
    };
    if v.len() != len || bytes != 4 * len {
        return Err(bad(format!(
            "has {bytes} bytes of data for shape {:?} ({} expected)",
            t.dims,
            4 * len
        )));
    }
    Ok(v)
}

fn ints(node: &NodeProto, name: &str, default: Vec<i64>) -> Vec<i64> {
    node.attribute
        .iter()
        .find(|a| a.name == name)
        .map(|a| {
            if a.ints.is_empty() {
                vec![a.i]
            } else {
                a.ints.clone()
            }
        })
        .unwrap_or(default)
}

/// Reads every `Conv` node of an f32 ONNX file, in graph order, with its initializers.
pub fn read_convs(path: &Path) -> Result<Vec<OnnxConv>, ImportError> {
    let bytes = std::fs::read(path).map_err(|error| ImportError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    let decode = |detail: String| ImportError::Decode {
        path: path.to_path_buf(),
        detail,
    };
    let model = ModelProto::decode(bytes.as_slice()).map_err(|e| decode(e.to_string()))?;
    let graph = model
        .graph
        .ok_or_else(|| decode("it has no graph".into()))?;
    if graph.node.is_empty() {
        return Err(decode("its graph has no nodes".into()));
    }
    if let Some(n) = graph
        .node
        .iter()
        .find(|n| QUANTISED_OPS.contains(&n.op_type.as_str()))
    {
        return Err(ImportError::Int8 {
            path: path.to_path_buf(),
            node: n.name.clone(),
            op: n.op_type.clone(),
        });
    }
    let inits: std::collections::HashMap<&str, &TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let mut out = Vec::new();
    for node in graph.node.iter().filter(|n| n.op_type == "Conv") {
        let init = |input: usize| -> Result<Option<&TensorProto>, ImportError> {
            match node.input.get(input).map(String::as_str) {
                None | Some("") if input == 2 => Ok(None),
                name => {
                    let name = name.unwrap_or("");
                    inits
                        .get(name)
                        .copied()
                        .map(Some)
                        .ok_or_else(|| ImportError::Missing {
                            path: path.to_path_buf(),
                            tensor: name.to_string(),
                            input,
                            node: node.name.clone(),
                        })
                }
            }
        };
        let w = init(1)?.expect("weights are input 1");
        let weight = f32_data(path, w)?;
        let (bias_tensor, bias) = match init(2)? {
            Some(b) => (b.name.clone(), f32_data(path, b)?),
            None => (String::new(), Vec::new()),
        };
        out.push(OnnxConv {
            node: node.name.clone(),
            tensor: w.name.clone(),
            bias_tensor,
            weight,
            dims: w.dims.clone(),
            bias,
            strides: ints(node, "strides", vec![1, 1]),
            pads: ints(node, "pads", vec![0, 0, 0, 0]),
            dilations: ints(node, "dilations", vec![1, 1]),
            group: ints(node, "group", vec![1])[0],
        });
    }
    Ok(out)
}

/// What [`init_from_onnx`] did.
#[derive(Debug, Clone, Copy)]
pub struct Imported {
    /// Convolutions read.
    pub convs: usize,
    /// Batch norms calibrated.
    pub batch_norms: usize,
    /// Calibration images.
    pub images: usize,
    /// Training-mode calibration passes after the first (none for a model not on an
    /// autodiff device, which cannot run batch norm in training mode).
    pub training_passes: usize,
    /// Largest change of a statistic in the last training-mode pass, in standard deviations
    /// (infinite when there was none).
    pub last_change: f64,
}

fn vec1(v: Vec<f32>, device: &Device) -> Tensor<1> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

/// Sets a batch norm to `gamma (y - mean) / sqrt(var + eps) + beta`.
fn set_bn(bn: &mut BatchNorm, gamma: Vec<f32>, beta: Vec<f32>, mean: Vec<f32>, var: Vec<f32>) {
    let device = bn.gamma.val().device();
    bn.gamma = Param::from_tensor(vec1(gamma, &device));
    bn.beta = Param::from_tensor(vec1(beta, &device));
    bn.running_mean = RunningState::new(vec1(mean, &device));
    bn.running_var = RunningState::new(vec1(var, &device));
}

/// Reads the f32 ONNX file at `path` and checks that its convolutions are, in order, the
/// layers of `model` (shapes, strides, dilations, pads, groups), changing nothing: what
/// `train` runs before it loads any data, so a wrong file fails at once.
pub fn check_onnx(model: &mut DeepLab, path: &Path) -> Result<Vec<OnnxConv>, ImportError> {
    let convs = read_convs(path)?;
    let slots = model.conv_slots();
    // Check everything before changing anything.
    for (i, (slot, c)) in slots.iter().zip(&convs).enumerate() {
        let mismatch = |tensor: &str, what: &'static str, got: Vec<i64>, expected: Vec<i64>| {
            ImportError::Architecture(Box::new(Mismatch {
                path: path.to_path_buf(),
                tensor: tensor.to_string(),
                index: i,
                layer: slot.name.clone(),
                what,
                got,
                expected,
            }))
        };
        let expected: Vec<i64> = slot.conv.weight.dims().iter().map(|&d| d as i64).collect();
        if c.dims != expected {
            return Err(mismatch(&c.tensor, "shape", c.dims.clone(), expected));
        }
        if !c.bias.is_empty() && c.bias.len() as i64 != expected[0] {
            return Err(mismatch(
                &c.bias_tensor,
                "shape",
                vec![c.bias.len() as i64],
                vec![expected[0]],
            ));
        }
        let (s, p, d) = (slot.stride as i64, slot.pad as i64, slot.dilation as i64);
        for (what, got, exp) in [
            // Dilations before pads: the pads follow from them.
            ("strides", &c.strides, vec![s, s]),
            ("dilations", &c.dilations, vec![d, d]),
            ("pads", &c.pads, vec![p, p, p, p]),
            ("group", &vec![c.group], vec![slot.groups as i64]),
        ] {
            if *got != exp {
                return Err(mismatch(&c.tensor, what, got.clone(), exp));
            }
        }
    }
    if slots.len() != convs.len() {
        return Err(ImportError::Count {
            path: path.to_path_buf(),
            got: convs.len(),
            expected: slots.len(),
            matched: slots.len().min(convs.len()),
        });
    }
    Ok(convs)
}

/// Loads the folded weights of the f32 ONNX file at `path` into `model` (built from the
/// configuration the file was exported with) and calibrates its batch norms on `images`
/// in batches of `batch` (the training batch size; same-sized images, normalised with
/// `recipe`'s statistics), so that the model in inference computes the file's function.
/// See the module documentation.
pub fn init_from_onnx(
    model: &mut DeepLab,
    path: &Path,
    images: &[RgbImage],
    batch: usize,
    recipe: &Recipe,
) -> Result<Imported, ImportError> {
    let convs = check_onnx(model, path)?;
    let mut slots = model.conv_slots();
    if images.is_empty() {
        return Err(ImportError::NoImages {
            path: path.to_path_buf(),
        });
    }
    let n_convs = convs.len();
    let device = slots[0].conv.weight.val().device();
    let mut biases = Vec::new();
    for (slot, c) in slots.iter_mut().zip(convs) {
        let device = slot.conv.weight.val().device();
        let dims: [usize; 4] = slot.conv.weight.dims();
        let bias = if c.bias.is_empty() {
            vec![0.0; dims[0]]
        } else {
            c.bias
        };
        slot.conv.weight =
            Param::from_tensor(Tensor::from_data(TensorData::new(c.weight, dims), &device));
        match slot.bn.as_deref_mut() {
            Some(bn) => {
                // Identity plus b' for the calibration pass (see the module documentation).
                let n = bias.len();
                let eps = bn.epsilon as f32;
                set_bn(
                    bn,
                    vec![1.0; n],
                    bias.clone(),
                    vec![0.0; n],
                    vec![1.0 - eps; n],
                );
                biases.push(bias);
            }
            None => {
                // The head: a plain convolution with a bias.
                slot.conv.bias = Some(Param::from_tensor(vec1(bias, &device)));
            }
        }
    }
    drop(slots);

    let to_batches = |device: &Device| -> Vec<Tensor<4>> {
        images
            .chunks(batch.max(1))
            .map(|chunk| {
                let (w, h) = chunk[0].dimensions();
                let r = Recipe {
                    width: w,
                    height: h,
                    ..recipe.clone()
                };
                let plane = 3 * (w * h) as usize;
                let mut x = vec![0f32; chunk.len() * plane];
                for (img, dst) in chunk.iter().zip(x.chunks_mut(plane)) {
                    r.normalize_into(img, dst);
                }
                Tensor::<4>::from_data(
                    TensorData::new(x, [chunk.len(), 3, h as usize, w as usize]),
                    device,
                )
            })
            .collect()
    };
    // First pass in inference: each layer sees what the exported network computes.
    let inner = device.clone().inner();
    let stats = model
        .valid()
        .to_device(&inner)
        .conv_output_stats(to_batches(&inner));
    let batch_norms = stats.len();
    set_statistics(model, &stats, &biases);
    let (mut stats, mut last_change) = (stats, f64::INFINITY);
    // Then in training mode, until the statistics are those training-mode batch norm itself
    // produces on these batches (a fixed point, as trained running statistics are): each
    // pass settles at least one more layer (the shipped model: 12 to 14 passes). Inference
    // is exact whatever the statistics; this decides how training mode starts.
    let mut passes = 0;
    if device.is_autodiff() {
        let batches = to_batches(&device);
        while last_change > CALIBRATION_TOLERANCE && passes < batch_norms {
            // The pass also moves the running statistics (momentum); set_statistics
            // overwrites them.
            let next = model.conv_output_stats(batches.iter().cloned());
            set_statistics(model, &next, &biases);
            last_change = change(&stats, &next);
            stats = next;
            passes += 1;
        }
    }
    Ok(Imported {
        convs: n_convs,
        batch_norms,
        images: images.len(),
        training_passes: passes,
        last_change,
    })
}

/// Largest change of a calibrated statistic (relative to the channel's standard deviation)
/// that ends the training-mode passes.
const CALIBRATION_TOLERANCE: f64 = 1e-3;

/// Sets every batch norm from its layer's statistics (see the module documentation).
fn set_statistics(model: &mut DeepLab, stats: &[ChannelStats], biases: &[Vec<f32>]) {
    let mut slots = model.conv_slots();
    let bns: Vec<&mut BatchNorm> = slots
        .iter_mut()
        .filter_map(|s| s.bn.as_deref_mut())
        .collect();
    assert_eq!(bns.len(), stats.len(), "one recorded layer per batch norm");
    for ((bn, st), bias) in bns.into_iter().zip(stats).zip(biases) {
        let eps = bn.epsilon;
        let (mut gamma, mut beta, mut mean, mut var) = (vec![], vec![], vec![], vec![]);
        for ((m, v), b) in st.moments().into_iter().zip(bias) {
            gamma.push((v + eps).sqrt() as f32);
            beta.push(b + m as f32);
            mean.push(m as f32);
            var.push(v as f32);
        }
        set_bn(bn, gamma, beta, mean, var);
    }
}

/// Largest change between two calibrations of a channel's mean or standard deviation, in
/// standard deviations.
fn change(old: &[ChannelStats], new: &[ChannelStats]) -> f64 {
    let mut most = 0f64;
    for (o, n) in old.iter().zip(new) {
        for ((mo, vo), (mn, vn)) in o.moments().into_iter().zip(n.moments()) {
            let (so, sn) = (vo.sqrt(), vn.sqrt().max(1e-6));
            most = most.max((mn - mo).abs() / sn).max((sn - so).abs() / sn);
        }
    }
    most
}
