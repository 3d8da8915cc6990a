#!/usr/bin/env bash
# Exact instructions per inference on aarch64, polypwatch against ONNX Runtime's aarch64 build
# (issue 16), counted under qemu-user with a TCG plugin.
#
# Usage: bash bench/aarch64.sh
#   THREADS="1 4"  inference threads to count (default "1")
#   REPEAT=2       times each count is taken, to check it repeats (default 2)
#   WARMUP=2 RUNS=10  the protocol: count(WARMUP + RUNS runs) - count(WARMUP + 0 runs), / RUNS
#   JOBS=2         qemu runs at once (each is single-threaded on the host per guest thread)
#   ORT_VERSION=1.32.0  onnxruntime wheel from PyPI (manylinux_2_28_aarch64)
#   TOP=12         symbols listed per polypwatch row (from count_runs' symbol table)
#   PRECISIONS="f32 int8"  polypwatch's files to count (default both)
#   RUNTIMES="polypwatch onnxruntime"  which runtimes run them (default both: a kernel change
#                  needs only polypwatch's side counted again)
#   CAPTURE="yuyv:1920x1080 mjpeg:1920x1080"  also count the capture thread's work per camera
#                  frame of these formats and sizes (examples/count_capture.rs: conversion or
#                  JPEG decode, the model's resize and normalisation, the blank check); "" skips
#   ORT_QDQ=1      also count ONNX Runtime on its own static QDQ int8 quantization of the f32
#                  file (bench/ort_bench.py's, made on this host in target/bench-venv, as
#                  bench/compare.sh makes it); 0 skips it
#
# What it does, caching everything under target/aarch64-bench (rebuilt only when stale):
# 1. cross-builds examples/count_runs.rs (polypwatch) and bench/aarch64/ort-driver (ONNX
#    Runtime, loaded at run time with the `ort` crate's load-dynamic) with Debian's rustc-web
#    and gcc-aarch64-linux-gnu, as .ci/run builds the daemon;
# 2. builds bench/aarch64/insn_count.c against qemu-plugin.h from Debian's qemu source package
#    (the version of the installed qemu-user; a deb-src line is added if there is none) and
#    loads it into Debian's dynamic qemu-aarch64 (package qemu-user: qemu-aarch64-static
#    cannot load plugins), `-cpu cortex-a76` (no SVE, like the Orin's Cortex-A78AE);
# 3. fetches onnxruntime's aarch64 wheel with pip and takes libonnxruntime.so out of it;
# 4. runs every count in a private mount namespace (unshare -m) where /proc/cpuinfo describes
#    Cortex-A78AE cores (part 0xd42, asimddp, no sve) and cpu0's cache files say L1d 64K,
#    L2 256K, L3 2M: qemu 7.2 shows a guest the host's x86 /proc/cpuinfo, on which ONNX
#    Runtime's CPU probe crashes, and tract sizes its matrix blocking from those cache files;
# 5. with ORT_QDQ=1, quantizes the f32 file with ONNX Runtime's own tools on this host;
# 6. prints the table (bench/aarch64/table.py): instructions, FMLA and SDOT per inference.
# Needs root (apt, unshare, mount), network for the first run (apt source, PyPI, crates.io).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
THREADS=${THREADS:-1}
REPEAT=${REPEAT:-2}
WARMUP=${WARMUP:-2}
RUNS=${RUNS:-10}
JOBS=${JOBS:-2}
ORT_VERSION=${ORT_VERSION:-1.32.0}
TOP=${TOP:-12}
ORT_QDQ=${ORT_QDQ:-1}
PRECISIONS=${PRECISIONS:-f32 int8}
RUNTIMES=${RUNTIMES:-polypwatch onnxruntime}
CAPTURE=${CAPTURE-yuyv:1920x1080 mjpeg:1920x1080}
out=$root/target/aarch64-bench
mkdir -p "$out"
target=aarch64-unknown-linux-gnu
start=$(date +%s)
stamp() { echo "== [$(($(date +%s) - start))s] $*" >&2; }

