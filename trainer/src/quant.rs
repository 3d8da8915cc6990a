//! The int8 variant: static calibration through tract, then a graph of `QLinearConv` with
//! per-tensor int8 weights and u8 activations, the one int8 form tract runs on real int8
//! kernels. Everything that is not a convolution (residual sums, resizes, concatenations, the
//! image pooling) runs in f32 between DequantizeLinear and QuantizeLinear, since tract loads
//! neither `QLinearAdd` nor `QLinearConcat`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Result, bail};
use tract_onnx::prelude::*;

use crate::onnx::{Act, Attr, F32Writer, Folded, Graph, Writer, conv_out};

/// Per-site activation range measured on calibration images: (mean of per-image minima, mean
/// of per-image maxima). Averaging the extremes over images keeps a single outlier frame from
/// stretching the scale of a whole layer.
pub type Range = (f32, f32);

/// Runs the f32 model on calibration inputs and measures every writer site's range.
pub fn calibrate(
    onnx: &Path,
    sites: &[String],
    inputs: &[Vec<f32>],
    h: usize,
    w: usize,
) -> Result<Vec<Range>> {
    if inputs.is_empty() {
        bail!("calibration needs at least one image");
    }
    let mut model = tract_onnx::onnx()
        .model_for_path(onnx)
        .map_err(|e| anyhow::anyhow!("{e:#}"))?;
    // tract's ONNX import keeps the names of most values; a Resize output is rebuilt under
    // another name. Sites it cannot find stay unmeasured (NaN): the int8 writer only needs the
    // range of a Resize's input, which bounds its output.
    let found: Vec<usize> = (1..sites.len())
        .filter(|&i| {
            model.find_outlet_label(&sites[i]).is_some() || model.node_by_name(&sites[i]).is_ok()
        })
        .collect();
    let outputs: Vec<&str> = found.iter().map(|&i| sites[i].as_str()).collect();
    model
        .select_outputs_by_name(outputs.iter())
        .map_err(|e| anyhow::anyhow!("selecting calibration outputs: {e:#}"))?;
    let plan = model
        .into_optimized()
        .and_then(|m| m.into_runnable())
        .map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let mut sums = vec![(0f64, 0f64); sites.len()];
    for x in inputs {
        let (lo, hi) = x
            .iter()
            .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
        sums[0].0 += lo as f64;
        sums[0].1 += hi as f64;
        let t = Tensor::from_shape(&[1, 3, h, w], x)?;
        let outs = plan
            .run(tvec!(t.into()))
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;
        for (&site, o) in found.iter().zip(outs.iter()) {
            let v = o.to_plain_array_view::<f32>()?;
            let (lo, hi) = v
                .iter()
                .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
            sums[site].0 += lo as f64;
            sums[site].1 += hi as f64;
        }
    }
    let n = inputs.len() as f64;
    let mut ranges: Vec<Range> = vec![(f32::NAN, f32::NAN); sites.len()];
    ranges[0] = ((sums[0].0 / n) as f32, (sums[0].1 / n) as f32);
    for &i in &found {
        ranges[i] = ((sums[i].0 / n) as f32, (sums[i].1 / n) as f32);
    }
    Ok(ranges)
}

/// Affine u8 quantisation parameters covering `range` (which is widened to include 0, so that
/// zero, the padding value, is exact).
fn qparams((lo, hi): Range) -> (f32, u8) {
    let (lo, hi) = (lo.min(0.0), hi.max(0.0));
    let scale = ((hi - lo) / 255.0).max(1e-8);
    let zp = (-lo / scale).round().clamp(0.0, 255.0) as u8;
    (scale, zp)
}

/// A value of the int8 graph: quantised u8 or plain f32, with its spatial size and range.
#[derive(Clone, Debug)]
pub struct QV {
    name: String,
    /// `Some((scale, zero point))` for a u8 tensor, `None` for f32.
    q: Option<(f32, u8)>,
    range: Range,
    hw: (usize, usize),
}

