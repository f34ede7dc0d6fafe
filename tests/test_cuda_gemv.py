"""The CUDA register-table GEMV (afpq_plugins.kernels.cuda): its decode, repack and plan, on CPU;
its compile without a GPU (NVRTC); the kernel itself where a GPU is present.

References, all independent of the kernel's own code path:

* the permute decode (PTX ``prmt`` semantics, modelled in numpy) is compared bit for bit with
  core's :func:`~afpq_plugins.core.quantize.decode` for every built-in format, mode,
  activation dtype and a grid of scale pairs (zero, fp16 subnormals, 65504, overflow to inf);
  ``prmt`` itself against hand-computed byte permutes;
* the repacked buffers, decoded through the model, must give core's decoded weight (the torch
  reference's ``dequantize_t``) bit for bit, for gptq/awq, 3/4 bits, act-order, padded groups;
* the modelled GEMV (the kernel's order of FMAs and additions) against float64 ``x @ W.T + b``
  within the stated bound: a chain of ``n`` half-precision FMAs per lane loses at most
  ``n * u * sum|x_k w_k|`` (``u`` = 2**-11 fp16, 2**-8 bf16; n = 8 for fp16 (16-code chains),
  4 for bf16), the float32 adds ``K * 2**-24 * sum|x w|``, the output rounding ``u * |y|``;
* on a GPU: the kernel's output equals the model's bit for bit, is within the same bound of
  float64, writes every output (NaN-poisoned before), and a CUDA-graph replay equals the eager
  call bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny import random_quantized_layer

from afpq_plugins.core.formats import get_format
from afpq_plugins.core.packing import pack_gptq
from afpq_plugins.core.quantize import decode
from afpq_plugins.kernels import torch_ref
from afpq_plugins.kernels import cuda as ck
from afpq_plugins.kernels.cuda import nvrtc, planning, source
from afpq_plugins.kernels.cuda import prmt_model as pm

NVRTC_OK, NVRTC_WHY = nvrtc.available()
needs_nvrtc = pytest.mark.skipif(not NVRTC_OK, reason=f"libnvrtc not available: {NVRTC_WHY}")
HAS_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
needs_gpu = pytest.mark.skipif(not (HAS_GPU and NVRTC_OK),
                               reason="needs a CUDA GPU with compute capability >= 8.0 and libnvrtc"
                               + ("" if NVRTC_OK else f" ({NVRTC_WHY})"))

FORMAT_MODES = [(f, m) for f in ("fp4", "fp3", "nf4", "nf3", "int4", "int3") for m in ("afpq", "sym", "zp")
                if get_format(f).supports(m)]


# -- prmt semantics ----------------------------------------------------------------------------

def test_prmt_hand_cases():
    a, b = 0x33221100, 0x77665544
    assert int(pm.prmt(a, b, 0x3210)) == a
    assert int(pm.prmt(a, b, 0x7654)) == b
    assert int(pm.prmt(a, b, 0x7531)) == 0x77553311
    assert int(pm.prmt(a, b, 0x5140)) == 0x55114400  # bytes 0, 4, 1, 5
    assert int(pm.prmt(a, b, 0xFFFF3210)) == a  # only c[15:0] is read
    # sign replication: bit 3 of a selector nibble
    assert int(pm.prmt(0x00000080, 0, 0x0008)) == 0x808080FF
    assert int(pm.prmt(0x00007F80, 0, 0x9898)) == 0x00FF00FF
    # the kernel's bit-3 masks: byte i = 0xff where nibble i of q has bit 3
    q = 0x80F70819  # nibbles (low first) 9, 1, 8, 0, 7, F, 0, 8
    m0 = int(pm.prmt(q, (q << 4) & 0xFFFFFFFF, 0x9D8C))
    m1 = int(pm.prmt(q, (q << 4) & 0xFFFFFFFF, 0xBFAE))
    assert m0 == 0x00FF00FF and m1 == 0xFF00FF00


def test_rounding_helpers():
    v = np.array([1.0, 1 + 2**-11, 1 + 3 * 2**-11, 65504.0, 65520.0, 2**-25, 3 * 2**-26, -0.0], dtype=np.float32)
    got = pm.round_f16(v)
    assert got.tolist() == [0x3C00, 0x3C00, 0x3C02, 0x7BFF, 0x7C00, 0x0000, 0x0001, 0x8000]
    w = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, -2.5, 3.0e38, 1e-40], dtype=np.float32)
    assert pm.round_bf16(w).tolist() == torch.tensor(w).to(torch.bfloat16).view(torch.int16).numpy().view(
        np.uint16).tolist()
    assert pm.round_bf16(np.float32(1 + 2**-8)).item() == 0x3F80  # tie to even
    assert pm.round_bf16_f64(np.float64(1 + 2**-8 + 2**-30)).item() == 0x3F81  # no double rounding


# -- the table + permute decode against core's decode, bit for bit ----------------------------

SCALES = np.array([0.0, 2**-24, 3 * 2**-24, 2**-14, 6.1e-5, 1e-3, 0.0123, 0.5, 1.0, 3.0, 1000.0, 65504.0])
ZEROS = np.array([0.0, 1.0, 3.0, 7.5, 8.0, 15.0, -2.0, 100.0])


@pytest.mark.parametrize("fmt,mode", FORMAT_MODES, ids=[f"{f}-{m}" for f, m in FORMAT_MODES])
@pytest.mark.parametrize("act", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("sdt", [torch.float16, torch.bfloat16, torch.float32], ids=["s16", "sbf16", "s32"])
def test_permute_decode_equals_core_decode(fmt, mode, act, sdt):
    f = get_format(fmt)
    bf = act == torch.bfloat16
    sc = torch.tensor(SCALES).to(sdt)
    if sdt == torch.float32:
        sc = torch.cat([sc, torch.tensor([1e5, 3.4e38, 1e-40])])  # beyond fp16 (overflow to inf / bf16 subnormal)
    second = torch.tensor(ZEROS).to(sdt) if mode == "zp" else sc
    a, b = torch.meshgrid(sc, second, indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    nt = 1 << f.bits
    ent = pm.table_entries(f.lut(mode).tolist(), mode, a.float().numpy(), b.float().numpy(), bf)
    cpb = 8 if nt == 16 else 32
    rng = np.random.default_rng(0)
    codes = np.stack([np.resize(np.arange(nt), cpb), np.resize(np.arange(nt)[::-1], cpb),
                      rng.integers(0, nt, cpb), rng.integers(0, nt, cpb)])
    got = pm.decode_codes(codes[None], ent[:, None, :])  # [pairs, rows, cpb]
    ref = decode(torch.from_numpy(codes)[None].expand(len(a), -1, -1), f, mode, a[:, None, None], b[:, None, None],
                 act).view(torch.int16).numpy().view(np.uint16)
    bad = np.argwhere(got != ref)
    assert bad.size == 0, (f"{len(bad)} mismatches, first: scale pair {a[bad[0][0]].item()}, {b[bad[0][0]].item()}, "
                           f"code {codes[bad[0][1], bad[0][2]]}: {got[tuple(bad[0])]:#06x} vs core {ref[tuple(bad[0])]:#06x}")
    if sdt == torch.float16 and mode != "zp":  # the grid reaches fp16 infinity (65504 * 6 for fp4)
        assert f.sorted_values[-1] * 65504 < 65520 or (ref == 0x7C00).any() or bf


def test_decode_model_can_fail():
    """A wrong plane order or a missing bit-3 select is caught by the comparison above."""
    f = get_format("nf4")
    ent = pm.table_entries(f.lut("afpq").tolist(), "afpq", np.float32(0.1), np.float32(0.2))
    codes = np.arange(8)[None] + 8
    L, H = pm.planes(ent)
    good = pm.decode_codes(codes, ent)
    q = sum(int(c) << (4 * i) for i, c in enumerate(codes[0]))
    swapped = pm.halves(pm.decode_word4(np.array(q), H, L))  # planes swapped
    assert not np.array_equal(good[0], swapped)
    assert not np.array_equal(good[0], pm.decode_codes(codes - 8, ent)[0])  # bit 3 matters


# -- repack + plan: the decoded weight of the kernel's buffers equals core's -------------------

# (layout, fmt, mode, group_size, act_order, in_features, out_features)
CASES = [
    ("gptq", "nf4", "afpq", 64, False, 256, 72),      # native layout, no copy
    ("gptq", "fp4", "afpq", -1, False, 512, 40),      # one group: split into units
    ("gptq", "nf4", "afpq", 32, True, 128, 40),       # act-order: sorted, gathered
    ("gptq", "int4", "zp", 20, False, 160, 33),       # group not a multiple of 8: padded
    ("gptq", "fp4", "sym", 128, False, 256, 24),
    ("awq", "nf4", "afpq", 64, False, 256, 48),
    ("awq", "int4", "zp", -1, False, 128, 16),
    ("gptq", "nf3", "afpq", 64, False, 256, 40),      # 3-bit repack
    ("gptq", "fp3", "sym", 32, True, 128, 24),
    ("gptq", "int3", "zp", 48, False, 192, 17),       # 3-bit, group padded to 64
]
IDS = [f"{c[0]}-{c[1]}-{c[2]}-g{c[3]}{'-act' if c[4] else ''}-{c[5]}x{c[6]}" for c in CASES]


def make_layer(layout, fmt, mode, gs, act, in_f, out_f, seed=0, bias=True):
    return random_quantized_layer(layout, fmt, mode, gs, act, in_f, out_f, seed, bias)[0]


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("act", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_repacked_weight_equals_reference(case, act):
    layer = make_layer(*case)
    prep = ck.prepare(layer)
    got = pm.decoded_weight(prep, act == torch.bfloat16)
    ref = torch_ref.dequantize_t(layer, act).t().contiguous().view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(got, ref), f"{(got != ref).sum()} of {got.size} weights differ"
    layout, fmt, mode, gs, act_order, in_f, out_f = case
    native = layout == "gptq" and layer.bits == 4 and not act_order and (gs == -1 or gs % 8 == 0)
    assert (prep.q is layer.qweight) == native
    assert (prep.kmap is None) == (not act_order and (gs == -1 or gs % planning.codes_per_block(layer.bits) == 0))
    assert prep.extra_bytes == (0 if native else prep.q.numel() * 4) + 4 * out_f + \
        (0 if prep.kmap is None else 4 * prep.kmap.numel())


def test_repack_detects_a_moved_code():
    """The comparison above fails when one code moves (the check can fail)."""
    layer = make_layer(*CASES[5])
    prep = ck.prepare(layer)
    q = prep.q.clone()
    q[3, 5] ^= 0x0000F000
    prep.q = q
    ref = torch_ref.dequantize_t(layer, torch.float16).t().contiguous().view(torch.int16).numpy().view(np.uint16)
    assert not np.array_equal(pm.decoded_weight(prep), ref)


def test_pack3_layout_by_hand():
    codes = torch.arange(32).remainder(8).view(32, 1)  # code of input i = i % 8
    codes[24:, 0] = torch.tensor([5, 2, 7, 0, 1, 6, 3, 4])
    w = planning.pack3(codes).view(torch.int64) if False else planning.pack3(codes)
    words = [int(v) & 0xFFFFFFFF for v in w[:, 0]]
    top = [5, 2, 7, 0, 1, 6, 3, 4]
    for j in range(3):
        for i in range(8):
            nib = (words[j] >> (4 * i)) & 0xF
            assert nib & 7 == (8 * j + i) % 8
            assert nib >> 3 == (top[i] >> j) & 1
    rng = torch.Generator().manual_seed(0)
    c = torch.randint(0, 8, (96, 7), generator=rng)
    assert torch.equal(planning.unpack3(planning.pack3(c)), c.int())


def test_pack4_is_gptq():
    c = torch.randint(0, 16, (64, 10), generator=torch.Generator().manual_seed(1))
    assert torch.equal(planning.pack4(c), pack_gptq(c.t(), 4))


def test_input_order_act_order():
    g_idx = torch.tensor([1, 0, 1, 0, 2, 2, 0, 1, 2, 1], dtype=torch.int32)  # group sizes 3, 4, 3
    kmap, gp = planning.input_order(10, 4, 3, g_idx, False, 8)  # (group size "4" is ignored: g_idx rules)
    assert gp == 8
    assert kmap.tolist() == [1, 3, 6, -1, -1, -1, -1, -1, 0, 2, 7, 9, -1, -1, -1, -1, 4, 5, 8, -1, -1, -1, -1, -1]
    kmap, gp = planning.input_order(64, 16, 4, None, True, 8)
    assert kmap is None and gp == 16
    kmap, gp = planning.input_order(60, 20, 3, None, True, 8)
    assert gp == 24 and kmap.tolist()[:24] == list(range(20)) + [-1] * 4


def test_plan_units_and_slices():
    p = planning.make_plan(4, 32, 128)  # K = 4096, group 128
    assert (p.bpg, p.upg, p.bpu, p.units, p.ch(1), p.ch(3), p.ch(8)) == (16, 1, 16, 32, 16, 8, 8)
    p = planning.make_plan(4, 1, 4096)  # group -1
    assert p.units >= planning.MIN_UNITS and p.bpg == p.upg * p.bpu and p.bpu % p.ch(1) == 0
    p = planning.make_plan(3, 2, 64)
    assert (p.bpg, p.upg, p.units) == (2, 1, 2) and p.ch(1) == 2  # units are not split below 8 blocks
    assert planning.slices(4096, 32, 132) == 16
    assert planning.slices(28672, 64, 132) == 8  # 896 blocks: 32 * 132 / 896 = 4.7 warps each, rounded up
    assert planning.slices(4096, 3, 132) == 2  # never more slices than units
    assert planning.slices(4096, 32, 132, 2) == 8  # launch bounds of the M > 1 kernels (256 threads)
    assert planning.chain_codes(4, False, 16) == 16 and planning.chain_codes(4, True, 16) == 8
    assert planning.chain_codes(4, False, 1) == 8


# -- the modelled GEMV (the kernel's order) against float64 -----------------------------------

def reference64(layer, x):
    w = torch_ref.dequantize_t(layer, x.dtype).double()  # [K, N], the exact decoded weights
    b = layer.bias.double() if layer.bias is not None else 0.0
    x64 = x.double()
    return x64 @ w + b, x64.abs() @ w.abs()


def bound(ref, absprod, dtype, K, chain):
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    n = chain // 2  # FMAs per half2 lane in one chain
    return 1.01 * (n * u * absprod + K * 2.0**-24 * absprod + u * ref.abs()) + 1e-30


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("M,act", [(1, torch.float16), (3, torch.bfloat16), (8, torch.float16)],
                         ids=["m1-fp16", "m3-bf16", "m8-fp16"])
def test_modelled_gemv_within_bound(case, M, act):
    layer = make_layer(*case)
    prep = ck.prepare(layer)
    x = torch.randn(M, layer.in_features, generator=torch.Generator().manual_seed(2)).to(act)
    ks = planning.slices(layer.out_features, prep.plan.units, 132, M)
    bf = act == torch.bfloat16
    y = pm.emulate(prep, x, ks, bf)
    yv = (pm.bf16_value(y) if bf else pm.f16_value(y))
    ref, absprod = reference64(layer, x)
    ch = prep.plan.ch(M, bf)
    b = bound(ref, absprod, act, layer.in_features, planning.chain_codes(layer.bits, bf, ch)).numpy()
    err = np.abs(yv - ref.numpy())
    assert (err <= b).all(), f"max err {err.max():.3g}, bound there {b.flatten()[err.argmax()]:.3g}"
    # the typical error is far inside the bound
    assert np.linalg.norm(yv - ref.numpy()) <= 4e-3 * np.linalg.norm(ref.numpy()) * (8 if bf else 1)


def test_modelled_gemv_can_fail():
    """Dropping one unit's contribution (a planning bug) breaks the bound above."""
    layer = make_layer(*CASES[1])
    prep = ck.prepare(layer)
    x = torch.randn(1, layer.in_features, generator=torch.Generator().manual_seed(3)).half()
    ref, absprod = reference64(layer, x)
    b = bound(ref, absprod, torch.float16, layer.in_features, 16).numpy()
    q = prep.q.clone()
    rows = prep.plan.bpu * prep.plan.wpb
    q[:rows] = 0x77777777  # unit 0 now decodes code 7 everywhere
    prep.q = q
    err = np.abs(pm.f16_value(pm.emulate(prep, x, 4)) - ref.numpy())
    assert (err > b).any()


