//! DeepLabv3+ in Burn, with an ONNX writer for every layer beside its `forward`.
//!
//! Each module's `export` mirrors its `forward` node for node, so the exported graph is the
//! trained graph; `export.rs` then checks that claim numerically through tract.

use std::cell::RefCell;

use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::TensorData;
use burn::tensor::activation::relu;
use burn::tensor::ops::ConvOptions;
use serde::{Deserialize, Serialize};

use crate::kernels;
use crate::onnx::{Act, F32Writer, Folded, Writer};

/// Which encoder (backbone) the model uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncoderKind {
    /// ResNet-50 (bottleneck blocks 3-4-6-3), the study's encoder.
    Resnet50,
    /// ResNet-18 (basic blocks 2-2-2-2): plain 3x3 convolutions, which train fast in Burn and
    /// run as dense int8 matrix products in tract.
    Resnet18,
    /// MobileNetV2 (inverted residuals with depthwise convolutions).
    Mobilenetv2,
}

/// Architecture hyper-parameters (the `[model]` table of a training config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Encoder family.
    pub encoder: EncoderKind,
    /// Channel width multiplier of the encoder (1.0 = the published network).
    #[serde(default = "one")]
    pub width: f32,
    /// ASPP rates; 1 means the 1x1 branch (the study: 1, 6, 12, 18).
    pub aspp_rates: Vec<usize>,
    /// Channels of every ASPP branch and of its projection (the study: 256).
    pub aspp_filters: usize,
    /// Channels of the projected low-level (stride 4) features (DeepLabv3+: 48).
    #[serde(default = "low_level_default")]
    pub low_level_filters: usize,
    /// Channels of the decoder's two 3x3 convolutions (DeepLabv3+: 256).
    pub decoder_filters: usize,
}

fn one() -> f32 {
    1.0
}
fn low_level_default() -> usize {
    48
}

impl ModelConfig {
    /// Checks values that would make an unusable network.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.width > 0.0 && self.width <= 4.0) {
            return Err(format!("[model] width = {} must be in (0, 4]", self.width));
        }
        if self.aspp_rates.is_empty() || self.aspp_rates.contains(&0) {
            return Err("[model] aspp_rates must be non-empty positive integers".into());
        }
        for (k, v) in [
            ("aspp_filters", self.aspp_filters),
            ("low_level_filters", self.low_level_filters),
            ("decoder_filters", self.decoder_filters),
        ] {
            if v == 0 || v > 4096 {
                return Err(format!("[model] {k} = {v} must be in 1..=4096"));
            }
        }
        Ok(())
    }

    /// A short architecture name for manifests, e.g. `deeplabv3plus-resnet18-w0.5-os16`.
    pub fn architecture(&self) -> String {
        let enc = match self.encoder {
            EncoderKind::Resnet50 => "resnet50",
            EncoderKind::Resnet18 => "resnet18",
            EncoderKind::Mobilenetv2 => "mobilenetv2",
        };
        let rates: Vec<String> = self.aspp_rates.iter().map(|r| r.to_string()).collect();
        format!(
            "deeplabv3plus-{enc}-w{}-os16-aspp{}x{}-dec{}",
            self.width,
            rates.join("."),
            self.aspp_filters,
            self.decoder_filters
        )
    }
}

/// Per-channel batch statistics of one convolution's output (before its batch norm), as
/// training-mode batch norm computes them, summed over the batches that went through it.
#[derive(Debug, Clone, Default)]
pub struct ChannelStats {
    /// Batches recorded.
    pub batches: usize,
    /// Sum over batches of each channel's batch mean.
    pub mean_sum: Vec<f64>,
    /// Sum over batches of each channel's biased batch variance.
    pub var_sum: Vec<f64>,
}

impl ChannelStats {
    /// Per channel, the mean of the batch means and the mean of the batch variances: what
    /// batch norm's running statistics converge to on such batches. (Not the variance over
    /// all images together, which adds the spread between batches: a batch norm calibrated
    /// on that would scale up every training batch.)
    pub fn moments(&self) -> Vec<(f64, f64)> {
        let b = self.batches.max(1) as f64;
        self.mean_sum
            .iter()
            .zip(&self.var_sum)
            .map(|(&m, &v)| (m / b, v / b))
            .collect()
    }
}

