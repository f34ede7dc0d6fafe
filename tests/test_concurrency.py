"""Loading a checkpoint folder while another thread keeps re-saving it.

Two versions of one tiny model (nf4 and fp4 RTN: the same tensor names and shapes) are
saved over each other with ``overwrite=True`` in a loop. Every load must return one
version whole: the logits of the nf4 model with an nf4 config, or of the fp4 model with
an fp4 config (the reference is each in-memory model), or fail with
:class:`~afpq_plugins.core.checkpoint.CheckpointError`; never a mix, never another error.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from _ckpt_tools import logits, tiny_llama_checkpoint  # noqa: E402
from afpq_plugins.core.checkpoint import CheckpointError, read_quant_config  # noqa: E402
from afpq_plugins.model import load_quantized, save_quantized  # noqa: E402


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    root = tmp_path_factory.mktemp("race")
    out = {}
    for fmt in ("nf4", "fp4"):
        path, model = tiny_llama_checkpoint(root / fmt, fmt=fmt)
        out[fmt] = (model, read_quant_config(path)[1], logits(model))
    return out


def _race(versions, target, load, pause, seconds=20.0, max_loads=30):
    save_quantized(versions["nf4"][0], str(target), versions["nf4"][1])
    stop, failures = threading.Event(), []

    def saver():
        rng = random.Random(0)
        i = 0
        while not stop.is_set():
            time.sleep(rng.uniform(0, pause))  # so that some loads fall between two saves
            model, qc, _ = versions["fp4" if i % 2 == 0 else "nf4"]
            try:
                save_quantized(model, str(target), qc, overwrite=True)
            except Exception as exc:  # noqa: BLE001
                failures.append(f"save: {type(exc).__name__}: {exc}")
                return
            i += 1

    thread = threading.Thread(target=saver, daemon=True)
    thread.start()
    seen: Counter = Counter()
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and sum(seen.values()) < max_loads:
            try:
                model = load()
            except CheckpointError:
                seen["named error"] += 1
                continue
            except Exception as exc:  # noqa: BLE001
                failures.append(f"load: {type(exc).__name__}: {exc}")
                break
            qc = model.config.quantization_config
            fmt = qc["format"] if isinstance(qc, dict) else qc.format
            if not torch.equal(logits(model), versions[fmt][2]):
                failures.append(f"load: a {fmt} config with tensors of the other version")
                break
            seen[fmt] += 1
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not failures, failures
    assert seen["nf4"] + seen["fp4"] > 0, seen
    return seen


def test_project_loader_never_mixes_versions(versions, tmp_path):
    target = tmp_path / "ck"
    _race(versions, target, lambda: load_quantized(str(target)), pause=0.2)


def test_transformers_loader_never_mixes_versions(versions, tmp_path):
    import afpq_plugins  # noqa: F401
    from transformers import AutoModelForCausalLM

    target = tmp_path / "ck"
    _race(versions, target, lambda: AutoModelForCausalLM.from_pretrained(str(target)), pause=1.5)


_SAVER = r"""
import sys, torch
from afpq_plugins.core.checkpoint import AFPQConfigDict, write_checkpoint
out, shard = sys.argv[1], (int(sys.argv[2]) or None)
qc = AFPQConfigDict(format="nf4", bits=4, group_size=32, mode="afpq")
big = {f"t{i}": torch.full((64, 1024), float(i)) for i in range(24)}
v = 0
print("ready", flush=True)
while True:
    v += 1
    write_checkpoint(out, {**big, "version": torch.tensor([v])}, {"version": v}, qc, overwrite=True,
                     max_shard_size=shard)
"""


@pytest.mark.parametrize("shard", [0, 300_000], ids=["single-file", "sharded"])
def test_killed_saves_leave_one_complete_version(tmp_path, shard):
    """SIGKILL a process that keeps re-saving a checkpoint (one file, or shards and an index),
    at random moments: the next read finds one complete version (config and tensors agree)
    and no leftovers."""
    import os
    import signal
    import subprocess
    import sys

    from afpq_plugins.core.checkpoint import AFPQConfigDict, CheckpointSnapshot, write_checkpoint

    out = tmp_path / "ck"
    qc = AFPQConfigDict(format="nf4", bits=4, group_size=32, mode="afpq")
    write_checkpoint(str(out), {"version": torch.tensor([0])}, {"version": 0}, qc)
    rng = random.Random(1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                       os.environ.get("PYTHONPATH", "")])}
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(out), str(shard)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.05, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        with CheckpointSnapshot(str(out)) as snap:
            v = snap.config["version"]
            assert int(snap.tensors()["version"]) == v
            assert snap.sharded == (bool(shard) and v > 0) and (len(snap.files) > 1) == snap.sharded
        assert sorted(os.listdir(tmp_path)) == ["ck"], os.listdir(tmp_path)