# -- host API without a GPU --------------------------------------------------------------------

def test_can_implement_reasons():
    layer = make_layer(*CASES[0])
    x = torch.randn(1, layer.in_features).half()
    ok, why = ck.can_implement(x, layer)
    assert not ok and "CUDA" in why
    assert ck.why_not(1, torch.float16, layer) == ""
    assert ck.why_not(8, torch.bfloat16, layer) == ""
    assert "M = 9" in ck.why_not(9, torch.float16, layer)
    assert "float32" in ck.why_not(1, torch.float32, layer)
    int2 = make_layer("gptq", "int4", "zp", 32, False, 64, 8)
    int2.bits = 2
    assert "2-bit" in ck.why_not(1, torch.float16, int2)


def test_register_adds_a_kernel_that_passes_cpu_inputs(monkeypatch):
    from afpq_plugins import kernels

    monkeypatch.setattr(kernels, "_KERNELS", dict(kernels._KERNELS))
    kernels.kernels.cache_clear()
    try:
        ck.register()
        names = [k.name for k in kernels.kernels()]
        assert names[0] == "cuda" and "torch" in names
        layer = make_layer(*CASES[0])
        x = torch.randn(2, layer.in_features, device="meta")  # every kernel but torch passes it over
        k, skipped = kernels.choose_kernel(x, layer)
        assert k.name != "cuda" and ("cuda", "input is not on a CUDA device") in skipped
    finally:
        monkeypatch.undo()
        kernels.kernels.cache_clear()
    # built in: the registry chooses it first on CUDA inputs of at most 8 rows
    assert [k.name for k in kernels.kernels()][0] == "cuda"


