#!/usr/bin/env bash
# polypwatch vs ONNX Runtime on the same ONNX model and the same frames (the demo clip), f32 and
# int8, 1 and 2 threads: per-frame inference latency p50/p95, ratio to ONNX Runtime, FLOPs and
# GFLOP/s. ONNX Runtime's int8 is its own static QDQ quantization of the same f32 model;
# "int8-ours" is ONNX Runtime running polypwatch's own int8 export. Both runtimes are timed the
# same way: the clip's first 32 frames preprocessed beforehand, 3 warm-up runs, then RUNS runs
# back to back (polypwatch: `bench`'s inference_back_to_back; its pipeline figures, with a
# frame decoded between two runs, are in its own table).
#   bash bench/compare.sh [F32_MANIFEST]     (default models/polypwatch-edge-f32.toml)
# ROUNDS=N (default 3) repeats the whole comparison, ONNX Runtime and polypwatch taking turns,
# and reports per row the median of the rounds' p50 and p95 and the range of p50: on a shared
# machine a burst of load otherwise lands on one runtime only.
# Installs onnxruntime, onnx, numpy, pillow and sympy from PyPI into target/bench-venv on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
m32=${1:-models/polypwatch-edge-f32.toml}
m8=${m32/-f32/-int8}
runs=${RUNS:-100}
rounds=${ROUNDS:-3}
venv=target/bench-venv
if [ ! -x $venv/bin/python ]; then
  python3 -m venv $venv
  $venv/bin/pip install -q onnxruntime onnx numpy pillow sympy
fi
cargo build --release --workspace -q  # --workspace: -p alone changes feature unification and rebuilds tract
onnx=$(dirname "$m32")/$(sed -n 's/^onnx = "\(.*\)"/\1/p' "$m32")
size=$(sed -n 's/^width = \([0-9]*\)/\1/p' "$m32" | head -1)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
onnx8=$(dirname "$m8")/$(sed -n 's/^onnx = "\(.*\)"/\1/p' "$m8")
for round in $(seq "$rounds"); do
  $venv/bin/python bench/ort_bench.py --model "$onnx" --frames demo/clip --size "$size" \
    --threads 1 2 --runs "$runs" --workdir "$tmp" --json "$tmp/ort-$round.json" --ours-int8 "$onnx8"
  for m in "$m32" "$m8"; do
    [ -f "$m" ] || continue
    for t in 1 2; do
      ./target/release/polypwatch bench --model "$m" --frames "$runs" --threads "$t" --json \
        >"$tmp/pw-$(sed -n 's/^precision = "\(.*\)"/\1/p' "$m")-$t-$round.json"
    done
  done
done
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet || echo -dirty), model: $m32"
$venv/bin/python - "$tmp" <<'PY'
import glob, json, os, statistics, sys
tmp = sys.argv[1]
runs = {}  # (runtime, precision, threads) -> [(p50, p95) per round]
flops, version = None, None
for f in sorted(glob.glob(os.path.join(tmp, "ort-*.json"))):
    ort = json.load(open(f))
    flops, version = ort["flops"], ort["ort_version"]
    for r in ort["results"]:
        runs.setdefault((r["runtime"], r["precision"], r["threads"]), []).append((r["p50"], r["p95"]))
for f in glob.glob(os.path.join(tmp, "pw-*.json")):
    prec, t, _ = os.path.basename(f)[3:-5].rsplit("-", 2)
    r = json.load(open(f))
    runs.setdefault(("polypwatch", prec, int(t)), []).append((r["inference_back_to_back"]["p50"], r["inference_back_to_back"]["p95"]))
rows = {k: (statistics.median(p for p, _ in v), statistics.median(q for _, q in v),
            min(p for p, _ in v), max(p for p, _ in v), len(v)) for k, v in runs.items()}
print(f"onnxruntime {version}; model {flops / 1e9:.2f} GFLOP per frame; median of rounds")
print(f"{'runtime':<12} {'precision':<9} {'threads':>7} {'p50 ms':>8} {'p95 ms':>8} {'p50 range':>13} {'vs ORT':>7} {'GFLOP/s':>8}")
for key in sorted(rows, key=lambda k: (k[1], k[2], k[0] != "polypwatch")):
    run, prec, t = key
    p50, p95, lo, hi, n = rows[key]
    ref = rows.get(("onnxruntime", prec, t)) or rows.get(("onnxruntime", "int8-ours", t))
    ratio = f"{p50 / ref[0]:.2f}x" if ref else "-"
    spread = f"{lo:.2f}-{hi:.2f}"
    print(f"{run:<12} {prec:<9} {t:>7} {p50:>8.2f} {p95:>8.2f} {spread:>13} {ratio:>7} {flops / 1e6 / p50:>8.1f}")
PY