/// Layers recorded so far and the next layer's index in the current forward.
struct Recorder {
    stats: Vec<ChannelStats>,
    next: usize,
}

thread_local! {
    // Only set inside `DeepLab::conv_output_stats`: a hook in `ConvBn::forward` rather than a
    // second copy of every forward, so the recorded order is the forward's by construction.
    static RECORDER: RefCell<Option<Recorder>> = const { RefCell::new(None) };
}

fn record_conv_output(y: &Tensor<4>) {
    RECORDER.with(|r| {
        let mut r = r.borrow_mut();
        let Some(rec) = r.as_mut() else { return };
        let [n, c, h, w] = y.dims();
        let v = y
            .clone()
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("f32 data");
        if rec.next == rec.stats.len() {
            rec.stats.push(ChannelStats {
                batches: 0,
                mean_sum: vec![0.0; c],
                var_sum: vec![0.0; c],
            });
        }
        let st = &mut rec.stats[rec.next];
        assert_eq!(st.mean_sum.len(), c, "layer {} changed width", rec.next);
        let count = (n * h * w) as f64;
        for ch in 0..c {
            let planes = (0..n).map(|i| &v[(i * c + ch) * h * w..(i * c + ch + 1) * h * w]);
            let mean = planes.clone().flatten().map(|&x| x as f64).sum::<f64>() / count;
            let var = planes
                .flatten()
                .map(|&x| (x as f64 - mean).powi(2))
                .sum::<f64>()
                / count;
            st.mean_sum[ch] += mean;
            st.var_sum[ch] += var;
        }
        st.batches += 1;
        rec.next += 1;
    });
}

/// One convolution of the network, in the order the ONNX export writes them, with its batch
/// norm (none for the head, whose convolution has a bias instead).
pub(crate) struct ConvSlot<'a> {
    /// Where it sits, e.g. `encoder.blocks.3.convs.0`.
    pub name: String,
    pub conv: &'a mut Conv2d,
    pub bn: Option<&'a mut BatchNorm>,
    pub stride: usize,
    pub pad: usize,
    pub dilation: usize,
    pub groups: usize,
}

impl ConvBn {
    fn slot(&mut self, name: String) -> ConvSlot<'_> {
        ConvSlot {
            name,
            conv: &mut self.conv,
            bn: Some(&mut self.bn),
            stride: self.stride,
            pad: self.pad,
            dilation: self.dilation,
            groups: self.groups,
        }
    }
}

const ACT_NONE: u8 = 0;
const ACT_RELU: u8 = 1;
const ACT_RELU6: u8 = 2;

/// Convolution (no bias) + batch norm + optional activation: the unit every layer is built of.
#[derive(Module, Debug)]
pub struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm,
    act: u8,
    stride: usize,
    pad: usize,
    dilation: usize,
    groups: usize,
}

#[allow(clippy::too_many_arguments)]
fn conv_bn(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
    act: u8,
    device: &Device,
) -> ConvBn {
    let pad = dilation * (k - 1) / 2;
    let conv = Conv2dConfig::new([cin, cout], [k, k])
        .with_stride([stride, stride])
        .with_dilation([dilation, dilation])
        .with_groups(groups)
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
        .with_bias(false)
        .init(device);
    ConvBn {
        conv,
        bn: BatchNormConfig::new(cout).init(device),
        act,
        stride,
        pad,
        dilation,
        groups,
    }
}

fn to_vec(t: Tensor<1>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 data")
}

