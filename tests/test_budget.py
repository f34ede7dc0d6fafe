"""Per-layer formats under a bits budget: the allocator against brute force, costs counted as the
peers table counts them, fused layers sharing a choice, and the per-module checkpoint through
the loaders."""

from __future__ import annotations

import hashlib
import itertools
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from afpq_plugins.core import budget as B
from afpq_plugins.core.checkpoint import AFPQConfigDict, CheckpointError, config_stamp
from afpq_plugins.core.spec import QuantSpec
from afpq_plugins.nn import AFPQLinear


def test_costs_counted_like_the_peers_table():
    from afpq_plugins.study.peers import bits_per_weight as peers_bpw

    for fmt, mode, g in [("nf4", "afpq", 64), ("nf3", "sym", 32), ("int4", "zp", 64), ("nf4", "afpq", 192)]:
        s = QuantSpec(fmt, g, mode)
        assert B.bits_per_weight(s, 576, 1536) == pytest.approx(peers_bpw(mode, s.bits, g))
    # hand-computed: 4 x 8 layer, nf4 afpq g4: 32 codes of 4 bits + 8 columns x 1 group... 2 groups x 8 x 32 bits
    assert B.layer_cost_bits(QuantSpec("nf4", 4, "afpq"), 8, 4) == 4 * 8 * 4 + 4 * 2 * 32
    assert B.layer_cost_bits(QuantSpec("nf3", -1, "sym", "float32"), 8, 4) == 4 * 8 * 3 + 4 * 1 * 32


def test_fused_units():
    names = ["l.0.attn.q_proj", "l.0.attn.k_proj", "l.0.attn.v_proj", "l.0.attn.o_proj", "l.0.mlp.gate_proj",
             "l.0.mlp.up_proj", "l.0.mlp.down_proj", "lm_head"]
    assert B.fused_units(names) == [names[:3], ["l.0.attn.o_proj"], names[4:6], ["l.0.mlp.down_proj"], ["lm_head"]]


def _brute(errors, costs, budget):
    best = None
    for combo in itertools.product(*[range(len(e)) for e in errors]):
        cost = sum(costs[u][c] for u, c in enumerate(combo))
        err = sum(errors[u][c] for u, c in enumerate(combo))
        if cost <= budget and math.isfinite(err) and (best is None or err < best[0]):
            best = (err, combo)
    return best


def test_allocator_matches_brute_force_on_a_tiny_model():
    """Real layers, real errors (h-weighted, from random energies), a few candidates, several budgets."""
    pytest.importorskip("transformers")
    from _tiny import tiny_llama

    from afpq_plugins.model import find_linears
    from afpq_plugins.rtn import layer_errors

    model = tiny_llama(tie=False, hidden=64)
    lin = {n: m for n, m in find_linears(model).items() if ".layers.0." in n}  # one decoder layer: 7 Linears
    base = QuantSpec("nf4", 32)
    cands = [B.Candidate("nf3", 32, "afpq"), B.Candidate("nf4", 64, "sym"), B.Candidate("nf4", 32, "afpq")]
    specs = B.candidate_specs(base, cands)
    g = torch.Generator().manual_seed(0)
    errs = {n: layer_errors(m.weight, torch.rand(m.in_features, generator=g) + 0.1, specs, n) for n, m in lin.items()}
    shapes = {n: (m.in_features, m.out_features) for n, m in lin.items()}
    units = B.fused_units(list(lin))
    assert len(units) == 4  # qkv, o, gate/up, down
    E = [[sum(errs[n][c] for n in u) for c in range(3)] for u in units]
    C = [B.unit_costs(specs, shapes, u) for u in units]
    total = sum(i * o for i, o in shapes.values())
    for bpw in (4.0, 4.1, 4.25, 4.4, 4.6, 4.8, 5.0):  # cheapest 4.0 (nf3 afpq g32), dearest 5.0
        budget = math.floor(bpw * total)
        a = B.allocate(E, C, budget)
        ref = _brute(E, C, budget)
        assert a.exact and a.bits <= budget
        assert a.error == pytest.approx(ref[0], rel=1e-12) and a.choice == ref[1], bpw
    with pytest.raises(ValueError, match="below the cheapest"):
        B.allocate(E, C, math.floor(3.9 * total))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 5), st.integers(1, 4), st.integers(0, 10**6), st.floats(0.0, 1.0), st.integers(3, 50))