def test_source_renders_exact_grid():
    src = source.render(bits=4, mode=0, bf16=False, s1t=0, s2t=2, ch=16, chain=16,
                        grid=get_format("nf4").lut("afpq").tolist())
    line = next(ln for ln in src.splitlines() if ln.startswith("#define AFPQ_GRID"))
    vals = [float.fromhex(v.strip().rstrip("f")) for v in line.split(" ", 2)[2].split(",")]
    assert vals == get_format("nf4").lut("afpq").tolist()
    with pytest.raises(ValueError):
        source.render(bits=4, mode=0, bf16=False, s1t=0, s2t=0, ch=1, chain=16, grid=[0.0] * 16)


# -- the host launch path on a fake device --------------------------------------------------------
#
# ``linear`` renders the source, picks the launch, packs the arguments and calls the driver. Here
# the driver is replaced by a stand-in that reads the rendered macros and the raw argument values
# (pointers into host memory, ints) exactly as the kernel would, and runs the numpy model on that
# memory: the argument order, the pointers, the grid / block / shared-memory sizes, the act-order
# gather and ``out=`` are checked against the torch reference (float64) on CPU.

import ctypes  # noqa: E402
import re  # noqa: E402


class _FakeModule:
    def __init__(self, src):
        self.macros = dict(re.findall(r"#define (AFPQ_\w+) (.*)", src))

    def function(self, name):
        return (name, self)


