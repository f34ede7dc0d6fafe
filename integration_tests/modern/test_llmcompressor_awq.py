"""llm-compressor 0.14's AWQ on AFPQ grids (``afpq_plugins.llmcompressor.awq``), on tiny random
Llama and Qwen2 models: ``oneshot`` with ``AFPQAWQModifier``, save, reload (project loader and
transformers), forward and generate.

References, independent of the code under test: every reloaded weight equals a float64
re-statement of the AFPQ grid applied to the smoothed float weight llm-compressor's AWQ left
(captured before packing); every candidate AWQ's grid search scored was on the AFPQ grid
(same float64 reference) and compressed-tensors' own fake quantizer never ran; a stock INT
``AWQModifier`` + ``QuantizationModifier`` run before and after gives identical tensors.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("llmcompressor")
transformers = pytest.importorskip("transformers")

from afpq_plugins.methods import Calibration, FormatSpec, get_method, quantize  # noqa: E402
from afpq_plugins.model import load_quantized  # noqa: E402
from afpq_plugins.nn import AFPQLinear  # noqa: E402

CALIB = Calibration(nsamples=6, seqlen=48)
# the grids, typed in from docs/format.md
TABLES = {
    "nf3": [-1, -0.5350227355957031, -0.2469314038753510, 0, 0.1833375245332718, 0.3819939494132996,
            0.6229856610298157, 1],
    "nf4": [-1, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1],
}


def reference(w: torch.Tensor, fmt: str, group_size: int, mode: str):
    """float64 fake quantization: min/max scales per group (two in afpq), rounded to float16,
    nearest grid value by brute force. Returns (float32 result, mask of values within float32
    rounding of a midpoint, where the library may pick the other neighbour)."""
    t = torch.tensor(TABLES[fmt], dtype=torch.float32).double()  # the grid values as stored (float32)
    rows, cols = w.shape[0], w.shape[-1]
    gs = cols if group_size <= 0 else group_size
    x = w.double().reshape(-1, gs)
    xmax, xmin = x.amax(-1, keepdim=True).clamp(min=0), x.amin(-1, keepdim=True).clamp(max=0)
    sp, sn = xmax / t.max(), -xmin / -t.min()
    if mode == "sym":
        sp = sn = torch.maximum(sp, sn)
    sp, sn = sp.half().double(), sn.half().double()
    y = torch.where(x > 0, x / torch.where(sp == 0, 1, sp), torch.where(x < 0, x / torch.where(sn == 0, 1, sn), 0))
    d = (y[..., None] - t).abs()
    v = t[torch.where(d == d.amin(-1, keepdim=True), t.abs(), torch.inf).argmin(-1)]  # ties toward zero
    near = (d.sort(-1).values[..., 1] - d.amin(-1)) < 1e-5 * y.abs().clamp(min=1)
    out = torch.where(v > 0, v * sp, v * sn)
    return out.float().reshape(w.shape), near.reshape(w.shape)


def assert_on_grid(got, w, fmt, group_size, mode, what):
    want, near = reference(w, fmt, group_size, mode)
    bad = (got.float() != want) & ~near
    assert not bad.any(), (f"{what}: {int(bad.sum())} values off the float64 reference, "
                           f"e.g. {got[bad][:4]} vs {want[bad][:4]}")
    assert near.float().mean() < 0.01, what


def _float(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _dataset(tok):
    from datasets import Dataset

    samples = CALIB.samples(tok)
    return Dataset.from_dict({"input_ids": [s.tolist() for s in samples],
                              "attention_mask": [[1] * s.numel() for s in samples]})


@pytest.fixture()
def spies(monkeypatch):
    """What AWQ left (the smoothed float weight of each layer, before packing), each candidate
    its grid search scored on the AFPQ grid, and the calls of compressed-tensors' fake quantizer."""
    from compressed_tensors.quantization.lifecycle import forward as ct_forward

    from afpq_plugins.llmcompressor import awq

    seen = {"smoothed": {}, "search": [], "ct_calls": 0}
    swap = awq.AFPQQuantizationModifier._swap_in_afpq

    def spy_swap(self, model):
        for name in self._afpq_names:
            seen["smoothed"][name] = model.get_submodule(name).weight.detach().float().clone()
        return swap(self, model)

    fq = awq.search_fake_quantize

    def spy_fq(spec, name, w):
        out = fq(spec, name, w)
        seen["search"].append((spec, w.clone(), out.clone()))
        return out

    ct_fq = ct_forward.fake_quantize

    def spy_ct(*a, **k):
        seen["ct_calls"] += 1
        return ct_fq(*a, **k)

    monkeypatch.setattr(awq.AFPQQuantizationModifier, "_swap_in_afpq", spy_swap)
    monkeypatch.setattr(awq, "search_fake_quantize", spy_fq)
    monkeypatch.setattr(ct_forward, "fake_quantize", spy_ct)
    return seen