def test_allocator_never_exceeds_the_budget_and_rounding_is_safe(units, cands, seed, slack, resolution):
    g = torch.Generator().manual_seed(seed)
    E = (torch.rand(units, cands, generator=g, dtype=torch.float64) * 10).tolist()
    C = torch.randint(100, 10_000, (units, cands), generator=g).tolist()
    lo, hi = sum(min(c) for c in C), sum(max(c) for c in C)
    budget = int(lo + slack * (hi - lo))
    a = B.allocate(E, C, budget, resolution=resolution)
    ref = _brute(E, C, budget)
    assert a.bits <= budget
    assert a.error >= ref[0] - 1e-9  # never better than the optimum
    if a.exact:
        assert a.error == pytest.approx(ref[0])


# -- the per-module checkpoint ------------------------------------------------------------------
def _qc(modules, **kw):
    return AFPQConfigDict(format="nf4", bits=4, group_size=32, mode="afpq", quantized_modules=["a", "b"],
                          modules=modules, **kw)


def test_uniform_checkpoints_keep_their_keys_and_stamp():
    qc = _qc({})
    assert "modules" not in qc.to_dict()
    d = qc.to_dict()
    keys = ("format", "bits", "group_size", "mode", "layout", "scale_dtype", "table")
    blob = json.dumps({k: d[k] for k in keys}, sort_keys=True, separators=(",", ":"))
    assert config_stamp(qc) == hashlib.sha256(blob.encode()).hexdigest()  # the stamp as before the map
    mixed = _qc({"b": {"format": "nf3", "bits": 3, "group_size": 64, "mode": "sym"}})
    assert mixed.to_dict()["modules"] == {"b": {"format": "nf3", "bits": 3, "group_size": 64, "mode": "sym"}}
    assert config_stamp(mixed) != config_stamp(qc)
    assert mixed.spec_for("a") == qc.spec and mixed.spec_for("b") == QuantSpec("nf3", 64, "sym", layout="gptq")
    assert AFPQConfigDict.from_dict(mixed.to_dict()).spec_for("b") == mixed.spec_for("b")


@pytest.mark.parametrize("modules,match", [
    ({"c": {"format": "nf3"}}, "'c' is not in quantized_modules"),
    ({"b": {"layout": "awq"}}, "unknown key 'layout'"),
    ({"b": {"format": "nf9"}}, "unknown format"),
    ({"b": {"format": "nf3", "bits": 4}}, "bits is 4 but format 'nf3' has 3"),
    ({"b": {"group_size": 0}}, "group_size"),
    ({"b": {"format": "int4", "mode": "afpq"}}, "does not support mode"),
    ({"b": "nf3"}, "modules must be"),
])
def test_bad_module_entries_are_named_errors(modules, match):
    with pytest.raises(CheckpointError, match=match):
        AFPQConfigDict.from_dict({**_qc({}).to_dict(), "modules": modules})


