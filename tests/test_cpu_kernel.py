"""The native CPU kernel (afpq_plugins.kernels.cpu) against core's decode and float64 maths.

References: the decoded weight must equal core's ``QuantizedWeight.dequantize`` bit for bit
(the kernel builds its per-group tables with the same float32 operations); the forward is
compared with float64 ``x @ W.T + b`` (W = core's decode) and with the torch reference kernel.

Stated bounds, from the arithmetic of each path. Float32 products (GEMV, the small-batch
micro-kernel, the float32 chunks): K float32 products accumulated in SIMD lanes (or at::mm), so
|y - y64| <= K * 2**-24 * (|x| @ |W|.T + |b|) (the classic gamma_K bound, u = 2**-24), plus
the output rounding (2**-8 relative for bfloat16 outputs). Bfloat16 products (batches above
``SMALL_ROWS`` rows on a CPU with native bf16, see ``cpu.prefill_bf16``; bfloat16 batches of
``REG_ROWS_AMX + 1`` to ``SMALL_ROWS`` rows on AMX): x and W are rounded to bf16 first (relative error 2**-9 each, so 2**-8 + 2**-18 per product), accumulated in
float32, the product rounded to bf16 and the bias added: |y - y64| <= (2**-8 + 2**-18 +
K * 2**-24) * (|x| @ |W|.T) + 2**-8 * (|y64| + |b|) + K * 2**-24 * |b|.

Every ISA path this machine can run is covered (``AFPQ_CPU_ISA``); the AVX-512 layout
(16 lanes) is also decoded by the portable path, so its repack is checked here even on
machines without AVX-512.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _tiny import random_quantized_layer

from afpq_plugins.core.quantize import QuantizedWeight
from afpq_plugins.kernels import choose_kernel, cpu, explain, torch_ref
from afpq_plugins.kernels.cpu import build
from afpq_plugins.kernels.cpu.repack import build_pack, get_pack

OK, WHY = cpu.available()
needs_kernel = pytest.mark.skipif(not OK, reason=f"native CPU kernel unavailable: {WHY}")
ISAS = [name for name, code in cpu.ISAS.items() if OK and code <= cpu._supported()]

# (layout, fmt, mode, group_size, act_order, in_features, out_features)
CASES = [
    ("gptq", "nf4", "afpq", 64, False, 192, 72),
    ("gptq", "nf4", "afpq", 32, True, 128, 40),
    ("gptq", "fp4", "afpq", -1, False, 136, 24),
    ("gptq", "fp4", "sym", 12, False, 96, 20),      # groups not a multiple of the SIMD width
    ("gptq", "int4", "zp", 128, True, 256, 17),
    ("gptq", "nf3", "afpq", 64, False, 192, 40),     # 3-bit words spill across int32 boundaries
    ("gptq", "nf3", "afpq", 32, True, 96, 24),
    ("gptq", "fp3", "sym", -1, False, 160, 12),
    ("gptq", "int3", "zp", 16, False, 64, 33),
    ("gptq", "int2", "zp", 16, True, 80, 24),
    ("gptq", "int2", "zp", -1, False, 48, 9),
    ("awq", "nf4", "afpq", 40, False, 200, 40),
    ("awq", "fp4", "zp", 32, False, 96, 24),
    ("awq", "int4", "zp", -1, False, 72, 16),
]
IDS = [f"{c[0]}-{c[1]}-{c[2]}-g{c[3]}{'-act' if c[4] else ''}-{c[5]}x{c[6]}" for c in CASES]


def _layer(layout, fmt, mode, gs, act, in_f, out_f, seed=0):
    return random_quantized_layer(layout, fmt, mode, gs, act, in_f, out_f, seed)


def _bf16_products(x, isa="avx512") -> bool:
    m = x.shape[0]
    if m > cpu.SMALL_ROWS:
        return cpu.prefill_bf16(x.dtype)
    amx = x.dtype == torch.bfloat16 and isa == "avx512" and cpu.amx_usable()
    return amx and m > cpu.REG_ROWS_AMX


def _check(y, x, w, bias, isa="avx512"):
    """|y - y64| within the stated bound of the path that ran (see the module docstring)."""
    x64, w64, b64 = x.double(), w.double(), bias.double()
    ref = x64 @ w64.T + b64
    k = x.shape[-1]
    bound = (x64.abs() @ w64.abs().T + b64.abs()) * (k * 2**-24)
    if _bf16_products(x, isa):
        bound = bound + (x64.abs() @ w64.abs().T) * (2**-8 + 2**-18) + (ref.abs() + b64.abs()) * 2**-8
    elif y.dtype == torch.bfloat16:
        bound = bound + ref.abs() * 2**-8
    err = (y.double() - ref).abs()
    assert (err <= bound + 1e-30).all(), f"max err {err.max().item():.3g}, bound at it {bound.flatten()[err.argmax()]:.3g}"
    return bound


@pytest.fixture
def isa_env(monkeypatch):
    def use(name):
        monkeypatch.setenv("AFPQ_CPU_ISA", name)
    return use


@needs_kernel
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_decoded_weight_equals_core_decode(case):
    layer, qw = _layer(*case)
    ref = qw.dequantize(torch.float32)
    assert torch.equal(layer.dequantize(), ref)
    for isa in ISAS:
        lanes = cpu.lanes_of(isa)
        pack = build_pack(layer, lanes)
        assert torch.equal(cpu.decode_packed(pack, layer.in_features, isa), ref), isa
    if "avx512" not in ISAS:  # the 16-lane (AVX-512) layout, decoded by the portable path
        pack = build_pack(layer, 16)
        assert torch.equal(cpu.decode_packed(pack, layer.in_features, "scalar"), ref)


#: Every path: GEMV (1-8 rows), AMX or the float32 small-batch micro-kernel (9-64), chunks (257).
MS = (1, 2, 3, 9, 16, 17, 64, 257)


@needs_kernel
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefill", ["auto", "bf16"])
def test_forward_matches_float64_and_torch_path(case, dtype, prefill, isa_env, monkeypatch):
    if prefill == "bf16" and not cpu.native_bf16():
        pytest.skip("no native bf16 on this CPU")
    monkeypatch.setenv("AFPQ_CPU_PREFILL", prefill)
    layer, qw = _layer(*case)
    w = qw.dequantize(torch.float32)
    torch.manual_seed(0)
    for isa in ISAS:
        isa_env(isa)
        for m in MS if prefill == "auto" else (257,):
            x = torch.randn(m, layer.in_features).to(dtype)
            with torch.no_grad():
                assert cpu.can_implement(x, layer) == (True, "")
                y = cpu.linear(x, layer)
                assert y.dtype == dtype and y.shape == (m, layer.out_features)
                bound = _check(y, x, w, layer.bias, isa)
                y_ref = torch_ref.linear(x, layer)
            err = (y.double() - y_ref.double()).abs()
            assert (err <= 2 * bound + 1e-30).all(), f"{isa} M={m}: max diff to the torch path {err.max():.3g}"


@needs_kernel
def test_bf16_products_only_where_stated(monkeypatch):
    """The path table: float32 activations keep float32 products unless torch's float32 matmul
    precision allows less ("high"/"medium") or AFPQ_CPU_PREFILL=bf16 asks for it; never with
    AFPQ_CPU_PREFILL=fp32; an unknown setting is a named error. The registry notices a change of
    torch's precision after the first call (a new binding)."""
    prec = torch.get_float32_matmul_precision()
    try:
        monkeypatch.setenv("AFPQ_CPU_PREFILL", "auto")
        torch.set_float32_matmul_precision("highest")
        assert not cpu.prefill_bf16(torch.float32)
        layer, qw = _layer("gptq", "nf4", "afpq", 64, False, 192, 72)
        x = torch.randn(cpu.SMALL_ROWS + 5, 192)
        with torch.no_grad():
            exact = layer(x)  # float32 products: the float32 bound
            _check(exact, x, qw.dequantize(), layer.bias)
            torch.set_float32_matmul_precision("medium")
            assert cpu.prefill_bf16(torch.float32) == cpu.native_bf16()
            fast = layer(x)
        if cpu.native_bf16():
            assert not torch.equal(fast, exact)  # the binding followed torch's setting
        _check(fast, x, qw.dequantize(), layer.bias)
        monkeypatch.setenv("AFPQ_CPU_PREFILL", "fp32")
        assert not cpu.prefill_bf16(torch.float32)
    finally:
        torch.set_float32_matmul_precision(prec)
    assert not cpu.prefill_bf16(torch.float16)
    monkeypatch.setenv("AFPQ_CPU_PREFILL", "fast")
    with pytest.raises(ValueError, match="AFPQ_CPU_PREFILL='fast'"):
        cpu.prefill_bf16(torch.float32)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threads_do_not_change_the_result(dtype):
    """Up to SMALL_ROWS rows every output column is summed by one thread in a fixed order: the
    result is bit-identical at 1 and 2 threads; above it at::mm may split sums by thread, so
    the two agree within the stated bound."""
    layer, qw = _layer("gptq", "nf4", "afpq", 32, True, 256, 96)
    w = qw.dequantize(torch.float32)
    n = torch.get_num_threads()
    for m in (3, 9, 64, 257):
        x = torch.randn(m, 256).to(dtype)
        try:
            torch.set_num_threads(1)
            y1 = cpu.linear(x, layer)
            torch.set_num_threads(2)
            y2 = cpu.linear(x, layer)
        finally:
            torch.set_num_threads(n)
        if m <= cpu.SMALL_ROWS:
            assert torch.equal(y1, y2), m
        else:
            bound = _check(y1, x, w, layer.bias)
            assert ((y1.double() - y2.double()).abs() <= 2 * bound + 1e-30).all()


