"""Hostile and damaged checkpoints, interrupted saves, half-done conversions.

Each test names the defect it pins down; the references are the safetensors library
(what it refuses, we refuse), the unmodified checkpoint, and hand-built cases.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import safetensors.torch as st  # noqa: E402

from _ckpt_tools import ids, join, logits, read_config, split, tiny_llama_checkpoint, write_config  # noqa: E402
from afpq_plugins.core.checkpoint import (  # noqa: E402
    CheckpointError,
    CheckpointSnapshot,
    recover_interrupted_save,
    write_checkpoint,
)
from afpq_plugins.core.safetensors_io import SafetensorsError, load_file, save_file  # noqa: E402
from afpq_plugins.model import load_quantized, quantize_model_rtn, save_quantized  # noqa: E402
from afpq_plugins.nn import AFPQLinear  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, model = tiny_llama_checkpoint(tmp_path_factory.mktemp("h") / "nf4")
    return path, logits(model)


def _copy(src, dst) -> str:
    shutil.copytree(src, str(dst))
    return str(dst)


# -- the safetensors reader is as strict as the library ----------------------------------------
def _small(tmp_path):
    p = str(tmp_path / "x.safetensors")
    save_file({"a": torch.arange(4, dtype=torch.float32), "b": torch.ones(2, dtype=torch.int32)}, p)
    return p


def _mutations():
    def dup(h, t, d):  # a second "a" (the library keeps the last one, which overlaps "b")
        return None, json.dumps(h)[:-1] + ',"a":{"dtype":"I32","shape":[2],"data_offsets":[16,24]}}', d

    def overlap(h, t, d):
        h["b"]["data_offsets"] = [8, 16]
        return h, None, d[:16]

    def trailing(h, t, d):
        return h, None, d + b"\0" * 8

    def meta_not_str(h, t, d):
        h["__metadata__"] = {"format": 1}
        return h, None, d

    def meta_nested(h, t, d):
        h["__metadata__"] = {"k": {"a": "b"}}
        return h, None, d

    def neg_shape(h, t, d):
        h["a"]["shape"] = [-4]
        return h, None, d

    def float_shape(h, t, d):
        h["a"]["shape"] = [4.0]
        return h, None, d

    def neg_offset(h, t, d):
        h["a"]["data_offsets"] = [-16, 0]
        return h, None, d

    def float_offset(h, t, d):
        h["a"]["data_offsets"] = [0.0, 16.0]
        return h, None, d

    def deep(h, t, d):
        return None, '{"a":' * 100000 + "1" + "}" * 100000, d

    return [dup, overlap, trailing, meta_not_str, meta_nested, neg_shape, float_shape, neg_offset, float_offset, deep]


@pytest.mark.parametrize("mutate", _mutations(), ids=lambda f: f.__name__)
def test_reader_refuses_what_the_safetensors_library_refuses(tmp_path, mutate):
    p = _small(tmp_path)
    h, _, d = split(p)
    h2, text, d2 = mutate(h, None, d)
    join(p, h2, d2, raw_text=text)
    with pytest.raises(Exception):  # the independent reference refuses it
        st.load_file(p)
    with pytest.raises(SafetensorsError) as exc:  # and so do we, with the named error
        load_file(p)
    assert p in str(exc.value) and isinstance(exc.value, CheckpointError)


def test_reader_still_reads_what_the_library_writes(tmp_path):
    p = str(tmp_path / "lib.safetensors")
    ref = {"w": torch.randn(3, 5), "i": torch.arange(7, dtype=torch.int64), "e": torch.zeros(0, 2)}
    st.save_file(ref, p, metadata={"k": "v"})
    got = load_file(p)
    assert sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


# -- config values are type-checked -------------------------------------------------------------
@pytest.mark.parametrize("edit, pattern", [
    (lambda c: c["quantization_config"].update(bits=4.0), "bits must be an integer"),
    (lambda c: c["quantization_config"].update(group_size="32"), "group_size must be an integer"),
    (lambda c: c["quantization_config"].__setitem__("table", [None] * 16), "table must be a list of finite numbers"),
    (lambda c: c["quantization_config"].__setitem__("table", [{}] * 16), "table must be a list of finite numbers"),
    (lambda c: c["quantization_config"].update(
        quantized_modules=c["quantization_config"]["quantized_modules"][:1] * 2), "more than once"),
    (lambda c: c["quantization_config"].update(quantized_modules="model"), "quantized_modules must be a list"),
    (lambda c: c["quantization_config"].update(desc_act="no"), "desc_act must be true or false"),
    (lambda c: c.__setitem__("quantization_config", "afpq"), "not a JSON object"),
    (lambda c: c.update(hidden_size=2**40), "config.json|has shape"),  # nothing allocated on the way
    (lambda c: c.update(vocab_size=2**45), "config.json|has shape"),
    (lambda c: c.update(model_type="not-a-model", auto_map={"AutoConfig": "x.Y"}), "trust_remote_code=False"),
])
def test_config_values_are_checked_with_a_named_error(ckpt, tmp_path, edit, pattern):
    path = _copy(ckpt[0], tmp_path / "c")
    cfg = read_config(path)
    edit(cfg)
    write_config(path, cfg)
    with pytest.raises(CheckpointError, match=pattern):
        load_quantized(path)


def test_config_json_that_is_a_list(ckpt, tmp_path):
    path = _copy(ckpt[0], tmp_path / "c")
    write_config(path, "[1, 2]")
    with pytest.raises(CheckpointError, match="JSON object"):
        load_quantized(path)


def test_auto_map_is_ignored_for_a_known_architecture(ckpt, tmp_path):
    """No prompt, no remote code: the built-in class loads and gives the same logits."""
    path = _copy(ckpt[0], tmp_path / "c")
    cfg = read_config(path)
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil", "AutoConfig": "modeling_evil.EvilConfig"}
    write_config(path, cfg)
    assert torch.equal(logits(load_quantized(path)), ckpt[1])


# -- tensor values ---------------------------------------------------------------------------------
def _edit_tensor(path, key, fn):
    f = os.path.join(path, "model.safetensors")
    t = load_file(f)
    t[key] = fn(t[key].clone())
    meta = split(f)[0].get("__metadata__")
    save_file(t, f, metadata=meta)


def test_negative_scale_is_refused(ckpt, tmp_path):
    path = _copy(ckpt[0], tmp_path / "c")
    key = "model.layers.0.mlp.up_proj.scales_neg"
    _edit_tensor(path, key, lambda t: t.index_put_((torch.tensor([0]), torch.tensor([3])), torch.tensor(-0.5, dtype=t.dtype)))
    with pytest.raises(CheckpointError, match=r"scales_neg.*must not be negative.*column 3"):
        load_quantized(path)


def test_zero_scale_still_loads(ckpt, tmp_path):
    """A zero scale (a side without weights) is what the writer produces: it decodes to zero."""
    path = _copy(ckpt[0], tmp_path / "c")
    _edit_tensor(path, "model.layers.0.mlp.up_proj.scales_neg", lambda t: t.zero_())
    layer = load_quantized(path).model.layers[0].mlp.up_proj
    w = layer.dequantize(torch.float32)
    assert (w >= 0).all()  # every negative weight decodes through s_neg = 0


def test_zero_points_outside_the_grid_are_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=128)).eval()
    qc = quantize_model_rtn(m, "int4", 32, mode="zp", progress=False)
    path = save_quantized(m, str(tmp_path / "zp"), qc)
    load_quantized(path)  # as written: fine
    for bad, why in ((16.0, "0..15"), (-1.0, "0..15"), (2.5, "0..15")):
        p2 = _copy(path, tmp_path / f"bad{bad}")
        _edit_tensor(p2, "model.layers.0.self_attn.q_proj.zeros", lambda t: t.fill_(bad))
        with pytest.raises(CheckpointError, match=why):
            load_quantized(p2)


def test_float_tensor_of_another_dtype_is_cast_like_transformers(tmp_path):
    """An fp16 lm_head in an fp32 checkpoint used to load as is and crash on the first forward."""
    path, model = tiny_llama_checkpoint(tmp_path / "c", tie=False, lm_head_dtype=torch.float16)
    loaded = load_quantized(path)
    assert loaded.lm_head.weight.dtype == torch.float32
    model.lm_head.float()  # the reference: the same fp16 values, computed in fp32
    assert torch.equal(logits(loaded), logits(model))


# -- snapshot reads -----------------------------------------------------------------------------------
def test_config_and_tensors_of_two_saves_are_refused(tmp_path):
    """nf4 and fp4 tensors have the same shapes: a config of one save with the tensors of the
    other used to load silently as a wrong model."""
    a, _ = tiny_llama_checkpoint(tmp_path / "a", fmt="nf4")
    b, _ = tiny_llama_checkpoint(tmp_path / "b", fmt="fp4")
    shutil.copyfile(os.path.join(b, "model.safetensors"), os.path.join(a, "model.safetensors"))
    with pytest.raises(CheckpointError, match="different saves"):
        load_quantized(a)


def test_a_snapshot_keeps_reading_its_version_while_the_folder_is_replaced(tmp_path):
    path, nf4 = tiny_llama_checkpoint(tmp_path / "ck", fmt="nf4")
    with CheckpointSnapshot(path) as snap:
        qc = snap.quant_config()
        tiny_llama_checkpoint(tmp_path / "other", fmt="fp4")
        _, fp4 = tiny_llama_checkpoint(tmp_path / "ck2", fmt="fp4")
        save_quantized(fp4, path, read_fp4 := _qc_of(tmp_path / "ck2"), overwrite=True)  # replaced on disk
        tensors = snap.tensors()
        snap.check_stamp(qc)
    assert qc.format == "nf4" and read_fp4.format == "fp4"
    ref = {k: v for k, v in nf4.state_dict().items() if k.endswith("up_proj.scales")}
    for k, v in ref.items():
        assert torch.equal(tensors[k], v)
    assert torch.equal(logits(load_quantized(path)), logits(fp4))  # a new read sees the new version


def _qc_of(path):
    from afpq_plugins.core.checkpoint import read_quant_config

    return read_quant_config(str(path))[1]


# -- validate, then mutate ---------------------------------------------------------------------------------
def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=128)).eval()


def _modules(m):
    return {n: mod for n, mod in m.named_modules()}


def test_rtn_with_a_nan_in_the_last_layer_leaves_the_model_untouched():
    m = _model()
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    before = _modules(m)
    with pytest.raises(ValueError, match="down_proj.weight"):
        quantize_model_rtn(m, "nf4", 32, progress=False)
    assert _modules(m) == before


def test_rtn_3bit_packing_constraint_checked_before_any_change():
    m = _model()
    m.model.layers[1].mlp.down_proj = nn.Linear(48, 64, bias=False)  # 48 is not a multiple of 32
    before = _modules(m)
    with pytest.raises(ValueError, match="down_proj.*multiple of 32"):
        quantize_model_rtn(m, "nf3", 16, progress=False)
    assert _modules(m) == before


def test_rtn_failure_midway_puts_every_layer_back(monkeypatch):
    m = _model()
    before = _modules(m)
    real = AFPQLinear.from_linear.__func__
    calls = []

    def flaky(cls, lin, *a, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("out of memory (simulated)")
        return real(cls, lin, *a, **kw)

    monkeypatch.setattr(AFPQLinear, "from_linear", classmethod(flaky))
    with pytest.raises(RuntimeError, match="simulated"):
        quantize_model_rtn(m, "nf4", 32, progress=False)
    assert _modules(m) == before


# -- crash-safe saves -----------------------------------------------------------------------------------------
def _t():
    return {"w": torch.ones(2)}


def _qcd(fmt="nf4"):
    from afpq_plugins.core.checkpoint import AFPQConfigDict

    return AFPQConfigDict(format=fmt, bits=4, group_size=32, mode="afpq")


def test_a_crash_between_the_renames_is_recovered_on_the_next_save_or_load(tmp_path):
    out = tmp_path / "ck"
    write_checkpoint(str(out), _t(), {"v": 1}, _qcd())
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    # the state a kill between the two renames leaves: target gone, both versions hidden
    os.replace(out, tmp_path / ".ck.old-abc123")
    write_checkpoint(str(tmp_path / "scratch"), _t(), {"v": 2}, _qcd("fp4"))
    os.replace(tmp_path / "scratch", tmp_path / ".ck.tmp-def456")
    with CheckpointSnapshot(str(out)) as snap:  # a load restores the last complete version
        assert snap.config["v"] == 1
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # and removes the leftovers


def test_stale_temporary_folders_are_removed_by_the_next_save(tmp_path):
    (tmp_path / ".ck.tmp-dead01").mkdir()
    (tmp_path / ".ck.tmp-dead01" / "model.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / ".ck.old-dead02").mkdir()
    write_checkpoint(str(tmp_path / "ck"), _t(), {}, _qcd())
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    assert recover_interrupted_save(str(tmp_path / "ck")) is None  # nothing left to do


def test_files_and_folders_are_flushed_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        synced.append(("rename", os.path.basename(str(dst))))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_checkpoint(str(tmp_path / "ck"), _t(), {}, _qcd())
    rename = synced.index(("rename", "ck"))
    assert {"config.json", "model.safetensors"} <= set(synced[:rename])
    assert any(str(s).startswith(".ck.tmp-") for s in synced[:rename])  # the new folder itself
    assert tmp_path.name in synced[rename + 1:]  # the parent, after the rename


@pytest.mark.parametrize("content", ["[1, 2]", '{"quantization_config": "afpq"}', "{"])
def test_afpq_eval_loader_names_a_malformed_config(tmp_path, content):
    """``afpq eval``'s loader used to end in AttributeError on these."""
    from afpq_plugins.cli import _load_any

    (tmp_path / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match="config.json"):
        _load_any(str(tmp_path))
