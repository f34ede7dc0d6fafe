"""AutoAWQ 0.2.9 adapter, end to end on a tiny random Llama, CPU only.

Hidden size 128 (out_features of every projection a multiple of 64, which AutoAWQ's
clip search asserts), 2 layers, tiny BPE tokenizer; calibration from token-id lists.
torch runs single-threaded here: on a shared 2-core machine two intra-op threads
make AWQ's many small ops about ten times slower.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from _tiny import TEXT, tiny_llama, tiny_tokenizer

awq = pytest.importorskip("awq", reason="AutoAWQ is not installed: run in the legacy venv")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import test_autoawq_int_reference  # noqa: E402

SEQLEN = test_autoawq_int_reference.CALIB_SEQLEN
NSAMPLES = test_autoawq_int_reference.CALIB_SAMPLES


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny_awq"))
    tok = tiny_tokenizer()
    tiny_llama(vocab_size=len(tok), hidden=128).save_pretrained(d)
    tok.save_pretrained(d)
    with open(os.path.join(d, "calib.txt"), "w", encoding="utf-8") as fh:
        fh.write(TEXT * 2)
    return d


def _load_awq(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from awq import AutoAWQForCausalLM

        return AutoAWQForCausalLM.from_pretrained(path, torch_dtype=torch.float32, device_map=None)


def _recording_quantizer():
    from afpq_plugins.autoawq import AFPQAwqQuantizer

    class Recording(AFPQAwqQuantizer):
        """Records pseudo_quantize_tensor of each weight right before packing."""

        recorded = {}

        def _apply_quant(self, module, named_linears):
            prefix = awq.utils.module.get_op_name(self.model, module)
            for name, lin in named_linears.items():
                Recording.recorded[f"{prefix}.{name}"] = self.pseudo_quantize_tensor(lin.weight.data)[0].clone()
            return super()._apply_quant(module, named_linears)

    Recording.recorded = {}
    return Recording


def _quantize(tiny_dir, fmt, group_size, clip="symmetric", cls=None, **kw):
    from afpq_plugins.autoawq import AFPQAwqQuantizer

    calib, tok = test_autoawq_int_reference.calib_ids(tiny_dir)
    model = _load_awq(tiny_dir)
    bits = int(fmt[-1])
    model.quantize(
        tok, quant_config={"w_bit": bits, "q_group_size": group_size, "zero_point": True, "version": "gemm"},
        quantizer_cls=cls or AFPQAwqQuantizer, calib_data=calib, max_calib_samples=NSAMPLES,
        max_calib_seq_len=SEQLEN, fmt=fmt, clip=clip, **kw,
    )
    return model, tok


CASES = [("nf3", 64, "two-sided", "gptq", None), ("nf4", -1, "symmetric", "awq", None),
         ("fp4", 64, "symmetric", "awq", None), ("nf3", 64, "symmetric", "gptq", "mse")]


@pytest.mark.parametrize("fmt,group_size,clip,layout,search", CASES,
                         ids=[f"{c[0]}-g{c[1]}-{c[2]}" + (f"-{c[4]}" if c[4] else "") for c in CASES])
def test_quantize_save_reload_generate(tiny_dir, tmp_path, fmt, group_size, clip, layout, search):
    from afpq_plugins.autoawq import load_quantized, save_quantized
    from afpq_plugins.model import load_quantized as plain_load
    from afpq_plugins.nn import AFPQLinear

    cls = _recording_quantizer()
    model, tok = _quantize(tiny_dir, fmt, group_size, clip, cls=cls, scale_search=search)
    layers = {n: m for n, m in model.model.named_modules() if isinstance(m, AFPQLinear)}
    assert len(layers) == 14 and set(layers) == set(cls.recorded)  # 7 projections x 2 layers
    ids = tok(TEXT[:200], return_tensors="pt").input_ids
    with torch.no_grad():
        ref_logits = model.model(ids).logits

    out = save_quantized(model, str(tmp_path / "ckpt"))
    cfg = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert cfg["quant_method"] == "afpq" and cfg["method"] == "awq" and cfg["format"] == fmt
    assert cfg["layout"] == layout and cfg["group_size"] == group_size and cfg["mode"] == "afpq"
    assert cfg["awq"]["clip"] == clip and sorted(cfg["quantized_modules"]) == sorted(layers)
    assert cfg["scale_search"]["method"] == (search or "minmax")

    loaded = load_quantized(out, device="cpu")
    assert type(loaded).__name__ == "LlamaAWQForCausalLM" and loaded.is_quantized
    for name, m in loaded.model.named_modules():
        if isinstance(m, AFPQLinear):
            assert m.layout == layout
            # the reloaded weights are exactly the fake-quantized ones of the AWQ run
            assert torch.equal(m.dequantize(), cls.recorded[name].float()), name
    with torch.no_grad():
        logits = loaded.model(ids).logits
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    gen = loaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                          pad_token_id=tok.eos_token_id)
    assert gen.shape == (1, ids.shape[1] + 4)
    plain = plain_load(out)  # the project's own loader reads it too
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, ref_logits, rtol=0, atol=0)


def test_kv_cache_off_during_search(tiny_dir):
    """A model loaded with use_cache=True (transformers' default) gets the same AWQ result
    as AutoAWQ's from_pretrained(use_cache=False) load; its setting is restored."""
    from awq.models._config import AwqConfig
    from awq.models.auto import AWQ_CAUSAL_LM_MODEL_MAP
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, torch_dtype=torch.float32).eval()
    hf.config.use_cache = True
    wrapped = AWQ_CAUSAL_LM_MODEL_MAP["llama"](hf, "llama", False, hf.config, AwqConfig(), None)
    calib, tok = test_autoawq_int_reference.calib_ids(tiny_dir)
    cls = _recording_quantizer()
    wrapped.quantize(tok, quant_config={"w_bit": 4, "q_group_size": 64, "zero_point": True, "version": "gemm"},
                     quantizer_cls=cls, calib_data=calib, max_calib_samples=NSAMPLES, max_calib_seq_len=SEQLEN,
                     fmt="nf4")
    assert hf.config.use_cache is True
    with_cache = dict(cls.recorded)
    cls2 = _recording_quantizer()
    _quantize(tiny_dir, "nf4", 64, cls=cls2)
    assert set(with_cache) == set(cls2.recorded)
    for k in with_cache:
        assert torch.equal(with_cache[k], cls2.recorded[k]), k


