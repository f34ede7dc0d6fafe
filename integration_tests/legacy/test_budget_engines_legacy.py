"""A bits budget through the legacy engines: AutoGPTQ 0.7.1 GPTQ and AutoAWQ 0.2.9 AWQ with
per-module settings (``layer_specs``) chosen by the registry.

On a tiny random Llama, ``quantize(..., bits_budget=...)`` with nf3/nf4, two group sizes and
afpq/sym candidates must: pick a real mixture (3- and 4-bit layers); quantize each Linear on
exactly the setting chosen on the float model (the allocation recomputed here by hand); stay
within the budget counted over the layers the checkpoint holds; save and load (the project's
loader and transformers ``from_pretrained``) to the in-memory model's logits. The engines'
own references: a layer whose result depends only on its own setting and on float inputs
(decoder layer 0, GPTQ with ``true_sequential=False``: every Linear of the layer sees the float
layer's inputs; AWQ: the smoothing scales, searched per group of Linears sharing an input on
the float layer) is bit-identical to a uniform run of the same engine on that setting. The
CLI (``afpq quantize --bits-budget``, a fresh process in a plain environment) writes the same
checkpoint as the API.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

pytest.importorskip("auto_gptq")
pytest.importorskip("awq")
transformers = pytest.importorskip("transformers")

from _plain import afpq  # noqa: E402
from _tiny import tiny_llama, tiny_llama_folder, tiny_tokenizer  # noqa: E402

from afpq_plugins.core import budget as B  # noqa: E402
from afpq_plugins.core.checkpoint import load_checkpoint_tensors, read_quant_config  # noqa: E402
from afpq_plugins.methods import BUDGET_SCORING_CALIBRATION, Calibration, QuantSpec, quantize  # noqa: E402
from afpq_plugins.model import load_quantized, save_quantized  # noqa: E402
from afpq_plugins.nn import AFPQLinear  # noqa: E402
from afpq_plugins.rtn import allocate_budget  # noqa: E402

# 3.25, 4.0, 4.25 and 5.0 bits per weight: a budget of 4.0 takes a mixture of all kinds
CANDIDATES = (B.Candidate("nf3", 64, "sym"), B.Candidate("nf3", 32, "afpq"), B.Candidate("nf4", 64, "sym"),
              B.Candidate("nf4", 32, "afpq"))
BUDGET = 4.0
CALIB = Calibration(4, 64)
# GPTQ: act-order (a g_idx per layer and group size), every Linear of a decoder layer on float inputs
GPTQ_OPTS = {"desc_act": True, "true_sequential": False}
# the output scale search: its energies are bound per layer at that layer's own group size
ENGINES = {  # method -> (backend, top-level spec, engine options)
    "gptq": ("autogptq", QuantSpec("nf4", 32, scale_search="output"), GPTQ_OPTS),
    "awq": ("autoawq", QuantSpec("nf4", 32, layout="gptq", scale_search="output"), {}),  # 3 and 4 bits: gptq layout
}
L0 = "model.layers.0."


def _key(s: QuantSpec):
    return (s.fmt, s.group_size, s.mode)


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _float(tok):
    return tiny_llama(vocab_size=len(tok))  # the model tiny_llama_folder saves (seed 0)


def _quantized(tok, method, spec=None, budget=True):
    backend, top, opts = ENGINES[method]
    model = _float(tok)
    kw = {"bits_budget": BUDGET, "candidates": CANDIDATES} if budget else {}
    qc = quantize(model, tok, method, spec or top, CALIB, backend=backend, progress=False, **opts, **kw)
    return model, qc


@pytest.fixture(scope="module")
def runs(tok):
    """Per method: the budgeted model, its config and the choice made by hand on the float model."""
    out = {}
    n, s = BUDGET_SCORING_CALIBRATION
    scoring = replace(CALIB, nsamples=min(CALIB.nsamples, n), seqlen=min(CALIB.seqlen, s))
    for method, (_, top, _) in ENGINES.items():
        chosen, _, _ = allocate_budget(_float(tok), tok, top.resolved(method), scoring, BUDGET, CANDIDATES,
                                       progress=False)
        model, qc = _quantized(tok, method)
        out[method] = (model, qc, chosen)
    return out


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, AFPQLinear)}


@pytest.mark.parametrize("method", list(ENGINES))
def test_each_layer_has_the_chosen_setting(runs, method):
    model, qc, chosen = runs[method]
    kinds = {_key(s) for s in chosen.values()}
    assert len(kinds) >= 3 and {s.bits for s in chosen.values()} == {3, 4}, kinds  # a real mixture
    layers = _layers(model)
    assert set(layers) == set(chosen) == set(qc.quantized_modules)
    assert {n: _key(m.spec) for n, m in layers.items()} == {n: _key(s) for n, s in chosen.items()}
    assert {n: _key(qc.spec_for(n)) for n in chosen} == {n: _key(s) for n, s in chosen.items()}
    assert qc.modules and all(_key(qc.spec_for(n)) != _key(qc.spec) for n in qc.modules)
    for n, m in layers.items():  # codes of the layer's own width, one group parameter per its group
        assert m.qweight.shape[0] == m.in_features * chosen[n].bits // 32, n
        assert m.scales.shape == (m.in_features // chosen[n].group_size, m.out_features), n
    for unit in B.fused_units(list(chosen)):  # a fused unit (q/k/v, gate/up) shares one setting
        assert len({_key(chosen[n]) for n in unit}) == 1, unit


@pytest.mark.parametrize("method", list(ENGINES))
def test_budget_holds_and_checkpoint_round_trips(runs, tok, method, tmp_path):
    model, qc, _ = runs[method]
    path = save_quantized(model, str(tmp_path / "ckpt"), qc, tokenizer=tok)
    _, disk = read_quant_config(path)
    loaded = load_quantized(path)
    layers = _layers(loaded)
    assert set(layers) == set(disk.quantized_modules) == set(qc.quantized_modules)
    # the budget, counted over the layers the checkpoint holds, with the settings it records
    bits = sum(B.layer_cost_bits(disk.spec_for(n), m.in_features, m.out_features) for n, m in layers.items())
    weights = sum(m.in_features * m.out_features for m in layers.values())
    assert bits / weights <= BUDGET
    assert math.isclose(bits / weights, qc.extra["bits_per_weight"], abs_tol=1e-6)
    assert {n: _key(m.spec) for n, m in layers.items()} == {n: _key(disk.spec_for(n)) for n in layers}
    ids = _ids(len(tok))
    with torch.no_grad():
        want = model(ids).logits
        got = loaded(ids).logits
        hf = transformers.AutoModelForCausalLM.from_pretrained(path)
        assert isinstance(hf.model.layers[0].self_attn.q_proj, AFPQLinear)
        got_hf = hf(ids).logits
    assert torch.equal(got, want)
    assert torch.equal(got_hf, want)


def test_autogptq_from_quantized_keeps_the_per_module_settings(runs, tok, tmp_path):
    """AutoGPTQ's own entry point on a budgeted checkpoint: ``from_quantized`` gives a config whose
    ``layer_specs`` are the checkpoint's ``modules`` (and whose checkpoint config says so again)."""
    from auto_gptq import AutoGPTQForCausalLM

    model, qc, _ = runs["gptq"]
    path = save_quantized(model, str(tmp_path / "ckpt"), qc, tokenizer=tok)
    wrapper = AutoGPTQForCausalLM.from_quantized(path, device="cpu")
    cfg = wrapper.quantize_config
    assert {n: _key(s) for n, s in cfg.layer_specs.items()} == {n: _key(qc.spec_for(n)) for n in qc.modules}
    assert cfg.to_afpq(qc.quantized_modules).modules == qc.modules
    ids = _ids(len(tok))
    with torch.no_grad():
        assert torch.equal(wrapper.model(ids).logits, model(ids).logits)


