"""afpq_version: written into every quantization_config, checked on load (newer major: named error)."""

from __future__ import annotations

import json
import os

import pytest

import afpq_plugins
from afpq_plugins.core.version import CheckpointVersionError, check_writer_version
from afpq_plugins.core.checkpoint_schema import AFPQConfigDict
from afpq_plugins.core.errors import CheckpointError


def _qc():
    return AFPQConfigDict(format="nf3", bits=3, group_size=32, mode="afpq", quantized_modules=["l"])


def test_the_config_records_the_writing_release():
    d = _qc().to_dict()
    assert d["afpq_version"] == afpq_plugins.__version__
    assert AFPQConfigDict.from_dict(d).to_dict() == d


def test_a_newer_major_is_refused_by_name():
    major = int(afpq_plugins.__version__.split(".")[0])
    d = dict(_qc().to_dict(), afpq_version=f"{major + 1}.0.0")
    with pytest.raises(CheckpointVersionError, match=rf"written by afpq-plugins {major + 1}\.0\.0.*upgrade"):
        AFPQConfigDict.from_dict(d, source="x/config.json")
    assert issubclass(CheckpointVersionError, CheckpointError)


@pytest.mark.parametrize("ok", [None, "0.0.1", "0.99.3", f"{afpq_plugins.__version__}.dev1"])
def test_same_or_older_majors_and_unversioned_load(ok):
    check_writer_version(ok)


@pytest.mark.parametrize("bad", [3, "", "v1", ["0.1.0"]])
def test_a_malformed_version_is_named(bad):
    with pytest.raises(CheckpointVersionError, match="afpq_version must be a version string"):
        check_writer_version(bad)


def test_saved_checkpoint_carries_it_and_a_newer_one_fails_to_load(tmp_path):
    from _tiny import tiny_llama
    from afpq_plugins.model import load_quantized, quantize_model_rtn, save_quantized

    model = tiny_llama()
    qc = quantize_model_rtn(model, fmt="nf3", group_size=32)
    out = save_quantized(model, str(tmp_path / "q"), qc)
    cfg_path = os.path.join(out, "config.json")
    cfg = json.load(open(cfg_path))
    assert cfg["quantization_config"]["afpq_version"] == afpq_plugins.__version__
    load_quantized(out)
    cfg["quantization_config"]["afpq_version"] = "99.0.0"
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(CheckpointVersionError, match="config.json.*99.0.0"):
        load_quantized(out)