def test_budgeted_rtn_fuses_and_loads_through_every_loader(tmp_path):
    transformers = pytest.importorskip("transformers")
    import afpq_plugins  # noqa: F401  (transformers plugin)
    from _tiny import tiny_llama, tiny_tokenizer

    from afpq_plugins.methods import Calibration, quantize
    from afpq_plugins.model import load_quantized, save_quantized

    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), tie=False)
    cands = (B.Candidate("nf3", 32, "afpq"), B.Candidate("nf4", 64, "sym"), B.Candidate("nf4", 32, "afpq"))
    qc = quantize(model, tok, "rtn", QuantSpec("nf4", 32, scale_search="output"), Calibration(2, 32),
                  progress=False, bits_budget=4.2, candidates=cands)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, AFPQLinear)}
    # the budget holds, counted over the layers as written
    bits = sum(B.layer_cost_bits(m.spec, m.in_features, m.out_features) for m in layers.values())
    weights = sum(m.in_features * m.out_features for m in layers.values())
    assert bits / weights <= 4.2 and qc.extra["bits_per_weight"] == pytest.approx(bits / weights, abs=1e-6)
    assert len({m.spec for m in layers.values()}) > 1  # a real mixture at this budget
    for i in range(2):  # fused layers share one choice
        p = f"model.layers.{i}"
        assert layers[f"{p}.self_attn.q_proj"].spec == layers[f"{p}.self_attn.k_proj"].spec == \
            layers[f"{p}.self_attn.v_proj"].spec
        assert layers[f"{p}.mlp.gate_proj"].spec == layers[f"{p}.mlp.up_proj"].spec
    assert qc.modules and all(qc.spec_for(n) == layers[n].spec for n in layers)
    out = save_quantized(model, str(tmp_path / "mix"), qc, tokenizer=tok)
    ids = torch.randint(0, len(tok), (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        ours = load_quantized(out)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out)
        assert {n: m.spec for n, m in ours.named_modules() if isinstance(m, AFPQLinear)} == \
            {n: m.spec for n, m in layers.items()}
        torch.testing.assert_close(ours(ids).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(theirs(ids).logits.float(), want, rtol=1e-5, atol=1e-5)


def test_cli_budget_needs_an_engine_with_per_module_settings(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    from _tiny import tiny_llama_folder

    import afpq_plugins.methods as M
    from afpq_plugins import cli

    folder = tiny_llama_folder(str(tmp_path / "m"))
    monkeypatch.setattr(M, "_METHODS", dict(M._METHODS))
    M.register_method(M.Method("gptq", "plain", lambda *a, **k: None, default_calibration=(4, 48)))
    rc = cli.main(["quantize", folder, str(tmp_path / "o"), "--method", "gptq", "--backend", "plain",
                   "--bits-budget", "4", "--nsamples", "2", "--calib-seqlen", "32", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "--bits-budget is not supported by --backend plain" in err and "--method rtn" in err
    assert not (tmp_path / "o").exists()
    assert cli.main(["quantize", folder, str(tmp_path / "o2"), "--candidates", "nf3/afpq/g32", "--quiet"]) == 2
    assert "--candidates needs --bits-budget" in capsys.readouterr().err
    assert cli.main(["quantize", folder, str(tmp_path / "o3"), "--bits-budget", "4", "--candidates", "nf3-afpq-32",
                     "--quiet"]) == 2
    assert "expected FORMAT/MODE/gGROUP" in capsys.readouterr().err


def test_layer_errors_with_sensitivities_against_float64():
    """sum_ij F_ij (w - q)_ij^2 with q the min/max fake quantization, in float64 by hand."""
    from afpq_plugins.core.quantize import fake_quantize
    from afpq_plugins.rtn import layer_errors

    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 64, generator=g)
    F = torch.rand(6, 64, generator=g)
    specs = B.candidate_specs(QuantSpec("nf4", 32), [B.Candidate("nf3", 32, "afpq"), B.Candidate("nf4", 64, "sym"),
                                                      B.Candidate("nf4", 48, "sym")])
    got = layer_errors(w, torch.ones(64), specs, "w", sensitivities=F)
    for s, e in zip(specs[:2], got[:2]):
        q = fake_quantize(w, s.format, s.group_size, s.mode, s.torch_scale_dtype).double()
        assert e == pytest.approx(float((F.double() * (w.double() - q) ** 2).sum()), rel=1e-6)
    assert got[2] == math.inf  # 48 does not divide 64


@pytest.mark.parametrize("objective", ["fisher", "relative"])
def test_budget_objectives_run_and_are_recorded(objective):
    pytest.importorskip("transformers")
    from _tiny import tiny_llama, tiny_tokenizer

    from afpq_plugins.methods import Calibration, quantize

    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), tie=False)
    cands = (B.Candidate("nf3", 32, "afpq"), B.Candidate("nf4", 64, "sym"), B.Candidate("nf4", 32, "afpq"))
    qc = quantize(model, tok, "rtn", QuantSpec("nf4", 32), Calibration(2, 32), progress=False, fake=True,
                  bits_budget=4.3, candidates=cands, budget_objective=objective)
    assert qc.extra["allocation"]["objective"] == objective
    assert qc.extra["bits_per_weight"] <= 4.3


def test_unknown_budget_objective_is_named():
    pytest.importorskip("transformers")
    from _tiny import tiny_llama, tiny_tokenizer

    from afpq_plugins.methods import Calibration, quantize

    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="budget objective 'loss'.*fisher, relative"):
        quantize(tiny_llama(vocab_size=len(tok)), tok, "rtn", QuantSpec("nf4", 32), Calibration(2, 32),
                 progress=False, bits_budget=4.3, budget_objective="loss")


def test_cli_budget_objective_needs_a_budget(tmp_path, capsys):
    pytest.importorskip("transformers")
    from _tiny import tiny_llama_folder

    from afpq_plugins import cli

    folder = tiny_llama_folder(str(tmp_path / "m"))
    assert cli.main(["quantize", folder, str(tmp_path / "o"), "--budget-objective", "relative", "--quiet"]) == 2
    assert "--budget-objective needs --bits-budget" in capsys.readouterr().err


def test_row_sampled_scoring_with_the_output_search_against_float64():
    """Rows 0, k, 2k of the output search's own quantization (computed on every row: the search is
    per row and group), F-weighted, summed in float64 and scaled by out / rows."""
    from afpq_plugins.core.output_search import BoundOutputSearch, OutputSearch, grouped_energies
    from afpq_plugins.core.quantize import fake_quantize
    from afpq_plugins.rtn import layer_errors

    g = torch.Generator().manual_seed(5)
    w = torch.randn(10, 64, generator=g)
    h = torch.rand(64, generator=g) * 3
    F = torch.rand(10, 64, generator=g)
    specs = B.candidate_specs(QuantSpec("nf4", 32), [B.Candidate("nf3", 32, "afpq"), B.Candidate("nf4", 64, "sym")])
    got = layer_errors(w, h, specs, "w", sensitivities=F[::4], row_stride=4, search=OutputSearch())
    for s, e in zip(specs, got):
        q = fake_quantize(w, s.format, s.group_size, s.mode, s.torch_scale_dtype,
                          search=BoundOutputSearch(OutputSearch(), grouped_energies(h, s.group_size))).double()
        ref = (F.double() * (w.double() - q) ** 2)[::4].sum() * 10 / 3
        assert e == pytest.approx(float(ref), rel=1e-6)  # float32 products, float64 sum
    with pytest.raises(ValueError, match="sensitivities of shape"):
        layer_errors(w, h, specs, "w", sensitivities=F, row_stride=4)


def test_score_row_stride_follows_the_scale_search():
    from afpq_plugins.rtn import SCORE_ROW_STRIDE, SCORE_ROW_STRIDE_OUTPUT, score_row_stride

    assert score_row_stride(QuantSpec("nf3", 64, "afpq", scale_search="output")) == SCORE_ROW_STRIDE_OUTPUT == 32
    assert score_row_stride(QuantSpec("nf3", 64, "afpq")) == SCORE_ROW_STRIDE == 8
    assert score_row_stride(QuantSpec("nf3", 64, "afpq", scale_search="mse")) == 8


def _fake_engine(honour: bool):
    """A registered 'gptq' engine that takes per-module settings: RTN of every Linear with
    ``layer_specs``' settings (or, ``honour=False``, ignoring them)."""
    from afpq_plugins.core.checkpoint import AFPQConfigDict
    from afpq_plugins.model import find_linears, quantize_model_rtn

    seen = {}

    def run(model, tokenizer, spec, calib, progress=True, layer_specs=None):
        seen.update(spec=spec, calib=calib, layer_specs=dict(layer_specs or {}))
        quantize_model_rtn(model, progress=False, spec=spec, layer_specs=layer_specs if honour else None)
        names = list(find_linears(model, ()))  # already AFPQLinear: the names only
        return AFPQConfigDict.from_spec(spec, "gptq", quantized_modules=list(seen["layer_specs"]) or names,
                                        layer_specs=layer_specs if honour else None)

    return run, seen


@pytest.mark.parametrize("honour", [True, False])
def test_budget_through_an_engine_that_takes_per_module_settings(honour, monkeypatch):
    """The registry chooses on the float model, hands the engine ``layer_specs`` and the most common
    setting as ``spec``, checks the engine's config says what was chosen, and records the allocation."""
    pytest.importorskip("transformers")
    from _tiny import tiny_llama, tiny_tokenizer

    import afpq_plugins.methods as M
    from afpq_plugins.rtn import allocate_budget, most_common_spec

    run, seen = _fake_engine(honour)
    monkeypatch.setattr(M, "_METHODS", dict(M._METHODS))
    M.register_method(M.Method("gptq", "fake", run, default_calibration=(4, 48), options=("layer_specs",)))
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), tie=False)
    ref = tiny_llama(vocab_size=len(tok), tie=False)
    ref.load_state_dict(model.state_dict())
    cands = (B.Candidate("nf3", 32, "afpq"), B.Candidate("nf4", 64, "sym"), B.Candidate("nf4", 32, "afpq"))
    # the same choice made by hand on the same float weights, with the scoring windows the registry uses
    want, _, _ = allocate_budget(ref, tok, QuantSpec("nf4", 32).resolved("gptq"), M.Calibration(4, 48, seed=0),
                                 4.2, cands, progress=False)
    assert len(set(want.values())) > 1
    if not honour:
        with pytest.raises(RuntimeError, match=r"fake did not apply the bits budget's per-module settings: "
                                               r"model\.layers\.\d\.\w+\.\w+_proj \("):
            M.quantize(model, tok, "gptq", QuantSpec("nf4", 32), backend="fake", bits_budget=4.2,
                       candidates=cands, progress=False)
        return
    qc = M.quantize(model, tok, "gptq", QuantSpec("nf4", 32), backend="fake", bits_budget=4.2, candidates=cands,
                    progress=False)
    assert seen["layer_specs"] == want
    assert seen["spec"] == most_common_spec(want, {n: m for n, m in ref.named_modules() if n in want})
    assert seen["calib"].nsamples == 4 and seen["calib"].seqlen == 48  # the engine gets its own windows
    key = lambda q: (q.fmt, q.group_size, q.mode)  # noqa: E731
    assert {n: key(qc.spec_for(n)) for n in want} == {n: key(s) for n, s in want.items()}
    assert {n: key(m.spec) for n, m in model.named_modules() if isinstance(m, AFPQLinear)} == \
        {n: key(s) for n, s in want.items()}
    assert qc.extra["bits_budget"] == 4.2 and qc.extra["bits_per_weight"] <= 4.2
    assert "4 x 48 tokens" in qc.extra["allocation"]["scoring_calibration"]


