"""The modern CLI's GPTQModel GPTQ and AWQ in a plain shell: a fresh process whose environment
has no ``GPTQMODEL_CPU_WORKERS`` (this folder's conftest sets it for in-process tests; a user's
shell does not), on 1 and 2 allowed cores. Before afpq_plugins set the variable itself, both
stopped on a 2-core machine with "Virtual pool 'model_loader:cpu' requests 2 workers but parent
'cpu' only has 1"."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from _plain import afpq, plain_env

pytestmark = pytest.mark.skipif(shutil.which("taskset") is None or not hasattr(os, "sched_getaffinity"),
                                reason="needs taskset and sched_getaffinity (Linux)")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from _tiny import tiny_llama_folder

    return tiny_llama_folder(str(tmp_path_factory.mktemp("plain") / "model"))


@pytest.mark.parametrize("cores", ["0", "0,1"])
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gptqmodel_cli_in_a_plain_shell(tiny_folder, tmp_path, method, cores):
    env = plain_env()
    assert "GPTQMODEL_CPU_WORKERS" not in env
    out = tmp_path / "out"
    r = afpq(["quantize", tiny_folder, str(out), "--method", method, "--backend", "gptqmodel", "--format", "nf3",
              "--group-size", "32", "--nsamples", "4", "--calib-seqlen", "64", "--quiet"],
             cwd=str(tmp_path), env=env, cores=cores)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Virtual pool" not in r.stderr
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "afpq" and qc["format"] == "nf3" and qc["group_size"] == 32
    assert qc["quantizer"].startswith("gptqmodel")


def test_a_worker_count_gptqmodel_cannot_use_is_named(tiny_folder, tmp_path):
    r = afpq(["quantize", tiny_folder, str(tmp_path / "out"), "--method", "gptq", "--backend", "gptqmodel",
              "--format", "nf3", "--group-size", "32", "--nsamples", "2", "--calib-seqlen", "32", "--quiet"],
             cwd=str(tmp_path), env=plain_env(GPTQMODEL_CPU_WORKERS="1"))
    assert r.returncode == 2
    assert "GPTQMODEL_CPU_WORKERS=1" in r.stderr and "at least 2" in r.stderr
