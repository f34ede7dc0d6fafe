"""``QuantSpec``, the one settings value: normalised and validated once, derived values in one
place, carried from the CLI to the kernel; and how often a run checks each layer."""

from __future__ import annotations

import os

import pytest
import torch

from afpq_plugins.core import spec as spec_mod
from afpq_plugins.core import quantize as quantize_mod
from afpq_plugins.core.checkpoint import AFPQConfigDict
from afpq_plugins.core.formats import get_format
from afpq_plugins.core.search import ScaleSearch
from afpq_plugins.core.spec import QuantSpec, effective_group_size, group_count, is_skipped
from afpq_plugins.nn import AFPQLinear


def test_normalised_once():
    s = QuantSpec(get_format("NF3"), 64, None, torch.bfloat16, None, "lm_head", "mse")
    assert (s.fmt, s.mode, s.scale_dtype, s.skip) == ("nf3", "afpq", "bfloat16", ("lm_head",))
    assert s.format is get_format("nf3") and s.bits == 3 and s.torch_scale_dtype == torch.bfloat16
    assert s.scale_search == ScaleSearch()  # the name resolved to the object
    assert s == QuantSpec("nf3", 64, "afpq", "bfloat16", None, ("lm_head",), {"method": "mse"})
    assert QuantSpec("int4").mode == "zp"  # the format's default mode


@pytest.mark.parametrize("kw,match", [
    (dict(fmt="nf9"), "unknown format 'nf9'"),
    (dict(group_size=0), "group_size must be -1"),
    (dict(group_size=-2), "group_size must be -1"),
    (dict(group_size=True), "group_size must be -1"),
    (dict(mode="nope"), "unknown mode"),
    (dict(fmt="int4", mode="afpq"), "does not support mode 'afpq'"),
    (dict(scale_dtype="float64"), "scale_dtype must be one of"),
    (dict(layout="marlin"), "layout must be one of"),
    (dict(scale_search="best"), "scale search 'best'"),
    (dict(skip=("",)), "skip must be module names"),
])
def test_invalid_settings_name_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kw)


def test_layout_each_method_writes():
    # the rule that diverged: AWQ writes the awq layout at 4 bits, everything else gptq
    assert QuantSpec("nf4").layout_for("awq") == "awq"
    assert QuantSpec("nf3").layout_for("awq") == "gptq"
    for m in ("rtn", "gptq", None):
        assert QuantSpec("nf4").layout_for(m) == "gptq"
    assert QuantSpec("nf4", layout="gptq").layout_for("awq") == "gptq"  # an explicit layout wins
    assert QuantSpec("nf4").resolved("awq").layout == "awq"
    assert QuantSpec("nf4", layout="gptq").resolved("awq").layout == "gptq"