impl ConvBn {
    /// Zeroes the batch-norm scale, so a residual branch starts as the identity.
    fn zero_gamma(mut self) -> Self {
        let g = self.bn.gamma.val();
        self.bn.gamma = Param::from_tensor(g.zeros_like());
        self
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let (s, p, d) = (self.stride, self.pad, self.dilation);
        let [_, _, h, w] = x.dims();
        let [o, c, k, _] = self.conv.weight.dims();
        let mut weight = self.conv.weight.val();
        let mut options = ConvOptions::new([s, s], [p, p], [d, d], self.groups);
        if kernels::enabled() && k == 3 && s == 1 && p == d && d >= h && d >= w {
            // At this map size every tap but the centre reads only padding (the ASPP's rates
            // 12 and 18 on the 12x12 training map): the same convolution as a 1x1 one, and
            // the other taps' gradient is zero either way.
            weight = weight.slice([0..o, 0..c, 1..2, 1..2]);
            options = ConvOptions::new([1, 1], [0, 0], [1, 1], self.groups);
        }
        let y = kernels::conv2d(x, weight, options);
        record_conv_output(&y);
        let y = kernels::batch_norm_train_act(&self.bn, y, self.act == ACT_RELU);
        match self.act {
            ACT_RELU6 => y.clamp(0.0, 6.0),
            _ => y,
        }
    }

    /// The convolution with the batch norm folded into its weights and bias.
    fn folded(&self) -> Folded {
        let w = self.conv.weight.val();
        let dims: [usize; 4] = w.shape().dims();
        let mut weight = to_vec(w.reshape([-1]));
        let gamma = to_vec(self.bn.gamma.val());
        let beta = to_vec(self.bn.beta.val());
        let mean = to_vec(self.bn.running_mean.value());
        let var = to_vec(self.bn.running_var.value());
        let per_out = weight.len() / dims[0];
        let mut bias = vec![0.0f32; dims[0]];
        for o in 0..dims[0] {
            let s = gamma[o] / (var[o] as f64 + self.bn.epsilon).sqrt() as f32;
            weight[o * per_out..(o + 1) * per_out]
                .iter_mut()
                .for_each(|v| *v *= s);
            bias[o] = beta[o] - mean[o] * s;
        }
        Folded {
            weight,
            dims,
            bias,
            stride: self.stride,
            pad: self.pad,
            dilation: self.dilation,
            groups: self.groups,
            act: match self.act {
                ACT_RELU => Act::Relu,
                ACT_RELU6 => Act::Relu6,
                _ => Act::None,
            },
        }
    }

    fn export<W: Writer>(&self, g: &mut W, x: &W::V) -> W::V {
        g.conv(&self.folded(), x)
    }
}

/// ResNet basic block (two 3x3 convolutions) or bottleneck (1x1, 3x3, 1x1), or a MobileNetV2
/// inverted residual (1x1 expand, 3x3 depthwise, 1x1 project): a chain of [`ConvBn`] with an
/// optional shortcut, which is all three have in common.
#[derive(Module, Debug)]
pub struct Block {
    convs: Vec<ConvBn>,
    downsample: Option<ConvBn>,
    residual: bool,
    relu_after_add: bool,
}

impl Block {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut y = x.clone();
        for c in &self.convs {
            y = c.forward(y);
        }
        if !self.residual {
            return y;
        }
        let shortcut = match &self.downsample {
            Some(d) => d.forward(x),
            None => x,
        };
        let y = y + shortcut;
        if self.relu_after_add { relu(y) } else { y }
    }

    fn export<W: Writer>(&self, g: &mut W, x: &W::V) -> W::V {
        let mut y = x.clone();
        for c in &self.convs {
            y = c.export(g, &y);
        }
        if !self.residual {
            return y;
        }
        let shortcut = match &self.downsample {
            Some(d) => d.export(g, x),
            None => x.clone(),
        };
        g.add(&y, &shortcut, self.relu_after_add)
    }
}

/// Encoder at output stride 16; also yields the stride-4 low-level features.
#[derive(Module, Debug)]
pub struct Encoder {
    stem: Vec<ConvBn>,
    maxpool: Option<MaxPool2d>,
    blocks: Vec<Block>,
    /// Low-level features are the output of block `low_level_after - 1`.
    low_level_after: usize,
    /// Channels of the low-level features.
    pub low_level_channels: usize,
    /// Channels of the final features.
    pub out_channels: usize,
}

