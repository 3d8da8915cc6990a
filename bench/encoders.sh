#!/usr/bin/env bash
# Measures the candidate light encoders on this machine: Burn (flex) training throughput and
# tract inference latency (f32 and int8, one thread). Each candidate trains one epoch on 96
# Kvasir-SEG images at the edge preset's settings, then is exported and timed.
#   bash bench/encoders.sh [DATASET]   (default ../shared/datasets/kvasir-seg)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/datasets/kvasir-seg}
cargo build --release --workspace -q
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf '%-34s %14s %14s %12s %12s\n' encoder "train img/s" "(256 px)" "tract f32" "tract int8"
for enc in "resnet18 0.5" "mobilenetv2 0.5" "resnet18 0.25"; do
  set -- $enc
  cfg=$tmp/$1-$2.toml
  sed -e "s/^encoder = .*/encoder = \"$1\"/" -e "s/^width = .*/width = $2/" trainer/configs/edge.toml > "$cfg"
  full=$tmp/$1-$2-full.toml
  sed -e '/^crop = /d' "$cfg" > "$full"
  ips() { ./target/release/polypwatch-train train --config "$1" --out "$2" --data "$data" \
          --epochs 1 --max-images 96 -q 2>&1 | sed -n 's/.* \([0-9.]*\) img\/s .*/\1/p'; }
  crop_ips=$(ips "$cfg" "$tmp/run-$1-$2")
  full_ips=$(ips "$full" "$tmp/run-$1-$2-full")
  out=$(./target/release/polypwatch-train export --run "$tmp/run-$1-$2" --out "$tmp/m-$1-$2" \
        --name m --data "$data" --verify-images 16 2>&1)
  f32=$(echo "$out" | sed -n 's/^f32: .*p50 \([0-9.]*\) ms.*/\1/p')
  int8=$(echo "$out" | sed -n 's/^int8: .*p50 \([0-9.]*\) ms.*/\1/p')
  printf '%-34s %14s %14s %9s ms %9s ms\n' "$1 width $2" "$crop_ips (192)" "$full_ips" "$f32" "$int8"
done