def test_group_rules_against_hand_computed_cases():
    assert [effective_group_size(576, g) for g in (-1, 64, 192)] == [576, 64, 192]
    assert [group_count(576, g) for g in (-1, 64, 192)] == [1, 9, 3]
    with pytest.raises(ValueError, match="layer.q: group_size 128 must be -1 or a positive divisor of in_features 576"):
        QuantSpec("nf4", 128).layer(576, 576, "layer.q")
    g = QuantSpec("nf3", 64).layer(576, 192, "x")
    assert (g.groups, g.group_size, g.qweight_shape, g.layout) == (9, 64, (576 * 3 // 32, 192), "gptq")
    with pytest.raises(ValueError, match="x:"):  # awq packs 8 output columns per word
        QuantSpec("nf4", 64, layout="awq").layer(64, 12, "x")


def test_skip_rule():
    for name, skip, want in [("lm_head", ["lm_head"], True), ("model.layers.0.mlp.down_proj", ["mlp"], False),
                             ("model.layers.0.mlp.down_proj", ["model.layers.0"], True),
                             ("model.layers.0.mlp.down_proj", ["down_proj"], True),
                             ("model.layers.0.mlp.down_proj", ["proj"], False)]:
        assert is_skipped(name, skip) is want, (name, skip)
        assert QuantSpec("nf4", skip=tuple(skip)).skips(name) is want


def test_checkpoint_config_round_trip():
    s = QuantSpec("fp4", 32, "sym", "float32", None, ("lm_head", "gate"), ScaleSearch(5, 0.8))
    qc = AFPQConfigDict.from_spec(s, "awq", quantized_modules=["a"], extra={"note": 1})
    d = qc.to_dict()
    assert (d["format"], d["bits"], d["group_size"], d["mode"], d["layout"], d["scale_dtype"]) == \
        ("fp4", 4, 32, "sym", "awq", "float32")
    assert d["modules_to_not_convert"] == ["lm_head", "gate"] and d["method"] == "awq" and d["note"] == 1
    assert d["scale_search"] == {"method": "mse", "grid": 5, "min_shrink": 0.8, "norm": 2.0}
    assert qc.spec == s.resolved("awq")
    assert AFPQConfigDict.from_dict(d).spec == qc.spec


def test_layer_and_kernel_view_take_the_spec():
    from afpq_plugins.kernels import ops

    s = QuantSpec("nf3", 32, scale_dtype="bfloat16")
    layer = AFPQLinear(64, 16, spec=s)
    assert layer.spec == s.resolved() and layer.layout == "gptq" and layer.scales.dtype == torch.bfloat16
    assert layer.scales.shape == (2, 16) and layer.qweight.shape == (64 * 3 // 32, 16)
    view = ops.LayerView(layer.qweight, layer.scales, layer.second, layer.g_idx, None, s, 64, 16, True)
    assert (view.fmt, view.mode, view.group_size, view.bits) == (s.format, "afpq", 32, 3)


# -- one check per layer -----------------------------------------------------------------------
@pytest.fixture
def count_checks(monkeypatch):
    """Count the per-layer checks: QuantSpec.layer and every group-size validation (group_count,
    under both names it is called by)."""
    calls = {"layer": [], "group_count": 0}
    real_layer, real_count = spec_mod.QuantSpec.layer, spec_mod.group_count

    def layer(self, in_f, out_f, name="weight", layout=None):
        calls["layer"].append(name)
        return real_layer(self, in_f, out_f, name, layout)

    def count(*a, **k):
        calls["group_count"] += 1
        return real_count(*a, **k)

    monkeypatch.setattr(spec_mod.QuantSpec, "layer", layer)
    monkeypatch.setattr(spec_mod, "group_count", count)
    monkeypatch.setattr(quantize_mod, "group_count", count)
    return calls


def _tiny():
    pytest.importorskip("transformers")
    from _tiny import tiny_llama

    return tiny_llama(tie=False)


def test_rtn_checks_each_layer_once(count_checks):
    from afpq_plugins.model import find_linears, quantize_model_rtn

    model = _tiny()
    n = len(find_linears(model))
    quantize_model_rtn(model, spec=QuantSpec("nf4", 32), progress=False)
    assert len(count_checks["layer"]) == n and len(set(count_checks["layer"])) == n
    assert count_checks["group_count"] == n


def _saved_and_reset(tmp_path, count_checks):
    """A tiny RTN checkpoint (its checks not counted): ``(folder, quantized layers)``."""
    from afpq_plugins.model import quantize_model_rtn, save_quantized

    model = _tiny()
    qc = quantize_model_rtn(model, spec=QuantSpec("nf4", 32), progress=False)
    out = save_quantized(model, str(tmp_path / "ckpt"), qc)
    count_checks["layer"].clear()
    count_checks["group_count"] = 0
    return out, len(qc.quantized_modules)


def test_load_checks_each_layer_once(tmp_path, count_checks):
    from afpq_plugins.model import load_quantized

    out, n = _saved_and_reset(tmp_path, count_checks)
    loaded = load_quantized(out)
    assert len(count_checks["layer"]) == n and count_checks["group_count"] == n
    assert sum(isinstance(m, AFPQLinear) for m in loaded.modules()) == n


def test_transformers_load_checks_each_layer_once(tmp_path, count_checks):
    transformers = pytest.importorskip("transformers")
    import afpq_plugins  # noqa: F401  (registers "afpq")

    out, n = _saved_and_reset(tmp_path, count_checks)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert len(count_checks["layer"]) == n and count_checks["group_count"] == n
    assert sum(isinstance(m, AFPQLinear) for m in loaded.modules()) == n
    assert os.path.isdir(out)
