"""Every script in examples/ runs (on a tiny random Llama, in a fresh process, as a user runs it).

Examples whose engine is not installed in this venv are skipped here and run in the venv that
has it (``make test`` runs tests/ in the modern and the legacy venv; lm-eval:
integration_tests/modern/test_lm_eval.py; vLLM: integration_tests/vllm/test_examples.py; lm-eval
through vLLM: integration_tests/vllm/test_lm_eval_vllm.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

pytest.importorskip("transformers")

from _plain import REPO, plain_env, run  # noqa: E402

EX = os.path.join(REPO, "examples")


def _needs(*modules):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed in this venv")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from _tiny import tiny_llama, tiny_tokenizer

    path = str(tmp_path_factory.mktemp("ex") / "model")
    tok = tiny_tokenizer()
    tiny_llama(vocab_size=len(tok), hidden=128).save_pretrained(path)  # 128: AutoAWQ's clip search
    tok.save_pretrained(path)
    return path


def _env():
    env = plain_env()
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    return env


def _py(script, *args, cwd):
    r = run([sys.executable, os.path.join(EX, script), *args], cwd=cwd, env=_env())
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout


def _is_checkpoint(path):
    assert json.load(open(os.path.join(path, "config.json")))["quantization_config"]["quant_method"] == "afpq"
    assert os.path.isfile(os.path.join(path, "README.md"))


def test_cli_quickstart(tiny, tmp_path):
    env = dict(_env(), AFPQ=f"{sys.executable} -m afpq_plugins.cli", GROUP="32", SEQLEN="32", WINDOWS="2",
               NSAMPLES="4")
    out = str(tmp_path / "cli")
    r = run(["bash", os.path.join(EX, "cli_quickstart.sh"), tiny, out], cwd=str(tmp_path), env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.startswith("afpq ") and "perplexity" in r.stdout and "| calibration |" in r.stdout
    _is_checkpoint(os.path.join(out, "rtn-nf3-g64-output"))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_registry_quickstart(tiny, tmp_path, method):
    from afpq_plugins.methods import MethodUnavailable, get_method

    try:
        get_method(method)
    except MethodUnavailable as exc:
        pytest.skip(str(exc))
    out = str(tmp_path / "reg")
    stdout = _py("registry_quickstart.py", "--model", tiny, "--method", method, "--group-size", "32", "--seqlen", "32",
                 "--nsamples", "4", "--out", out, cwd=str(tmp_path))
    assert f"{method} nf3/afpq g32 -> {out}" in stdout
    _is_checkpoint(out)


@_needs("gptqmodel")
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gptqmodel_quickstart(tiny, tmp_path, method):
    out = str(tmp_path / "gm")
    _py("gptqmodel_quickstart.py", "--model", tiny, "--method", method, "--group-size", "32", "--nsamples", "4",
        "--seqlen", "32", "--out", out, cwd=str(tmp_path))
    _is_checkpoint(out)


@_needs("llmcompressor")
def test_llmcompressor_quickstart(tiny, tmp_path):
    out = str(tmp_path / "llmc")
    _py("llmcompressor_quickstart.py", "--model", tiny, "--group-size", "32", "--nsamples", "4", "--seqlen", "32",
        "--out", out, cwd=str(tmp_path))
    _is_checkpoint(out)


@_needs("auto_gptq")
def test_autogptq_quickstart(tiny, tmp_path):
    out = str(tmp_path / "ag")
    _py("autogptq_quickstart.py", tiny, out, "--group-size", "32", "--nsamples", "4", "--seqlen", "32",
        cwd=str(tmp_path))
    _is_checkpoint(out)


@_needs("awq")
def test_autoawq_quickstart(tiny, tmp_path):
    out = str(tmp_path / "aw")
    _py("autoawq_quickstart.py", tiny, out, cwd=str(tmp_path))
    _is_checkpoint(out)


def test_hf_load(tiny, tmp_path):
    from afpq_plugins import cli

    ck = str(tmp_path / "ck")
    assert cli.main(["quantize", tiny, ck, "--format", "nf3", "--group-size", "32", "--quiet"]) == 0
    _py("hf_load.py", ck, "--out", str(tmp_path / "resaved"), cwd=str(tmp_path))
