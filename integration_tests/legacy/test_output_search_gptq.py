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
