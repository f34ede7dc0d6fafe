"""Fused Triton AFPQ kernels, run on CPU with Triton's interpreter.

Triton decides "interpreter or compiler" when a function is decorated with
``@triton.jit``: for its own standard library (``tl.cdiv``, ``tl.sum``...) that is
when ``triton`` is first imported, for our kernels when
``afpq_plugins.kernels.triton`` is imported. So:

* CPU-only machine, triton not imported yet: this module sets ``TRITON_INTERPRET=1``
  before importing triton (on such a machine Triton can only run interpreted anyway)
  and the tests run in this process;
* otherwise (a CUDA machine, or triton imported earlier without the interpreter):
  the in-process interpreter tests skip and one test reruns this file in a subprocess
  with ``TRITON_INTERPRET=1`` and CUDA hidden; on CUDA the compiled kernels are
  additionally checked in-process (``test_compiled_on_cuda``).

Shapes are tiny because the interpreter runs every program in numpy. References: a
float64 product with the exactly decoded weight (``layer.dequantize``), and the torch
reference kernel. Outputs are pre-filled with NaN so that an element the kernel never
writes cannot pass. Interpreted bfloat16 dots go through the shim in
``benchmarks/triton_dev.py`` (Triton's interpreter multiplies their raw bits).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

_SUBPROCESS_FLAG = "AFPQ_TRITON_INTERPRETER_SUBPROCESS"
if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from afpq_plugins.kernels import torch_ref  # noqa: E402
from afpq_plugins.nn import AFPQLinear  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_PKG = ROOT / "afpq_plugins" / "kernels" / "triton"
#: Triton's own library was built for the interpreter: in-process interpreter tests can run.
IN_PROCESS = type(triton.language.cdiv).__name__ == "InterpretedFunction"

# Relative error bounds (Frobenius and max-abs, against the float64 product). The
# kernels round the decoded weight to the activation dtype for tensor-core dots and
# round the output once; the bounds leave at least 4x headroom over what is observed.
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


def _drop(name: str) -> None:
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        sys.modules.pop(key, None)


def _load_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _load_copy(name: str, interpret: bool):
    """A private copy of the kernels package, decorated with TRITON_INTERPRET as asked.
    ``name`` must sit beside the real package (``afpq_plugins.kernels.<x>``)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    spec = importlib.util.spec_from_file_location(name, _PKG / "__init__.py", submodule_search_locations=[str(_PKG)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        _drop(name)
        raise
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
    return mod


@pytest.fixture(scope="module")
def tk():
    if not IN_PROCESS:
        pytest.skip("triton was imported without the interpreter; covered by test_interpreter_suite_in_subprocess")
    name = "afpq_plugins.kernels._triton_interpreted"
    mod = _load_copy(name, interpret=True)
    assert mod.INTERPRET, "kernels were not built for the interpreter"
    dev = _load_file("_afpq_triton_dev", ROOT / "benchmarks" / "triton_dev.py")
    with dev.interpreter_bf16_dot():
        yield mod
    _drop(name)


def _layer(fmt, mode, layout, K, N, gs, *, bias=True, act_order=False, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(K, N, bias=bias)
    layer = AFPQLinear.from_linear(lin, fmt, gs, mode=mode, layout=layout)
    if act_order:
        g = torch.arange(K, dtype=torch.int32) // (K if gs == -1 else gs)
        layer.g_idx.copy_(g[torch.randperm(K)])
        assert not layer.has_default_order()
    return layer


def _ref64(x, layer):
    w = layer.dequantize(torch.float64)  # [out, in], exact float32 decode widened
    y = x.double() @ w.t()
    if layer.bias is not None:
        y = y + layer.bias.double()
    return y


def _assert_close(y, ref, dtype, what):
    y = y.double()
    assert torch.isfinite(y).all(), f"{what}: non-finite output (an element never written?)"
    tol = TOL[dtype]
    scale = ref.norm().clamp_min(1e-30)
    rel = ((y - ref).norm() / scale).item()
    mx = ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    assert rel <= tol and mx <= 2 * tol, f"{what}: rel err {rel:.3g}, max err {mx:.3g} (tol {tol:g})"


# (fmt, mode, layout, K, N, group, M, dtype, act_order, bias, overrides)
CASES = [
    # M = 1: split-K GEMV without tensor cores; group modes 0 (gs 128) and 1 (gs 32)
    ("nf4", "afpq", "gptq", 256, 40, 128, 1, torch.float16, False, True, {}),
    ("fp4", "afpq", "gptq", 128, 72, 32, 1, torch.bfloat16, False, False, {"split_k": 3}),
    ("fp4", "afpq", "awq", 128, 40, 32, 1, torch.float16, False, True, {"block_n": 32}),
    ("nf4", "sym", "gptq", 64, 24, -1, 1, torch.float32, False, True, {}),
    ("int4", "zp", "gptq", 96, 40, 32, 1, torch.float16, False, True, {}),
    ("nf3", "afpq", "gptq", 128, 40, 32, 1, torch.float16, False, True, {"split_k": 2}),
    ("fp3", "afpq", "gptq", 64, 40, 32, 1, torch.bfloat16, True, True, {}),
    ("nf4", "afpq", "gptq", 128, 40, 32, 1, torch.float16, True, False, {"split_k": 2, "block_r": 4}),
    # M = 3: GEMV on tensor cores (BLOCK_M 16) or, forced, CUDA cores (3-D accumulator)
    ("nf4", "afpq", "gptq", 128, 40, 32, 3, torch.float16, True, True, {"block_m": 4}),
    ("fp4", "sym", "awq", 64, 40, 32, 3, torch.bfloat16, False, True, {"split_k": 2, "block_m": 2}),
    ("nf4", "zp", "awq", 64, 24, 16, 3, torch.float32, False, False, {}),
    ("fp3", "sym", "gptq", 64, 40, 32, 3, torch.float16, False, True, {}),
    ("int3", "zp", "gptq", 96, 24, 32, 3, torch.bfloat16, False, True, {}),
    # M = 9: GEMV on tensor cores, split-K with float32 atomics
    ("nf4", "afpq", "gptq", 256, 40, 64, 9, torch.float16, False, True, {"split_k": 2}),
    ("fp4", "afpq", "awq", 128, 24, 64, 9, torch.bfloat16, False, True, {"split_k": 2}),
    ("nf3", "zp", "gptq", 64, 40, 16, 9, torch.float32, False, True, {"split_k": 2}),
    # fold (group parameters applied per K-tile): forced off on CUDA cores; on tensor cores
    # (one group per K-tile: group 128 = 16 code blocks of 8) in each mode
    ("nf4", "afpq", "gptq", 128, 40, 32, 1, torch.float16, False, True, {"fold": False}),
    # folded CUDA-core GEMV with the next K-tile prefetched: several K-tiles per split, both group modes
    ("nf4", "afpq", "gptq", 512, 40, 128, 1, torch.float16, False, True, {"split_k": 2, "prefetch": True}),
    ("fp4", "zp", "gptq", 256, 40, 32, 1, torch.bfloat16, False, True, {"split_k": 1, "prefetch": True}),
    ("nf4", "sym", "gptq", 512, 40, 128, 1, torch.float16, False, True, {"split_k": 1}),
    ("nf4", "afpq", "gptq", 256, 40, 128, 5, torch.float16, False, True, {}),
    ("fp4", "sym", "awq", 256, 40, 128, 3, torch.bfloat16, False, True, {"block_r": 16}),
    ("int4", "zp", "gptq", 256, 40, 128, 9, torch.float16, False, False, {"split_k": 2}),
    ("nf4", "afpq", "gptq", 256, 40, 128, 1, torch.bfloat16, False, True, {"block_m": 16, "path": "gemv"}),
    # M = 17: tiled GEMM
    ("nf4", "afpq", "gptq", 128, 72, 32, 17, torch.float16, False, True, {}),
    ("nf4", "afpq", "gptq", 128, 40, 32, 17, torch.bfloat16, True, True, {}),
    ("fp4", "afpq", "awq", 128, 72, 32, 17, torch.float16, False, False, {"block_n": 32}),
    ("int4", "zp", "awq", 64, 40, 64, 17, torch.bfloat16, False, True, {}),
    ("nf3", "afpq", "gptq", 64, 40, 32, 17, torch.float16, False, True, {}),
    ("fp3", "afpq", "gptq", 64, 24, 32, 17, torch.float32, True, True, {}),
    ("int2", "zp", "gptq", 64, 24, 32, 17, torch.float16, False, True, {}),
    ("int8", "zp", "gptq", 64, 24, 32, 17, torch.float16, True, True, {}),
    # dequantize kernel + matmul (the large-M path)
    ("nf4", "afpq", "gptq", 128, 40, 32, 17, torch.float16, True, True, {"path": "dequant"}),
    ("fp4", "afpq", "awq", 64, 40, 32, 3, torch.bfloat16, False, True, {"path": "dequant"}),
    ("nf3", "afpq", "gptq", 64, 24, 32, 17, torch.float32, False, False, {"path": "dequant"}),
    # forcing each path at an unusual M
    ("nf4", "afpq", "gptq", 64, 40, 32, 1, torch.float16, False, True, {"path": "gemm"}),
    ("fp4", "afpq", "gptq", 64, 40, 32, 20, torch.bfloat16, False, True, {"path": "gemv", "block_m": 16}),
]


def _case_id(c):
    fmt, mode, layout, K, N, gs, M, dt, act, bias, kw = c
    extra = "-".join(f"{k}={v}" for k, v in kw.items())
    return f"{fmt}-{mode}-{layout}-{K}x{N}-g{gs}-M{M}-{str(dt)[6:]}{'-act' if act else ''}{'' if bias else '-nobias'}" + (
        f"-{extra}" if extra else "")


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matmul_matches_references(tk, case):
    fmt, mode, layout, K, N, gs, M, dtype, act, bias, kw = case
    layer = _layer(fmt, mode, layout, K, N, gs, bias=bias, act_order=act)
    torch.manual_seed(1)
    x = torch.randn(M, K).to(dtype)
    out = torch.full((M, N), float("nan"), dtype=dtype)
    y = tk.afpq_matmul(
        x, layer.qweight, layer.scales, layer.second, layer.fmt.lut(layer.mode), bits=layer.bits,
        layout=layout, mode=mode, group_size=gs, g_idx=layer.g_idx, bias=layer.bias, out=out, **kw,
    )
    assert y is out and y.dtype == dtype and y.shape == (M, N)
    if gs == 128 and K == 256 and (M > 1 or kw.get("block_m") == 16):
        plan = tk.plan_matmul(M, N, K, bits=layer.bits, layout=layout, group_size=gs, dtype=dtype, on_cuda=False,
                              sms=4, **{k: v for k, v in kw.items()})
        assert plan.fold and plan.use_dot, plan  # the tensor-core fold is what this case checks
    ref = _ref64(x, layer)
    _assert_close(y, ref, dtype, "vs float64")
    _assert_close(y, torch_ref.linear(x, layer).double(), dtype, "vs torch_ref")


@pytest.mark.parametrize(
    "fmt,mode,layout,gs,act",
    [
        ("nf4", "afpq", "gptq", 32, False),
        ("fp4", "afpq", "gptq", 32, True),
        ("fp4", "sym", "awq", 64, False),
        ("int4", "zp", "awq", 32, False),
        ("nf3", "afpq", "gptq", 32, True),
        ("fp3", "zp", "gptq", 16, False),  # group smaller than a 3-bit code block
    ],
)
def test_dequantize_kernel_is_exact(tk, fmt, mode, layout, gs, act):
    """The Triton decode does core's float32 arithmetic: bit-identical weights."""
    layer = _layer(fmt, mode, layout, 128, 40, gs, act_order=act)
    w_t = tk.dequantize_layer(layer, torch.float32)
    assert torch.equal(w_t, layer.dequantize(torch.float32).t())
    poisoned = torch.full((128, 40), float("nan"), dtype=torch.float16)
    kw, lut = tk.launching._layer_args(layer, "cpu")
    got = tk.dequantize(layer.qweight, layer.scales, layer.second, lut, in_features=128, out=poisoned,
                        block_n=16, block_r=8, **kw)
    assert torch.equal(got, layer.dequantize(torch.float16).t())


def test_linear_contract_leading_dims_and_dtypes(tk):
    layer = _layer("nf4", "afpq", "gptq", 64, 40, 32)
    torch.manual_seed(2)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.randn(2, 3, 64).to(dtype)
        y = tk.linear(x, layer)
        assert y.shape == (2, 3, 40) and y.dtype == dtype
        _assert_close(y.reshape(6, 40), _ref64(x.reshape(6, 64), layer), dtype, f"linear {dtype}")
    assert tk.linear(torch.randn(0, 64, dtype=torch.float16), layer).shape == (0, 40)
    # A dtype the kernels do not take falls back to the torch reference.
    x64 = torch.randn(3, 64, dtype=torch.float64)
    assert torch.equal(tk.linear(x64, layer), torch_ref.linear(x64, layer))
    with pytest.raises(ValueError):
        tk.linear(torch.randn(3, 63, dtype=torch.float16), layer)


def test_non_contiguous_activations(tk):
    layer = _layer("fp4", "afpq", "awq", 64, 40, 32)
    x = torch.randn(64, 5).to(torch.float16).t()  # [5, 64], strides (1, 5)
    _assert_close(tk.linear(x, layer), _ref64(x, layer), torch.float16, "transposed x")


def test_g_idx_change_is_seen(tk):
    """The default-order answer is cached per layer; writing g_idx must invalidate it."""
    layer = _layer("nf4", "afpq", "gptq", 128, 24, 32)
    x = torch.randn(3, 128, dtype=torch.float16)
    _assert_close(tk.linear(x, layer), _ref64(x, layer), torch.float16, "default order")
    g = layer.g_idx.clone()
    layer.g_idx.copy_(g[torch.randperm(128)])
    _assert_close(tk.linear(x, layer), _ref64(x, layer), torch.float16, "after in-place act-order")
    layer.g_idx = g  # a new tensor object
    _assert_close(tk.linear(x, layer), _ref64(x, layer), torch.float16, "after reassignment")


def test_dispatcher_reaches_the_kernels(tk):
    """AFPQLinear.forward with backend "triton" goes through kernels/__init__.py to ``linear``."""
    from afpq_plugins.kernels import triton as real

    if not real.INTERPRET:
        pytest.skip("the package's kernels module was imported earlier without the interpreter")
    layer = _layer("fp4", "afpq", "gptq", 64, 40, 32, act_order=True)
    layer.backend = "triton"
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    _assert_close(y, _ref64(x, layer), torch.bfloat16, "AFPQLinear.forward -> triton")


def test_bad_arguments(tk):
    layer = _layer("nf4", "afpq", "gptq", 64, 40, 32)
    lut = layer.fmt.lut(layer.mode)
    x = torch.randn(2, 64, dtype=torch.float16)
    base = dict(bits=4, layout="gptq", mode="afpq", group_size=32, g_idx=layer.g_idx)
    with pytest.raises(ValueError):  # wrong group size for the scales
        tk.afpq_matmul(x, layer.qweight, layer.scales, layer.second, lut, **{**base, "group_size": 16})
    with pytest.raises(ValueError):  # afpq without s_neg
        tk.afpq_matmul(x, layer.qweight, layer.scales, None, lut, **base)
    with pytest.raises(ValueError):  # out of the wrong dtype
        tk.afpq_matmul(x, layer.qweight, layer.scales, layer.second, lut, out=torch.empty(2, 40), **base)
    with pytest.raises(ValueError):
        tk.afpq_matmul(x, layer.qweight, layer.scales, layer.second, lut, path="nope", **base)
    with pytest.raises(ValueError):  # tensor-core tiles below 16
        tk.afpq_matmul(x, layer.qweight, layer.scales, layer.second, lut, path="gemm", block_r=8, **base)
    bad = layer.g_idx.clone()
    bad[5] = 2  # groups are 0 and 1: the kernel would read scales out of bounds
    with pytest.raises(ValueError, match="g_idx"):
        tk.afpq_matmul(x, layer.qweight, layer.scales, layer.second, lut, **{**base, "g_idx": bad})
    layer.g_idx.copy_(bad)
    with pytest.raises(ValueError, match="g_idx"):
        tk.linear(x, layer)


def test_import_error_without_triton(monkeypatch):
    """The dispatcher treats ImportError as "backend unavailable": nothing else may escape."""
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    with pytest.raises(ImportError):
        _load_copy("afpq_plugins.kernels._triton_no_triton", interpret=True)
    assert "afpq_plugins.kernels._triton_no_triton" not in sys.modules


def test_cpu_tensors_refused_without_interpreter():
    """Built for a GPU (no TRITON_INTERPRET), the kernels refuse CPU tensors with a clear error."""
    name = "afpq_plugins.kernels._triton_compiled"
    mod = _load_copy(name, interpret=False)
    try:
        assert not mod.INTERPRET
        layer = _layer("nf4", "afpq", "gptq", 64, 40, 32)
        with pytest.raises(RuntimeError, match="CUDA"):
            mod.linear(torch.randn(1, 64, dtype=torch.float16), layer)
    finally:
        _drop(name)


def test_interpreter_suite_in_subprocess():
    if IN_PROCESS or os.environ.get(_SUBPROCESS_FLAG):
        pytest.skip("the interpreter tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", **{_SUBPROCESS_FLAG: "1"})
    root = str(ROOT)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


_AOT_SCRIPT = r"""
import json, sys, torch
from afpq_plugins.kernels import triton as tk
import triton_dev
assert not tk.INTERPRET
dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
results = []
for M, K, N, bits, layout, mode, act, dtype, cap, path in json.loads(sys.argv[1]):
    plan = tk.plan_matmul(M, N, K, bits=bits, layout=layout, group_size=128, act_order=act,
                          capability=tuple(cap), path=path, dtype=dt[dtype])
    k = triton_dev.aot_compile(plan, bits=bits, layout=layout, mode=mode, group_size=128, K=K, dtype=dt[dtype],
                       capability=tuple(cap))
    results.append([plan.path, plan.use_dot, plan.split, k.metadata.shared, triton_dev.SHARED_LIMIT[cap[0]], len(k.asm["cubin"])])
for dtype in ("fp16", "bf16", "fp32"):  # the split-K reduction
    k = triton_dev.aot_compile_reduce(dtype=dt[dtype])
    results.append(["reduce", False, False, k.metadata.shared, triton_dev.SHARED_LIMIT[9], len(k.asm["cubin"])])
print(json.dumps(results))
"""

# Plans for LLaMA-sized layers (the planner's auto choice, and each fused path forced),
# compiled down to cubins.
_AOT_CASES = [
    (1, 4096, 4096, 4, "gptq", "afpq", False, "fp16", (9, 0), "auto"),      # gemv, CUDA cores, split-K
    (16, 4096, 4096, 4, "gptq", "afpq", False, "bf16", (9, 0), "gemv"),     # gemv, tensor cores, split-K
    (128, 4096, 11008, 4, "gptq", "afpq", True, "fp16", (9, 0), "gemm"),    # gemm, act-order
    (512, 5120, 13824, 4, "awq", "zp", False, "bf16", (9, 0), "gemm"),      # gemm, awq
    (1, 4096, 4096, 3, "gptq", "afpq", False, "fp16", (9, 0), "auto"),      # 3-bit gemv (spills)
    (64, 4096, 4096, 4, "gptq", "sym", False, "fp32", (9, 0), "gemm"),      # fp32, ieee dot
    (2048, 4096, 4096, 4, "gptq", "afpq", False, "fp16", (9, 0), "auto"),   # dequant kernel
    (256, 4096, 4096, 4, "gptq", "afpq", False, "bf16", (8, 0), "gemm"),    # A100
    (16, 4096, 4096, 4, "gptq", "afpq", False, "bf16", (9, 0), "auto"),     # dequant from M = 2 on CUDA
]


def test_compiled_path_builds_for_sm90_and_sm80():
    """No GPU needed: Triton's full pipeline (TTIR -> PTX -> ptxas cubin) for the kernels
    the planner picks, within each architecture's shared-memory limit. The interpreter
    never sees the compiled path, so this is its only check on a CPU-only machine."""
    import json

    pytest.importorskip("triton.backends.compiler")

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("triton's bundled ptxas is missing")
    root = str(ROOT)
    env = dict(os.environ, TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, str(ROOT / "benchmarks"), env.get("PYTHONPATH")) if p)
    cases = json.dumps([list(c) for c in _AOT_CASES])
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, cases], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for case, (path, use_dot, split, shared, limit, cubin) in zip(_AOT_CASES + ["reduce"] * 3, results):
        assert cubin > 0, case
        assert shared <= limit, f"{case}: {shared} bytes of shared memory > {limit}"
    results = results[:-3]
    assert [r[0] for r in results] == ["gemv", "gemv", "gemm", "gemm", "gemv", "gemm", "dequant", "gemm", "dequant"]
    assert [r[1] for r in results[:2]] == [False, True] and results[0][2]  # M=1: CUDA cores, split-K


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("M", [1, 3, 9, 17, 200, 1500])
@pytest.mark.parametrize(
    "fmt,mode,layout,gs,act",
    [
        ("nf4", "afpq", "gptq", 128, False),
        ("fp4", "afpq", "gptq", 128, True),
        ("fp4", "afpq", "awq", 128, False),
        ("int4", "zp", "gptq", 64, False),
        ("nf3", "afpq", "gptq", 128, False),
        ("fp3", "sym", "gptq", 32, True),
    ],
)
def test_compiled_on_cuda(M, fmt, mode, layout, gs, act):
    """The compiled kernels (never exercised by the interpreter) on real shapes."""
    if IN_PROCESS:
        pytest.skip("triton runs interpreted in this process")
    from afpq_plugins.kernels import triton as real

    layer = _layer(fmt, mode, layout, 1024, 328, gs, act_order=act).cuda()
    kw, lut = real.launching._layer_args(layer, torch.device("cuda"))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        torch.manual_seed(3)
        x = torch.randn(M, 1024, device="cuda").to(dtype)
        ref = _ref64(x, layer)
        _assert_close(real.linear(x, layer), ref, dtype, f"compiled linear {dtype}")
        out = torch.full((M, 328), float("nan"), device="cuda", dtype=dtype)
        real.afpq_matmul(x, layer.qweight, layer.scales, layer.second, lut, bias=layer.bias, out=out, **kw)
        _assert_close(out, ref, dtype, f"compiled afpq_matmul, poisoned out, {dtype}")
        if M <= 16:  # the fused GEMV (auto from M = 2 on CUDA is dequant + cuBLAS)
            _assert_close(real.linear(x, layer, path="gemv"), ref, dtype, f"compiled gemv, {dtype}")
            _assert_close(real.linear(x, layer, path="gemv", split_k=1), ref, dtype, f"compiled, no split, {dtype}")
        if M >= 17:
            _assert_close(real.linear(x, layer, path="gemm"), ref, dtype, f"compiled fused gemm, {dtype}")
        for _ in range(3):  # split-K partial tiles and their reduction, repeated (a race would move the error)
            _assert_close(real.linear(x, layer, path="gemv" if M <= 16 else "gemm", split_k=4), ref, dtype,
                          f"compiled split-K x4 repeated, {dtype}")
    assert torch.equal(real.dequantize_layer(layer, torch.float32), layer.dequantize(torch.float32).t())