/// Writes the int8 graph from the calibrated ranges of the f32 writer's sites.
pub struct Int8Writer<'a> {
    /// The graph under construction.
    pub g: Graph,
    ranges: &'a [Range],
    site: usize,
    input_hw: (usize, usize),
    cache: HashMap<String, QV>,
}

impl<'a> Int8Writer<'a> {
    /// An int8 writer for an `h` x `w` input with one range per f32-writer site.
    pub fn new(h: usize, w: usize, ranges: &'a [Range]) -> Self {
        Int8Writer {
            g: Graph::default(),
            ranges,
            site: 0,
            input_hw: (h, w),
            cache: HashMap::new(),
        }
    }

    fn next_range(&mut self) -> Range {
        let r = self.ranges[self.site];
        assert!(!r.0.is_nan(), "site {} was not calibrated", self.site);
        self.site += 1;
        r
    }

    fn scalar_f32(&mut self, v: f32) -> String {
        self.g.const_f32("scale", &[], vec![v])
    }

    fn float(&mut self, v: &QV) -> QV {
        let Some((scale, zp)) = v.q else {
            return v.clone();
        };
        let key = format!("f:{}", v.name);
        if let Some(c) = self.cache.get(&key) {
            return c.clone();
        }
        let s = self.scalar_f32(scale);
        let z = self.g.const_u8("zp", &[], vec![zp]);
        let name = self.g.node("DequantizeLinear", &[&v.name, &s, &z], vec![]);
        let out = QV {
            name,
            q: None,
            ..v.clone()
        };
        self.cache.insert(key, out.clone());
        out
    }

    fn quant(&mut self, v: &QV) -> QV {
        if v.q.is_some() {
            return v.clone();
        }
        let key = format!("q:{}", v.name);
        if let Some(c) = self.cache.get(&key) {
            return c.clone();
        }
        let (scale, zp) = qparams(v.range);
        let s = self.scalar_f32(scale);
        let z = self.g.const_u8("zp", &[], vec![zp]);
        let name = self.g.node("QuantizeLinear", &[&v.name, &s, &z], vec![]);
        let out = QV {
            name,
            q: Some((scale, zp)),
            ..v.clone()
        };
        self.cache.insert(key, out.clone());
        out
    }

    fn float_value(&self, name: String, range: Range, hw: (usize, usize)) -> QV {
        QV {
            name,
            q: None,
            range,
            hw,
        }
    }

    /// Serialises the graph with `out` (made f32) renamed `logits`.
    pub fn finish(mut self, out: &QV, input: [usize; 4], output: [usize; 4], doc: &str) -> Vec<u8> {
        let out = self.float(out);
        self.g
            .finish_renamed(&out.name, "logits", input, output, doc)
    }
}