def test_awq_scaling_keeps_the_float_model(tiny_dir):
    """AWQ's scaling alone (export_compatible, no clip) leaves the float function intact.

    Fails without ``compat.snapshot_state_dict``: AutoAWQ 0.2.9 on CPU accumulates the
    candidate scales of its search in the weights (see patches/autoawq_cpu.py)."""
    from transformers import AutoModelForCausalLM

    ref_model = AutoModelForCausalLM.from_pretrained(tiny_dir, torch_dtype=torch.float32).eval()
    ids = torch.tensor([list(range(3, 67))])
    with torch.no_grad():
        ref = ref_model(ids).logits
    model, _ = _quantize(tiny_dir, "nf3", 64, export_compatible=True, apply_clip=False)
    with torch.no_grad():
        out = model.model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    scaled = model.model.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(scaled, ref_model.model.layers[0].self_attn.q_proj.weight)  # it did scale


def test_pseudo_quantize_is_core_maths():
    from afpq_plugins.autoawq import AFPQAwqQuantizer
    from afpq_plugins.core.quantize import fake_quantize, quantize_weight
    from afpq_plugins.core.search_registry import resolve_search

    q = AFPQAwqQuantizer.__new__(AFPQAwqQuantizer)  # the maths needs no model
    from afpq_plugins.core.formats import get_format

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(128, 256, generator=gen) * 0.02
    w[0] = w[0].abs()  # a group with no negative weight: s_neg = 0, no NaN
    cases = [("nf3", "afpq", 64, None), ("fp3", "afpq", -1, None), ("nf4", "sym", 64, None), ("int3", "zp", 64, None),
             ("nf3", "afpq", 64, "mse"), ("int3", "zp", -1, "mse")]
    for fmt, mode, gs, search in cases:
        q.fmt, q.mode, q.group_size, q.scale_dtype = get_format(fmt), mode, gs, torch.float16
        q.search = resolve_search(search)
        w_hat, p1, p2 = q.pseudo_quantize_tensor(w)
        assert torch.equal(w_hat, fake_quantize(w, fmt, gs, mode, search=search))
        if search is not None:
            assert not torch.equal(w_hat, fake_quantize(w, fmt, gs, mode))
        qw = quantize_weight(w, fmt, gs, mode, search=search)
        assert torch.equal(p1, qw.scales.t().float())
        if mode != "sym":
            assert torch.equal(p2, qw.scales2.t().float())
        # AutoAWQ's clip search calls it on 4-D [co, 1, groups, group_size] tensors
        g = 256 if gs == -1 else gs
        w4 = w.reshape(128, 1, -1, g)
        assert torch.equal(q.pseudo_quantize_tensor(w4)[0], w_hat.reshape(w4.shape))


