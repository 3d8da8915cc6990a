"""ONNX Runtime side of bench/compare.sh: times an ONNX model (f32, and ORT's own static int8
quantization of it) on the same frames polypwatch uses, and counts the model's FLOPs.

    python bench/ort_bench.py --model models/polypwatch-edge-f32.onnx --frames demo/clip \
        --size 256 --threads 1 2 --runs 100 --json out.json
"""
import argparse
import glob
import json
import os
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnx import numpy_helper, shape_inference
from PIL import Image

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def load_frames(folder, size, limit=32):
    """The demo clip's frames with polypwatch's recipe: RGB, bilinear (triangle) resize to a
    square, ImageNet mean/std, NCHW."""
    files = sorted(glob.glob(os.path.join(folder, "*.jpg")))[:limit]
    out = []
    for f in files:
        img = Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR)
        x = (np.asarray(img, dtype=np.float32) / 255.0 - MEAN) / STD
        out.append(x.transpose(2, 0, 1)[None].astype(np.float32))
    return out


def conv_flops(path):
    """Multiply-adds x 2 of the Conv/ConvTranspose/MatMul/Gemm nodes, from inferred shapes."""
    m = shape_inference.infer_shapes(onnx.load(path))
    shapes = {}
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    inits = {i.name: numpy_helper.to_array(i).shape for i in m.graph.initializer}
    total = 0
    for n in m.graph.node:
        if n.op_type in ("Conv", "QLinearConv"):
            w = n.input[3] if n.op_type == "QLinearConv" else n.input[1]
            out = shapes.get(n.output[0])
            if w in inits and out and all(out):
                cout, cin_g, kh, kw = inits[w]
                total += 2 * out[0] * cout * out[2] * out[3] * cin_g * kh * kw
        elif n.op_type in ("MatMul", "Gemm"):
            a, out = shapes.get(n.input[0]), shapes.get(n.output[0])
            if a and out and all(a) and all(out):
                total += 2 * int(np.prod(out)) * a[-1]
    return total


class Reader(CalibrationDataReader):
    """Calibration frames for ORT's static quantization."""

    def __init__(self, name, frames):
        self.it = iter([{name: f} for f in frames])

    def get_next(self):
        return next(self.it, None)


def quantize(f32_path, out_path, frames):
    """ORT's recommended CPU int8: QDQ, u8 activations, per-channel s8 weights."""
    pre = out_path + ".pre.onnx"
    quant_pre_process(f32_path, pre)
    name = onnx.load(pre).graph.input[0].name
    quantize_static(pre, out_path, Reader(name, frames), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=True)
    os.remove(pre)


def time_model(path, frames, threads, runs):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    for f in frames[:3]:
        s.run(None, {name: f})
    ms = []
    for i in range(runs):
        t = time.perf_counter()
        s.run(None, {name: frames[i % len(frames)]})
        ms.append((time.perf_counter() - t) * 1e3)
    return {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--frames", required=True)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--workdir", default=".")
    ap.add_argument("--json", required=True)
    ap.add_argument("--ours-int8", help="also time this int8 ONNX file (polypwatch's export)")
    a = ap.parse_args()
    frames = load_frames(a.frames, a.size)
    int8 = os.path.join(a.workdir, "ort-int8.onnx")
    quantize(a.model, int8, frames)
    res = {"ort_version": ort.__version__, "flops": conv_flops(a.model), "results": []}
    variants = [("f32", a.model), ("int8", int8)]
    if a.ours_int8:
        variants.append(("int8-ours", a.ours_int8))
    for variant, path in variants:
        for t in a.threads:
            r = time_model(path, frames, t, a.runs)
            res["results"].append({"runtime": "onnxruntime", "precision": variant,
                                   "threads": t, **r})
    with open(a.json, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
