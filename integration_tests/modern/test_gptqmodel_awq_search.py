"""AWQ's smoothing-scale search through GPTQModel 7.6 (``afpq_plugins.gptqmodel.awq_search``).

gptqmodel 7.6's own search keeps its "master copy" of a float32 CPU weight as the weight
itself, so every candidate quantizes on top of the previous one and the weights come
out corrupted. These tests show that defect on gptqmodel's own function (if it stops
showing, the replacement can go), check the replacement against a float64 search
written here, and check end to end that AWQ through GPTQModel no longer does worse
than plain rounding on a tiny model.
"""

from __future__ import annotations

import copy
import functools
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("gptqmodel")

from afpq_plugins.core.quantize import fake_quantize_rows  # noqa: E402
from afpq_plugins.gptqmodel.awq_search import N_GRID, compute_best_scale, fixed_scale_search  # noqa: E402

GROUP = 32


def _processor(fc, x, pseudo):
    """The attributes of an AWQProcessor that the scale search reads, for one Linear."""

    def forward_chunks(inp, module, kwargs):
        yield module(inp)

    def reference_chunks(inp, ref):
        yield ref

    ns = SimpleNamespace(duo_scaling=True, _scale_context=SimpleNamespace(), pseudo_quantize_tensor=pseudo,
                         _iter_module_forward_outputs=forward_chunks, _iter_reference_output_chunks=reference_chunks,
                         qcfg=SimpleNamespace(bits=3, group_size=GROUP, sym=False,
                                              scale_search_chunked_activations=True))
    return ns


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    fc = torch.nn.Linear(128, 48, bias=True).requires_grad_(False)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(48, 128, generator=g) * 0.05)
        fc.bias.copy_(torch.randn(48, generator=g) * 0.01)
    # a few input channels much louder than the rest: what AWQ's scales are for
    loud = torch.ones(128)
    loud[torch.randperm(128, generator=g)[:8]] = 20.0
    x = torch.randn(2, 24, 128, generator=g) * loud
    w_mean = (fc.weight.abs() / fc.weight.abs().view(48, -1, GROUP).amax(-1, keepdim=True).repeat_interleave(
        GROUP, -1).view(48, 128)).mean(0)
    return fc, x, w_mean, x.abs().view(-1, 128).mean(0)


def _int3(w):
    return fake_quantize_rows(w, "int3", GROUP, "zp", torch.float32)


def test_gptqmodel_search_corrupts_float32_cpu_weights():
    """The defect this module exists for: gptqmodel 7.6's search changes the weights it was meant to restore."""
    from gptqmodel.looper.awq_processor import AWQProcessor

    fc, x, w_mean, x_mean = _case()
    before = fc.weight.detach().clone()
    ns = _processor(fc, x, None)
    ns._pseudo_quantize_tensor_into = functools.partial(AWQProcessor._pseudo_quantize_tensor_into, ns)
    with torch.no_grad():
        ref = fc(x)
    AWQProcessor._compute_best_scale(ns, x, w_mean, x_mean, fc, [fc], ref, {})
    assert not torch.equal(fc.weight, before)


@pytest.mark.parametrize("duo", [True, False])
def test_search_matches_float64_and_restores_weights(duo):
    fc, x, w_mean, x_mean = _case(1)
    before = fc.weight.detach().clone()
    with torch.no_grad():
        ref = fc(x)
    ns = _processor(fc, x, _int3)
    ns.duo_scaling = duo
    scales, loss = compute_best_scale(ns, x, w_mean, x_mean, fc, [fc], ref, {})
    assert torch.equal(fc.weight, before)  # the float weights are back, bit for bit

    # float64 reference: every candidate of the grid, scored on the float64 output error
    W, b, X = before.double(), fc.bias.detach().double(), x.double()
    xm, wm = x_mean.double(), w_mean.double()
    cands, losses = [], []
    for i in range(N_GRID):
        r = i / N_GRID
        s = (xm ** r / (wm ** (1 - r) + 1e-4)) if duo else xm ** r
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        wq = fake_quantize_rows(W * s, "int3", GROUP, "zp", torch.float32)[0] / s
        losses.append(float(((X @ wq.T + b) - ref.double()).pow(2).mean()))
        cands.append(s)
    assert len(set(round(v, 12) for v in losses)) > 1  # the scales matter in this case
    chosen = min(range(N_GRID), key=lambda i: float((cands[i] - scales.double()).abs().max()))
    assert torch.allclose(scales.double(), cands[chosen], rtol=1e-5, atol=1e-7)
    assert losses[chosen] <= min(losses) * (1 + 1e-4)
    assert loss == pytest.approx(losses[chosen], rel=1e-3)


def test_search_restores_weights_on_error():
    fc, x, w_mean, x_mean = _case(2)
    before = fc.weight.detach().clone()

    def boom(w):
        fc.weight.data.mul_(3.0)  # a failure halfway through a candidate
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        compute_best_scale(_processor(fc, x, boom), x, w_mean, x_mean, fc, [fc], fc(x).detach(), {})
    assert torch.equal(fc.weight, before)


