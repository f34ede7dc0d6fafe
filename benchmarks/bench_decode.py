"""End-to-end decode: a stack of LLaMA-2-7B-shaped decoder layers, fp16 vs AFPQ vs torch INT4.

Used by ``benchmarks/gpu_check.py``. The model is a plain PyTorch LLaMA decoder stack
(RMSNorm, rotary attention with a static KV cache, SwiGLU MLP; hidden 4096, 32 heads,
MLP 11008 by default) with random weights made on the device; no embedding or LM head:
the normalised last hidden state is fed back as the next input, so each step depends on
the previous one as in greedy decoding. Variants share the same random fp16 weights:

* ``fp16``  ``nn.Linear`` in fp16 (cuBLAS)
* ``afpq``  each linear replaced by ``AFPQLinear.from_linear(..., "nf4", 128)`` (RTN), run
            through the package's kernel registry (the Triton kernels on CUDA)
* ``int4``  each linear replaced by torch's INT4 kernel (``_weight_int4pack_mm``, group
            128, random codes), activations in bf16 (the kernel takes bf16 only)

Batch 1: a prompt of ``prompt`` tokens (one prefill call), then ``new`` decode steps, timed
eagerly and by replaying one CUDA graph per step (the whole step captured: position and
input live on the device, so replays need no host work). Reported: prefill ms, decode
tokens/s, and checks that the graph replays reproduce the eager steps and that the AFPQ
model through the Triton kernels matches the same model through the torch reference.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
import torch.nn.functional as F


@dataclass
class Shape:
    hidden: int = 4096
    heads: int = 32
    inter: int = 11008
    layers: int = 8
    prompt: int = 128
    new: int = 128


LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


class Int4Linear(nn.Module):
    """torch's tinygemm INT4 linear (group 128), random codes; bf16 in and out."""

    def __init__(self, K: int, N: int, device):
        super().__init__()
        from bench_kernels import int4_weight

        w, err = int4_weight(K, N, device)
        if w is None:
            raise RuntimeError(f"torch INT4 kernel unavailable: {err}")
        self.packed, self.sz, self.mm = w
        self.out_features = N

    def forward(self, x):
        shp = x.shape
        return self.mm(x.reshape(-1, shp[-1]), self.packed, 128, self.sz).reshape(*shp[:-1], self.out_features)


class Layer(nn.Module):
    def __init__(self, s: Shape, device, dtype):
        super().__init__()
        h, i = s.hidden, s.inter
        dims = {"q": (h, h), "k": (h, h), "v": (h, h), "o": (h, h), "gate": (h, i), "up": (h, i), "down": (i, h)}
        for name, (K, N) in dims.items():
            lin = nn.Linear(K, N, bias=False, device=device, dtype=dtype)
            nn.init.normal_(lin.weight, std=1 / math.sqrt(K))
            setattr(self, name, lin)
        self.n1 = torch.ones(h, device=device, dtype=dtype)
        self.n2 = torch.ones(h, device=device, dtype=dtype)
        self.heads, self.hd = s.heads, h // s.heads


def rms(x, w, eps=1e-5):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope(x, cos, sin):  # x [B, H, T, D]; cos/sin [T, D]
    d = x.shape[-1] // 2
    rot = torch.cat((-x[..., d:], x[..., :d]), dim=-1)
    return x * cos + rot * sin