def test_two_sided_clip_separable_equals_brute_force():
    from afpq_plugins.autoawq import AFPQAwqQuantizer
    from afpq_plugins.core.formats import get_format

    q = AFPQAwqQuantizer.__new__(AFPQAwqQuantizer)
    q.fmt, q.mode, q.group_size, q.scale_dtype = get_format("nf3"), "afpq", 64, torch.float16
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 128, generator=gen) * 0.02
    w[:, ::17] *= 6  # outliers worth clipping
    x = torch.randn(300, 128, generator=gen)
    lo1, hi1 = q._two_sided_clip(w, x, separable=True)
    lo2, hi2 = q._two_sided_clip(w, x, separable=False)
    same = (lo1 == lo2) & (hi1 == hi2)
    assert same.float().mean() > 0.97  # float rounding may flip near-ties
    wg = w.reshape(64, 2, 64)
    assert (hi1 <= wg.amax(-1, keepdim=True)).all() and (lo1 >= wg.amin(-1, keepdim=True)).all()
    assert ((hi1 < wg.amax(-1, keepdim=True)) | (lo1 > wg.amin(-1, keepdim=True))).any()  # it does clip

    def out_err(lo, hi):
        wc = torch.maximum(torch.minimum(wg, hi), lo).reshape(w.shape)
        return ((x @ (q.pseudo_quantize_tensor(wc)[0] - w).t()) ** 2).mean()

    none = out_err(wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True))
    assert out_err(lo1, hi1) <= none


@pytest.mark.parametrize("fmt,mode,group_size", [("nf3", "afpq", 64), ("int4", "zp", 64), ("nf4", "afpq", -1)])
def test_symmetric_clip_is_autoawqs(fmt, mode, group_size):
    """clip='symmetric' picks what AutoAWQ 0.2.9's own _compute_best_clip picks."""
    from awq.quantize.quantizer import AwqQuantizer

    from afpq_plugins.autoawq import AFPQAwqQuantizer
    from afpq_plugins.core.formats import get_format

    q = AFPQAwqQuantizer.__new__(AFPQAwqQuantizer)
    q.fmt, q.mode, q.group_size, q.scale_dtype = get_format(fmt), mode, group_size, torch.float16
    gen = torch.Generator().manual_seed(2)
    in_f = 640 if group_size == -1 else 256  # -1: more columns than tokens, the direct path
    w = torch.randn(128, in_f, generator=gen) * 0.02
    w[:, ::13] *= 5
    x = torch.randn(2, 300, in_f, generator=gen)
    ours = q._symmetric_clip(w, x)
    theirs = AwqQuantizer._compute_best_clip(q, w, x)
    assert ours.shape == theirs.shape
    assert (ours == theirs).float().mean() > 0.97  # float rounding may flip near-ties
    assert (ours < w.abs().reshape(128, ours.shape[1], -1).amax(-1, keepdim=True)).any()