@needs_kernel
def test_registry_picks_cpu_kernel_and_env_forces_torch(monkeypatch):
    layer, qw = _layer("gptq", "nf4", "afpq", 64, False, 192, 72)
    x = torch.randn(2, 192)
    with torch.no_grad():
        assert choose_kernel(x, layer)[0].name == "cpu"
        y = layer(x)
        monkeypatch.setenv("AFPQ_KERNEL", "torch")
        assert choose_kernel(x, layer)[0].name == "torch"
        y_torch = layer(x)
    _check(y, x, qw.dequantize(), layer.bias)
    _check(y_torch, x, qw.dequantize(), layer.bias)
    monkeypatch.delenv("AFPQ_KERNEL")
    # Inputs that need autograd or live elsewhere go to the torch path, with the reason.
    xg = x.clone().requires_grad_()
    assert "no backward" in explain(xg, layer)
    assert cpu.can_implement(torch.empty(1, 192, device="meta"), layer) == (False, "input on meta")


@needs_kernel
def test_pack_is_cached_and_rebuilt_when_buffers_change():
    layer, qw = _layer("gptq", "fp4", "afpq", 32, False, 64, 16)
    lanes = cpu.lanes_of(cpu.isa()[0])
    p = get_pack(layer, lanes)
    assert get_pack(layer, lanes) is p
    x = torch.randn(1, 64)
    with torch.no_grad():
        layer.scales.mul_(2)  # in place: the pack must notice
        y = layer(x)
    assert get_pack(layer, lanes) is not p
    qw2 = QuantizedWeight(qw.codes, qw.scales * 2, qw.scales2, qw.g_idx, qw.fmt, qw.mode, qw.group_size)
    _check(y, x, qw2.dequantize(), layer.bias)


