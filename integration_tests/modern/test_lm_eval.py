"""lm-eval-harness on an AFPQ checkpoint, the way users run it: ``python -m lm_eval --model hf``
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

from _plain import build_wheel, plain_env, run, venv_with_wheel

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
    from afpq_plugins.lm_eval_tasks import TASK, TASKS_DIR, token_perplexity
    from afpq_plugins.lm_eval_tasks.pride import text

    out = os.path.join(setup["work"], "results")
    r = run([setup["python"], "-m", "lm_eval", "--model", "hf", "--model_args",
             f"pretrained={setup['ckpt']},max_length={SEQLEN}", "--tasks", TASK, "--include_path",
             TASKS_DIR.replace(os.path.dirname(os.path.dirname(TASKS_DIR)), _installed_root(setup["python"])),
             "--metadata", json.dumps({"chars": CHARS}), "--batch_size", "4", "--output_path", out],
            cwd=setup["work"], env=plain_env(None, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"), timeout=900)
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


def _installed_root(python: str) -> str:
    """site-packages of the wheel's venv: the task folder the user gets (not this checkout's)."""
    import subprocess

    return subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
