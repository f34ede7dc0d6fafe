"""A bits budget (per-layer formats) through GPTQModel 7.6's and llm-compressor 0.14's GPTQ and AWQ
(``--backend gptqmodel`` / ``llmcompressor``).

The registry chooses every Linear's settings on the float model and hands them to the engine as
``layer_specs`` (:func:`afpq_plugins.methods.quantize`). Checked against independent references:
the choice made by hand (:func:`afpq_plugins.rtn.allocate_budget` on a copy of the float weights),
the budget counted over the layers the checkpoint holds (:func:`afpq_plugins.core.budget.layer_cost_bits`),
the checkpoint reloaded by the project loader and by transformers, and the same engine run with one
uniform setting equal to a mixed layer's choice: the first decoder layer's q/k/v (the first Linears
each engine quantizes, whose inputs no other quantized layer has touched; GPTQ feeds later Linears
the outputs of quantized ones, and AWQ's scale searches for o_proj, gate/up and down run on
outputs of the layers before them, so from o_proj on a layer's result depends on its neighbours'
settings too) must come out bit for bit the same.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("gptqmodel")

from _plain import afpq, plain_env  # noqa: E402
from _tiny import tiny_llama, tiny_llama_folder  # noqa: E402

from afpq_plugins.core import budget as B  # noqa: E402
from afpq_plugins.core.errors import EngineResultError  # noqa: E402
from afpq_plugins.core.spec import QuantSpec  # noqa: E402
from afpq_plugins.methods import Calibration, quantize  # noqa: E402
from afpq_plugins.nn import AFPQLinear  # noqa: E402
from afpq_plugins.rtn import allocate_budget  # noqa: E402

CANDS = (B.Candidate("nf3", 32, "afpq"), B.Candidate("nf4", 64, "sym"), B.Candidate("nf4", 32, "afpq"),
         B.Candidate("nf3", 64, "sym"))
BUDGET = 4.0
CALIB = Calibration(4, 48)
QKV0 = [f"model.layers.0.self_attn.{x}_proj" for x in "qkv"]


def key(s):
    return s.fmt, s.group_size, s.mode


def _model(tok):
    return tiny_llama(vocab_size=len(tok), tie=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Llama folder (llm-compressor's oneshot reads the model's name_or_path)."""
    return tiny_llama_folder(str(tmp_path_factory.mktemp("budget") / "model"))


def _load(folder):
    from afpq_plugins.data import load_model_and_tokenizer

    return load_model_and_tokenizer(folder)[0]


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, AFPQLinear)}


ENGINES = [("gptqmodel", "gptq"), ("gptqmodel", "awq"), ("llmcompressor", "gptq"), ("llmcompressor", "awq")]


