"""AFPQLinearMethod inside vLLM's own parallel linear layers, one layer at a time (no engine).

Each tensor-parallel rank is built in this process with vLLM's QKV / merged / column / row
layers (the TP rank and size are patched where vLLM reads them), loaded through vLLM's
weight loaders from checkpoint tensors packed by core, and run with the plugin's ``apply``.
Reference: float64 ``x @ W.T + b`` with ``W`` decoded by core from the unpacked codes
(no packing, sharding or kernel involved). Ranks' outputs are concatenated (column
parallel) or summed (row parallel, what vLLM's all-reduce does).
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch

pytest.importorskip("vllm")

import vllm.model_executor.layers.linear as L  # noqa: E402
import vllm.model_executor.parameter as P  # noqa: E402

from _ckpt import HEAD, HEADS, HIDDEN, INTER, KV_HEADS, permutation, quantize_act_order  # noqa: E402
from afpq_plugins.core.checkpoint import AFPQConfigDict, CheckpointError, refusal_placeholder  # noqa: E402
from afpq_plugins.core.formats import get_format, resolve_mode  # noqa: E402
from afpq_plugins.core.quantize import quantize_weight  # noqa: E402
from afpq_plugins.nn import AFPQLinear  # noqa: E402
from afpq_plugins.vllm.config import AFPQVllmConfig  # noqa: E402

PARTS = {
    "qkv": [("m.q_proj", "q", HEADS * HEAD), ("m.k_proj", "k", KV_HEADS * HEAD), ("m.v_proj", "v", KV_HEADS * HEAD)],
    "gate_up": [("m.gate_proj", 0, INTER), ("m.up_proj", 1, INTER)],
    "o": [("m.o_proj", None, HIDDEN)],
    "down": [("m.down_proj", None, HIDDEN)],
}
IN_FEATURES = {"qkv": HIDDEN, "gate_up": HIDDEN, "o": HIDDEN, "down": INTER}
ALL = [n for parts in PARTS.values() for n, _, _ in parts]


@contextlib.contextmanager
def tp(rank: int, size: int):
    with contextlib.ExitStack() as stack:
        for mod in (L, P):
            stack.enter_context(mock.patch.object(mod, "get_tensor_model_parallel_rank", lambda: rank))
            stack.enter_context(mock.patch.object(mod, "get_tensor_model_parallel_world_size", lambda: size))
        yield


def make_config(fmt, gs, mode, layout, desc_act=False, quantized=ALL) -> AFPQVllmConfig:
    f = get_format(fmt)
    qc = AFPQConfigDict(format=f.name, bits=f.bits, group_size=gs, mode=resolve_mode(f, mode), layout=layout,
                        desc_act=desc_act, quantized_modules=list(quantized))
    cfg = AFPQVllmConfig.from_config(qc.to_dict())
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    return cfg


def checkpoint(cfg: AFPQVllmConfig, bias: bool, seed: int = 0, perms=None):
    """Checkpoint tensors of every layer in PARTS, and (float64 weight, bias) references."""
    qc = cfg.qc
    gen = torch.Generator().manual_seed(seed)
    tensors, refs = {}, {}
    for kind, parts in PARTS.items():
        in_f = IN_FEATURES[kind]
        for name, _, out_f in parts:
            w = torch.randn(out_f, in_f, generator=gen) * 0.05
            b = torch.randn(out_f, generator=gen) * 0.1 if bias else None
            if qc.desc_act:
                perm = (perms or {}).get(name, permutation(in_f, kind))
                qw = quantize_act_order(w, qc.fmt, qc.group_size, qc.mode, perm, name=name)
            else:
                qw = quantize_weight(w, qc.fmt, qc.group_size, qc.mode, torch.float16, name=name)
            lin = AFPQLinear.from_quantized(qw, b, qc.layout, name=name)
            for suffix, t in lin.state_dict().items():
                tensors[f"{name}.{suffix}"] = t.clone()
            tensors[f"{name}.weight"] = refusal_placeholder()
            tensors[f"{name}.qzeros"] = refusal_placeholder()
            refs[name] = (qw.dequantize(torch.float64), None if b is None else b.double())
    return tensors, refs


def build(kind: str, cfg, rank: int, size: int, bias: bool):
    with tp(rank, size):
        if kind == "qkv":
            return L.QKVParallelLinear(HIDDEN, HEAD, HEADS, KV_HEADS, bias=bias, quant_config=cfg, prefix="m.qkv_proj")
        if kind == "gate_up":
            return L.MergedColumnParallelLinear(HIDDEN, [INTER, INTER], bias=bias, quant_config=cfg, prefix="m.gate_up_proj")
        in_f = IN_FEATURES[kind]
        return L.RowParallelLinear(in_f, HIDDEN, bias=bias, quant_config=cfg, prefix=f"m.{kind}_proj")


def load(layer, kind: str, tensors, rank: int, size: int) -> None:
    params = dict(layer.named_parameters())
    with tp(rank, size):
        for name, shard, _ in PARTS[kind]:
            for key, t in tensors.items():
                if not key.startswith(name + "."):
                    continue
                p = params[key[len(name) + 1:]]
                if shard is None:
                    p.weight_loader(p, t)
                else:
                    p.weight_loader(p, t, shard)
        layer.quant_method.process_weights_after_loading(layer)


def check_kind(kind: str, cfg, tensors, refs, size: int, bias: bool) -> None:
    x = torch.randn(5, IN_FEATURES[kind], generator=torch.Generator().manual_seed(1))
    parts = PARTS[kind]
    if kind in ("o", "down"):
        name = parts[0][0]
        w, b = refs[name]
        ref = x.double() @ w.t() + (b if b is not None else 0)
        total = torch.zeros_like(ref)
        for r in range(size):
            layer = build(kind, cfg, r, size, bias)
            load(layer, kind, tensors, r, size)
            n = layer.input_size_per_partition
            total += layer.quant_method.apply(layer, x[:, r * n:(r + 1) * n], layer.bias if r == 0 else None).double()
        torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-4)
        return
    for r in range(size):
        layer = build(kind, cfg, r, size, bias)
        load(layer, kind, tensors, r, size)
        want = []
        for name, _, out_f in parts:
            w, b = refs[name]
            full = x.double() @ w.t() + (b if b is not None else 0)
            shards = min(size, KV_HEADS) if name.endswith(("k_proj", "v_proj")) else size
            step = out_f // shards
            j = r * shards // size
            want.append(full[:, j * step:(j + 1) * step])
        got = layer.quant_method.apply(layer, x, layer.bias).double()
        torch.testing.assert_close(got, torch.cat(want, dim=1), rtol=1e-5, atol=1e-4)


CASES = [
    # format, group, mode, layout, desc_act, bias
    ("nf4", 32, "afpq", "gptq", False, True),
    ("nf4", 32, "afpq", "gptq", True, True),     # act-order
    ("nf3", 64, "zp", "gptq", False, False),     # o_proj shard of 96 inputs cuts a group of 64
    ("fp3", 32, "afpq", "gptq", True, False),    # 3-bit act-order
    ("fp4", -1, "sym", "gptq", False, True),     # one group per row
    ("int2", 32, "zp", "gptq", False, False),
    ("int8", 64, "zp", "gptq", False, True),
    ("nf4", 64, "afpq", "awq", False, True),     # awq, straddling groups
    ("nf4", 32, "sym", "awq", False, False),
]


@pytest.mark.parametrize("size", [1, 2])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c))
def test_layers_match_float64_reference(case, size):
    fmt, gs, mode, layout, desc_act, bias = case
    cfg = make_config(fmt, gs, mode, layout, desc_act)
    tensors, refs = checkpoint(cfg, bias)
    for kind in PARTS:
        check_kind(kind, cfg, tensors, refs, size, bias)


def test_straddling_group_keeps_all_scales_on_each_rank():
    cfg = make_config("nf3", 64, "zp", "gptq")
    layer = build("o", cfg, 1, 2, False)
    assert isinstance(layer.scales, P.ChannelQuantScaleParameter)
    assert tuple(layer.scales.shape) == (HIDDEN // 64, HIDDEN)
    whole = build("down", cfg, 1, 2, False)  # 192 inputs per shard: whole groups, sharded scales
    assert isinstance(whole.scales, P.GroupQuantScaleParameter)
    assert tuple(whole.scales.shape) == (INTER // 2 // 64, HIDDEN)


# -- refusals ---------------------------------------------------------------------------------------------
def test_shard_splitting_packed_words_is_refused():
    cfg = make_config("nf3", 64, "afpq", "gptq")
    with pytest.raises(CheckpointError, match=r"'m.o_proj'.*192 input features into shards of 48.*multiple of 32"):
        build("o", cfg, 0, 4, False)
    cfg = make_config("nf4", 32, "afpq", "awq", quantized=["m.x_proj"])
    with tp(0, 2), pytest.raises(CheckpointError, match=r"'m.x_proj': output shard sizes \[12\]"):
        L.ColumnParallelLinear(HIDDEN, 24, bias=False, quant_config=cfg, prefix="m.x_proj")


def test_wrong_tensor_shape_names_the_key():
    cfg = make_config("nf4", 32, "afpq", "gptq")
    tensors, _ = checkpoint(cfg, False)
    tensors["m.k_proj.scales"] = tensors["m.k_proj.scales"][:-1]
    layer = build("qkv", cfg, 0, 1, False)
    with pytest.raises(CheckpointError, match=r"'m.k_proj.scales' has shape \(5, 64\), expected \(6, 64\)"):
        load(layer, "qkv", tensors, 0, 1)
    tensors, _ = checkpoint(cfg, False)
    tensors["m.up_proj.qweight"] = tensors["m.up_proj.qweight"].to(torch.int64)
    layer = build("gate_up", cfg, 0, 1, False)
    with pytest.raises(CheckpointError, match=r"'m.up_proj.qweight' has dtype torch.int64"):
        load(layer, "gate_up", tensors, 0, 1)


def test_float_weight_under_placeholder_key_is_refused():
    cfg = make_config("nf4", 32, "afpq", "gptq")
    tensors, _ = checkpoint(cfg, False)
    tensors["m.o_proj.weight"] = torch.zeros(HIDDEN, HIDDEN)
    layer = build("o", cfg, 0, 1, False)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'm.o_proj.weight'"):
        load(layer, "o", tensors, 0, 1)


def test_fused_layers_with_different_g_idx_are_refused():
    cfg = make_config("nf4", 32, "afpq", "gptq", desc_act=True)
    tensors, _ = checkpoint(cfg, False, perms={"m.v_proj": permutation(HIDDEN, "other")})
    layer = build("qkv", cfg, 0, 1, False)
    with pytest.raises(CheckpointError, match=r"'m.v_proj.g_idx' differs from 'm.q_proj.g_idx'"):
        load(layer, "qkv", tensors, 0, 1)


def test_act_order_without_desc_act_is_refused_when_scales_are_sharded():
    tensors, _ = checkpoint(make_config("nf4", 32, "afpq", "gptq", desc_act=True), False)
    cfg = make_config("nf4", 32, "afpq", "gptq", desc_act=False)
    layer = build("down", cfg, 1, 2, False)
    with pytest.raises(CheckpointError, match=r"'m.down_proj': g_idx is not the plain order"):
        load(layer, "down", tensors, 1, 2)


def test_config_refusals_name_the_key():
    base = AFPQConfigDict(format="nf4", bits=4, group_size=32, mode="afpq").to_dict()
    with pytest.raises(CheckpointError, match=r"format 'nf5'"):
        AFPQVllmConfig.from_config({**base, "format": "nf5", "table": None})
    with pytest.raises(CheckpointError, match=r"layout 'awq' with bits 3"):
        AFPQVllmConfig.from_config({**AFPQConfigDict(format="nf3", bits=3, group_size=32, mode="afpq").to_dict(),
                                    "layout": "awq"})
    with pytest.raises(CheckpointError, match=r"quantization_config.mode"):
        AFPQVllmConfig.from_config({**base, "mode": "asym"})
    cfg = make_config("nf4", 32, "afpq", "gptq", quantized=["m.q_proj", "m.v_proj"])
    with tp(0, 1), pytest.raises(CheckpointError, match=r"'m.qkv_proj'.*m.k_proj=float"):
        L.QKVParallelLinear(HIDDEN, HEAD, HEADS, KV_HEADS, bias=False, quant_config=cfg, prefix="m.qkv_proj")


def test_custom_op_has_a_fake_implementation():
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = make_config("nf4", 32, "afpq", "gptq")
    tensors, _ = checkpoint(cfg, False)
    layer = build("o", cfg, 0, 1, False)
    load(layer, "o", tensors, 0, 1)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(7, HIDDEN)
        y = layer.quant_method.apply(layer, x)
    assert tuple(y.shape) == (7, HIDDEN)
    torch.library.opcheck(torch.ops.afpq.linear.default, (
        torch.randn(3, HIDDEN), layer.qweight, layer.scales, layer.scales_neg, layer.g_idx, None,
        "nf4", "afpq", "gptq", 32, HIDDEN, HIDDEN, True))
