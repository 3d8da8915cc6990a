#!/usr/bin/env python3
"""bench/aarch64.sh's table: instructions per inference from insn_count's files.

usage: table.py RUNS_DIR RUNS TOP [POLYPWATCH_BINARY]

RUNS_DIR holds RUNTIME-PRECISION-tTHREADS-nN-rREPEAT.counts for N = RUNS and N = 0; a figure
per inference is (count at RUNS - count at 0) / RUNS. Prints a markdown table (the first
repeat, and how far the others are from it; ONNX Runtime runs polypwatch's int8 file in the
int8 row and, where counted, its own QDQ quantization (precision "qdq") in the next), then
polypwatch's TOP symbols per inference. With
the binary, polypwatch's blocks are attributed by address from its symbol table
(aarch64-linux-gnu-nm): qemu's own lookup skips symbols without a type and size, such as
tract's assembly kernels.
"""

import bisect
import collections
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path


def load(path, nm=None):
    total, mnem, sym, blocks = 0, defaultdict(int), defaultdict(int), []
    for line in path.read_text().splitlines():
        parts = line.split(" ")
        if parts[0] == "total":
            total = int(parts[1])
        elif parts[0] == "mnemonic":
            mnem[parts[1]] += int(parts[-1])
        elif parts[0] == "symbol":
            sym[" ".join(parts[1:-1])] += int(parts[-1])
        elif parts[0] == "block":
            blocks.append((int(parts[1], 16), " ".join(parts[2:-1]), int(parts[-1])))
    if nm and blocks:
        sym = by_address(blocks, nm)
    return total, mnem, sym


def symbol_table(binary):
    """The binary's code symbols, sorted by address: (addresses, names)."""
    out = subprocess.run(["aarch64-linux-gnu-nm", "--defined-only", "-n", binary],
                         capture_output=True, text=True, check=True).stdout
    syms = []
    for line in out.splitlines():
        f = line.split()
        # Assembly's local labels (".packed_packed_loop_4") name loops, not functions.
        if len(f) == 3 and f[1] in "tTwW" and not f[2].startswith("."):
            syms.append((int(f[0], 16), f[2]))
    return [a for a, _ in syms], [n for _, n in syms]


def by_address(blocks, nm):
    """Blocks' instructions per symbol of the binary, at the load address that qemu's names
    for some blocks give (the most common lowest-block-minus-symbol offset)."""
    addrs, names = nm
    where = {}
    for n, a in zip(names, addrs):
        where.setdefault(n, a)
    lowest = {}
    for v, name, _ in blocks:
        if name != "?" and name in where:
            lowest[name] = min(v, lowest.get(name, v))
    offsets = collections.Counter(v - where[n] for n, v in lowest.items())
    if not offsets:
        sym = defaultdict(int)
        for _, name, n in blocks:
            sym[name] += n
        return sym
    bias = offsets.most_common(1)[0][0]
    end = addrs[-1] + 0x10000
    sym = defaultdict(int)
    for v, name, n in blocks:
        a = v - bias
        i = bisect.bisect_right(addrs, a) - 1
        if 0 <= i and a < end:
            sym[names[i]] += n
        else:
            sym["(outside the binary: ld.so, libc) " + name] += n
    return sym


def demangle(name):
    """Rust legacy mangling (_ZN...E) to a path, hash dropped; anything else unchanged."""
    m = re.fullmatch(r"_ZN(.*)E(\.llvm\.\d+)?", name)
    if not m:
        return name
    s, parts = m.group(1), []
    while s and s[0].isdigit():
        n = re.match(r"\d+", s).group(0)
        parts.append(s[len(n) : len(n) + int(n)])
        s = s[len(n) + int(n) :]
    if parts and re.fullmatch(r"h[0-9a-f]{16}", parts[-1]):
        parts.pop()
    out = "::".join(parts)
    for a, b in [("$LT$", "<"), ("$GT$", ">"), ("$u20$", " "), ("$RF$", "&"), ("$BP$", "*"),
                 ("$C$", ","), ("$u7b$", "{"), ("$u7d$", "}"), ("$u5b$", "["), ("$u5d$", "]"),
                 ("$u27$", "'"), ("$LP$", "("), ("$RP$", ")"), ("$u3b$", ";"), ("..", "::")]:
        out = out.replace(a, b)
    return out.replace("::_", "::").replace("<_", "<")


