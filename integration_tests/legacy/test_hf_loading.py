"""AFPQ checkpoints through ``transformers.AutoModelForCausalLM`` (the plugin's HfQuantizer).

Stack-agnostic: the same file runs in the legacy venv (transformers 4.53.3) and, via
``integration_tests/modern/test_hf_loading.py``, in the modern one (5.17.0). Tiny random
Llama checkpoints made by RTN (both layouts), then by the AutoGPTQ / AutoAWQ adapters
when those are importable, load with the same logits as
:func:`afpq_plugins.model.load_quantized`, generate, and round-trip through
``save_pretrained``; damaged checkpoints fail with errors naming the tensor or key.
Without the plugin, stock ``from_pretrained`` refuses them (the refusal placeholders).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _tiny import tiny_llama, tiny_tokenizer  # noqa: E402

import afpq_plugins  # noqa: E402,F401
from afpq_plugins.core.checkpoint import CheckpointError, read_quant_config  # noqa: E402
from afpq_plugins.core.safetensors_io import SafetensorsError, load_file, save_file  # noqa: E402
from afpq_plugins.hf import AFPQConfig, AFPQHfQuantizer, register  # noqa: E402
from afpq_plugins.hf import registration  # noqa: E402
from afpq_plugins.model import load_quantized, quantize_model_rtn, save_quantized  # noqa: E402
from afpq_plugins.nn import AFPQLinear  # noqa: E402

AutoModelForCausalLM = transformers.AutoModelForCausalLM

# (format, group size, layout, mode): both layouts, afpq / zp / sym, 3 and 4 bits
RTN_CASES = [
    ("nf3", 32, "gptq", None),
    ("fp4", 32, "awq", None),
    ("nf4", -1, "gptq", "sym"),
    ("int4", 32, "gptq", "zp"),
]


def _ids(vocab: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, 12), generator=g)


def _make_rtn(path, fmt="nf3", group_size=32, layout="gptq", mode=None, seed=0) -> str:
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), seed=seed)
    qc = quantize_model_rtn(model, fmt, group_size, mode=mode, layout=layout, progress=False)
    return save_quantized(model, str(path), qc, tokenizer=tok)


@pytest.fixture(scope="module")
def rtn_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("afpq_hf")
    return {case: _make_rtn(root / f"{case[0]}-{case[1]}-{case[2]}-{case[3]}", *case) for case in RTN_CASES}


@pytest.fixture(scope="module")
def ckpt(rtn_checkpoints):
    return rtn_checkpoints[RTN_CASES[0]]


def _copy(src: str, dst) -> str:
    shutil.copytree(src, str(dst))
    return str(dst)


def _hf_load(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, **kw)


# -- loading ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", RTN_CASES, ids=lambda c: "-".join(str(x) for x in c))
def test_rtn_checkpoint_loads_with_same_logits_and_generates(rtn_checkpoints, case):
    path = rtn_checkpoints[case]
    ref = load_quantized(path)
    model = _hf_load(path)
    assert isinstance(model.get_submodule("model.layers.0.self_attn.q_proj"), AFPQLinear)
    assert model.is_quantized and isinstance(model.hf_quantizer, AFPQHfQuantizer)
    _, qc = read_quant_config(path)
    for name in qc.quantized_modules:
        a, b = ref.get_submodule(name), model.get_submodule(name)
        for buf, t in a.named_buffers():
            assert torch.equal(getattr(b, buf), t), f"{name}.{buf}"
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
        out = model.generate(ids[:1, :4], attention_mask=torch.ones(1, 4, dtype=torch.long), max_new_tokens=6, min_new_tokens=6,
                             do_sample=False, pad_token_id=0)
        expect = ref.generate(ids[:1, :4], attention_mask=torch.ones(1, 4, dtype=torch.long), max_new_tokens=6, min_new_tokens=6,
                              do_sample=False, pad_token_id=0)
    assert out.shape == (1, 10) and torch.equal(out, expect)


def _make_gpt2_checkpoint(path, fmt="nf4", group_size=32, seed=0):
    """A tiny GPT-2 whose ``Conv1D`` layers (weight ``[in, out]``) are AFPQ layers, saved."""
    from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel

    from afpq_plugins.core.checkpoint import AFPQConfigDict
    from afpq_plugins.nn.skeleton import set_module

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    float_model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=64, n_layer=2, n_head=4)).eval()
    model = GPT2LMHeadModel(AutoConfig.for_model(**float_model.config.to_dict())).eval()
    model.load_state_dict(float_model.state_dict())
    names = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert names
    for n in names:
        conv = model.get_submodule(n)
        lin = torch.nn.Linear(conv.weight.shape[0], conv.weight.shape[1])
        with torch.no_grad():
            lin.weight.copy_(conv.weight.t())
            lin.bias.copy_(conv.bias)
        set_module(model, n, AFPQLinear.from_linear(lin, fmt, group_size, name=n))
    qc = AFPQConfigDict(format=fmt, bits=4, group_size=group_size, mode="afpq", quantized_modules=names)
    return save_quantized(model, str(path), qc, tokenizer=tok), model, float_model, names


def test_gpt2_conv1d_checkpoint_loads_through_transformers(tmp_path):
    """GPT-2's Conv1D layers go through the one skeleton rule in both loaders: the
    transformers path gives the same buffers and logits as the project's loader and as
    the float model holding the decoded weights (transposed back to Conv1D's [in, out])."""
    path, model, float_model, names = _make_gpt2_checkpoint(tmp_path / "gpt2")
    ref = load_quantized(path)
    hf = _hf_load(path)
    with torch.no_grad():
        for n in names:
            a, b = ref.get_submodule(n), hf.get_submodule(n)
            assert isinstance(a, AFPQLinear) and isinstance(b, AFPQLinear), n
            for buf, t in a.named_buffers():
                assert torch.equal(getattr(b, buf), t), f"{n}.{buf}"
            float_model.get_submodule(n).weight.copy_(model.get_submodule(n).dequantize(torch.float32).t())
        ids = _ids(hf.config.vocab_size)
        want = model(ids).logits
        assert torch.equal(hf(ids).logits, want) and torch.equal(ref(ids).logits, want)
        torch.testing.assert_close(float_model(ids).logits, want, atol=1e-4, rtol=1e-4)


def test_pickle_only_checkpoint_is_refused_before_unpickling(ckpt, tmp_path, monkeypatch):
    """An AFPQ config beside only a pytorch_model.bin: the plugin refuses before transformers
    would torch.load (unpickle) anything."""
    path = tmp_path / "bin"
    path.mkdir()
    shutil.copyfile(os.path.join(ckpt, "config.json"), path / "config.json")
    torch.save({"x": torch.ones(1)}, path / "pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(CheckpointError, match="safetensors"):
        _hf_load(str(path))


@pytest.mark.parametrize("case", RTN_CASES[:2], ids=lambda c: "-".join(str(x) for x in c))
def test_save_pretrained_round_trips_in_the_same_format(rtn_checkpoints, case, tmp_path):
    path = rtn_checkpoints[case]
    model = _hf_load(path)
    out = tmp_path / "resaved"
    model.save_pretrained(str(out))
    _, qc0 = read_quant_config(path)
    _, qc1 = read_quant_config(str(out))  # validates the written quantization_config
    assert qc1.to_dict() == qc0.to_dict()
    t0, t1 = load_file(os.path.join(path, "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(t0) == set(t1)
    for name in qc0.quantized_modules:  # save_pretrained keeps writing the refusal placeholders
        for ph in (f"{name}.weight", f"{name}.qzeros"):
            assert t1[ph].dtype == torch.uint8 and t1[ph].tolist() == [0], ph
    for k in t0:
        assert t0[k].dtype == t1[k].dtype and torch.equal(t0[k], t1[k]), k
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():  # all three on the same kernel (with autograd on, the torch path runs instead)
        ref = load_quantized(str(out))(ids).logits  # our own loader reads what transformers wrote
        again = _hf_load(str(out))(ids).logits
        first = model(ids).logits
    assert torch.equal(ref, first) and torch.equal(again, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtype_keeps_the_group_parameters_exact(ckpt, dtype):
    ref = load_quantized(ckpt)
    model = _hf_load(ckpt, torch_dtype=dtype)
    assert model.dtype == dtype
    q = model.get_submodule("model.layers.1.mlp.down_proj")
    r = ref.get_submodule("model.layers.1.mlp.down_proj")
    assert q.scales.dtype == torch.float16 and torch.equal(q.scales, r.scales)
    assert torch.equal(q.scales_neg, r.scales_neg) and q.qweight.dtype == torch.int32
    assert model.model.embed_tokens.weight.dtype == dtype
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        got = model(ids).logits.float()
        want = load_quantized(ckpt, dtype=dtype)(ids).logits.float()
    assert torch.allclose(got, want, atol=2e-2, rtol=0), (got - want).abs().max()


@pytest.mark.parametrize("device_map", ["cpu", "auto", {"": "cpu"}])
def test_device_map(ckpt, device_map):
    model = _hf_load(ckpt, device_map=device_map)
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, load_quantized(ckpt)(ids).logits)


# -- bad input ----------------------------------------------------------------------------------
def _rewrite_tensors(path, edit):
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_missing_scales_neg_names_the_tensor(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path / "bad")
    _rewrite_tensors(bad, lambda t: t.pop("model.layers.1.mlp.up_proj.scales_neg"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.scales_neg.*missing"):
        _hf_load(bad)


def test_misshapen_scales_neg_names_the_tensor(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path / "bad")
    key = "model.layers.0.self_attn.k_proj.scales_neg"
    _rewrite_tensors(bad, lambda t: t.__setitem__(key, t[key][:, :-1].contiguous()))
    with pytest.raises(CheckpointError, match=r"k_proj\.scales_neg.*shape"):
        _hf_load(bad)


def test_nan_scale_names_the_tensor(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path / "bad")
    key = "model.layers.0.self_attn.q_proj.scales"

    def edit(t):
        t[key] = t[key].clone()
        t[key][0, 0] = float("nan")

    _rewrite_tensors(bad, edit)
    with pytest.raises(CheckpointError, match=r"q_proj\.scales.*NaN"):
        _hf_load(bad)


def test_missing_float_tensor_is_not_random_initialized(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path / "bad")
    _rewrite_tensors(bad, lambda t: t.pop("model.layers.0.input_layernorm.weight"))
    with pytest.raises(CheckpointError, match=r"input_layernorm\.weight.*missing"):
        _hf_load(bad)


def test_misshapen_float_tensor_names_the_tensor(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path / "bad")
    key = "model.norm.weight"
    _rewrite_tensors(bad, lambda t: t.__setitem__(key, t[key][:-1].contiguous()))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*shape"):
        _hf_load(bad)


def test_float_weight_inside_a_quantized_layer_is_refused(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path / "bad")
    _rewrite_tensors(bad, lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight", torch.zeros(128, 64)))
    with pytest.raises(CheckpointError, match=r"up_proj\.weight"):
        _hf_load(bad)


def test_int_zero_points_inside_a_quantized_layer_are_refused(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path / "bad")
    key = "model.layers.1.self_attn.o_proj.qzeros"
    _rewrite_tensors(bad, lambda t: t.__setitem__(key, torch.zeros(2, 8, dtype=torch.int32)))
    with pytest.raises(CheckpointError, match=r"o_proj\.qzeros"):
        _hf_load(bad)


def _strip_placeholders(path) -> None:
    """Make ``path`` a checkpoint as written before the refusal placeholders."""
    def strip(t):
        for k in [k for k in t if k.endswith((".qzeros", "_proj.weight"))]:
            del t[k]
    _rewrite_tensors(path, strip)


def test_checkpoint_without_placeholders_loads_and_resaves_with_them(ckpt, tmp_path):
    old = _copy(ckpt, tmp_path / "old")
    _strip_placeholders(old)
    model = _hf_load(old)
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, load_quantized(ckpt)(ids).logits)
    model.save_pretrained(str(tmp_path / "rt"))
    t = load_file(str(tmp_path / "rt" / "model.safetensors"))
    assert set(t) == set(load_file(os.path.join(ckpt, "model.safetensors")))


def test_truncated_safetensors_names_file_and_tensor(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path / "bad")
    f = os.path.join(bad, "model.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size - 100)
    with pytest.raises(SafetensorsError, match=r"model\.safetensors.*tensor '.*'.*truncated"):
        _hf_load(bad)


def _edit_config(path, **changes):
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file) as fh:
        cfg = json.load(fh)
    for k, v in changes.items():
        if v is None:
            cfg["quantization_config"].pop(k, None)
        else:
            cfg["quantization_config"][k] = v
    with open(cfg_file, "w") as fh:
        json.dump(cfg, fh)


def test_unknown_format_names_the_key(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path / "bad")
    _edit_config(bad, format="fp5", table=None)
    with pytest.raises(CheckpointError, match=r"format.*'fp5'"):
        _hf_load(bad)


@pytest.mark.parametrize("key,value,pattern", [
    ("layout", "exl2", r"layout 'exl2'"),
    ("bits", 4, r"bits is 4"),
    ("mode", "weird", r"mode 'weird'"),
    ("quantized_modules", ["model.layers.0.nope"], r"model\.layers\.0\.nope"),
    ("quantized_modules", ["model.norm"], r"model\.norm.*RMSNorm"),
])
def test_bad_config_key_names_it(ckpt, tmp_path, key, value, pattern):
    bad = _copy(ckpt, tmp_path / "bad")
    _edit_config(bad, **{key: value})
    with pytest.raises(CheckpointError, match=pattern):
        _hf_load(bad)


# -- registration --------------------------------------------------------------------------------
def test_registration_is_idempotent_and_public():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert registration.is_registered()
    assert register() == "already" and register() == "already"
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["afpq"] is AFPQConfig
    assert AUTO_QUANTIZER_MAPPING["afpq"] is AFPQHfQuantizer
    assert registration.register_lazily() is True  # already imported: registers (no-op) at once


def test_foreign_registration_is_left_in_place(ckpt):
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    class ForeignConfig(AFPQConfig):
        pass

    ForeignConfig.__module__ = "somebody_else"
    registration.unregister()
    AUTO_QUANTIZATION_CONFIG_MAPPING["afpq"] = ForeignConfig
    AUTO_QUANTIZER_MAPPING["afpq"] = AFPQHfQuantizer
    try:
        assert register() == "foreign"
        assert AUTO_QUANTIZATION_CONFIG_MAPPING["afpq"] is ForeignConfig
        assert register(force=True) == "registered"
        assert AUTO_QUANTIZATION_CONFIG_MAPPING["afpq"] is AFPQConfig
    finally:
        registration.unregister()
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop("afpq", None)
        AUTO_QUANTIZER_MAPPING.pop("afpq", None)
        assert register() == "registered"
    assert isinstance(_hf_load(ckpt).model.layers[0].mlp.up_proj, AFPQLinear)


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.path.join(os.getcwd(), "tests")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_lazy_registration_imports_nothing_then_registers_on_first_transformers_use(ckpt):
    code = (
        "import sys\n"
        "from afpq_plugins.hf.registration import register_lazily\n"
        "register_lazily(); register_lazily()\n"
        "assert 'transformers' not in sys.modules, 'transformers imported eagerly'\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({ckpt!r})\n"
        "print(type(m.model.layers[0].self_attn.q_proj).__name__)\n"
    )
    res = _run(code)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("AFPQLinear")


STOCK_LOAD = (
    "import sys\n"
    "from transformers import AutoModelForCausalLM\n"
    "kw = {'ignore_mismatched_sizes': True} if len(sys.argv) > 2 else {}\n"
    "try:\n"
    "    m = AutoModelForCausalLM.from_pretrained(sys.argv[1], **kw)\n"
    "except Exception as exc:\n"
    "    print('REFUSED', type(exc).__name__, exc)\n"
    "else:\n"
    "    print('LOADED', type(m.model.layers[0].self_attn.q_proj).__name__, getattr(m, 'is_quantized', False))\n"
    "assert not [m for m in sys.modules if m.startswith('afpq_plugins')], 'the stock run imported afpq_plugins'\n"
)


def _stock(*args) -> subprocess.CompletedProcess:
    """``from_pretrained`` in a fresh interpreter that never imports afpq_plugins (not on its path)."""
    env = dict(os.environ, PYTHONPATH="", AFPQ_PLUGINS_AUTOLOAD="0")  # not even the installed .pth hook
    return subprocess.run([sys.executable, "-c", STOCK_LOAD, *args], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.abspath(args[0])), timeout=300)


def test_without_the_plugin_transformers_refuses_the_checkpoint(ckpt):
    """What a user sees without ``import afpq_plugins`` (quoted in the README): transformers
    skips the unknown quant_method, then stops at the refusal placeholders' size mismatch
    (4.53: in the exception; 5.x: in the load report logged just before it)."""
    res = _stock(ckpt)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("REFUSED RuntimeError"), res.stdout
    assert "Unknown quantization type, got afpq" in res.stderr
    assert "size mismatch" in res.stdout + res.stderr
    assert "torch.Size([1])" in res.stdout + res.stderr


def test_without_the_plugin_ignore_mismatched_sizes_loads_random_layers(ckpt):
    """Documented: asking transformers to ignore the mismatch re-initialises every quantized
    layer, and transformers says so (naming the placeholder's shape)."""
    res = _stock(ckpt, "ignore")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "LOADED Linear False"
    assert "self_attn.q_proj.weight" in res.stderr and "torch.Size([1])" in res.stderr


def test_with_the_plugin_placeholders_load_without_warnings(ckpt):
    """The placeholders are neither loaded nor reported (4.53: unexpected-key hook; 5.x: the
    model's ignore patterns), and nothing is re-initialised."""
    code = (
        "import logging, sys, afpq_plugins\n"
        "from transformers import AutoModelForCausalLM\n"
        "logging.basicConfig(level=logging.INFO)\n"  # 4.53 reports unexpected keys at INFO for a foreign arch
        "from transformers.utils import logging as tlog\n"
        "tlog.set_verbosity_info()\n"
        f"m = AutoModelForCausalLM.from_pretrained({ckpt!r})\n"
        "print('TYPE', type(m.model.layers[0].self_attn.q_proj).__name__)\n"
    )
    res = _run(code)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("TYPE AFPQLinear")
    for word in ("qzeros", "proj.weight", "UNEXPECTED", "MISMATCH", "not used", "newly initialized"):
        assert word not in res.stderr, (word, res.stderr[-3000:])


# -- checkpoints from the GPTQ and AWQ adapters (legacy stack, when the adapters exist) -------------
def _adapter_checkpoint(kind: str, tmp_path):
    """A checkpoint written by the AutoGPTQ / AutoAWQ adapter on a tiny Llama, or skip."""
    import importlib.util

    upstream, adapter = {"gptq": ("auto_gptq", "afpq_plugins.autogptq"), "awq": ("awq", "afpq_plugins.autoawq")}[kind]
    if importlib.util.find_spec(upstream) is None:
        pytest.skip(f"{upstream} is not installed (legacy stack only)")
    try:
        importlib.import_module(adapter)
    except ImportError as exc:  # the adapter is being written concurrently
        pytest.skip(f"{adapter} is not importable yet: {exc}")
    from _tiny import TEXT, tiny_llama, tiny_tokenizer

    src = str(tmp_path / "float")
    tok = tiny_tokenizer()
    # hidden 128: AutoAWQ 0.2.9's clip search needs out_features % 64 == 0 (k/v_proj: 64)
    tiny_llama(vocab_size=len(tok), hidden=128).save_pretrained(src)
    tok.save_pretrained(src)
    out = str(tmp_path / kind)
    tok = transformers.AutoTokenizer.from_pretrained(src)
    if kind == "gptq":
        from afpq_plugins.autogptq import AFPQQuantizeConfig, examples_from_ids, quantize_model

        model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32)
        ids = tok(TEXT, return_tensors="pt").input_ids[0]
        examples = examples_from_ids([ids[i:i + 32] for i in range(0, 32 * 4, 32)])
        cfg = AFPQQuantizeConfig(bits=3, group_size=32, fmt="nf3", desc_act=True)
        qc = quantize_model(model, cfg, examples)
        save_quantized(model, out, qc, tokenizer=tok)
    else:
        from afpq_plugins.autoawq import quantize_awq

        quantize_awq(src, out, fmt="fp4", group_size=32, calib_data=[TEXT] * 4, n_samples=4, seqlen=32,
                     progress=False)
    return out


@pytest.mark.parametrize("kind", ["gptq", "awq"])
def test_adapter_checkpoint_loads_with_same_logits(kind, tmp_path):
    path = _adapter_checkpoint(kind, tmp_path)
    ref = load_quantized(path)
    model = _hf_load(path)
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
        assert model.generate(ids[:1, :4], attention_mask=torch.ones(1, 4, dtype=torch.long), max_new_tokens=4, min_new_tokens=4,
                              do_sample=False, pad_token_id=0).shape == (1, 8)
    model.save_pretrained(str(tmp_path / "rt"))
    with torch.no_grad():
        assert torch.equal(load_quantized(str(tmp_path / "rt"))(ids).logits, ref(ids).logits)
    assert read_quant_config(str(tmp_path / "rt"))[1].to_dict() == read_quant_config(path)[1].to_dict()


def test_dequantize_gives_float_linears_with_the_decoded_weights(ckpt):
    model = _hf_load(ckpt)
    ref = load_quantized(ckpt)
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        want = ref(ids).logits
    model = model.dequantize()
    layer = model.get_submodule("model.layers.0.mlp.gate_proj")
    assert type(layer) is torch.nn.Linear
    assert torch.equal(layer.weight, ref.get_submodule("model.layers.0.mlp.gate_proj").dequantize(torch.float32))
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, want, atol=1e-4, rtol=1e-4)


def test_registration_without_transformers_is_a_quiet_no_op():
    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'transformers' or name.startswith('transformers.'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import afpq_plugins, afpq_plugins.hf as hf\n"
        "from afpq_plugins.hf import registration\n"
        "assert registration.register_lazily() is False and registration._hook is None\n"
        "assert not hf.is_registered()\n"
        "print('ok')\n"
    )
    res = _run(code)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
