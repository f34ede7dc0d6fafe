"""The package as users get it: a wheel built from this checkout, installed into a fresh venv,
run in a plain environment (no PYTHONPATH, no variable of ours) from a folder outside the
source tree. Runs in the modern and the legacy venv (``make test``), i.e. with transformers
5.x and 4.53.

- the console script: ``afpq --version``, ``afpq formats``, a tiny RTN quantize;
- registered when installed: in a fresh interpreter with no import of ours,
  ``AutoModelForCausalLM.from_pretrained(afpq_checkpoint)`` builds AFPQLinear layers whose
  logits equal afpq_plugins' own loader's; ``AFPQ_PLUGINS_AUTOLOAD=0`` gives stock transformers
  (which refuses the checkpoint); the start-up hook imports neither torch nor transformers nor
  afpq_plugins, and ``import transformers`` alone leaves afpq_plugins unimported.
"""

from __future__ import annotations

import json
import os
import sys
import zipfile

import pytest

from _plain import REPO, build_wheel, plain_env, run, venv_with_wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    work = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(str(work))
    py = venv_with_wheel(str(work / "venv"), wheel)
    return {"wheel": wheel, "python": py, "afpq": os.path.join(os.path.dirname(py), "afpq"), "cwd": str(work)}


@pytest.fixture(scope="module")
def checkpoint(installed, tmp_path_factory):
    """A tiny Llama quantized by the installed console script (RTN nf3, group 32)."""
    from _tiny import tiny_llama_folder

    root = tmp_path_factory.mktemp("ckpt")
    src = tiny_llama_folder(str(root / "model"))
    out = str(root / "rtn")
    r = run([installed["afpq"], "quantize", src, out, "--format", "nf3", "--group-size", "32", "--quiet"],
            cwd=installed["cwd"], env=plain_env(None))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_wheel_carries_the_cpp_source_the_texts_and_the_autoload(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert "afpq_plugins/kernels/cpu/afpq_cpu.cpp" in names
    assert "afpq_plugins/assets/text/prideprejudice.txt" in names
    assert "afpq_plugins/lm_eval_tasks/afpq_pride_ppl.yaml" in names and "afpq_plugins/lm_eval_tasks/pride.py" in names
    assert "afpq_plugins-autoload.pth" in names and "_afpq_autoload.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)


def test_console_script_version_and_formats(installed):
    from afpq_plugins import __version__

    r = run([installed["afpq"], "--version"], cwd=installed["cwd"], env=plain_env(None))
    assert r.returncode == 0 and r.stdout.startswith(f"afpq {__version__} "), (r.stdout, r.stderr)
    r = run([installed["afpq"], "formats"], cwd=installed["cwd"], env=plain_env(None))
    assert r.returncode == 0, r.stderr
    assert [line.split()[0] for line in r.stdout.splitlines()][:2] and "nf3" in r.stdout and "fp4" in r.stdout


LOAD = r"""
import sys, torch
from transformers import AutoModelForCausalLM
assert 'afpq_plugins' not in sys.modules, 'import transformers imported afpq_plugins'
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
layer = type(m.model.layers[0].self_attn.q_proj).__name__
print('LOADED', layer, sys.modules['afpq_plugins'].__file__)
from afpq_plugins.model import load_quantized
ids = torch.arange(12).view(1, 12) % m.config.vocab_size
with torch.no_grad():
    print('EQUAL', torch.equal(m(ids).logits, load_quantized(sys.argv[1])(ids).logits))
"""


def test_from_pretrained_with_no_import_of_ours(installed, checkpoint):
    r = run([installed["python"], "-c", LOAD, checkpoint], cwd=installed["cwd"], env=plain_env(None))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line.startswith(("LOADED", "EQUAL")))
    layer, where = lines["LOADED"].split()
    assert layer == "AFPQLinear"
    assert not where.startswith(REPO)  # the installed copy, not this checkout
    assert lines["EQUAL"] == "True"
    qc = json.load(open(os.path.join(checkpoint, "config.json")))["quantization_config"]
    assert qc["quant_method"] == "afpq"


def test_autoload_off_gives_stock_transformers(installed, checkpoint):
    r = run([installed["python"], "-c", LOAD, checkpoint], cwd=installed["cwd"],
            env=plain_env(None, AFPQ_PLUGINS_AUTOLOAD="0"))
    assert r.returncode != 0
    assert "size mismatch" in r.stderr or "MISMATCH" in r.stderr + r.stdout, r.stderr[-2000:]


def test_the_startup_hook_imports_nothing_heavy(installed):
    code = ("import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'afpq_plugins', '_afpq_autoload', 'numpy')))")
    r = run([installed["python"], "-c", code], cwd=installed["cwd"], env=plain_env(None))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['_afpq_autoload']"
    r = run([installed["python"], "-c", "import transformers, sys; print('afpq_plugins' in sys.modules)"],
            cwd=installed["cwd"], env=plain_env(None))
    assert r.stdout.strip() == "False", r.stderr