class Model(nn.Module):
    """The decoder stack with a static KV cache of ``prompt + new`` positions."""

    def __init__(self, s: Shape, device, dtype=torch.float16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.s, self.dtype = s, dtype
        self.blocks = nn.ModuleList(Layer(s, device, dtype) for _ in range(s.layers))
        self.norm = torch.ones(s.hidden, device=device, dtype=dtype)
        hd, T = s.hidden // s.heads, s.prompt + s.new
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
        ang = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv)
        self.cos = torch.cat((ang.cos(), ang.cos()), -1).to(dtype)
        self.sin = torch.cat((ang.sin(), ang.sin()), -1).to(dtype)
        self.kc = torch.zeros(s.layers, 1, s.heads, T, hd, device=device, dtype=dtype)
        self.vc = torch.zeros_like(self.kc)
        self.slots = torch.arange(T, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # next position (decode)

    def to_dtype(self, dtype):
        """Activations, norms, caches and rotary tables in ``dtype`` (linears untouched)."""
        self.dtype = dtype
        for b in self.blocks:
            b.n1, b.n2 = b.n1.to(dtype), b.n2.to(dtype)
        self.norm = self.norm.to(dtype)
        self.cos, self.sin = self.cos.to(dtype), self.sin.to(dtype)
        self.kc, self.vc = self.kc.to(dtype), self.vc.to(dtype)
        return self

    def _attn(self, i, b, x, pos, T):
        B, L, H = x.shape
        q = b.q(x).view(B, L, b.heads, b.hd).transpose(1, 2)
        k = b.k(x).view(B, L, b.heads, b.hd).transpose(1, 2)
        v = b.v(x).view(B, L, b.heads, b.hd).transpose(1, 2)
        cos, sin = self.cos.index_select(0, pos), self.sin.index_select(0, pos)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        self.kc[i].index_copy_(2, pos, k)
        self.vc[i].index_copy_(2, pos, v)
        if L > 1:  # prefill from position 0
            o = F.scaled_dot_product_attention(q, self.kc[i][:, :, :L], self.vc[i][:, :, :L], is_causal=True)
        else:
            mask = (self.slots <= pos).view(1, 1, 1, -1)
            o = F.scaled_dot_product_attention(q, self.kc[i], self.vc[i], attn_mask=mask)
        return b.o(o.transpose(1, 2).reshape(B, L, H))

    def forward(self, x, pos):
        """``x`` [1, L, hidden], ``pos`` the L positions (device tensor) -> normalised last hidden."""
        for i, b in enumerate(self.blocks):
            x = x + self._attn(i, b, rms(x, b.n1), pos, x.shape[1])
            h = rms(x, b.n2)
            x = x + b.down(F.silu(b.gate(h)) * b.up(h))
        return rms(x[:, -1:], self.norm)

    def prefill(self, prompt):
        self.kc.zero_()
        self.vc.zero_()
        L = prompt.shape[1]
        out = self.forward(prompt, self.slots[:L])
        self.pos.fill_(L)
        return out

    def step(self, x):
        """One decode step on device state: input ``x`` [1, 1, hidden]; advances ``pos``."""
        out = self.forward(x, self.pos)
        self.pos.add_(1)
        return out


def quantize_afpq(model: Model, fmt: str = "nf4", group: int = 128) -> Model:
    from afpq_plugins.nn import AFPQLinear

    for b in model.blocks:
        for name in LINEARS:
            lin = getattr(b, name)
            setattr(b, name, AFPQLinear.from_linear(lin, fmt, group, layout="gptq", name=name))
            del lin
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return model


def to_int4(model: Model) -> Model:
    for b in model.blocks:
        for name in LINEARS:
            lin = getattr(b, name)
            setattr(b, name, Int4Linear(lin.in_features, lin.out_features, lin.weight.device))
            del lin
    return model.to_dtype(torch.bfloat16)


def weight_bytes(model: Model) -> int:
    n = 0
    for b in model.blocks:
        for name in LINEARS:
            m = getattr(b, name)
            for t in (list(m.parameters()) + list(m.buffers()) + [getattr(m, "packed", None), getattr(m, "sz", None)]):
                if isinstance(t, torch.Tensor):
                    n += t.numel() * t.element_size()
    return n


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run_decode(model: Model, prompt: torch.Tensor, graphs: bool) -> Dict:
    """Prefill, then ``new`` steps; eager, or one captured step replayed. Times and outputs."""
    dev = prompt.device
    s = model.s
    prompt = prompt.to(model.dtype)
    with torch.no_grad():
        if dev.type == "cuda":  # warm-up (compilation, workspaces, cached checks)
            model.prefill(prompt)
            model.step(model.prefill(prompt))
            _sync(dev)
        t0 = time.perf_counter()
        x = model.prefill(prompt)
        _sync(dev)
        prefill_ms = (time.perf_counter() - t0) * 1e3
        outs = []
        if not graphs:
            t0 = time.perf_counter()
            for _ in range(s.new):
                x = model.step(x)
                outs.append(x)
            _sync(dev)
            dt = time.perf_counter() - t0
        else:
            static_x = x.clone()
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):  # warm-up on a side stream, as capture wants
                model.step(static_x.clone())
            torch.cuda.current_stream(dev).wait_stream(side)
            g = torch.cuda.CUDAGraph()
            model.pos.fill_(s.prompt)
            with torch.cuda.graph(g):
                static_y = model.step(static_x)
                static_x.copy_(static_y)
            # capture ran nothing: restore the state the eager run would have
            x = model.prefill(prompt)
            static_x.copy_(x)
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(s.new):
                g.replay()
                outs.append(static_y.clone())
            _sync(dev)
            dt = time.perf_counter() - t0
            del g
    return {"prefill_ms": prefill_ms, "decode_s": dt, "tokens_per_s": s.new / dt, "outs": outs}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def set_backend(model: Model, backend: str):
    for b in model.blocks:
        for name in LINEARS:
            m = getattr(b, name)
            if hasattr(m, "backend"):
                m.backend = backend


