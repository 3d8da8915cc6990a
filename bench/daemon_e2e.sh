#!/usr/bin/env bash
# The daemon end to end on camera-sized frames (BENCHMARKS.md, "The daemon end to end"): a
# 150-frame 1280x1024 replay clip through `polypwatch run`, int8 and f32, unpaced and paced,
# each case RUNS times (default 2); prints each run's exit line (frames/s, dropped, latency,
# stage times).
#   bash bench/daemon_e2e.sh [DATASETS]   (default ../shared/datasets; makes target/clip1280)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/datasets}
runs=${RUNS:-2}
[ -n "${NO_BUILD:-}" ] || cargo build --release --workspace -q  # --workspace: -p alone changes feature unification
if [ "$(ls target/clip1280 2>/dev/null | grep -c jpg)" -lt 150 ]; then
  ./target/release/examples/make_clip "$data/kvasir-seg" ck2da7fwcjfis07218r1rvm95 target/clip1280 150 1280 1024
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
case_run() { # precision fps threads
  cat >"$tmp/c.toml" <<TOML
[model]
manifest = "$PWD/models/polypwatch-edge-$1.toml"
[source]
kind = "replay"
path = "$PWD/target/clip1280"
fps = $2
loop = false
[events]
stdout = false
journald = "off"
level = "info"
[runtime]
status_secs = 2.0
threads = $3
TOML
  for r in $(seq "$runs"); do
    printf '%-5s fps=%-4s threads=%s run %s: ' "$1" "$2" "$3" "$r"
    ./target/release/polypwatch run --config "$tmp/c.toml" 2>&1 | grep -m1 ' stopped: ' | sed 's/.* stopped: //' || echo "(no exit line)"
  done
}
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet || echo -dirty)"
case_run int8 0.0 1
case_run int8 30.0 1
case_run int8 25.0 1
case_run f32 0.0 1
case_run f32 0.0 2