impl Writer for Int8Writer<'_> {
    type V = QV;

    fn input(&mut self) -> QV {
        let r = self.next_range();
        self.float_value("input".into(), r, self.input_hw)
    }

    fn conv(&mut self, c: &Folded, x: &QV) -> QV {
        let range = self.next_range();
        let x = self.quant(x);
        let (xs, xzp) = x.q.expect("quantised");
        // Per-tensor symmetric int8 weights: tract fuses requantisation only for those.
        let wmax = c.weight.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        let ws = wmax / 127.0;
        let wq: Vec<i8> = c
            .weight
            .iter()
            .map(|v| (v / ws).round().clamp(-127.0, 127.0) as i8)
            .collect();
        let bias: Vec<i32> = c
            .bias
            .iter()
            .map(|b| (b / (xs * ws)).round() as i32)
            .collect();
        let range = match c.act {
            Act::Relu => (0.0, range.1),
            Act::Relu6 => (0.0, range.1.min(6.0)),
            Act::None => range,
        };
        let (ys, yzp) = qparams(range);
        let xs_n = self.scalar_f32(xs);
        let xzp_n = self.g.const_u8("zp", &[], vec![xzp]);
        let w_n = self.g.const_i8("wq", &c.dims, wq);
        let ws_n = self.scalar_f32(ws);
        let wzp_n = self.g.const_i8("wzp", &[], vec![0]);
        let ys_n = self.scalar_f32(ys);
        let yzp_n = self.g.const_u8("zp", &[], vec![yzp]);
        let b_n = self.g.const_i32("bq", &[c.dims[0]], bias);
        let p = c.pad as i64;
        let name = self.g.node(
            "QLinearConv",
            &[
                &x.name, &xs_n, &xzp_n, &w_n, &ws_n, &wzp_n, &ys_n, &yzp_n, &b_n,
            ],
            vec![
                (
                    "kernel_shape",
                    Attr::Ints(vec![c.dims[2] as i64, c.dims[3] as i64]),
                ),
                ("strides", Attr::Ints(vec![c.stride as i64; 2])),
                ("pads", Attr::Ints(vec![p, p, p, p])),
                ("dilations", Attr::Ints(vec![c.dilation as i64; 2])),
                ("group", Attr::Int(c.groups as i64)),
            ],
        );
        // The u8 output saturates at 0 (zero point 0 for ReLU ranges) and at the range's top,
        // which is the activation itself.
        QV {
            name,
            q: Some((ys, yzp)),
            range,
            hw: (
                conv_out(x.hw.0, c, c.dims[2]),
                conv_out(x.hw.1, c, c.dims[3]),
            ),
        }
    }

    fn add(&mut self, a: &QV, b: &QV, relu: bool) -> QV {
        let range = self.next_range();
        let (fa, fb) = (self.float(a), self.float(b));
        let mut y = self.g.node("Add", &[&fa.name, &fb.name], vec![]);
        if relu {
            y = self.g.node("Relu", &[&y], vec![]);
        }
        self.float_value(y, range, a.hw)
    }

    fn maxpool3x3s2(&mut self, x: &QV) -> QV {
        let range = self.next_range();
        let f = self.float(x);
        let y = self.g.node(
            "MaxPool",
            &[&f.name],
            vec![
                ("kernel_shape", Attr::Ints(vec![3, 3])),
                ("strides", Attr::Ints(vec![2, 2])),
                ("pads", Attr::Ints(vec![1, 1, 1, 1])),
            ],
        );
        self.float_value(y, range, ((x.hw.0 - 1) / 2 + 1, (x.hw.1 - 1) / 2 + 1))
    }

    fn global_avg_pool(&mut self, x: &QV) -> QV {
        let range = self.next_range();
        let f = self.float(x);
        let y = self.g.node("GlobalAveragePool", &[&f.name], vec![]);
        self.float_value(y, range, (1, 1))
    }

    fn upsample(&mut self, x: &QV, h: usize, w: usize) -> QV {
        // Bilinear weights are convex: the output stays within the input's range.
        self.site += 1;
        let range = x.range;
        let f = self.float(x);
        let y = self
            .g
            .resize_bilinear(&f.name, h as f32 / x.hw.0 as f32, w as f32 / x.hw.1 as f32);
        self.float_value(y, range, (h, w))
    }

    fn concat(&mut self, xs: &[QV]) -> QV {
        let range = self.next_range();
        let fs: Vec<QV> = xs.iter().map(|x| self.float(x)).collect();
        let refs: Vec<&str> = fs.iter().map(|f| f.name.as_str()).collect();
        let y = self.g.node("Concat", &refs, vec![("axis", Attr::Int(1))]);
        self.float_value(y, range, xs[0].hw)
    }
}

/// The f32 writer's site names for a model, used to pick calibration outputs.
pub fn sites_of(model: &crate::model::DeepLab, h: usize, w: usize) -> Vec<String> {
    let mut g = F32Writer::new(h, w);
    model.export(&mut g, h, w);
    g.sites
}

/// Writes the int8 ONNX of `model` from calibration ranges.
pub fn export_int8(
    model: &crate::model::DeepLab,
    h: usize,
    w: usize,
    ranges: &[Range],
    doc: &str,
) -> Result<Vec<u8>> {
    let mut g = Int8Writer::new(h, w, ranges);
    let out = model.export(&mut g, h, w);
    if g.site != ranges.len() {
        bail!(
            "int8 writer visited {} sites, calibration has {}",
            g.site,
            ranges.len()
        );
    }
    Ok(g.finish(&out, [1, 3, h, w], [1, 1, h, w], doc))
}