fn scaled(c: usize, width: f32) -> usize {
    // Round to a multiple of 8 (as MobileNet does), never below 8.
    (((c as f32 * width) / 8.0).round() as usize * 8).max(8)
}

fn resnet(bottleneck: bool, layers: [usize; 4], width: f32, device: &Device) -> Encoder {
    let expansion = if bottleneck { 4 } else { 1 };
    let stem_c = scaled(64, width);
    let stem = vec![conv_bn(3, stem_c, 7, 2, 1, 1, ACT_RELU, device)];
    let maxpool = MaxPool2dConfig::new([3, 3])
        .with_strides([2, 2])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init();
    let mut blocks = Vec::new();
    let mut cin = stem_c;
    let mut low_level = (0, 0);
    // (planes, stride, dilation); the last stage is dilated instead of strided: output stride 16.
    let stages = [(64, 1, 1), (128, 2, 1), (256, 2, 1), (512, 1, 2)];
    for (si, (&(planes, stride, dilation), &n)) in stages.iter().zip(&layers).enumerate() {
        let planes = scaled(planes, width);
        let cout = planes * expansion;
        for bi in 0..n {
            let s = if bi == 0 { stride } else { 1 };
            let convs = if bottleneck {
                vec![
                    conv_bn(cin, planes, 1, 1, 1, 1, ACT_RELU, device),
                    conv_bn(planes, planes, 3, s, dilation, 1, ACT_RELU, device),
                    conv_bn(planes, cout, 1, 1, 1, 1, ACT_NONE, device).zero_gamma(),
                ]
            } else {
                vec![
                    conv_bn(cin, planes, 3, s, dilation, 1, ACT_RELU, device),
                    conv_bn(planes, cout, 3, 1, dilation, 1, ACT_NONE, device).zero_gamma(),
                ]
            };
            let downsample =
                (s != 1 || cin != cout).then(|| conv_bn(cin, cout, 1, s, 1, 1, ACT_NONE, device));
            blocks.push(Block {
                convs,
                downsample,
                residual: true,
                relu_after_add: true,
            });
            cin = cout;
        }
        if si == 0 {
            low_level = (blocks.len(), cout);
        }
    }
    Encoder {
        stem,
        maxpool: Some(maxpool),
        blocks,
        low_level_after: low_level.0,
        low_level_channels: low_level.1,
        out_channels: cin,
    }
}

fn mobilenetv2(width: f32, device: &Device) -> Encoder {
    let stem_c = scaled(32, width);
    let stem = vec![conv_bn(3, stem_c, 3, 2, 1, 1, ACT_RELU6, device)];
    // (expansion t, channels c, repeats n, stride s); the last stride-2 stage is dilated.
    let settings = [
        (1, 16, 1, 1, 1),
        (6, 24, 2, 2, 1),
        (6, 32, 3, 2, 1),
        (6, 64, 4, 2, 1),
        (6, 96, 3, 1, 1),
        (6, 160, 3, 1, 2),
        (6, 320, 1, 1, 2),
    ];
    let mut blocks = Vec::new();
    let mut cin = stem_c;
    let mut low_level = (0, 0);
    for (si, &(t, c, n, s, d)) in settings.iter().enumerate() {
        let cout = scaled(c, width);
        for bi in 0..n {
            let stride = if bi == 0 { s } else { 1 };
            let hidden = cin * t;
            let mut convs = Vec::new();
            if t != 1 {
                convs.push(conv_bn(cin, hidden, 1, 1, 1, 1, ACT_RELU6, device));
            }
            convs.push(conv_bn(
                hidden, hidden, 3, stride, d, hidden, ACT_RELU6, device,
            ));
            convs.push(conv_bn(hidden, cout, 1, 1, 1, 1, ACT_NONE, device));
            blocks.push(Block {
                convs,
                downsample: None,
                residual: stride == 1 && cin == cout,
                relu_after_add: false,
            });
            cin = cout;
        }
        if si == 1 {
            low_level = (blocks.len(), cout);
        }
    }
    Encoder {
        stem,
        maxpool: None,
        blocks,
        low_level_after: low_level.0,
        low_level_channels: low_level.1,
        out_channels: cin,
    }
}