def _host_array(ptr, ctype, n):
    return np.ctypeslib.as_array((ctype * n).from_address(ptr))


def _fake_launch(self, func, grid, block, smem, stream):
    name, mod = func
    mac = mod.macros
    v = [a.value for a in self.vals]
    if name == source.GATHER_NAME:
        xp, kp_ptr, outp, M, Kp, xs = v
        x = _host_array(xp, ctypes.c_uint16, M * xs).reshape(M, xs)
        km = _host_array(kp_ptr, ctypes.c_int32, Kp)
        out = _host_array(outp, ctypes.c_uint16, M * Kp).reshape(M, Kp)
        assert grid[0] * block[0] >= M * Kp
        out[:] = np.where(km[None] >= 0, x[:, np.clip(km, 0, None)], 0)
        _fake_launch.calls.append((name, grid, block, smem))
        return
    M = int(name.rsplit("m", 1)[1])
    qp, s1p, s2p, xp, bp, yp, N, U, UPG, BPU, xs, ys = v
    bits, mode, bf16 = int(mac["AFPQ_BITS"]), int(mac["AFPQ_MODE"]), mac["AFPQ_BF16"] == "1"
    grid_vals = [float.fromhex(t.strip().rstrip("f")) for t in mac["AFPQ_GRID"].split(",")]
    cpb, wpb = (8, 1) if bits == 4 else (32, 3)
    rows = U * BPU * wpb
    groups = U // UPG
    ks = block[0] // 32
    assert grid == (-(-N // 32), 1, 1) and block[0] % 32 == 0 and block[0] <= source.max_threads(M)
    assert smem == ks * M * 32 * 4
    q = _host_array(qp, ctypes.c_uint32, rows * N).reshape(rows, N)

    def param(ptr, t):
        if t == "2":
            return _host_array(ptr, ctypes.c_float, groups * N).reshape(groups, N).astype(np.float32)
        h = _host_array(ptr, ctypes.c_uint16, groups * N).reshape(groups, N)
        return pm.bf16_value(h).astype(np.float32) if t == "1" else pm.f16_value(h).astype(np.float32)

    s1, s2 = param(s1p, mac["AFPQ_S1T"]), param(s2p, mac["AFPQ_S2T"])
    kp = U * BPU * cpb
    assert xs >= kp
    x = _host_array(xp, ctypes.c_uint16, M * xs).reshape(M, xs)[:, :kp]
    bias = None if not bp else _host_array(bp, ctypes.c_float, N).copy()
    y = pm.gemv_arrays(q, s1, s2, x, bias, grid=grid_vals, mode=("afpq", "sym", "zp")[mode], bits=bits, units=U,
                       upg=UPG, bpu=BPU, ks=ks, bf16=bf16, ch=int(mac["AFPQ_CH"]), chain=int(mac["AFPQ_CHAIN"]))
    _host_array(yp, ctypes.c_uint16, M * ys).reshape(M, ys)[:, :N] = y
    _fake_launch.calls.append((name, grid, block, smem))


_fake_launch.calls = []


@pytest.fixture
def fake_device(monkeypatch):
    class _Stream:
        cuda_stream = 0

    monkeypatch.setattr(ck, "_module", lambda src, dev: _FakeModule(src))
    monkeypatch.setattr(ck, "_sms", lambda dev: 132)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(nvrtc.Launch, "__call__", _fake_launch)
    _fake_launch.calls = []
    return _fake_launch.calls


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3], CASES[5], CASES[8]],
                         ids=[IDS[0], IDS[2], IDS[3], IDS[5], IDS[8]])
