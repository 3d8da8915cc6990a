#!/usr/bin/env bash
# polypwatch-train vs PyTorch eager on the same training step of edge-multi's network
# (DeepLabv3+ ResNet-18 w0.5, 3,972,801 trainable parameters; batch 8 of 192x192; BCE + soft
# Dice; Adam), 1 and 2 threads, images/s: polypwatch-train with its own kernels and with Burn's
# (--burn-kernels, the trainer before issue 18), PyTorch eager NCHW and channels_last.
# Each round runs every row once, in turn, so a burst of load is spread over all of them; the
# table gives per row the median over rounds and the range. Also prints how far the losses of
# the two polypwatch kernel sets drift apart over the same fixed-seed steps.
#   bash bench/train_compare.sh            ROUNDS=3 WARMUP=5 STEPS=30 by default
# Installs torch (CPU use of the PyPI wheel) and numpy into target/torch-venv on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-3}
warmup=${WARMUP:-5}
steps=${STEPS:-30}
torch_version=${TORCH_VERSION:-2.15.0}
venv=target/torch-venv
if [ ! -x $venv/bin/python ]; then
  python3 -m venv $venv
  $venv/bin/pip install -q "torch==$torch_version" numpy
fi
cargo build --release --workspace --all-targets -q  # the build CI makes: another target set changes feature unification and rebuilds tract
cfg=trainer/configs/edge-multi.toml
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for round in $(seq "$rounds"); do
  for t in 1 2; do
    for k in polypwatch burn; do
      flag=""; [ $k = burn ] && flag=--burn-kernels
      RAYON_NUM_THREADS=$t ./target/release/polypwatch-train bench --config $cfg \
        --warmup "$warmup" --steps "$steps" --json $flag >"$tmp/pw-$k-$t-$round.json"
    done
    for cl in "" --channels-last; do
      OMP_NUM_THREADS=$t $venv/bin/python bench/torch_train.py --threads "$t" --warmup "$warmup" \
        --steps "$steps" $cl >"$tmp/pt${cl:+-cl}-$t-$round.json"
    done
  done
done
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet || echo -dirty); $rounds rounds of $warmup warm-up + $steps timed steps"
python3 - "$tmp" <<'PY'
import glob, json, os, statistics, sys
tmp = sys.argv[1]
rows = {}
for f in glob.glob(os.path.join(tmp, "*.json")):
    r = json.load(open(f))
    name = r.get("runtime") or f"polypwatch-train ({r['kernels']} kernels)"
    if "kernels" in r:
        name = "polypwatch-train" + ("" if r["kernels"] == "polypwatch" else " (Burn's kernels)")
    rows.setdefault((r["threads"], name), []).append(r)
order = ["polypwatch-train", "polypwatch-train (Burn's kernels)", "pytorch", "pytorch channels_last"]
print(f"{'runtime':<36}{'threads':>8}{'images/s':>10}{'range':>16}{'vs PyTorch eager':>18}")
for t in (1, 2):
    ref = statistics.median(r["images_per_s"] for r in rows[(t, "pytorch")])
    for name in order:
        rs = rows.get((t, name), [])
        if not rs:
            continue
        v = [r["images_per_s"] for r in rs]
        m = statistics.median(v)
        print(f"{name:<36}{t:>8}{m:>10.2f}{f'{min(v):.2f}-{max(v):.2f}':>16}{m / ref:>17.2f}x")
pw = rows[(1, "polypwatch-train")][0]["losses"]
bk = rows[(1, "polypwatch-train (Burn's kernels)")][0]["losses"]
drift = max(abs(a - b) / abs(b) for a, b in zip(pw, bk))
print(f"losses, polypwatch vs Burn kernels, same seed, {len(pw)} steps: largest relative difference {drift:.1e}"
      f" (first {pw[0]:.5f} / {bk[0]:.5f}, last {pw[-1]:.5f} / {bk[-1]:.5f})")
print(f"torch {rows[(1, 'pytorch')][0]['torch']}, parameters: PyTorch {rows[(1, 'pytorch')][0]['parameters']}, "
      f"polypwatch {pw and rows[(1, 'polypwatch-train')][0]['parameters']} (with batch-norm running statistics)")
PY