impl Encoder {
    fn new(kind: EncoderKind, width: f32, device: &Device) -> Self {
        match kind {
            EncoderKind::Resnet50 => resnet(true, [3, 4, 6, 3], width, device),
            EncoderKind::Resnet18 => resnet(false, [2, 2, 2, 2], width, device),
            EncoderKind::Mobilenetv2 => mobilenetv2(width, device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let mut y = x;
        for c in &self.stem {
            y = c.forward(y);
        }
        if let Some(p) = &self.maxpool {
            y = crate::kernels::max_pool2d(p, y);
        }
        let mut low = None;
        for (i, b) in self.blocks.iter().enumerate() {
            y = b.forward(y);
            if i + 1 == self.low_level_after {
                low = Some(y.clone());
            }
        }
        (low.expect("low-level block exists"), y)
    }

    fn export<W: Writer>(&self, g: &mut W, x: &W::V) -> (W::V, W::V) {
        let mut y = x.clone();
        for c in &self.stem {
            y = c.export(g, &y);
        }
        if self.maxpool.is_some() {
            y = g.maxpool3x3s2(&y);
        }
        let mut low = None;
        for (i, b) in self.blocks.iter().enumerate() {
            y = b.export(g, &y);
            if i + 1 == self.low_level_after {
                low = Some(y.clone());
            }
        }
        (low.expect("low-level block exists"), y)
    }
}

/// Atrous spatial pyramid pooling with an image-pooling branch.
#[derive(Module, Debug)]
pub struct Aspp {
    branches: Vec<ConvBn>,
    pooling: ConvBn,
    project: ConvBn,
}

impl Aspp {
    fn new(cin: usize, rates: &[usize], filters: usize, device: &Device) -> Self {
        let branches = rates
            .iter()
            .map(|&r| {
                if r == 1 {
                    conv_bn(cin, filters, 1, 1, 1, 1, ACT_RELU, device)
                } else {
                    conv_bn(cin, filters, 3, 1, r, 1, ACT_RELU, device)
                }
            })
            .collect();
        Aspp {
            branches,
            pooling: conv_bn(cin, filters, 1, 1, 1, 1, ACT_RELU, device),
            project: conv_bn(
                filters * (rates.len() + 1),
                filters,
                1,
                1,
                1,
                1,
                ACT_RELU,
                device,
            ),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [n, _, h, w] = x.dims();
        let mut outs: Vec<Tensor<4>> = self.branches.iter().map(|b| b.forward(x.clone())).collect();
        let pooled = self.pooling.forward(x.mean_dim(2).mean_dim(3));
        let c = pooled.dims()[1];
        outs.push(pooled.expand([n, c, h, w]));
        self.project.forward(Tensor::cat(outs, 1))
    }

    fn export<W: Writer>(&self, g: &mut W, x: &W::V, h: usize, w: usize) -> W::V {
        let mut outs: Vec<W::V> = self.branches.iter().map(|b| b.export(g, x)).collect();
        let gap = g.global_avg_pool(x);
        let pooled = self.pooling.export(g, &gap);
        // Broadcast back with a Resize from 1x1: tract cannot optimise Expand/Tile here.
        outs.push(g.upsample(&pooled, h, w));
        let cat = g.concat(&outs);
        self.project.export(g, &cat)
    }
}

/// Bilinear interpolation matrix (out x in) with half-pixel centres and edge clamping, the
/// semantics of ONNX Resize `half_pixel` and PyTorch `align_corners=False`.
pub fn interp_matrix(out: usize, inp: usize) -> Vec<f32> {
    let mut m = vec![0.0f32; out * inp];
    let scale = inp as f64 / out as f64;
    for o in 0..out {
        let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(inp - 1);
        let i1 = (i0 + 1).min(inp - 1);
        let f = (src - i0 as f64) as f32;
        m[o * inp + i0] += 1.0 - f;
        m[o * inp + i1] += f;
    }
    m
}

/// Bilinear resize written as two matrix products. Every Burn backend differentiates matmul, so
/// this trains on backends without a bilinear backward (burn-ndarray) as well as on flex/cuda.
pub fn resize_bilinear(x: Tensor<4>, out_h: usize, out_w: usize) -> Tensor<4> {
    let [n, c, h, w] = x.dims();
    let device = x.device();
    let mw = Tensor::<2>::from_data(
        TensorData::new(interp_matrix(out_w, w), [out_w, w]),
        &device,
    );
    let mh = Tensor::<2>::from_data(
        TensorData::new(interp_matrix(out_h, h), [out_h, h]),
        &device,
    );
    let y = x.reshape([n * c * h, w]).matmul(mw.transpose());
    let y = y.reshape([n, c, h, out_w]).swap_dims(2, 3);
    let y = y.reshape([n * c * out_w, h]).matmul(mh.transpose());
    y.reshape([n, c, out_w, out_h]).swap_dims(2, 3)
}

/// DeepLabv3+: encoder, ASPP, decoder with low-level skip, one output logit per pixel.
#[derive(Module, Debug)]
pub struct DeepLab {
    encoder: Encoder,
    aspp: Aspp,
    low_project: ConvBn,
    decoder: Vec<ConvBn>,
    head: Conv2d,
}

impl DeepLab {
    /// Builds a freshly initialised network.
    pub fn new(cfg: &ModelConfig, device: &Device) -> Self {
        let encoder = Encoder::new(cfg.encoder, cfg.width, device);
        let aspp = Aspp::new(
            encoder.out_channels,
            &cfg.aspp_rates,
            cfg.aspp_filters,
            device,
        );
        let low_project = conv_bn(
            encoder.low_level_channels,
            cfg.low_level_filters,
            1,
            1,
            1,
            1,
            ACT_RELU,
            device,
        );
        let decoder = vec![
            conv_bn(
                cfg.aspp_filters + cfg.low_level_filters,
                cfg.decoder_filters,
                3,
                1,
                1,
                1,
                ACT_RELU,
                device,
            ),
            conv_bn(
                cfg.decoder_filters,
                cfg.decoder_filters,
                3,
                1,
                1,
                1,
                ACT_RELU,
                device,
            ),
        ];
        let head = Conv2dConfig::new([cfg.decoder_filters, 1], [1, 1]).init(device);
        DeepLab {
            encoder,
            aspp,
            low_project,
            decoder,
            head,
        }
    }

    /// Input `[N, 3, H, W]` (H, W multiples of 16) to logits `[N, 1, H, W]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [_, _, h, w] = x.dims();
        let (low, high) = self.encoder.forward(x);
        let high = self.aspp.forward(high);
        let low = self.low_project.forward(low);
        let [_, _, lh, lw] = low.dims();
        let mut y = Tensor::cat(vec![resize_bilinear(high, lh, lw), low], 1);
        for c in &self.decoder {
            y = c.forward(y);
        }
        resize_bilinear(self.head.forward(y), h, w)
    }

    /// Walks the network in forward order, writing it through `g` for a static `[1, 3, h, w]`
    /// input; returns the logits value.
    pub fn export<W: Writer>(&self, g: &mut W, h: usize, w: usize) -> W::V {
        let x = g.input();
        let (low, high) = self.encoder.export(g, &x);
        let high = self.aspp.export(g, &high, h / 16, w / 16);
        let low = self.low_project.export(g, &low);
        let up = g.upsample(&high, h / 4, w / 4);
        let mut y = g.concat(&[up, low]);
        for c in &self.decoder {
            y = c.export(g, &y);
        }
        let wt = self.head.weight.val();
        let dims: [usize; 4] = wt.shape().dims();
        let head = Folded {
            weight: to_vec(wt.reshape([-1])),
            dims,
            bias: self
                .head
                .bias
                .as_ref()
                .map(|b| to_vec(b.val()))
                .unwrap_or_else(|| vec![0.0; dims[0]]),
            stride: 1,
            pad: 0,
            dilation: 1,
            groups: 1,
            act: Act::None,
        };
        let logits = g.conv(&head, &y);
        g.upsample(&logits, h, w)
    }

    /// Every convolution in export (and forward) order: the encoder's stem and blocks (each
    /// block's chain, then its shortcut), the ASPP branches, pooling branch and projection,
    /// the low-level projection, the decoder, the head.
    pub(crate) fn conv_slots(&mut self) -> Vec<ConvSlot<'_>> {
        let mut out = Vec::new();
        for (i, c) in self.encoder.stem.iter_mut().enumerate() {
            out.push(c.slot(format!("encoder.stem.{i}")));
        }
        for (b, block) in self.encoder.blocks.iter_mut().enumerate() {
            for (i, c) in block.convs.iter_mut().enumerate() {
                out.push(c.slot(format!("encoder.blocks.{b}.convs.{i}")));
            }
            if let Some(d) = &mut block.downsample {
                out.push(d.slot(format!("encoder.blocks.{b}.downsample")));
            }
        }
        for (i, c) in self.aspp.branches.iter_mut().enumerate() {
            out.push(c.slot(format!("aspp.branches.{i}")));
        }
        out.push(self.aspp.pooling.slot("aspp.pooling".into()));
        out.push(self.aspp.project.slot("aspp.project".into()));
        out.push(self.low_project.slot("low_project".into()));
        for (i, c) in self.decoder.iter_mut().enumerate() {
            out.push(c.slot(format!("decoder.{i}")));
        }
        out.push(ConvSlot {
            name: "head".into(),
            conv: &mut self.head,
            bn: None,
            stride: 1,
            pad: 0,
            dilation: 1,
            groups: 1,
        });
        out
    }

    /// Runs `batches` through the network and returns, for every convolution followed by a
    /// batch norm (in [`Self::conv_slots`] order), the batch statistics of its output before
    /// the batch norm. Call it on an inference model (`valid()`), whose batch norms use their
    /// running statistics, so that each layer sees what the trained network computes.
    pub fn conv_output_stats(
        &self,
        batches: impl IntoIterator<Item = Tensor<4>>,
    ) -> Vec<ChannelStats> {
        RECORDER.with(|r| {
            *r.borrow_mut() = Some(Recorder {
                stats: Vec::new(),
                next: 0,
            })
        });
        for x in batches {
            RECORDER.with(|r| r.borrow_mut().as_mut().expect("recording").next = 0);
            let _ = self.forward(x);
        }
        RECORDER.with(|r| r.borrow_mut().take().expect("recording").stats)
    }

    /// Writes the network as an f32 ONNX model for a static `[1, 3, h, w]` input.
    pub fn export_onnx(&self, h: usize, w: usize, doc: &str) -> Vec<u8> {
        let mut g = F32Writer::new(h, w);
        let out = self.export(&mut g, h, w);
        g.finish(&out, [1, 3, h, w], [1, 1, h, w], doc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interp_rows_sum_to_one_and_hit_centres() {
        let m = interp_matrix(8, 2);
        for r in m.chunks(2) {
            assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        // output pixel 0 maps to source (0.5 / 4) - 0.5 = -0.375 -> clamped to pixel 0
        assert_eq!(&m[0..2], &[1.0, 0.0]);
        // output pixel 2 maps to source 2.5 / 4 - 0.5 = 0.125
        assert!((m[4] - 0.875).abs() < 1e-6 && (m[5] - 0.125).abs() < 1e-6);
    }

    #[test]
    fn matmul_resize_matches_burn_bilinear() {
        use burn::tensor::Distribution;
        use burn::tensor::module::interpolate;
        use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
        let device = Device::flex();
        let x = Tensor::<4>::random([2, 3, 5, 4], Distribution::Default, &device);
        let ours = resize_bilinear(x.clone(), 20, 16);
        let theirs = interpolate(
            x,
            InterpolateOptions::new(InterpolateMode::Bilinear)
                .with_align_corners(false)
                .with_output_size([20, 16]),
        );
        let diff = (ours - theirs).abs().max().into_scalar::<f32>();
        assert!(diff < 5e-7, "max diff {diff}");
    }
}