def test_quantizer_argument_errors(tiny_dir):
    with pytest.raises(ValueError, match="3 bits but quant_config w_bit is 4"):
        _quantize_bad(tiny_dir, w_bit=4, fmt="nf3")
    with pytest.raises(ValueError, match="clip must be one of"):
        _quantize_bad(tiny_dir, w_bit=3, fmt="nf3", clip="both")
    with pytest.raises(ValueError, match="4-bit only"):
        _quantize_bad(tiny_dir, w_bit=3, fmt="nf3", layout="awq")
    with pytest.raises(ValueError, match="scale_search"):
        _quantize_bad(tiny_dir, w_bit=3, fmt="nf3", scale_search="best")


def _quantize_bad(tiny_dir, w_bit, **kw):
    from afpq_plugins.autoawq import AFPQAwqQuantizer

    calib, tok = test_autoawq_int_reference.calib_ids(tiny_dir)
    model = _load_awq(tiny_dir)
    model.quantize(tok, quant_config={"w_bit": w_bit, "q_group_size": 64, "zero_point": True, "version": "gemm"},
                   quantizer_cls=AFPQAwqQuantizer, calib_data=calib, max_calib_samples=NSAMPLES,
                   max_calib_seq_len=SEQLEN, **kw)


def test_calibration_inputs(tiny_dir):
    from afpq_plugins.autoawq import calibration_token_lists

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    long_ids = tok.encode(TEXT.strip())
    assert len(long_ids) > 64  # AutoAWQ alone would drop this string
    pieces = calibration_token_lists([TEXT], tok, 8, 64)
    assert sum(pieces, []) == long_ids and all(len(p) <= 64 for p in pieces)
    t = torch.tensor(long_ids[:256]).view(2, 128)
    assert calibration_token_lists(t, tok, 8, 64) == [long_ids[i : i + 64] for i in range(0, 256, 64)]
    austen = calibration_token_lists("austen", tok, 3, 32)
    assert len(austen) == 3 and all(len(p) == 32 and isinstance(p[0], int) for p in austen)
    assert calibration_token_lists("some/hf-dataset", tok, 3, 32) == "some/hf-dataset"
    with pytest.raises(ValueError, match="fewer than one block"):
        calibration_token_lists(["short"], tok, 8, 64)


@pytest.fixture(scope="module")
def saved_by_autoawq(tiny_dir, tmp_path_factory):
    """An nf4 (4-bit, awq layout) model saved through AutoAWQ's own ``save_quantized``."""
    model, _ = _quantize(tiny_dir, "nf4", 64)
    out = str(tmp_path_factory.mktemp("awq_save") / "via_autoawq_save")
    model.save_quantized(out)
    return out