def test_host_launch_path_on_a_fake_device(case, fake_device):
    layer = make_layer(*case)
    for M, act in ((1, torch.float16), (2, torch.bfloat16), (5, torch.float16)):
        x = torch.randn(M, layer.in_features, generator=torch.Generator().manual_seed(M)).to(act)
        out = torch.full((M, layer.out_features), float("nan"), dtype=act)
        y = ck.linear(x, layer, out=out)
        assert y is out and not torch.isnan(out).any()
        ref, absprod = reference64(layer, x)
        prep = ck.get_prepared(layer)
        chain = planning.chain_codes(layer.bits, act == torch.bfloat16, prep.plan.ch(M, act == torch.bfloat16))
        err = (out.double() - ref).abs()
        assert (err <= bound(ref, absprod, act, layer.in_features, chain)).all(), f"M={M}: max err {err.max():.3g}"
        y2 = ck.linear(x.unsqueeze(0), layer)  # leading dims, allocated output, cached launch
        assert y2.shape == (1, M, layer.out_features) and torch.equal(y2[0].view(torch.int16), out.view(torch.int16))
    names = [c[0] for c in fake_device]
    assert names.count(source.GATHER_NAME) == (6 if prep.kmap is not None else 0)  # act-order / padded groups
    assert ck.get_prepared(layer) is prep  # cached on the layer while its buffers are unchanged
    layer.scales.mul_(2)
    prep2 = ck.get_prepared(layer)
    assert prep2 is not prep  # an in-place edit invalidates it
    layer.bias = layer.bias.clone()
    assert ck.get_prepared(layer) is not prep2  # so does a new tensor