def main():
    runs_dir, runs, top = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    nm = symbol_table(sys.argv[4]) if len(sys.argv) > 4 else None
    files = {}
    for f in runs_dir.glob("*.counts"):
        m = re.fullmatch(r"(\w+)-(\w+)-t(\d+)-n(\d+)-r(\d+)\.counts", f.name)
        if m:
            rt, p, t, n, rep = m.groups()
            files[(rt, p, int(t), int(n), int(rep))] = f
    per = {}  # (rt, p, t, rep) -> (total, mnemonics, symbols) per inference
    for (rt, p, t, n, rep), f in files.items():
        if n != runs or (rt, p, t, 0, rep) not in files:
            continue
        table = nm if rt in ("polypwatch", "capture") else None
        a, b = load(f, table), load(files[(rt, p, t, 0, rep)], table)
        total = (a[0] - b[0]) / runs
        mnem = {k: (a[1][k] - b[1].get(k, 0)) / runs for k in a[1]}
        sym = {k: (a[2][k] - b[2].get(k, 0)) / runs for k in a[2]}
        per[(rt, p, t, rep)] = (total, mnem, sym)

    def cell(rt, p, t):
        reps = sorted(r for (x, y, z, r) in per if (x, y, z) == (rt, p, t))
        if not reps:
            return None, "not run"
        total, mnem, _ = per[(rt, p, t, reps[0])]
        spread = max(abs(per[(rt, p, t, r)][0] - total) / total for r in reps)
        kinds = ", ".join(
            f"{mnem.get(k, 0) / 1e6:.1f} M {k.upper()}" for k in ("fmla", "sdot", "udot") if mnem.get(k, 0) > 0.5e6
        )
        again = f"; {len(reps)} repeats within {100 * spread:.3f} %" if len(reps) > 1 else ""
        return total, f"{total / 1e6:.1f} M ({kinds}{again})"

    if per and all(k[0] == "capture" for k in per):
        # bench/aarch64.sh's CAPTURE counts: the capture thread's work per frame.
        print(f"instructions per frame on the capture thread: (count of {runs} + warm-up passes - count of warm-up passes) / {runs}")
        print()
        print("| camera frame | instructions | of which in the top symbols below |")
        print("| --- | --- | --- |")
        for (rt, p, t, rep), (total, _, sym) in sorted(per.items()):
            if rep == 1:
                head = sum(sorted(sym.values(), reverse=True)[:3])
                print(f"| {p} | {total / 1e6:.1f} M | {head / 1e6:.1f} M in 3 symbols |")
    else:
        print(f"instructions per inference: (count of {runs} + warm-up runs - count of warm-up runs) / {runs}")
        print()
        print("| threads | precision | polypwatch | ONNX Runtime | ratio |")
        print("| --- | --- | --- | --- | --- |")
    for t in sorted({k[2] for k in per if k[0] != "capture"}):
        for p, q, label in [("f32", "f32", "f32"), ("int8", "int8", "int8"),
                            ("int8", "qdq", "int8, ONNX Runtime on its own QDQ file")]:
            a, ca = cell("polypwatch", p, t)
            b, cb = cell("onnxruntime", q, t)
            if b is None and q == "qdq":
                continue
            ratio = f"{a / b:.2f}" if a and b else "-"
            print(f"| {t} | {label} | {ca} | {cb} | {ratio} |")

    for (rt, p, t, rep), (total, mnem, sym) in sorted(per.items()):
        if rep != 1:
            continue
        kinds = sorted(mnem.items(), key=lambda kv: -kv[1])[:8]
        print(f"\n{rt} {p}, {t} threads: top mnemonics per inference: "
              + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in kinds))
        if rt not in ("polypwatch", "capture"):
            continue
        print("top symbols per inference:")
        for k, v in sorted(sym.items(), key=lambda kv: -kv[1])[:top]:
            print(f"  {v / 1e6:8.1f} M  {100 * v / total:5.1f} %  {demangle(k)[:110]}")


if __name__ == "__main__":
    main()
