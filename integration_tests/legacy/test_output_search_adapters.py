"""The output search inside AutoGPTQ's GPTQ: with a diagonal Hessian GPTQ has no error
feedback, so every grouping (plain, static groups, act-order, whole rows) must equal core's
round-to-nearest with the output search weighted by that diagonal (the column walk lines
the energies up with GPTQ's groups)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

with warnings.catch_warnings(record=True):
    pytest.importorskip("auto_gptq")
    import afpq_plugins.autogptq as A

from afpq_plugins.core.output_search import BoundOutputSearch, OutputSearch, grouped_energies
from afpq_plugins.core.quantize import fake_quantize


@pytest.mark.parametrize("fmt,mode", [("nf3", "afpq"), ("int3", "zp")])
@pytest.mark.parametrize("grouping", ["plain", "static", "act", "static-act", "row"])
def test_diagonal_hessian_gives_core_rtn_with_the_output_search(fmt, mode, grouping):
    from afpq_plugins.autogptq import compat

    torch.manual_seed(3)
    layer = nn.Linear(64, 24, bias=False)
    w = layer.weight.data.clone()
    gs = -1 if grouping == "row" else 16
    d = torch.rand(64) ** 3 * 10 + torch.linspace(0.01, 0.02, 64)  # distinct energies, a few loud columns
    g = A.AFPQGPTQ.bind(fmt, mode, torch.float16, "output")(layer)
    g.quantizer.configure(int(fmt[-1]), perchannel=True, sym=False)
    g.H, g.nsamples = torch.diag(d), 1
    with compat.no_cuda_synchronize():
        g.fasterquant(group_size=gs, actorder="act" in grouping, static_groups="static" in grouping)
    if grouping == "act":  # groups of GPTQ's column order (decreasing energy)
        perm = torch.argsort(d, descending=True)
        s = BoundOutputSearch(OutputSearch(), grouped_energies(d[perm], gs))
        expect = fake_quantize(w[:, perm], fmt, gs, mode, search=s)[:, torch.argsort(perm)]
    else:
        expect = fake_quantize(w, fmt, gs, mode, search=BoundOutputSearch(OutputSearch(), grouped_energies(d, gs)))
    assert torch.equal(layer.weight.data, expect)
    assert not torch.equal(expect, fake_quantize(w, fmt, gs, mode))  # the search changed something


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    pytest.importorskip("awq")
    import os

    from _tiny import TEXT, tiny_llama, tiny_tokenizer

    d = str(tmp_path_factory.mktemp("tiny_awq_out"))
    tok = tiny_tokenizer()
    tiny_llama(vocab_size=len(tok), hidden=128).save_pretrained(d)
    tok.save_pretrained(d)
    with open(os.path.join(d, "calib.txt"), "w", encoding="utf-8") as fh:  # as test_autoawq_adapter's
        fh.write(TEXT * 2)
    return d


def test_awq_output_search_after_the_clip_search(tiny_dir):
    """AWQ with ``scale_search="output"``: every layer is quantized with the search bound to the
    energies of its clip-step inputs (the stored weights are core's quantize_weight with that
    search), the result differs from min/max somewhere, and the config records the search."""
    pytest.importorskip("awq")
    import awq.utils.module

    import test_autoawq_adapter as T
    from afpq_plugins.autoawq import AFPQAwqQuantizer
    from afpq_plugins.core.quantize import quantize_weight
    from afpq_plugins.nn import AFPQLinear

    seen = {}

    class Recording(AFPQAwqQuantizer):
        def _apply_quant(self, module, named_linears):
            prefix = awq.utils.module.get_op_name(self.model, module)
            for name, lin in named_linears.items():
                s = self._layer_search[f"{prefix}.{name}"]
                seen[f"{prefix}.{name}"] = (lin.weight.data.clone(), s)
            return super()._apply_quant(module, named_linears)

    model, _ = T._quantize(tiny_dir, "nf3", 32, "symmetric", cls=Recording, scale_search="output")
    layers = {n: m for n, m in model.model.named_modules() if isinstance(m, AFPQLinear)}
    assert set(layers) == set(seen) and len(layers) == 14
    differs = False
    for name, (w, s) in seen.items():
        assert s.energies.shape == (w.shape[1] // 32, 32) and (s.energies >= 0).all()
        qw = quantize_weight(w, "nf3", 32, "afpq", search=s)
        assert torch.equal(layers[name].dequantize(), qw.dequantize()), name
        differs |= not torch.equal(qw.dequantize(), quantize_weight(w, "nf3", 32, "afpq").dequantize())
    assert differs
    assert model.model._afpq_config.extra["scale_search"]["method"] == "output"