def _check(model, qc, seen, tok, tmp_path, fmt, group, mode, float_model):
    from afpq_plugins.llmcompressor import save

    layers = {n: m for n, m in model.named_modules() if isinstance(m, AFPQLinear)}
    assert sorted(layers) == sorted(qc.quantized_modules) == sorted(seen["smoothed"]) and len(layers) == 14
    # AWQ really smoothed (some balance weight moved), and its search ran on the AFPQ grid only
    assert any(not torch.equal(seen["smoothed"][n], float_model.get_submodule(n).weight) for n in layers)
    assert len(seen["search"]) >= 2 * 20 * 3 and seen["ct_calls"] == 0
    for grid, w, out in seen["search"][::17]:
        assert (grid.fmt, grid.group_size, grid.mode) == (fmt, group, mode)
        assert_on_grid(out, w, fmt, group, mode, "AWQ search candidate")
    path = save(model, str(tmp_path / "ckpt"), tokenizer=tok)
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        mine = load_quantized(path)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path)
        for name in layers:  # every reloaded weight: the AFPQ grid applied to AWQ's smoothed weight
            assert_on_grid(mine.get_submodule(name).dequantize(), seen["smoothed"][name], fmt, group, mode, name)
            assert torch.equal(hf.get_submodule(name).dequantize(), mine.get_submodule(name).dequantize()), name
        assert torch.equal(mine(ids).logits, want)
        assert torch.allclose(hf(ids).logits, want, atol=1e-5, rtol=1e-5)
        out = hf.generate(ids[:1, :4], attention_mask=torch.ones(1, 4, dtype=torch.long), max_new_tokens=4,
                          min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)


@pytest.mark.parametrize("arch,fmt,group,mode", [("llama", "nf3", 32, "afpq"), ("qwen2", "nf4", -1, "sym")])
def test_oneshot_save_reload(folders, tok, tmp_path, spies, arch, fmt, group, mode):
    from llmcompressor import oneshot

    from afpq_plugins.llmcompressor import AFPQAWQModifier

    model, ref = _float(folders[arch]), _float(folders[arch])
    recipe = AFPQAWQModifier(fmt=fmt, group_size=group, mode=None if mode == "afpq" else mode, ignore=["lm_head"],
                             duo_scaling="both")
    oneshot(model=model, dataset=_dataset(tok), recipe=recipe, num_calibration_samples=CALIB.nsamples,
            max_seq_length=CALIB.seqlen)
    qc = model._afpq_config
    assert (qc.method, qc.format, qc.group_size, qc.mode, qc.layout) == (
        "awq", fmt, group, mode, "awq" if fmt == "nf4" else "gptq")
    assert qc.extra["duo_scaling"] == "both" and qc.extra["quantizer"] == "llmcompressor 0.14"
    _check(model, qc, spies, tok, tmp_path, fmt, group, mode, ref)


