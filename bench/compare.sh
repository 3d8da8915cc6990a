#!/usr/bin/env bash
# polypwatch vs ONNX Runtime on the same ONNX model and the same frames (the demo clip), f32 and
# int8, 1 and 2 threads: per-frame inference latency p50/p95, ratio to ONNX Runtime, FLOPs and
# GFLOP/s. ONNX Runtime's int8 is its own static QDQ quantization of the same f32 model;
# "int8-ours" is ONNX Runtime running polypwatch's own int8 export.
#   bash bench/compare.sh [F32_MANIFEST]     (default models/polypwatch-edge-f32.toml)
# Installs onnxruntime, onnx, numpy, pillow and sympy from PyPI into target/bench-venv on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
m32=${1:-models/polypwatch-edge-f32.toml}
m8=${m32/-f32/-int8}
runs=${RUNS:-100}
venv=target/bench-venv
if [ ! -x $venv/bin/python ]; then
  python3 -m venv $venv
  $venv/bin/pip install -q onnxruntime onnx numpy pillow sympy
fi
cargo build --release -p polypwatch -q
onnx=$(dirname "$m32")/$(sed -n 's/^onnx = "\(.*\)"/\1/p' "$m32")
size=$(sed -n 's/^width = \([0-9]*\)/\1/p' "$m32" | head -1)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
onnx8=$(dirname "$m8")/$(sed -n 's/^onnx = "\(.*\)"/\1/p' "$m8")
$venv/bin/python bench/ort_bench.py --model "$onnx" --frames demo/clip --size "$size" \
  --threads 1 2 --runs "$runs" --workdir "$tmp" --json "$tmp/ort.json" --ours-int8 "$onnx8"
for m in "$m32" "$m8"; do
  [ -f "$m" ] || continue
  for t in 1 2; do
    ./target/release/polypwatch bench --model "$m" --frames "$runs" --threads "$t" --json \
      >"$tmp/pw-$(sed -n 's/^precision = "\(.*\)"/\1/p' "$m")-$t.json"
  done
done
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet || echo -dirty), model: $m32"
$venv/bin/python - "$tmp" <<'PY'
import glob, json, os, sys
tmp = sys.argv[1]
ort = json.load(open(os.path.join(tmp, "ort.json")))
flops = ort["flops"]
rows = {(r["runtime"], r["precision"], r["threads"]): r for r in ort["results"]}
for f in glob.glob(os.path.join(tmp, "pw-*.json")):
    prec, t = os.path.basename(f)[3:-5].rsplit("-", 1)
    r = json.load(open(f))
    rows[("polypwatch", prec, int(t))] = {"p50": r["inference"]["p50"], "p95": r["inference"]["p95"]}
print(f"onnxruntime {ort['ort_version']}; model {flops / 1e9:.2f} GFLOP per frame")
print(f"{'runtime':<12} {'precision':<9} {'threads':>7} {'p50 ms':>8} {'p95 ms':>8} {'vs ORT':>7} {'GFLOP/s':>8}")
for key in sorted(rows, key=lambda k: (k[1], k[2], k[0] != "polypwatch")):
    run, prec, t = key
    r = rows[key]
    ref = rows.get(("onnxruntime", prec, t)) or rows.get(("onnxruntime", "int8-ours", t))
    ratio = f"{r['p50'] / ref['p50']:.2f}x" if ref else "-"
    print(f"{run:<12} {prec:<9} {t:>7} {r['p50']:>8.2f} {r['p95']:>8.2f} {ratio:>7} {flops / 1e6 / r['p50']:>8.1f}")
PY