stamp "tools: Debian rustc-web, gcc-aarch64-linux-gnu, libstd-rust-web-dev:arm64, qemu-user"
need=()
[ -x /usr/bin/cargo ] && [ -x /usr/bin/rustc ] || need+=(rustc-web cargo-web)
[ -d /usr/lib/rustlib/$target ] || need+=(libstd-rust-web-dev:arm64)
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
[ -x /usr/bin/qemu-aarch64 ] || need+=(qemu-user)
[ -e /usr/lib/aarch64-linux-gnu/libstdc++.so.6 ] || need+=(libstdc++6:arm64)
if [ ${#need[@]} -gt 0 ]; then
  dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

stamp "cross-build count_runs (polypwatch) and ort-driver (ONNX Runtime) for $target"
cross_env=(
  CARGO_TERM_COLOR=never CARGO_INCREMENTAL=0 CARGO_PROFILE_RELEASE_DEBUG=false
  RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc CARGO_TARGET_DIR="$out"
  CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
  CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
  AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
)
# What the table names: the tree as built, not HEAD when the (long) runs end.
built="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!BENCHMARKS.md' || echo '+dirty')"
env "${cross_env[@]}" nice -n 10 /usr/bin/cargo build --release --target $target \
  -p polypwatch --example count_runs --example count_capture
(cd bench/aarch64/ort-driver &&
  env "${cross_env[@]}" nice -n 10 /usr/bin/cargo build --release --target $target --locked)
count_runs=$out/$target/release/examples/count_runs
count_capture=$out/$target/release/examples/count_capture
ort_driver=$out/$target/release/ort-driver

stamp "TCG plugin against qemu-plugin.h of Debian's qemu $(dpkg-query -W -f='${source:Version}' qemu-user)"
src_version=$(dpkg-query -W -f='${source:Version}' qemu-user)
header_dir=$out/qemu-src/$src_version
if [ ! -f "$header_dir/qemu-plugin.h" ]; then
  if ! apt-cache showsrc qemu 2>/dev/null | grep -qx "Version: $src_version"; then
    if ! grep -rqs "deb-src" /etc/apt/sources.list /etc/apt/sources.list.d/; then
      cat >/etc/apt/sources.list.d/debian-src.sources <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    fi
    apt-get update -qq
  fi
  dl=$(mktemp -d)
  (cd "$dl" && apt-get source --download-only -qq "qemu=$src_version" 2>&1 | grep -v "unsandboxed" || true)
  orig=$(ls "$dl"/qemu_*.orig.tar.xz)
  member=$(tar -tJf "$orig" | grep '/include/qemu/qemu-plugin\.h$')
  # Debian's patches (debian.tar.xz) are checked not to touch the header.
  tar -xJf "$dl"/qemu_*.debian.tar.xz -C "$dl"
  if grep -rqs "qemu-plugin\.h" "$dl/debian/patches"; then
    echo "Debian's qemu $src_version patches qemu-plugin.h: use apt-get source (patched tree)" >&2
    exit 1
  fi
  mkdir -p "$header_dir"
  tar -xJf "$orig" -O "$member" >"$header_dir/qemu-plugin.h"
  rm -rf "$dl"
fi
plugin=$out/libinsn_count.so
if [ ! -f "$plugin" ] || [ bench/aarch64/insn_count.c -nt "$plugin" ]; then
  gcc -shared -fPIC -O2 -Wall -Wextra -Wno-unused-parameter -Werror -I "$header_dir" \
    bench/aarch64/insn_count.c -o "$plugin"
fi

stamp "onnxruntime $ORT_VERSION aarch64 wheel (PyPI)"
ort_dir=$out/ort-$ORT_VERSION
ort_lib=$ort_dir/libonnxruntime.so.$ORT_VERSION
if [ ! -f "$ort_lib" ]; then
  mkdir -p "$ort_dir"
  pip download -q --no-deps --platform manylinux_2_28_aarch64 --only-binary=:all: \
    "onnxruntime==$ORT_VERSION" -d "$ort_dir"
  unzip -q -o -j "$ort_dir"/onnxruntime-"$ORT_VERSION"-*.whl \
    "onnxruntime/capi/libonnxruntime.so.$ORT_VERSION" -d "$ort_dir"
fi

stamp "Orin-like CPU description: /proc/cpuinfo (Cortex-A78AE) and cpu0's cache files"
orin=$out/orin
rm -rf "$orin"
mkdir -p "$orin/cache"
ncpu=$(($(sed 's/.*-//' /sys/devices/system/cpu/possible) + 1))
for ((i = 0; i < ncpu; i++)); do
  sed "s/^processor.*/processor\t: $i/" bench/aarch64/cpuinfo-a78ae
  echo
done >"$orin/cpuinfo"
cache() { # index level type size shared_cpu_list
  mkdir -p "$orin/cache/index$1"
  echo "$2" >"$orin/cache/index$1/level"
  echo "$3" >"$orin/cache/index$1/type"
  echo "$4" >"$orin/cache/index$1/size"
  echo "$5" >"$orin/cache/index$1/shared_cpu_list"
}
cache 0 1 Data 64K 0
cache 1 1 Instruction 64K 0
cache 2 2 Unified 256K 0
cache 3 3 Unified 2048K "0-$((ncpu - 1))"

# Runs "$@" under qemu with the plugin, its counts to $1 (the rest: program and arguments).
count() {
  local counts=$1
  shift
  unshare -m sh -c '
    mount --make-rprivate /
    mount --bind "$1/cpuinfo" /proc/cpuinfo
    mount --bind "$1/cache" /sys/devices/system/cpu/cpu0/cache
    shift
    exec "$@"' sh "$orin" \
    nice -n 10 qemu-aarch64 -cpu cortex-a76 -plugin "$plugin,out=$counts" "$@"
}

manifest() { echo "models/polypwatch-edge-$1.toml"; }
onnx() { # precision: polypwatch's files, or ONNX Runtime's own QDQ quantization (qdq)
  if [ "$1" = qdq ]; then echo "$out/ort-qdq-$ORT_VERSION.onnx"; else echo "models/polypwatch-edge-$1.onnx"; fi
}
frame=demo/clip/frame_00000.jpg
input=$out/input-f32.bin

stamp "input: $frame preprocessed by count_runs (the manifest's recipe), for ONNX Runtime too"
count "$out/dump.counts" "$count_runs" "$(manifest f32)" "$frame" 0 0 1 "$input" >/dev/null

if [ "$ORT_QDQ" = 1 ] && [ ! -f "$(onnx qdq)" ]; then
  stamp "ONNX Runtime's own int8: static QDQ of the f32 file, calibrated on demo/clip (bench/ort_bench.py)"
  venv=target/bench-venv
  if [ ! -x $venv/bin/python ]; then
    python3 -m venv $venv
    $venv/bin/pip install -q "onnxruntime==$ORT_VERSION" onnx numpy pillow sympy
  fi
  size=$(grep -m1 '^height' "$(manifest f32)" | tr -dc 0-9)
  nice -n 10 $venv/bin/python -c '
import sys
sys.path.insert(0, "bench")
import ort_bench
ort_bench.quantize(sys.argv[1], sys.argv[2], ort_bench.load_frames("demo/clip", int(sys.argv[3])))
' "$(onnx f32)" "$(onnx qdq).tmp" "$size"
  mv "$(onnx qdq).tmp" "$(onnx qdq)"
fi

runs_dir=$out/runs
rm -rf "$runs_dir"
mkdir -p "$runs_dir"
jobs_list=()
for t in $THREADS; do
  for rep in $(seq 1 "$REPEAT"); do
    for p in $PRECISIONS; do
      for n in "$RUNS" 0; do
        for rt in $RUNTIMES; do
          jobs_list+=("$rt $p $t $n $rep")
        done
      done
    done
    if [ "$ORT_QDQ" = 1 ] && [[ " $RUNTIMES " = *" onnxruntime "* ]]; then
      jobs_list+=("onnxruntime qdq $t $RUNS $rep" "onnxruntime qdq $t 0 $rep")
    fi
  done
done
# The capture thread's work per camera frame (once: it runs on one thread whatever THREADS).
mkdir -p "$runs_dir/capture"
for fs in $CAPTURE; do
  for n in "$RUNS" 0; do
    jobs_list+=("capture ${fs%%:*}${fs#*:} 1 $n 1")
  done
done
run_one() { # runtime precision threads runs rep
  local c="$runs_dir/$1-$2-t$3-n$4-r$5.counts"
  [ "$1" = capture ] && c="$runs_dir/capture/$1-$2-t$3-n$4-r$5.counts"
  if [ "$1" = polypwatch ]; then
    count "$c" "$count_runs" "$(manifest "$2")" "$frame" "$WARMUP" "$4" "$3"
  elif [ "$1" = capture ]; then # precision: FORMATWIDTHxHEIGHT
    count "$c" "$count_capture" "$(manifest int8)" "$frame" "${2%%[0-9]*}" "${2#"${2%%[0-9]*}"}" "$WARMUP" "$4"
  else
    count "$c" "$ort_driver" "$ort_lib" "$(onnx "$2")" "$input" "$WARMUP" "$4" "$3"
  fi >"${c%.counts}.log" 2>&1 || {
    echo "failed: $*" >&2
    cat "${c%.counts}.log" >&2
    return 1
  }
}
stamp "${#jobs_list[@]} qemu runs, $JOBS at a time (threads: $THREADS; repeats: $REPEAT)"
pids=()
for j in "${jobs_list[@]}"; do
  # shellcheck disable=SC2086
  run_one $j &
  pids+=($!)
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
done
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done
[ "$fail" = 0 ] || { echo "a qemu run failed (logs in $runs_dir)" >&2; exit 1; }

stamp "table"
echo "commit $built, $(date -u +%Y-%m-%d), qemu $(qemu-aarch64 --version | head -1 | cut -d' ' -f3) -cpu cortex-a76, onnxruntime $ORT_VERSION, model $(grep -m1 '^version' "$(manifest f32)" | cut -d'"' -f2)"
if [ -n "${PRECISIONS// /}" ] && [ -n "${RUNTIMES// /}" ]; then
  python3 bench/aarch64/table.py "$runs_dir" "$RUNS" "$TOP" "$count_runs"
  echo
fi
if [ -n "${CAPTURE// /}" ]; then
  python3 bench/aarch64/table.py "$runs_dir/capture" "$RUNS" "$TOP" "$count_capture"
fi
