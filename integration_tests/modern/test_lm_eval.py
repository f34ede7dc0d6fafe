"""lm-eval-harness on an AFPQ checkpoint, the way users run it (examples/lm_eval_quickstart.sh:
``python -m lm_eval --model hf``
in a fresh process with no import of ours (the installed package's .pth hook registers
``quant_method "afpq"``; here the package is a wheel built from this checkout, in a venv over
this one), with the task shipped in afpq_plugins/lm_eval_tasks (offline, Pride and Prejudice).
Its perplexity must match ``afpq eval`` on the same text and window length, and ``afpq eval --lm-eval``
must run the same lm-eval command."""

from __future__ import annotations

import glob
import importlib.util
import json
import os

import pytest

from _plain import REPO, afpq, build_wheel, plain_env, run, venv_with_wheel

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


def _word_perplexity(out_dir: str) -> float:
    from afpq_plugins.lm_eval_tasks import TASK

    (res_file,) = glob.glob(os.path.join(out_dir, "**", "results_*.json"), recursive=True)
    return json.load(open(res_file))["results"][TASK]["word_perplexity,none"]


@pytest.fixture(scope="module")
def quickstart(setup):
    """lm-eval's word perplexity from examples/lm_eval_quickstart.sh."""
    out = os.path.join(setup["work"], "results")
    # the documented example, as a user runs it: bash, the wheel venv's python first on PATH, no PYTHONPATH
    env = plain_env(None)
    env["PATH"] = os.path.dirname(setup["python"]) + os.pathsep + env["PATH"]
    r = run(["bash", os.path.join(REPO, "examples", "lm_eval_quickstart.sh"), setup["ckpt"], str(SEQLEN), str(CHARS),
             "--output_path", out], cwd=setup["work"], env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return _word_perplexity(out)


def test_lm_eval_hf_matches_afpq_eval(setup, quickstart, capsys):
    from transformers import AutoTokenizer

    from afpq_plugins import cli
    from afpq_plugins.lm_eval_tasks import token_perplexity
    from afpq_plugins.lm_eval_tasks.pride import text

    doc = text(CHARS)
    doc_file = os.path.join(setup["work"], "doc.txt")
    with open(doc_file, "w", encoding="utf-8") as f:
        f.write(doc)
    n_tokens = len(AutoTokenizer.from_pretrained(setup["ckpt"])(doc, add_special_tokens=False)["input_ids"])
    lm_ppl = token_perplexity(quickstart, doc, n_tokens)
    capsys.readouterr()
    assert cli.main(["eval", setup["ckpt"], "--text", doc_file, "--seqlen", str(SEQLEN), "--json", "--quiet"]) == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ours["kind"] == "afpq"
    assert lm_ppl == pytest.approx(ours["ppl"], rel=TOLERANCE), (lm_ppl, ours["ppl"])


def test_afpq_eval_lm_eval_runs_the_same_task(setup, quickstart):
    """``afpq eval CKPT --lm-eval afpq_pride_ppl --seqlen L`` (hf backend, in a plain environment) runs
    the same lm-eval command as the example: the same windows, so the same perplexity (float32 both)."""
    from afpq_plugins.lm_eval_tasks import TASK

    out = os.path.join(setup["work"], "results_afpq_eval")
    extra = f"--metadata '{json.dumps({'chars': CHARS})}' --output_path {out}"
    r = afpq(["eval", setup["ckpt"], "--lm-eval", TASK, "--seqlen", str(SEQLEN), "--lm-eval-args", extra],
             cwd=setup["work"], timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "afpq eval: running" in r.stderr and f"max_length={SEQLEN}" in r.stderr
    assert _word_perplexity(out) == pytest.approx(quickstart, rel=1e-6)