def _state(model, prefix):
    return {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}


def test_gptq_layers_equal_a_uniform_run_on_their_setting(runs, tok):
    """GPTQ is per layer: with true_sequential=False every Linear of decoder layer 0 sees the float
    layer's inputs, so its codes, scales and act-order g_idx are those of a uniform run on its setting."""
    model, _, chosen = runs["gptq"]
    mixed = model.state_dict()
    first = {n: s for n, s in chosen.items() if n.startswith(L0)}
    settings = {_key(s): s for s in first.values()}
    assert len(settings) >= 2  # layer 0 itself is mixed
    compared, permuted = set(), set()
    for key, s in settings.items():
        ref, _ = _quantized(tok, "gptq", replace(s, skip=("lm_head",)), budget=False)
        ref_state = ref.state_dict()
        for n in (n for n, t in first.items() if _key(t) == key):
            tensors = [k for k in ref_state if k.startswith(n + ".")]
            assert {"qweight", "scales", "g_idx"} <= {k.rsplit(".", 1)[1] for k in tensors}
            for k in tensors:
                assert torch.equal(mixed[k], ref_state[k]), k
            g_idx = mixed[n + ".g_idx"].long()
            assert torch.equal(torch.bincount(g_idx), torch.full((g_idx.numel() // s.group_size,), s.group_size))
            if g_idx.numel() > s.group_size:  # act-order spread the groups over the columns
                assert not torch.equal(g_idx, torch.arange(g_idx.numel()) // s.group_size), n
                permuted.add(n)
            compared.add(n)
    assert compared == set(first) and permuted


def test_awq_smoothing_and_layers_equal_a_uniform_run_on_their_setting(runs, tok):
    """AWQ searches one smoothing scale per group of Linears sharing an input (q/k/v behind
    input_layernorm, gate/up behind post_attention_layernorm, down_proj behind up_proj), all on the
    float decoder layer 0, then clips and quantizes each Linear: a module of layer 0 whose groups all
    have one setting (its scales folded in, its own clip and codes) equals a uniform run on it."""
    model, _, chosen = runs["awq"]
    attn = model.model.layers[0].self_attn
    # AutoAWQ scales o_proj (behind v_proj) only when v_proj and o_proj have one shape: not here
    assert (attn.v_proj.out_features, attn.v_proj.in_features) != (attn.o_proj.out_features, attn.o_proj.in_features)
    setting = {n[len(L0):]: _key(s) for n, s in chosen.items() if n.startswith(L0)}
    qkv, gate_up = setting["self_attn.q_proj"], setting["mlp.gate_proj"]
    down, o = setting["mlp.down_proj"], setting["self_attn.o_proj"]
    depends = {  # module -> the settings of the groups whose search changes its tensors
        "input_layernorm": {qkv}, "self_attn.q_proj": {qkv}, "self_attn.k_proj": {qkv}, "self_attn.v_proj": {qkv},
        "self_attn.o_proj": {o}, "post_attention_layernorm": {gate_up}, "mlp.gate_proj": {gate_up},
        "mlp.up_proj": {gate_up, down}, "mlp.down_proj": {down},
    }
    assert len(set(setting.values())) >= 2  # layer 0 itself is mixed
    mixed = model.state_dict()
    compared = set()
    for key in set(setting.values()):
        s = next(s for n, s in chosen.items() if n.startswith(L0) and _key(s) == key)
        ref, _ = _quantized(tok, "awq", replace(s, layout="gptq"), budget=False)
        ref_state = ref.state_dict()
        for n, deps in depends.items():
            if deps == {key}:
                tensors = [k for k in ref_state if k.startswith(L0 + n + ".")]
                assert tensors, n
                for k in tensors:
                    assert torch.equal(mixed[k], ref_state[k]), k
                compared.add(n)
    assert compared == {n for n, deps in depends.items() if len(deps) == 1}
    assert {"input_layernorm", "post_attention_layernorm"} & compared  # a smoothing scale compared


def test_cli_budget_with_autogptq_writes_the_apis_checkpoint(runs, tok, tmp_path):
    """``afpq quantize --method gptq --backend autogptq --bits-budget`` in a fresh process with a plain
    environment: a loadable checkpoint with per-module settings, tensor for tensor the API's."""
    model, qc, _ = runs["gptq"]
    folder = tiny_llama_folder(str(tmp_path / "model"))
    out = tmp_path / "out"
    r = afpq(["quantize", folder, str(out), "--method", "gptq", "--backend", "autogptq", "--format", "nf4",
              "--group-size", "32", "--bits-budget", str(BUDGET), "--candidates",
              *[f"{c.fmt}/{c.mode}/g{c.group_size}" for c in CANDIDATES], "--nsamples", str(CALIB.nsamples),
              "--calib-seqlen", str(CALIB.seqlen), "--scale-search", "output", "--desc-act", "--no-true-sequential",
              "--quiet"],
             cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads((out / "config.json").read_text())["quantization_config"]
    assert d["method"] == "gptq" and d["modules"] == qc.to_dict()["modules"] and d["bits_budget"] == BUDGET
    api = save_quantized(model, str(tmp_path / "api"), qc, tokenizer=tok)
    got, want = load_checkpoint_tensors(str(out)), load_checkpoint_tensors(api)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    ids = _ids(len(tok))
    with torch.no_grad():
        assert torch.equal(load_quantized(str(out))(ids).logits, model(ids).logits)


# -- errors name the module ------------------------------------------------------------------
def test_gptq_layer_specs_for_a_module_autogptq_does_not_quantize_is_named_before_any_work(tok):
    from afpq_plugins.autogptq import gptq_quantize

    model = _float(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    samples = [torch.arange(32) % len(tok)]
    for specs, msg in (({"lm_head": QuantSpec("nf3", 32)}, r"'lm_head', which AutoGPTQ 0\.7\.1 does not quantize"),
                       ({L0 + "mlp.down_proj": QuantSpec("nf3", 96)},
                        r"model\.layers\.0\.mlp\.down_proj: group_size 96 must be -1 or a positive divisor of in_features 128")):
        with pytest.raises(ValueError, match=msg):
            gptq_quantize(model, tok, "nf4", 32, samples=samples, layer_specs=specs)
    assert not _layers(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_awq_linears_sharing_an_input_with_different_settings_are_named(tok):
    from afpq_plugins.autoawq import awq_quantize

    L1 = "model.layers.1."  # the last decoder layer: found before layer 0 is touched
    specs = {L1 + "self_attn.q_proj": QuantSpec("nf4", 32, "sym", layout="gptq"),
             L1 + "self_attn.k_proj": QuantSpec("nf3", 64, "sym", layout="gptq")}
    model = _float(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"one smoothing scale .* differ: model\.layers\.1\.self_attn\.q_proj "
                                         r"nf4/sym/g32, model\.layers\.1\.self_attn\.k_proj nf3/sym/g64"):
        awq_quantize(model, tok, "nf4", 32, layout="gptq", calib_data=[list(range(32))], n_samples=1,
                     seqlen=32, progress=False, layer_specs=specs)
    # found before any search: nothing was scaled or quantized
    assert not _layers(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_awq_budget_with_3_bit_candidates_needs_the_gptq_layout(tok):
    backend, _, _ = ENGINES["awq"]
    with pytest.raises(ValueError, match=r"layout 'awq' \(AutoAWQ GEMM\) is 4-bit only; use layout 'gptq' for 3 bits"):
        quantize(_float(tok), tok, "awq", QuantSpec("nf4", 32, layout="awq"), CALIB, backend=backend,
                 progress=False, bits_budget=BUDGET, candidates=CANDIDATES)  # asked for (the default: gptq)