def test_fixed_scale_search_is_scoped():
    from gptqmodel.looper.awq_processor import AWQProcessor

    stock = AWQProcessor.__dict__["_compute_best_scale"]
    with fixed_scale_search():
        assert AWQProcessor.__dict__["_compute_best_scale"] is compute_best_scale
    assert AWQProcessor.__dict__["_compute_best_scale"] is stock


def test_awq_through_gptqmodel_beats_corrupted_search_end_to_end():
    """Tiny Llama (hidden 128), INT3 g32: AWQ's output error stays near plain rounding's (with
    gptqmodel's own search it was 1.6x rounding's: 0.43 vs 0.27)."""
    from _tiny import tiny_llama, tiny_tokenizer

    from afpq_plugins.methods import Calibration, FormatSpec, quantize

    tok = tiny_tokenizer()
    base = tiny_llama(vocab_size=len(tok), hidden=128)
    x = torch.randint(0, 250, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(x).logits

    def err(m):
        with torch.no_grad():
            return float((m(x).logits - ref).norm() / ref.norm())

    rtn = copy.deepcopy(base)
    quantize(rtn, tok, "rtn", FormatSpec("int3", GROUP), progress=False)
    awq = copy.deepcopy(base)
    quantize(awq, tok, "awq", FormatSpec("int3", GROUP), Calibration(8, 64), backend="gptqmodel", progress=False)
    assert err(awq) < 1.05 * err(rtn)


def test_norm_folding_keeps_the_function_for_one_plus_weight_norms():
    """Gemma 3's norm multiplies by ``1 + weight``: folding ``1/s`` into it and ``s`` into the next
    Linear leaves ``fc(ln(x))`` unchanged (float64); gptqmodel's plain fold does not."""
    from gptqmodel.quantization.awq.quantize import scale as upstream
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from afpq_plugins.gptqmodel.awq_search import fixed_norm_folding, is_offset_norm

    g = torch.Generator().manual_seed(3)
    assert is_offset_norm(Gemma3RMSNorm(16)) and not is_offset_norm(LlamaRMSNorm(16))
    x = torch.randn(5, 16, generator=g, dtype=torch.float64)
    s = torch.rand(16, generator=g, dtype=torch.float64) + 0.5

    def build():
        ln = Gemma3RMSNorm(16).double()
        fc = torch.nn.Linear(16, 8).double()
        with torch.no_grad():
            ln.weight.copy_(torch.randn(16, generator=torch.Generator().manual_seed(4)) * 0.3)
            fc.weight.copy_(torch.randn(8, 16, generator=torch.Generator().manual_seed(5)))
            fc.bias.copy_(torch.randn(8, generator=torch.Generator().manual_seed(6)))
        return ln, fc

    ln, fc = build()
    with torch.no_grad():
        ref = fc(ln(x))
    upstream.scale_ln_fcs(ln, [fc], s)
    with torch.no_grad():
        assert not torch.allclose(fc(ln(x)), ref, atol=1e-6)  # the defect
    ln, fc = build()
    with torch.no_grad():
        assert torch.equal(fc(ln(x)), ref)
    stock = upstream.scale_ln_fcs
    with fixed_norm_folding():
        upstream.scale_ln_fcs(ln, [fc], s)
    assert upstream.scale_ln_fcs is stock
    with torch.no_grad():
        assert torch.allclose(fc(ln(x)), ref, rtol=1e-5, atol=1e-5)  # the norms compute in float32
    # a plain norm still goes to gptqmodel's own fold, which is right for it
    ln2, fc2 = LlamaRMSNorm(16).double(), torch.nn.Linear(16, 8).double()
    with torch.no_grad():
        ref2 = fc2(ln2(x))
        with fixed_norm_folding():
            upstream.scale_ln_fcs(ln2, [fc2], s)
        assert torch.allclose(fc2(ln2(x)), ref2, rtol=1e-5, atol=1e-5)  # the norms compute in float32


def test_gemma3_mlp_scales_fold_into_the_pre_feedforward_norm(tok):
    from gptqmodel import QuantizeConfig
    from gptqmodel.models.auto import MODEL_MAP
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from afpq_plugins.gptqmodel.awq_search import fix_mlp_input_norm

    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    qcfg = QuantizeConfig(bits=4, group_size=32, method="awq", offload_to_disk=False)
    qm = MODEL_MAP["gemma3_text"](Gemma3ForCausalLM(cfg), quantized=False, quantize_config=qcfg, tokenizer=tok)
    layer = [n for n in qm.effective_module_tree if isinstance(n, dict)][0]
    assert tuple(layer["post_attention_layernorm"]) == ("post_attention_layernorm:!",)  # Llama's tree
    assert fix_mlp_input_norm(qm)
    layer = [n for n in qm.effective_module_tree if isinstance(n, dict)][0]
    assert tuple(layer["post_attention_layernorm"]) == ("pre_feedforward_layernorm:!",)
    assert list(layer).index("post_attention_layernorm") < list(layer).index("mlp")
    fresh = MODEL_MAP["gemma3_text"](Gemma3ForCausalLM(cfg), quantized=False, quantize_config=qcfg, tokenizer=tok)
    assert tuple([n for n in fresh.effective_module_tree if isinstance(n, dict)][0]["post_attention_layernorm"]) == (
        "post_attention_layernorm:!",)  # the class's tree is untouched