def _stock_int_awq(path, tok):
    """llm-compressor's own AWQ + INT4 (asymmetric, groups of 32) QuantizationModifier: every
    tensor of the result."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    from afpq_plugins.llmcompressor.awq import cpu_pinning_shim

    model = _float(path)
    recipe = [AWQModifier(duo_scaling="both"),
              QuantizationModifier(config_groups={"int4": {"targets": ["Linear"], "weights": {
                  "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32}}},
                  ignore=["lm_head"])]
    torch.manual_seed(0)  # the calibration loader shuffles
    with cpu_pinning_shim():  # llm-compressor's AWQ cannot pin memory without an accelerator
        oneshot(model=model, dataset=_dataset(tok), recipe=recipe, num_calibration_samples=CALIB.nsamples,
                max_seq_length=CALIB.seqlen)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_registry_and_stock_awq_unaffected(folders, tok, tmp_path, spies):
    """``awq`` with ``--backend llmcompressor`` (nf4 afpq g32: layout awq), between two stock INT
    AWQ runs in the same process, which give identical tensors; nothing stays patched."""
    from compressed_tensors.quantization import forward_quantize
    from llmcompressor.modifiers.transform.awq import base as awq_base
    from llmcompressor.pipelines.cache import IntermediatesCache

    pin = IntermediatesCache.pin_memory
    before = _stock_int_awq(folders["llama"], tok)
    stock_calls = spies["ct_calls"]
    assert stock_calls > 0 and any(k.endswith("weight_zero_point") for k in before)  # really INT, on that path
    assert not spies["search"] and not spies["smoothed"]
    spies["ct_calls"] = 0

    m = get_method("awq", "llmcompressor")
    assert m.default_calibration == (256, 512) and set(m.options) == {"duo_scaling", "n_grid", "layer_specs"}
    model, ref = _float(folders["llama"]), _float(folders["llama"])
    qc = quantize(model, tok, "awq", FormatSpec("nf4", 32), CALIB, backend="llmcompressor", progress=False)
    assert (qc.method, qc.format, qc.mode, qc.layout, qc.extra["duo_scaling"]) == ("awq", "nf4", "afpq", "awq", True)
    _check(model, qc, spies, tok, tmp_path, "nf4", 32, "afpq", ref)
    assert awq_base.forward_quantize is forward_quantize and IntermediatesCache.pin_memory is pin

    after = _stock_int_awq(folders["llama"], tok)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_bad_arguments_and_recipes_are_named(folders, tok, tmp_path, capsys):
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    from afpq_plugins.cli import main
    from afpq_plugins.llmcompressor import AFPQAWQModifier, AFPQAWQTransformModifier, AFPQQuantizationModifier

    with pytest.raises(ValueError, match="AFPQQuantizationModifier: fmt: unknown format 'nf9'"):
        AFPQAWQModifier(fmt="nf9", group_size=32)
    with pytest.raises(ValueError, match="AFPQQuantizationModifier: scale_dtype must be one of"):
        AFPQAWQModifier(fmt="nf3", scale_dtype="float8")
    with pytest.raises(ValueError, match="layout 'awq' packs 4-bit formats only"):
        AFPQAWQModifier(fmt="nf3", layout="awq")
    with pytest.raises(ValueError, match="builds its own config group"):
        AFPQQuantizationModifier(fmt="nf3", scheme="W4A16")
    with pytest.raises(ValueError, match=r"for AFPQAWQTransformModifier\s+duo_scaling"):
        AFPQAWQModifier(fmt="nf3", duo_scaling="sometimes")
    with pytest.raises(ValueError, match="method 'awq' \\(llmcompressor\\) has no option 'clip'"):
        quantize(_float(folders["llama"]), tok, "awq", FormatSpec("nf3", 32), CALIB, backend="llmcompressor",
                 clip="two-sided")
    # mismatched pairs: llm-compressor's AWQ with the AFPQ step, the AFPQ AWQ with an INT step
    for recipe, msg in (
        ([AWQModifier(), AFPQQuantizationModifier(fmt="nf3", group_size=32, ignore=["lm_head"])],
         "would search AWQ's scales on the INT proxy grid"),
        ([AFPQAWQTransformModifier(), QuantizationModifier(scheme="W4A16", ignore=["lm_head"])],
         "no balance layer carries an AFPQ grid"),
    ):
        with pytest.raises(ValueError, match=msg):
            oneshot(model=_float(folders["llama"]), dataset=_dataset(tok), recipe=recipe,
                    num_calibration_samples=CALIB.nsamples, max_seq_length=CALIB.seqlen)
    capsys.readouterr()
    assert main(["quantize", folders["llama"], str(tmp_path / "x"), "--method", "awq", "--backend",
                 "llmcompressor", "--clip", "two-sided", "--quiet"]) == 2
    assert "--clip is not supported by --backend llmcompressor" in capsys.readouterr().err


def test_quantization_modifier_alone_is_rtn(folders, spies):
    """``AFPQQuantizationModifier`` without AWQ (no data): round to nearest of the float weights."""
    from llmcompressor import oneshot

    from afpq_plugins.llmcompressor import AFPQQuantizationModifier

    model, ref = _float(folders["qwen2"]), _float(folders["qwen2"])
    oneshot(model=model, recipe=[AFPQQuantizationModifier(fmt="nf3", group_size=32, ignore=["lm_head"])])
    qc = model._afpq_config
    assert (qc.method, qc.format, qc.layout, len(qc.quantized_modules)) == ("rtn", "nf3", "gptq", 14)
    assert not spies["search"] and "duo_scaling" not in qc.extra
    for name in qc.quantized_modules:
        assert torch.equal(spies["smoothed"][name], ref.get_submodule(name).weight), name  # nothing smoothed
        assert_on_grid(model.get_submodule(name).dequantize(), ref.get_submodule(name).weight, "nf3", 32, "afpq", name)
    # scale_search reaches the final scales: core's MSE search, not min/max
    from afpq_plugins.core.quantize import fake_quantize

    model = _float(folders["qwen2"])
    oneshot(model=model, recipe=[AFPQQuantizationModifier(fmt="nf3", group_size=32, ignore=["lm_head"],
                                                          scale_search="mse")])
    assert model._afpq_config.extra["scale_search"]["method"] == "mse"
    name = qc.quantized_modules[0]
    w = ref.get_submodule(name).weight.detach()
    got = model.get_submodule(name).dequantize()
    assert torch.equal(got, fake_quantize(w, "nf3", 32, "afpq", name=name, search="mse"))
    assert not torch.equal(got, fake_quantize(w, "nf3", 32, "afpq", name=name))