def test_fake_device_catches_swapped_arguments(fake_device, monkeypatch):
    """The check above fails when two launch arguments are swapped (it can fail)."""
    layer = make_layer(*CASES[0])
    x = torch.randn(1, layer.in_features, generator=torch.Generator().manual_seed(0)).half()
    real_set = nvrtc.Launch.set

    def swapped(self, i, value):  # scales <-> second parameter
        real_set(self, {1: 2, 2: 1}.get(i, i) if len(self.vals) == 12 else i, value)

    monkeypatch.setattr(nvrtc.Launch, "set", swapped)
    y = ck.linear(x, layer)
    ref, absprod = reference64(layer, x)
    assert ((y.double() - ref).abs() > bound(ref, absprod, torch.float16, layer.in_features, 16)).any()


def test_compile_failure_disables_the_kernel(fake_device, monkeypatch):
    """A source that does not compile: one warning, the torch path for that call, then
    can_implement says why (the registry passes the kernel over instead of failing)."""
    def broken(src, dev):
        raise nvrtc.CompileError("NVRTC: error: simulated")

    monkeypatch.setattr(ck, "_module", broken)
    monkeypatch.setattr(ck, "_BROKEN", {})
    layer = make_layer(*CASES[0])
    x = torch.randn(2, layer.in_features, generator=torch.Generator().manual_seed(0)).half()
    with pytest.warns(RuntimeWarning, match="simulated"):
        y = ck.apply(x, layer)
    assert torch.equal(y, torch_ref.linear(x, layer))
    assert "simulated" in ck._BROKEN["why"]
    monkeypatch.setattr(ck, "_capability", lambda i: (9, 0))
    monkeypatch.setattr(ck, "_nvrtc_ok", lambda: (True, ""))

    class _CudaLike:  # passes the device checks of can_implement
        is_cuda = True
        shape = x.shape
        dtype = x.dtype
        device = layer.qweight.device
        requires_grad = False

        def numel(self):
            return x.numel()

    ok, why = ck.can_implement(_CudaLike(), layer)
    assert not ok and "simulated" in why


