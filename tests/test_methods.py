"""The methods registry (``afpq_plugins.methods``): one signature, engine choice, clear errors,
and the CLI's saves byte-identical to the direct calls they replaced."""

from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("transformers")

from _tiny import tiny_llama_folder  # noqa: E402

from afpq_plugins import cli, methods  # noqa: E402
from afpq_plugins.methods import (  # noqa: E402
    Calibration, FormatSpec, Method, MethodUnavailable, get_method, quantize, register_method,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_llama_folder(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture()
def fake_engine():
    """A registered method whose engine is not installed, removed afterwards."""
    m = register_method(Method("gptq", "no-such-engine", lambda *a, **k: None, requires=("afpq_no_such_module",),
                               install_hint="; use .venv-elsewhere", default_calibration=(7, 9)))
    yield m
    methods._METHODS.pop(("gptq", "no-such-engine"))


def test_registry_lists_and_resolves():
    assert {"rtn", "gptq", "awq"} <= set(methods.list_methods())
    assert get_method("rtn").engine == "core"
    with pytest.raises(ValueError, match="unknown method 'qat'"):
        get_method("qat")
    with pytest.raises(ValueError, match="no backend 'nope'"):
        get_method("gptq", "nope")


def test_missing_engine_is_one_clear_line(fake_engine, folder, tmp_path, capsys):
    with pytest.raises(MethodUnavailable, match="no-such-engine is not installed in this environment.*venv-elsewhere"):
        get_method("gptq", "no-such-engine")
    rc = cli.main(["quantize", folder, str(tmp_path / "o"), "--method", "gptq", "--backend", "no-such-engine",
                   "--format", "nf3", "--group-size", "32", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "no-such-engine is not installed" in err
    assert not (tmp_path / "o").exists()


def test_engine_default_calibration(fake_engine):
    c = Calibration().resolved(fake_engine)
    assert (c.nsamples, c.seqlen) == (7, 9)
    assert Calibration(nsamples=3).resolved(fake_engine).nsamples == 3  # --nsamples overrides


def test_unknown_option_names_the_option(folder):
    from afpq_plugins.data import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(folder)
    with pytest.raises(ValueError, match="no option 'clip'"):
        quantize(model, tok, "rtn", FormatSpec("nf3", 32), clip="symmetric")


@pytest.mark.parametrize("argv,kw", [
    (["--format", "nf3", "--group-size", "32"], dict(fmt="nf3", group_size=32)),
    (["--format", "fp4", "--group-size", "64", "--sym", "--layout", "awq", "--scale-search", "mse"],
     dict(fmt="fp4", group_size=64, mode="sym", layout="awq", scale_search="mse")),
])
def test_cli_rtn_save_is_byte_identical_to_the_direct_path(folder, tmp_path, argv, kw):
    """The registry route writes the same bytes as quantize_model_rtn + save_quantized did."""
    from afpq_plugins.data import load_model_and_tokenizer
    from afpq_plugins.model import quantize_model_rtn, save_quantized

    out = str(tmp_path / "cli")
    assert cli.main(["quantize", folder, out, "--method", "rtn", "--quiet", *argv]) == 0
    model, tok = load_model_and_tokenizer(folder)
    qc = quantize_model_rtn(model, kw["fmt"], kw["group_size"], kw.get("mode"), kw.get("layout", "gptq"),
                            progress=False, scale_search=kw.get("scale_search"))
    ref = save_quantized(model, str(tmp_path / "direct"), qc, tokenizer=tok)
    for name in ("model.safetensors", "config.json"):
        with open(os.path.join(out, name), "rb") as a, open(os.path.join(ref, name), "rb") as b:
            assert a.read() == b.read(), name


def test_rtn_fake_equals_packed_decode(folder):
    """``fake=True`` leaves float Linears holding exactly what the packed modules decode to."""
    from afpq_plugins.data import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(folder)
    fake, packed = copy.deepcopy(model), copy.deepcopy(model)
    spec = FormatSpec("nf3", 32, scale_search="mse")
    qc = quantize(fake, tok, "rtn", spec, fake=True, progress=False)
    quantize(packed, tok, "rtn", spec, progress=False)
    assert qc.method == "rtn" and qc.quantized_modules
    for name in qc.quantized_modules:
        lin, layer = fake.get_submodule(name), packed.get_submodule(name)
        with torch.no_grad():
            torch.testing.assert_close(lin.weight, layer(torch.eye(lin.in_features)).t(), rtol=1e-5, atol=1e-6)


def test_plan_line_and_first_layer_estimate(folder, fake_engine):
    from afpq_plugins.data import load_model_and_tokenizer
    from afpq_plugins.progress import FirstLayerTimer, describe_plan

    model, _ = load_model_and_tokenizer(folder)
    n = model.config.num_hidden_layers
    line = describe_plan(fake_engine, model, Calibration().resolved(fake_engine))
    assert f"{n} decoder layers" in line and "7 x 9 tokens" in line and "device cpu" in line
    logs = []
    with FirstLayerTimer(model, logs.append):
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))
            model(torch.tensor([[1, 2, 3]]))
    assert len(logs) == 1 and f"the first of {n} layers" in logs[0]
    model(torch.tensor([[1, 2]]))  # hooks removed on exit
    assert len(logs) == 1
