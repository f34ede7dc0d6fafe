"""lm-eval-harness on an AFPQ checkpoint, the way users run it (examples/lm_eval_quickstart.sh:
``python -m lm_eval --model hf``
in a fresh process with no import of ours (the installed package's .pth hook registers
``quant_method "afpq"``; here the package is a wheel built from this checkout, in a venv over
this one), with the task shipped in afpq_plugins/lm_eval_tasks (offline, Pride and Prejudice).
Its perplexity must match ``afpq eval`` on the same text and window length."""

from __future__ import annotations

import glob
import importlib.util
import json
import os

import pytest

from _plain import REPO, build_wheel, plain_env, run, venv_with_wheel

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed")

CHARS = 6000
SEQLEN = 64
TOLERANCE = 0.02  # relative, on perplexity (docs/lm_eval.md: why they differ at all)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from _tiny import tiny_llama_folder

    from afpq_plugins import cli

    work = tmp_path_factory.mktemp("lmeval")
    py = venv_with_wheel(str(work / "venv"), build_wheel(str(work)))
    src = tiny_llama_folder(str(work / "model"))
    ckpt = str(work / "nf4")
    assert cli.main(["quantize", src, ckpt, "--format", "nf4", "--group-size", "32", "--quiet"]) == 0
    return {"python": py, "ckpt": ckpt, "work": str(work)}


def test_lm_eval_hf_matches_afpq_eval(setup, capsys):
    from transformers import AutoTokenizer

    from afpq_plugins import cli
    from afpq_plugins.lm_eval_tasks import TASK, token_perplexity
    from afpq_plugins.lm_eval_tasks.pride import text

    out = os.path.join(setup["work"], "results")
    # the documented example, as a user runs it: bash, the wheel venv's python first on PATH, no PYTHONPATH
    env = plain_env(None)
    env["PATH"] = os.path.dirname(setup["python"]) + os.pathsep + env["PATH"]
    r = run(["bash", os.path.join(REPO, "examples", "lm_eval_quickstart.sh"), setup["ckpt"], str(SEQLEN), str(CHARS),
             "--output_path", out], cwd=setup["work"], env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    (res_file,) = glob.glob(os.path.join(out, "**", "results_*.json"), recursive=True)
    word_ppl = json.load(open(res_file))["results"][TASK]["word_perplexity,none"]

    doc = text(CHARS)
    doc_file = os.path.join(setup["work"], "doc.txt")
    with open(doc_file, "w", encoding="utf-8") as f:
        f.write(doc)
    n_tokens = len(AutoTokenizer.from_pretrained(setup["ckpt"])(doc, add_special_tokens=False)["input_ids"])
    lm_ppl = token_perplexity(word_ppl, doc, n_tokens)
    capsys.readouterr()
    assert cli.main(["eval", setup["ckpt"], "--text", doc_file, "--seqlen", str(SEQLEN), "--json", "--quiet"]) == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ours["kind"] == "afpq"
    assert lm_ppl == pytest.approx(ours["ppl"], rel=TOLERANCE), (lm_ppl, ours["ppl"])