# -- NVRTC: the source compiles without a GPU --------------------------------------------------

COMPILE = [(4, "nf4", "afpq", False, 80), (4, "nf4", "afpq", True, 90), (3, "nf3", "afpq", False, 90),
           (3, "fp3", "sym", True, 80), (4, "int4", "zp", False, 90), (4, "fp4", "sym", False, 80)]


@needs_nvrtc
@pytest.mark.parametrize("bits,fmt,mode,bf16,arch", COMPILE, ids=[f"{c[1]}-{c[2]}-{'bf16' if c[3] else 'fp16'}-sm{c[4]}"
                                                                  for c in COMPILE])
def test_nvrtc_compiles_without_spills(bits, fmt, mode, bf16, arch):
    f = get_format(fmt)
    bpu = 128 // planning.codes_per_block(bits)  # group 128
    by_ch = {}
    for m in range(1, source.MAX_M + 1):
        by_ch.setdefault(planning.chunk_blocks(bits, bpu, m, bf16), []).append(m)
    for ch, ms in by_ch.items():  # one source per chunk size; each M runs the kernel of its chunk
        src = source.render(bits=bits, mode=planning.MODES[mode], bf16=bf16, s1t=0, s2t=0, ch=ch,
                            chain=planning.chain_codes(bits, bf16, ch), grid=f.lut(mode).tolist())
        img = nvrtc.compile_source(src, arch, use_cache=False)
        assert img[:4] == b"\x7fELF"
        res = nvrtc.cubin_resources(img)
        for name in source.KERNEL_NAMES + (source.GATHER_NAME,):
            assert name in res, name
        for m in ms:
            r = res[source.KERNEL_NAMES[m - 1]]
            assert r.get("frame", 0) == 0, f"M={m}, chunk {ch}: {r} (local memory: spills)"
            assert 0 < r["regs"] <= 65536 // source.max_threads(m), r


