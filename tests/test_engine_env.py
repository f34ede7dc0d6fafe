"""afpq_plugins sets GPTQModel's worker count itself (afpq_plugins._engine_env)."""

from __future__ import annotations

import os
import sys

import pytest

from _plain import REPO, run, plain_env
from afpq_plugins import _engine_env as ee


@pytest.mark.parametrize("cores,want", [(1, 2), (2, 2), (3, 2), (4, 2), (5, 3), (16, 8), (64, 12)])
def test_workers_follow_gptqmodels_default_but_never_below_two(cores, want):
    assert ee.gptqmodel_workers(cores) == want


def test_configure_fills_only_an_unset_variable():
    env = {}
    ee.configure(env)
    assert env[ee.VAR] == str(ee.gptqmodel_workers(ee.allowed_cores()))
    env = {ee.VAR: "7"}
    ee.configure(env)
    assert env[ee.VAR] == "7"


@pytest.mark.parametrize("value", ["1", "0", "two"])
def test_check_names_the_variable(value):
    with pytest.raises(ValueError, match=ee.VAR):
        ee.check({ee.VAR: value})
    ee.check({ee.VAR: "2"})
    ee.check({})


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux")
def test_import_sets_it_from_the_allowed_cores_in_a_plain_process(tmp_path):
    code = "import os, afpq_plugins; print(os.environ['GPTQMODEL_CPU_WORKERS'], len(os.sched_getaffinity(0)))"
    r = run([sys.executable, "-c", code], cwd=str(tmp_path), cores="0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["2", "1"]
    r = run([sys.executable, "-c", code], cwd=str(tmp_path), env=plain_env(REPO, GPTQMODEL_CPU_WORKERS="5"))
    assert r.stdout.split()[0] == "5"