def decode_suite(device, s: Shape, log: Callable[[str], None] = print, graphs: Optional[bool] = None,
                 afpq_backend: str = "auto") -> Dict:
    """The three variants, eager and (CUDA) graphs. Returns a JSON-able dict. ``afpq_backend``
    is the AFPQ layers' kernel choice ("triton" forces the interpreter in a CPU dry run)."""
    graphs = device.type == "cuda" if graphs is None else graphs
    torch.manual_seed(1)
    prompt = torch.randn(1, s.prompt, s.hidden, device=device)
    res: Dict = {"shape": s.__dict__.copy(), "variants": {}, "checks": {}}
    modes = ["eager"] + (["graph"] if graphs else [])

    def run(name, model):
        entry = {"weight_GB": weight_bytes(model) / 1e9}
        outs = {}
        for m in modes:
            t0 = time.time()
            try:
                r = run_decode(model, prompt, m == "graph")
                outs[m] = r.pop("outs")
                entry[m] = r
            except Exception as exc:
                entry[m] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            log(f"  decode {name} {m}: {entry[m]} ({time.time() - t0:.0f} s)")
        if "eager" in outs and "graph" in outs:
            errs = [rel(a, b) for a, b in zip(outs["graph"], outs["eager"])]
            entry["graph_vs_eager_rel_err"] = max(errs)
            # Outputs are fed back: a difference in the last bits (split-K sums, kernel
            # choice) can grow step by step. The first step tells a capture bug from that.
            entry["graph_vs_eager_rel_err_first_step"] = errs[0]
            entry["graph_vs_eager_rel_err_by_step"] = {i: errs[i] for i in (0, 1, 3, 7, 15, 31, 63, 127) if i < len(errs)}
        res["variants"][name] = entry
        return outs

    model = Model(s, device)
    run("fp16", model)
    quantize_afpq(model)
    set_backend(model, afpq_backend)
    outs = run("afpq_nf4", model)
    # Same AFPQ model through the torch reference kernel: first decode outputs must agree.
    try:
        set_backend(model, "torch")
        with torch.no_grad():
            x = model.prefill(prompt.to(model.dtype))
            ref = [x := model.step(x) for _ in range(min(4, s.new))]
        set_backend(model, afpq_backend)
        res["checks"]["afpq_triton_vs_torch_ref_rel_err"] = max(rel(a, b) for a, b in zip(outs["eager"], ref))
    except Exception as exc:
        res["checks"]["afpq_triton_vs_torch_ref_rel_err"] = f"{type(exc).__name__}: {exc}"
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        run("int4", to_int4(Model(s, device)))
    except Exception as exc:
        res["variants"]["int4"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    v = res["variants"]
    for m in modes:
        try:
            a, f, i = (v[k].get(m, {}).get("tokens_per_s") for k in ("afpq_nf4", "fp16", "int4"))
        except AttributeError:
            continue
        res["checks"][f"{m}_afpq_over_fp16"] = a / f if a and f else None
        res["checks"][f"{m}_afpq_over_int4"] = a / i if a and i else None
    return res
