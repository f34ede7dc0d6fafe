"""M = 1 with warm and with cold caches: the AFPQ GEMV next to torch's INT4 CPU kernel.

    python benchmarks/cpu_cold.py            # T=1 for one thread

4096 x 4096, nf4 g128 AFPQ (fp32 and bf16 activations) and INT4 g128 (bf16 activations),
30 rounds, calls interleaved; "warm" calls back to back, "cold" after writing 256 MB (the
weights come from memory, as in a large model's decode). Median µs per call.
"""

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_cpu as B  # noqa: E402

torch.set_grad_enabled(False)
torch.set_num_threads(int(os.environ.get("T", torch.get_num_threads())))
lin, layer = B._layer(4096, 4096, 128, "nf4")
int4 = B._int4(4096, 4096, 128)
xb = torch.randn(1, 4096).bfloat16()
x = xb.float()
big = torch.ones(64 << 20)
for cold in (False, True):
    res = {"int4": [], "nf4_bf16": [], "nf4": []}
    fns = {"int4": lambda: int4(xb), "nf4_bf16": lambda: layer(xb), "nf4": lambda: layer(x)}
    for f in fns.values():
        f()
    for _ in range(30):
        for k, f in fns.items():
            if cold:
                big.add_(1)
            t = time.perf_counter()
            f()
            res[k].append(time.perf_counter() - t)
    print(f"threads {torch.get_num_threads()}", "cold" if cold else "warm",
          {k: round(statistics.median(v) * 1e6) for k, v in res.items()})