@needs_nvrtc
def test_nvrtc_reports_compile_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("AFPQ_CUDA_CACHE", str(tmp_path))
    with pytest.raises(nvrtc.CompileError, match="error"):
        nvrtc.compile_source("__global__ void f() { undefined_thing(); }", 80)
    img = nvrtc.compile_source('extern "C" __global__ void g(int* p) { *p = 1; }', 80)
    assert list(tmp_path.iterdir()) and nvrtc.compile_source('extern "C" __global__ void g(int* p) { *p = 1; }',
                                                             80) == img


# -- on a GPU: the kernel itself -----------------------------------------------------------------

GPU_CASES = CASES + [("gptq", "nf4", "afpq", 128, False, 4096, 136)]


@needs_gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=IDS + ["gptq-nf4-afpq-g128-4096x136"])
@pytest.mark.parametrize("act", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_kernel_equals_model_bit_for_bit(case, act):
    cpu_layer = make_layer(*case)
    layer = make_layer(*case).cuda()
    prep = ck.prepare(layer)
    for M in (range(1, 9) if layer.in_features <= 512 else (1, 8)):
        x = torch.randn(M, layer.in_features, generator=torch.Generator().manual_seed(M)).to(act).cuda()
        assert ck.can_implement(x, layer) == (True, "")
        y = ck.linear(x, layer, prep)
        torch.cuda.synchronize()
        _, _, _, ks = ck.launch_config(prep, M, ck._sms(torch.cuda.current_device()))
        want = pm.emulate(prep, x, ks, act == torch.bfloat16)
        got = y.cpu().view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(got, want), f"M={M}: {(got != want).sum()} outputs differ from the model"
        ref, absprod = reference64(cpu_layer, x.cpu())
        b = bound(ref, absprod, act, layer.in_features,
                  planning.chain_codes(layer.bits, act == torch.bfloat16, prep.plan.ch(M, act == torch.bfloat16))).numpy()
        err = np.abs(y.cpu().double().numpy() - ref.numpy())
        assert (err <= b).all(), f"M={M}: max err {err.max():.3g}"


@needs_gpu
def test_gpu_writes_every_output_and_graph_replay_is_bit_exact():
    layer = make_layer("gptq", "nf4", "afpq", 128, False, 1024, 200).cuda()
    x = torch.randn(4, 1024, device="cuda").half()
    y = ck.linear(x, layer)  # warm-up: prepare + compile
    out = torch.full_like(y, float("nan"))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out.copy_(ck.linear(x, layer))
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    assert not torch.isnan(out).any()
    assert torch.equal(out.view(torch.int16), ck.linear(x, layer).view(torch.int16))
