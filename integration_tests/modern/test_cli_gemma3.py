"""A model type the legacy engines do not know (Gemma 3 text, ``gemma3_text``) quantizes on the
modern venv from the CLI with the venv's default engine (GPTQModel 7.6), GPTQ and AWQ; the
checkpoint loads through the project loader and through transformers, which agree, and
stays close to the float model."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("gptqmodel")
transformers = pytest.importorskip("transformers")

from afpq_plugins.cli import main  # noqa: E402
from afpq_plugins.model import load_quantized  # noqa: E402
from afpq_plugins.nn import AFPQLinear  # noqa: E402


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory, tok):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    path = str(tmp_path_factory.mktemp("gemma3") / "model")
    Gemma3ForCausalLM(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gemma3_quantizes_from_the_cli(gemma3, tmp_path, capsys, method):
    out = str(tmp_path / method)
    rc = main(["quantize", gemma3, out, "--method", method, "--format", "nf4", "--group-size", "32",
               "--nsamples", "4", "--calib-seqlen", "48"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"{method} through gptqmodel" in err
    with open(os.path.join(out, "config.json"), encoding="utf-8") as fh:
        cfg = json.load(fh)
    assert cfg["model_type"] == "gemma3_text"
    qc = cfg["quantization_config"]
    assert (qc["method"], qc["format"], qc["mode"]) == (method, "nf4", "afpq")
    assert len(qc["quantized_modules"]) == 2 * 7  # q k v o gate up down per layer

    ids = torch.randint(0, 250, (1, 24), generator=torch.Generator().manual_seed(1))
    ref = transformers.AutoModelForCausalLM.from_pretrained(gemma3, dtype=torch.float32).eval()
    ours = load_quantized(out)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert sum(isinstance(m, AFPQLinear) for m in ours.modules()) == 14
    assert sum(isinstance(m, AFPQLinear) for m in theirs.modules()) == 14
    with torch.no_grad():
        a, b, r = ours(ids).logits, theirs(ids).logits, ref(ids).logits
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    # 4-bit, group 32, on a random model: the output moves, but stays near the float one
    assert float((a - r).norm() / r.norm()) < 0.3
    gen = ours.generate(ids[:, :8], max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 12)