@needs_kernel
def test_unsupported_isa_request_is_refused_with_reason(isa_env):
    layer, _ = _layer("gptq", "nf4", "afpq", 64, False, 192, 72)
    isa_env("sse9")
    assert "not one of" in cpu.can_implement(torch.randn(1, 192), layer)[1]
    if "avx512" not in ISAS:
        isa_env("avx512")
        ok, why = cpu.can_implement(torch.randn(1, 192), layer)
        assert not ok and "avx512" in why


def test_without_compiler_falls_back_to_torch_with_one_warning(monkeypatch):
    layer, qw = _layer("gptq", "nf4", "afpq", 64, False, 192, 72)
    monkeypatch.setattr(build, "load", lambda: (False, "no C++ compiler ('c++' not found on PATH)"))
    monkeypatch.setattr(cpu, "_warned", False)
    x = torch.randn(2, 192)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            k, skipped = choose_kernel(x, layer)
            y = layer(x)
            layer(x)
    assert k.name == "torch" and ("cpu", "no C++ compiler ('c++' not found on PATH)") in skipped
    msgs = [str(w.message) for w in caught if "native CPU kernel" in str(w.message)]
    assert len(msgs) == 1 and "no C++ compiler" in msgs[0]
    assert "apt install g++" in msgs[0] and "pip install ninja" in msgs[0]  # the message names the fix
    _check(y, x, qw.dequantize(), layer.bias)


def test_ninja_is_a_dependency_of_the_package():
    """The build requirement is part of the install (pyproject), not only of the project's venvs."""
    import tomllib
    from pathlib import Path

    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.replace(" ", "").startswith("ninja") for d in deps), deps


@needs_kernel
def test_bound_runner_follows_a_views_new_tensors():
    """Engines (vLLM) pass a LayerView whose tensors they may swap without telling anyone: the
    runner bound once per view notices a new tensor (identity) and an in-place edit (version)."""
    from afpq_plugins.core.spec import QuantSpec
    from afpq_plugins.kernels import afpq_linear
    from afpq_plugins.kernels.ops import LayerView

    layer, qw = _layer("gptq", "nf4", "afpq", 32, False, 64, 16)
    view = LayerView(layer.qweight, layer.scales, layer.second, None, layer.bias,
                     QuantSpec("nf4", 32, "afpq", layer.scales.dtype, "gptq"), 64, 16, True)
    x = torch.randn(2, 64)
    with torch.no_grad():
        _check(afpq_linear(x, view), x, qw.dequantize(), layer.bias)
        view.scales = layer.scales * 2  # a new tensor, no invalidate() call
        view.second = layer.second * 2
        y2 = afpq_linear(x, view)
        view.scales.mul_(0.5)  # in place
        view.second.mul_(0.5)
        y3 = afpq_linear(x, view)
    qw2 = QuantizedWeight(qw.codes, qw.scales * 2, qw.scales2 * 2, qw.g_idx, qw.fmt, qw.mode, qw.group_size)
    _check(y2, x, qw2.dequantize(), layer.bias)
    _check(y3, x, qw.dequantize(), layer.bias)
