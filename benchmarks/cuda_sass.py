"""SASS instruction count of the CUDA GEMV's inner loop, per weight, without a GPU.

    python benchmarks/cuda_sass.py                  # 4-bit and 3-bit, fp16 and bf16, M = 1, 2, 4, 8, sm_80 + sm_90
    python benchmarks/cuda_sass.py --bits 4 --m 1 --arch 90 --dump /tmp/m1.sass

Compiles the kernel source (``afpq_plugins.kernels.cuda.source``) with NVRTC (the
``nvidia-cuda-nvrtc-cu12`` wheel) to a cubin and disassembles it with ``nvdisasm`` (the
``nvidia-cuda-nvdisasm`` wheel; ``$NVDISASM`` or ``PATH`` otherwise). For each kernel it finds
the main loop (the backward branch enclosing the most instructions; one iteration = two
prefetched chunks) and splits its instructions into:

* *per unit*: the forward-branch regions that build the decoded table (they hold the
  ``F2FP ... PACK_AB`` conversions) or only load group parameters (16-bit loads); these run
  once per unit (``BPU`` blocks, one group of 128 by default). The loop body holds two chunk
  steps, so two table builds: the figure printed is per unit (half of them). The next unit's
  scale loads are predicated inside the prefetch and stay in *steady* (over-counted there);
* *steady*: everything else in the loop, i.e. what runs for every chunk (decode, x loads,
  FMAs, flushes, the weight prefetch, bookkeeping), counted as per-weight cost: the figure
  the target (<= 4.5 per 4-bit weight at M = 1) refers to.

Also printed: registers per thread (from the cubin's section header) and local-memory
instructions (``LDL``/``STL``: spills; the target is none).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from afpq_plugins.core.formats import get_format  # noqa: E402
from afpq_plugins.kernels.cuda import nvrtc, source  # noqa: E402

INSN = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")
LABEL = re.compile(r"^(\.L_x_\d+):")
BRANCH = re.compile(r"`\((\.L_x_\d+)\)")


def find_nvdisasm() -> Optional[str]:
    env = os.environ.get("NVDISASM")
    if env and os.path.exists(env):
        return env
    for base in sys.path:
        for p in glob.glob(os.path.join(base or ".", "nvidia", "*", "bin", "nvdisasm")):
            return p
    return shutil.which("nvdisasm")


def parse(sass: str, fn: str) -> List[Tuple[str, str, str]]:
    """[(kind, opcode or label, text)] of one function: kind 'i' instruction, 'l' label."""
    lines = sass.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith(f".text.{fn}:")), None)
    if start is None:
        raise ValueError(f"function {fn} not in the disassembly")
    out = []
    for ln in lines[start + 1:]:
        if ln.startswith(".text.") or ln.lstrip().startswith(".section"):
            break
        m = LABEL.match(ln.strip())
        if m:
            out.append(("l", m.group(1), ln))
            continue
        m = INSN.match(ln)
        if m:
            out.append(("i", m.group(2), ln))
    return out


def analyse(items: List[Tuple[str, str, str]]) -> Dict:
    pos = {}
    insns = []  # (opcode, text)
    for kind, op, text in items:
        if kind == "l":
            pos[op] = len(insns)
        else:
            insns.append((op, text))
    # the main loop: the backward branch spanning the most instructions
    best = None
    for i, (op, text) in enumerate(insns):
        if op == "BRA":
            m = BRANCH.search(text)
            if m and m.group(1) in pos and pos[m.group(1)] <= i:
                span = (pos[m.group(1)], i)
                if best is None or span[1] - span[0] > best[1] - best[0]:
                    best = span
    if best is None:
        raise ValueError("no loop found")
    lo, hi = best
    per_unit = [False] * len(insns)
    for i in range(lo, hi + 1):
        op, text = insns[i]
        if op == "BRA" and "@" in text:
            m = BRANCH.search(text)
            if not m or pos.get(m.group(1), -1) <= i:
                continue
            j = pos[m.group(1)]
            region = insns[i + 1:j]
            loads = [o for o, _ in region if o.startswith("LDG")]
            table = any(o.startswith("F2FP") and "PACK_AB" in o for o, _ in region) and not loads
            params = bool(loads) and all(".U16" in o or ".16" in o for o in loads)
            if table or params:
                for k in range(i + 1, j):
                    per_unit[k] = True
    skip = {"BSSY", "BSYNC", "NOP"}
    steady = [insns[i][0] for i in range(lo, hi + 1) if not per_unit[i] and insns[i][0] not in skip]
    unit = [insns[i][0] for i in range(lo, hi + 1) if per_unit[i] and insns[i][0] not in skip]
    local = sum(1 for op, _ in insns if op.startswith(("LDL", "STL")))
    loop_local = sum(1 for op, _ in insns[lo:hi + 1] if op.startswith(("LDL", "STL")))
    return {"steady": len(steady), "unit": len(unit), "local": local, "loop_local": loop_local, "total": len(insns),
            "mix": Counter(op.split(".")[0] for op in steady)}


def kernel_source(bits: int, bf16: bool, ch: int, chain: int, fmt: str = "") -> str:
    f = get_format(fmt or ("nf4" if bits == 4 else "nf3"))
    return source.render(bits=bits, mode=0, bf16=bf16, s1t=0, s2t=0, ch=ch, chain=chain, grid=f.lut("afpq").tolist())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, nargs="*", default=[4, 3])
    ap.add_argument("--m", type=int, nargs="*", default=[1, 2, 4, 8])
    ap.add_argument("--arch", type=int, nargs="*", default=[80, 90])
    ap.add_argument("--dtype", nargs="*", default=["fp16", "bf16"])
    ap.add_argument("--chain", type=int, default=0, help="codes per half2 chain (default: the host's choice)")
    ap.add_argument("--dump", default=None, help="write the first kernel's SASS here")
    args = ap.parse_args(argv)
    ok, why = nvrtc.available()
    if not ok:
        print(f"cuda_sass: skipped: {why}")
        return 0
    nvd = find_nvdisasm()
    if not nvd:
        print("cuda_sass: nvdisasm not found (pip install nvidia-cuda-nvdisasm, or set NVDISASM): SASS counts skipped")
        return 0
    from afpq_plugins.kernels.cuda import planning

    print(f"NVRTC {'.'.join(map(str, nvrtc.nvrtc_version()))}, {nvd}")
    print("| arch | bits | act | M | chunk | chain | regs | LDL+STL (in the loop) / frame bytes | steady insns/iter | weights/iter | "
          "steady per weight | insns per unit (table) | per weight at g128 | top opcodes (steady) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    dumped = False
    worst = 0.0
    for arch in args.arch:
        for bits in args.bits:
            for dt in args.dtype:
                bf16 = dt == "bf16"
                cpb = 8 if bits == 4 else 32
                bpu = 128 // cpb
                sass_of = {}
                for m in args.m:
                    ch = planning.chunk_blocks(bits, bpu, m, bf16)
                    chain = args.chain or planning.chain_codes(bits, bf16, ch)
                    if (ch, chain) not in sass_of:
                        img = nvrtc.compile_source(kernel_source(bits, bf16, ch, chain), arch)
                        with tempfile.NamedTemporaryFile(suffix=".cubin") as tf:
                            tf.write(img)
                            tf.flush()
                            sass_of[(ch, chain)] = (subprocess.run([nvd, "-c", tf.name], capture_output=True,
                                                                   text=True, check=True).stdout, nvrtc.cubin_resources(img))
                    sass, res = sass_of[(ch, chain)]
                    fn = f"afpq_gemv_m{m}"
                    a = analyse(parse(sass, fn))
                    weights = 2 * ch * cpb  # the loop body holds two chunks (ping-pong buffers)
                    per = a["steady"] / weights
                    unit = a["unit"] / 2  # the body holds two table builds (one per chunk step)
                    amort = per + unit / 128
                    if m == 1 and bits == 4:
                        worst = max(worst, per)
                    top = ", ".join(f"{k} {v}" for k, v in a["mix"].most_common(6))
                    print(f"| sm_{arch} | {bits} | {dt} | {m} | {ch} | {chain} | {res.get(fn, {}).get('regs', '?')} | {a['local']} ({a['loop_local']} in loop) / {res.get(fn, {}).get('frame', '?')} | "
                          f"{a['steady']} | {weights} | {per:.2f} | {unit:.0f} | {amort:.2f} | {top} |")
                    if args.dump and not dumped:
                        with open(args.dump, "w") as f:
                            f.write(sass)
                        dumped = True
    print(f"\nM = 1, 4-bit: steady inner loop {worst:.2f} instructions per weight (target <= 4.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