@pytest.mark.parametrize("backend,method", ENGINES, ids=lambda x: x)
def test_budget_through_modern_engines(tok, folder, tmp_path, backend, method):
    pytest.importorskip(backend)
    from transformers import AutoModelForCausalLM

    from afpq_plugins.hf import register
    from afpq_plugins.model import load_quantized, save_quantized

    spec = QuantSpec("nf4", 32, layout="gptq")  # one layout for 3 and 4 bits (awq's packs 4 bits only)
    model, ref = _load(folder), _load(folder)
    want, _, _ = allocate_budget(ref, tok, spec.resolved(method), CALIB, BUDGET, CANDS, progress=False)
    assert {s.fmt for s in want.values()} == {"nf3", "nf4"} and len(set(want.values())) >= 3

    qc = quantize(model, tok, method, spec, CALIB, backend=backend, bits_budget=BUDGET, candidates=CANDS,
                  progress=False)
    layers = _layers(model)
    assert {n: key(m.spec) for n, m in layers.items()} == {n: key(s) for n, s in want.items()}
    assert {n: key(qc.spec_for(n)) for n in want} == {n: key(s) for n, s in want.items()}
    assert qc.modules and qc.extra["quantizer"].startswith(backend)
    for n, m in layers.items():  # the stored group parameters have the module's own group count
        assert m.scales.shape[0] == m.in_features // want[n].group_size, n

    out = save_quantized(model, str(tmp_path / "ckpt"), qc, tokenizer=tok)
    loaded = load_quantized(out)
    written = _layers(loaded)
    assert {n: key(m.spec) for n, m in written.items()} == {n: key(s) for n, s in want.items()}
    total = sum(m.in_features * m.out_features for m in written.values())
    bits = sum(B.layer_cost_bits(m.spec, m.in_features, m.out_features) for m in written.values())
    assert bits <= BUDGET * total and bits / total == pytest.approx(qc.extra["bits_per_weight"], abs=1e-6)
    register()
    hf = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, len(tok), (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
        torch.testing.assert_close(loaded(ids).logits, logits, rtol=0, atol=0)
        torch.testing.assert_close(hf(ids).logits, logits, rtol=0, atol=0)

    # the engine with one uniform setting: the first layer's q/k/v chosen setting
    s0 = want[QKV0[0]]
    assert s0 != qc.spec, "the reference should exercise a per-module (non-default) setting"
    uniform = quantize(ref, tok, method, replace_spec(spec, s0), CALIB, backend=backend, progress=False)
    assert key(uniform.spec) == key(s0)
    for n in QKV0:
        a, b = layers[n], _layers(ref)[n]
        for t in ("qweight", "scales", "scales_neg", "g_idx"):
            if getattr(a, t, None) is not None or getattr(b, t, None) is not None:
                assert torch.equal(getattr(a, t), getattr(b, t)), f"{n}.{t}"


def replace_spec(spec, s):
    from dataclasses import replace

    return replace(spec, fmt=s.fmt, group_size=s.group_size, mode=s.mode)


@pytest.mark.parametrize("backend", ["gptqmodel", "llmcompressor"])
def test_awq_layout_with_3_bit_candidates_is_named(tok, folder, backend):
    """The awq layout packs 4 bits only: asked for with 3-bit candidates, a 3-bit choice is refused by
    name (without a layout asked for, a budget writes gptq: methods.budget_layout)."""
    pytest.importorskip(backend)
    with pytest.raises(ValueError, match=r"model\.layers\.\d\.[\w.]+_proj: .*(awq layout needs 4 bits|layout 'awq' "
                                         r"packs 4-bit formats only)"):
        quantize(_load(folder), tok, "awq", QuantSpec("nf4", 32, layout="awq"), CALIB, backend=backend, bits_budget=BUDGET,
                 candidates=CANDS, progress=False)


def test_awq_scaling_group_with_different_settings_is_named(tok):
    """q/k/v share AWQ's smoothing scale: settings that differ among them stop the run, naming them."""
    from afpq_plugins.gptqmodel import quantize_model

    spec = QuantSpec("nf4", 32, "afpq", layout="gptq").resolved("awq")
    specs = {n: spec for n in QKV0}
    specs[QKV0[1]] = replace_spec(spec, QuantSpec("nf3", 64, "sym"))
    with pytest.raises(EngineResultError, match=r"AWQ shares one smoothing scale among model\.layers\.0\."
                                                r"self_attn\.q_proj, model\.layers\.0\.self_attn\.k_proj, "
                                                r".*k_proj: nf3/sym/g64"):
        quantize_model(_model(tok), tok, spec, CALIB, method="awq", layer_specs=specs)


def test_cli_bits_budget_with_gptqmodel_in_a_plain_shell(tmp_path):
    src = tiny_llama_folder(str(tmp_path / "model"))
    out = tmp_path / "out"
    r = afpq(["quantize", src, str(out), "--method", "gptq", "--backend", "gptqmodel", "--format", "nf4",
              "--group-size", "32", "--bits-budget", str(BUDGET), "--candidates", "nf3/afpq/g32", "nf4/sym/g64",
              "nf4/afpq/g32", "nf3/sym/g64", "--nsamples", "4", "--calib-seqlen", "48", "--quiet"],
             cwd=str(tmp_path), env=plain_env())
    assert r.returncode == 0, r.stderr[-3000:]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quantizer"].startswith("gptqmodel") and qc["bits_budget"] == BUDGET
    assert qc["modules"] and {m["format"] for m in qc["modules"].values()} | {qc["format"]} == {"nf3", "nf4"}
    from afpq_plugins.model import load_quantized

    layers = _layers(load_quantized(str(out)))
    assert set(layers) == set(qc["quantized_modules"])
    for n, o in qc["modules"].items():
        assert key(layers[n].spec) == (o["format"], o["group_size"], o["mode"]), n
    total = sum(m.in_features * m.out_features for m in layers.values())
    assert sum(B.layer_cost_bits(m.spec, m.in_features, m.out_features) for m in layers.values()) <= BUDGET * total
