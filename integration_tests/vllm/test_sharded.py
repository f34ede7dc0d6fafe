"""Sharded AFPQ checkpoints (streaming RTN, several ``model-0000k-of-0000n`` files and an
index) through vLLM: same greedy tokens and log-probabilities as the project loader; the
header scan of checkpoints without ``quantized_modules`` reads every shard; quantized MoE
experts are refused by name."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("vllm")

from _ckpt import tiny_llama, tiny_tokenizer  # noqa: E402
from test_engine import _compare, reference, run_engine  # noqa: E402

from afpq_plugins.core.checkpoint import INDEX_NAME, AFPQConfigDict, CheckpointError  # noqa: E402
from afpq_plugins.core.spec import QuantSpec  # noqa: E402
from afpq_plugins.streaming import quantize_rtn_streaming  # noqa: E402


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    tok = tiny_tokenizer()
    src = str(root / "float")
    tiny_llama(len(tok)).save_pretrained(src, max_shard_size="200KB")
    tok.save_pretrained(src)
    out = str(root / "nf4")
    quantize_rtn_streaming(src, out, QuantSpec("nf4", 32), max_shard_size="200KB")
    assert os.path.isfile(os.path.join(out, INDEX_NAME))
    assert len([n for n in os.listdir(out) if n.startswith("model-")]) >= 3
    return out


def test_sharded_checkpoint_matches_project_loader(sharded):
    worst = _compare(run_engine(sharded), reference(sharded), "sharded nf4 vLLM vs load_quantized")
    print(f"sharded nf4: tokens equal; max |logprob diff| {worst:.2e}")


def test_header_scan_reads_every_shard(sharded):
    from afpq_plugins.vllm.config import AFPQVllmConfig

    with open(os.path.join(sharded, "config.json")) as fh:
        qd = json.load(fh)["quantization_config"]
    want = sorted(qd.pop("quantized_modules"))
    cfg = AFPQVllmConfig.from_config(qd)
    cfg.maybe_update_config(sharded)
    assert sorted(cfg.quantized) == want


def test_quantized_moe_experts_are_refused_by_name():
    from afpq_plugins.vllm.config import AFPQVllmConfig

    qc = AFPQConfigDict(format="nf4", bits=4, group_size=32, mode="afpq", quantized_modules=[
        "model.layers.0.self_attn.q_proj", "model.layers.0.block_sparse_moe.experts.0.w1"])
    cfg = AFPQVllmConfig(qc)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.block_sparse_moe.experts'.*float experts only"):
        cfg.get_quant_method(torch.nn.Module(), "model.layers.0.block_sparse_moe.experts")
    assert cfg.get_quant_method(torch.nn.Module(), "model.layers.1.block_sparse_moe.experts") is None