def test_stock_loaders_refuse_and_awq_save_is_safe(saved_by_autoawq):
    out = saved_by_autoawq
    # AutoAWQ's own save_quantized on this instance writes the AFPQ format, never "awq"
    cfg = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert cfg["quant_method"] == "afpq" and cfg["method"] == "awq" and cfg["layout"] == "awq"

    from awq import AutoAWQForCausalLM

    # AutoAWQ 0.2.9 refuses: on CPU it demands IPEX; with CUDA, version 1 picks no module.
    with pytest.raises((ImportError, UnboundLocalError, ValueError, KeyError)):
        AutoAWQForCausalLM.from_quantized(out, device_map="cpu")

    # transformers 4.53.3 without the afpq plugin (a clean process) skips the unknown
    # quant_method, then stops at the refusal placeholder <layer>.weight (uint8 [1]).
    code = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
            "try:\n    AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
            "except RuntimeError as exc:\n    print('REFUSED', exc)\n"
            "assert not [m for m in sys.modules if m.startswith('afpq_plugins')]\n")
    proc = subprocess.run([sys.executable, "-c", code, out], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH="", AFPQ_PLUGINS_AUTOLOAD="0"), cwd=os.path.dirname(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("REFUSED") and "size mismatch for weight" in proc.stdout, proc.stdout
    assert "torch.Size([1])" in proc.stdout


STOCK_AWQ_LOAD = """
import sys, warnings
with warnings.catch_warnings(record=True):
    from awq import AutoAWQForCausalLM
    import awq.models.base as base
if sys.argv[2] == "cuda":
    base.get_best_device = lambda: "cuda:0"  # what AutoAWQ sees on a CUDA machine (no IPEX demanded)
kw = dict(device_map={"": "cpu"}, fuse_layers=False)
kw.update({"default": {}, "exllama": {"use_exllama": True}, "exllama_v2": {"use_exllama_v2": True}}[sys.argv[3]])
try:
    AutoAWQForCausalLM.from_quantized(sys.argv[1], **kw)
except Exception as exc:
    print("REFUSED", type(exc).__name__, exc)
else:
    print("LOADED")
assert not [m for m in sys.modules if m.startswith("afpq_plugins")]
"""


@pytest.mark.parametrize("device,kernel,expect", [
    ("cpu", "default", "ImportError Please install intel_extension_for_pytorch"),
    ("cuda", "default", "UnboundLocalError"),  # quantization_config.version is 1, not a kernel name
    # a 4-bit checkpoint reaches the weight loading with the exllama kernels: the qzeros placeholder stops it
    ("cuda", "exllama", 'ValueError Trying to set a tensor of shape torch.Size([1]) in "qzeros"'),
    ("cuda", "exllama_v2", 'ValueError Trying to set a tensor of shape torch.Size([1]) in "qzeros"'),
])
def test_stock_autoawq_refuses_in_a_clean_process(saved_by_autoawq, tmp_path, device, kernel, expect):
    env = dict(os.environ, PYTHONPATH="", AFPQ_PLUGINS_AUTOLOAD="0")  # stock AutoAWQ, afpq_plugins not even on the path
    proc = subprocess.run([sys.executable, "-c", STOCK_AWQ_LOAD, saved_by_autoawq, device, kernel],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("REFUSED " + expect), proc.stdout + proc.stderr[-2000:]


def test_int_awq_unchanged(tiny_dir, tmp_path):
    """Stock INT AWQ gives the same tensors in a clean subprocess and here, after an AFPQ run."""
    _quantize(tiny_dir, "nf3", 64, "two-sided")  # AFPQ first, in this process
    ours = test_autoawq_int_reference.run(tiny_dir)
    ref_file = str(tmp_path / "ref.pt")
    # stock AutoAWQ with nothing of ours: the installed .pth hook would register "afpq" once
    # transformers' quantizer registry is imported (issue 26), so it is switched off here
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), AFPQ_PLUGINS_AUTOLOAD="0")
    subprocess.run([sys.executable, os.path.join(HERE, "test_autoawq_int_reference.py"), tiny_dir, ref_file],
                   check=True, env=env, cwd=HERE, capture_output=True)
    ref = torch.load(ref_file)
    assert set(ours) == set(ref)
    assert any(k.endswith("qzeros") for k in ref)  # really AutoAWQ's WQLinear_GEMM
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k


def test_cli_awq_quantize_and_eval(tiny_dir, tmp_path, capsys):
    from afpq_plugins.cli import main

    out = str(tmp_path / "cli")
    rc = main(["quantize", tiny_dir, out, "--method", "awq", "--format", "nf3", "--group-size", "64",
               "--clip", "two-sided", "--nsamples", "4", "--calib-seqlen", "64", "--scale-search", "mse", "--quiet"])
    assert rc == 0
    cfg = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert cfg["method"] == "awq" and cfg["awq"]["clip"] == "two-sided" and cfg["scale_search"]["method"] == "mse"
    assert main(["eval", out, "--seqlen", "64", "--windows", "2", "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"] > 1
