#!/usr/bin/env bash
# Exports a finished run and measures everything the model report quotes, into OUT.
#
#   bash models/make-report.sh RUN VERSION [OUT]      (from the repository root)
#
# RUN is a polypwatch-train run folder of a multi-source config (its carve-outs are the
# <source>.{train,validation,test}.txt files in it); OUT defaults to models/. Figures come from
# test carve-outs only: the operating point was chosen by `export` on validation frames.
# SKIP_EXPORT=1 measures models already in OUT (e.g. to redo the figures).
set -euo pipefail

run=${1:?usage: make-report.sh RUN VERSION [OUT]}
version=${2:?usage: make-report.sh RUN VERSION [OUT]}
out=${3:-models}
name=${NAME:-polypwatch-edge}
data=../shared/datasets
bin=target/release
mkdir -p "$out/report" "$out/splits"

cargo build --release --workspace --all-targets  # the build CI makes: -p changes feature unification and rebuilds tract

if [ "${SKIP_EXPORT:-0}" != 1 ]; then
  # Burn's own evaluation of every carve-out (the trainer's tables).
  $bin/polypwatch-train eval --run "$run" --json "$out/report/train-eval.json" -q \
    | tee "$out/report/train-eval.txt"
  $bin/polypwatch-train export --run "$run" --out "$out" --name "$name" --version "$version" \
    | tee "$out/report/export.txt"
  cp "$run"/metrics.csv "$run"/curves.png "$out/"
  cp "$run"/config.toml "$out/$name-train-config.toml"
fi
# The carve-outs travel with the model: the figures below can be redone without the run.
cp "$run"/*.validation.txt "$run"/*.test.txt "$out/splits/"

sets=(
  "kvasir $data/kvasir-seg $data/kvasir-seg/splits/official_val.txt"
  "bkai $data/bkai-neopolyp $out/splits/bkai.test.txt"
  "negatives $data/cpchild-negatives $out/splits/negatives.test.txt"
)
for prec in f32 int8; do
  for s in "${sets[@]}"; do
    read -r set root split <<<"$s"
    echo "== $prec $set ($split)"
    $bin/polypwatch eval --model "$out/$name-$prec.toml" --data "$root" --split "$split" \
      --json "$out/report/eval-$set-$prec.json" -q | tee "$out/report/eval-$set-$prec.txt"
  done
done

# Alert-level: pans across held-out polyp images with polyp-free test frames between them.
clips=target/clips
$bin/examples/make_alert_clip $clips/kvasir-test $data/kvasir-seg \
  $data/kvasir-seg/splits/official_val.txt $data/cpchild-negatives "$out/splits/negatives.test.txt" \
  --sequences 20 --gap 10
$bin/examples/make_alert_clip $clips/bkai-test $data/bkai-neopolyp "$out/splits/bkai.test.txt" \
  $data/cpchild-negatives "$out/splits/negatives.test.txt" --sequences 20 --gap 10
for prec in f32 int8; do
  $bin/polypwatch eval-alerts --model "$out/$name-$prec.toml" --fps 25 \
    --json "$out/report/alerts-$prec.json" $clips/kvasir-test $clips/bkai-test \
    | tee "$out/report/alerts-$prec.txt"
done

$bin/examples/make_gallery "$out/gallery.png" "$out/$name-int8.toml" \
  $data/kvasir-seg $data/kvasir-seg/splits/official_val.txt \
  $data/cpchild-negatives "$out/splits/negatives.test.txt" | tee "$out/report/gallery.md"

for prec in f32 int8; do
  $bin/polypwatch bench --model "$out/$name-$prec.toml" --frames 100 --threads 1 \
    | tee "$out/report/bench-$prec.txt"
done
echo "report figures in $out/report/"