def test_budget_with_an_engine_without_per_module_settings_is_named(monkeypatch):
    pytest.importorskip("transformers")
    from _tiny import tiny_llama, tiny_tokenizer

    import afpq_plugins.methods as M

    monkeypatch.setattr(M, "_METHODS", dict(M._METHODS))
    M.register_method(M.Method("gptq", "plain", lambda *a, **k: None, default_calibration=(4, 48)))
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match=r"method 'gptq' \(plain\) has no option 'bits_budget'.*"
                                         r"needs an engine that takes per-module settings \((none|for)"):
        M.quantize(tiny_llama(vocab_size=len(tok)), tok, "gptq", QuantSpec("nf4", 32), backend="plain",
                   bits_budget=4.0)


def test_awq_budget_layout_follows_the_candidates_widths(monkeypatch):
    """AWQ's default 4-bit layout cannot hold 3-bit layers: a budget with 3-bit candidates and no
    layout asked for writes gptq; 4-bit candidates keep awq; an asked-for layout is kept."""
    pytest.importorskip("transformers")
    from _tiny import tiny_llama, tiny_tokenizer

    import afpq_plugins.methods as M

    class Seen(Exception):
        pass

    def run(model, tokenizer, spec, calib, progress=True, layer_specs=None):
        raise Seen(spec.layout, {s.layout for s in layer_specs.values()})

    monkeypatch.setattr(M, "_METHODS", dict(M._METHODS))
    M.register_method(M.Method("awq", "fake", run, default_calibration=(2, 32), options=("layer_specs",)))
    tok = tiny_tokenizer()
    mixed = (B.Candidate("nf3", 32, "afpq"), B.Candidate("nf4", 32, "afpq"))
    four = (B.Candidate("nf4", 64, "sym"), B.Candidate("nf4", 32, "afpq"))
    for spec, cands, want in ((QuantSpec("nf4", 32), mixed, "gptq"), (QuantSpec("nf4", 32), four, "awq"),
                              (QuantSpec("nf4", 32, layout="awq"), mixed, "awq"), (QuantSpec("nf4", 32), None, "gptq")):
        with pytest.raises(Seen) as e:
            M.quantize(tiny_llama(vocab_size=len(tok)), tok, "awq", spec, backend="fake", bits_budget=4.3,
                       candidates=cands, progress=False)
        assert e.value.args[0] == want and e.value.args[1] <= {want}
    assert M.budget_layout("gptq", QuantSpec("nf4", 32), mixed) == "gptq"
