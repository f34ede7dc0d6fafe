"""Checkpoint format: safetensors bytes, config validation, per-layer tensors, atomic writes.

The reference reader/writer is the real ``safetensors`` package.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file as st_save_file

import afpq_plugins.core.atomic_dir as atomic_dir
from afpq_plugins.core.checkpoint import (
    AFPQConfigDict,
    CheckpointError,
    expected_layer_tensors,
    load_checkpoint_tensors,
    read_quant_config,
    validate_layer_tensors,
    write_checkpoint,
)
from afpq_plugins.core.safetensors_io import SafetensorsError, load_file, read_header, save_file


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.q.qweight": torch.randint(-2**31, 2**31 - 1, (8, 16), dtype=torch.int32, generator=g),
        "model.layers.0.q.scales": torch.rand(2, 16, generator=g).half(),
        "model.layers.0.q.scales_neg": torch.rand(2, 16, generator=g).half(),
        "model.layers.0.q.g_idx": (torch.arange(64) // 32).to(torch.int32),
        "model.embed.weight": torch.randn(10, 6, generator=g),
        "model.norm.weight": torch.randn(6, generator=g).to(torch.bfloat16),
        "a.f64": torch.randn(3, generator=g).double(),
        "a.i64": torch.tensor([-(2**62), 5]),
        "a.u8": torch.tensor([[0, 255]], dtype=torch.uint8),
        "a.i8": torch.tensor([-128, 127], dtype=torch.int8),
        "a.i16": torch.tensor([-300, 300], dtype=torch.int16),
        "a.bool": torch.tensor([True, False, True]),
        "a.scalar": torch.tensor(3.5),
        "a.empty": torch.zeros(0, 4),
        "a.noncontig": torch.arange(12.0).view(3, 4).t(),
    }


def _qc(**kw):
    base = dict(format="nf4", bits=4, group_size=32, mode="afpq")
    base.update(kw)
    return AFPQConfigDict(**base)


def _same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert tuple(a[k].shape) == tuple(b[k].shape), k
        assert torch.equal(a[k], b[k]), k


# -- safetensors -------------------------------------------------------------------------------------------
def test_save_is_deterministic(tmp_path):
    t = _tensors()
    save_file(t, tmp_path / "a.safetensors", metadata={"format": "pt", "x": "1"})
    reordered = dict(reversed(list(t.items())))
    save_file(reordered, tmp_path / "b.safetensors", metadata={"x": "1", "format": "pt"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_real_safetensors_reads_our_file(tmp_path):
    t = _tensors()
    path = str(tmp_path / "m.safetensors")
    save_file(t, path, metadata={"format": "pt", "quant_method": "afpq"})
    _same(st_load_file(path), {k: v.contiguous() for k, v in t.items()})
    with safe_open(path, framework="pt") as fh:
        assert fh.metadata() == {"format": "pt", "quant_method": "afpq"}
    # And our reader agrees.
    _same(load_file(path), {k: v.contiguous() for k, v in t.items()})


def test_we_read_real_safetensors_files(tmp_path):
    t = {k: v.contiguous() for k, v in _tensors().items()}
    path = str(tmp_path / "ref.safetensors")
    st_save_file(t, path, metadata={"format": "pt"})
    _same(load_file(path), t)
    _, meta, _ = read_header(path)
    assert meta == {"format": "pt"}


def test_header_is_aligned_and_sorted(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"b": torch.ones(3, dtype=torch.uint8), "a": torch.ones(1)}, path)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert header["a"]["data_offsets"] == [0, 4] and header["b"]["data_offsets"] == [4, 7]
    assert len(raw) == 8 + n + 7


def test_truncated_file_names_the_tensor(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"alpha": torch.ones(4), "zeta.scales_neg": torch.ones(16, dtype=torch.float16)}, path)
    raw = path.read_bytes()
    path.write_bytes(raw[:-5])  # cut into the last tensor (sorted by name)
    with pytest.raises(SafetensorsError) as exc:
        load_file(str(path))
    assert "'zeta.scales_neg'" in str(exc.value) and "truncated" in str(exc.value)
    assert str(path) in str(exc.value)
    # Through the checkpoint reader as well.
    os.rename(path, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="zeta.scales_neg"):
        load_checkpoint_tensors(str(tmp_path))


def test_truncated_header_and_bad_entries(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"\x05\x00")
    with pytest.raises(SafetensorsError, match="truncated"):
        load_file(str(path))
    save_file({"w": torch.ones(4)}, path)
    raw = path.read_bytes()
    path.write_bytes(raw[:20])
    with pytest.raises(SafetensorsError, match="header"):
        load_file(str(path))
    # A byte count that does not match the shape names the tensor.
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["w"]["shape"] = [5]
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(len(hb).to_bytes(8, "little") + hb + raw[8 + n:])
    with pytest.raises(SafetensorsError, match="'w'"):
        load_file(str(path))


def test_unsupported_dtype_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="'c'"):
        save_file({"c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "x.safetensors")


# -- AFPQConfigDict ------------------------------------------------------------------------------------------
def test_config_round_trip():
    qc = _qc(layout="awq", quantized_modules=["a", "b"], extra={"damp": 0.01})
    d = qc.to_dict()
    assert d["quant_method"] == "afpq" and d["version"] == 1 and d["damp"] == 0.01
    assert d["table"] == [float(v) for v in qc.fmt.values]
    back = AFPQConfigDict.from_dict(json.loads(json.dumps(d)))
    assert back.to_dict() == d


@pytest.mark.parametrize("patch, key", [
    ({"quant_method": "gptq"}, "quant_method"),
    ({"quant_method": None}, "quant_method"),
    ({"bits": 3}, "bits"),
    ({"layout": "marlin"}, "layout"),
    ({"mode": "asym"}, "mode"),
    ({"format": "int4", "bits": 4, "mode": "afpq", "table": None}, "mode"),
    ({"scale_dtype": "float8"}, "scale_dtype"),
    ({"group_size": 0}, "group_size"),
    ({"group_size": "128"}, "group_size"),
    ({"version": 2}, "version"),
    ({"table": [0.0] * 16}, "table"),
])
def test_config_validation_names_the_key(patch, key):
    d = _qc().to_dict()
    d.update(patch)
    if d.get("table") is None:
        d.pop("table", None)
    with pytest.raises(CheckpointError) as exc:
        AFPQConfigDict.from_dict(d, source="cfg.json quantization_config")
    msg = str(exc.value)
    assert key in msg, msg
    assert "cfg.json" in msg


def test_config_unknown_format_names_the_key():
    d = _qc().to_dict()
    d["format"] = "nf5"
    d.pop("table")
    with pytest.raises(CheckpointError) as exc:
        AFPQConfigDict.from_dict(d)
    msg = str(exc.value)
    assert "format" in msg and "'nf5'" in msg and "quantization_config" in msg


def test_config_unknown_format_with_unusable_table(restore_format_registry):
    """An unknown name with an unsorted (fp-style) table cannot register as a custom grid."""
    d = _qc(format="fp4", bits=4).to_dict()
    d["format"] = "fp4x"
    with pytest.raises(CheckpointError) as exc:
        AFPQConfigDict.from_dict(d)
    assert "fp4x" in str(exc.value)


def test_config_missing_keys_named():
    d = _qc().to_dict()
    for k in ("format", "group_size"):
        d.pop(k)
    with pytest.raises(CheckpointError) as exc:
        AFPQConfigDict.from_dict(d)
    assert "format" in str(exc.value) and "group_size" in str(exc.value)
    with pytest.raises(CheckpointError, match="JSON object"):
        AFPQConfigDict.from_dict([1, 2])


def test_config_direct_construction_validates():
    with pytest.raises(CheckpointError, match="quantization_config.bits"):
        _qc(bits=3)
    with pytest.raises(CheckpointError, match="quantization_config.layout"):
        _qc(layout="exl2")
    with pytest.raises(CheckpointError, match="quant_method"):
        _qc(quant_method="awq")


def test_custom_format_reloads_from_its_table(restore_format_registry):
    from afpq_plugins.core.formats import get_format, register_format

    table = [-1.0, -0.25, 0.0, 0.5]
    register_format("t_ckpt", table)
    d = _qc(format="t_ckpt", bits=2).to_dict()
    assert d["table"] == table
    del restore_format_registry._REGISTRY["t_ckpt"]  # a fresh process
    qc = AFPQConfigDict.from_dict(d)
    assert list(qc.fmt.values) == table and list(get_format("t_ckpt").values) == table


# -- per-layer tensors ------------------------------------------------------------------------------------
def test_expected_layer_tensors():
    exp = expected_layer_tensors(_qc(), 64, 16, bias=True)
    assert exp == {
        "qweight": ((8, 16), torch.int32),
        "scales": ((2, 16), torch.float16),
        "scales_neg": ((2, 16), torch.float16),
        "g_idx": ((64,), torch.int32),
        "bias": ((16,), None),
    }
    exp = expected_layer_tensors(_qc(format="int3", bits=3, mode="zp", layout="gptq", group_size=-1,
                                     scale_dtype="bfloat16"), 64, 16, bias=False)
    assert exp == {
        "qweight": ((6, 16), torch.int32),
        "scales": ((1, 16), torch.bfloat16),
        "zeros": ((1, 16), torch.bfloat16),
        "g_idx": ((64,), torch.int32),
    }
    exp = expected_layer_tensors(_qc(mode="sym", layout="awq"), 64, 16, bias=False)
    assert exp == {"qweight": ((64, 2), torch.int32), "scales": ((2, 16), torch.float16)}


def _layer_tensors(name="m.l"):
    return {
        f"{name}.qweight": torch.zeros(8, 16, dtype=torch.int32),
        f"{name}.scales": torch.ones(2, 16, dtype=torch.float16),
        f"{name}.scales_neg": torch.ones(2, 16, dtype=torch.float16),
        f"{name}.g_idx": (torch.arange(64) // 32).to(torch.int32),
    }


def test_validate_layer_tensors_names_the_tensor():
    qc = _qc()
    validate_layer_tensors("m.l", _layer_tensors(), qc, 64, 16, bias=False)
    t = _layer_tensors()
    del t["m.l.scales_neg"]
    with pytest.raises(CheckpointError, match=r"'m\.l\.scales_neg' is missing"):
        validate_layer_tensors("m.l", t, qc, 64, 16, bias=False, source="ck")
    t = _layer_tensors()
    t["m.l.scales"] = torch.ones(16, 2, dtype=torch.float16)
    with pytest.raises(CheckpointError, match=r"'m\.l\.scales' has shape \(16, 2\), expected \(2, 16\)"):
        validate_layer_tensors("m.l", t, qc, 64, 16, bias=False)
    t = _layer_tensors()
    t["m.l.qweight"] = t["m.l.qweight"].long()
    with pytest.raises(CheckpointError, match=r"'m\.l\.qweight' has dtype"):
        validate_layer_tensors("m.l", t, qc, 64, 16, bias=False)
    t = _layer_tensors()
    t["m.l.scales_neg"][1, 3] = float("nan")
    with pytest.raises(CheckpointError, match=r"'m\.l\.scales_neg' holds NaN"):
        validate_layer_tensors("m.l", t, qc, 64, 16, bias=False)
    t = _layer_tensors()
    t["m.l.g_idx"][5] = 2
    with pytest.raises(CheckpointError, match=r"m\.l\.g_idx"):
        validate_layer_tensors("m.l", t, qc, 64, 16, bias=False)
    with pytest.raises(CheckpointError, match=r"'m\.l\.bias' is missing"):
        validate_layer_tensors("m.l", _layer_tensors(), qc, 64, 16, bias=True)


def test_validate_layer_tensors_accepts_placeholders_or_none_and_refuses_real_tensors():
    qc = _qc()
    with_ph = {**_layer_tensors(), "m.l.weight": PLACEHOLDER.clone(), "m.l.qzeros": PLACEHOLDER.clone()}
    validate_layer_tensors("m.l", with_ph, qc, 64, 16, bias=False)
    validate_layer_tensors("m.l", _layer_tensors(), qc, 64, 16, bias=False)  # written before the placeholders
    for key, bad in (("m.l.weight", torch.zeros(16, 64)), ("m.l.weight", torch.zeros(1)),
                     ("m.l.qzeros", torch.zeros(2, 2, dtype=torch.int32)), ("m.l.qzeros", torch.zeros(1, 1, dtype=torch.uint8))):
        with pytest.raises(CheckpointError, match=re.escape(repr(key)) + r".*quantized layer 'm\.l'"):
            validate_layer_tensors("m.l", {**with_ph, key: bad}, qc, 64, 16, bias=False, source="ck")


# -- checkpoint folders ------------------------------------------------------------------------------------
MODEL_CFG = {"model_type": "llama", "hidden_size": 64, "zeta": [1, 2], "alpha": {"b": 1, "a": 2}}


# the refusal placeholders, spelled out independently of the module under test
PLACEHOLDER = torch.tensor([0], dtype=torch.uint8)


def test_write_checkpoint_deterministic_and_readable(tmp_path):
    t = _tensors()
    a = write_checkpoint(str(tmp_path / "a"), t, MODEL_CFG, _qc())
    b = write_checkpoint(str(tmp_path / "b"), dict(reversed(list(t.items()))), dict(reversed(list(MODEL_CFG.items()))), _qc())
    for f in ("config.json", "model.safetensors"):
        assert open(os.path.join(a, f), "rb").read() == open(os.path.join(b, f), "rb").read(), f
    assert sorted(os.listdir(a)) == ["config.json", "model.safetensors"]
    cfg, qc = read_quant_config(a)
    assert cfg["hidden_size"] == 64 and qc.to_dict() == _qc().to_dict()
    # quantized_modules is empty here: the quantized layer is found from its .qweight
    want = {k: v.contiguous() for k, v in t.items()}
    want.update({"model.layers.0.q.weight": PLACEHOLDER, "model.layers.0.q.qzeros": PLACEHOLDER})
    _same(st_load_file(os.path.join(a, "model.safetensors")), want)
    _same(load_checkpoint_tensors(a), want)
    with safe_open(os.path.join(a, "model.safetensors"), framework="pt") as fh:
        assert fh.metadata()["quant_method"] == "afpq"
        assert "afpq_plugins" in fh.metadata()["afpq_placeholder"]


def test_refusal_placeholders_for_each_quantized_module(tmp_path):
    """Every module in quantized_modules gets <name>.weight and <name>.qzeros = uint8 [0];
    a dict that already holds them gives the same bytes; a real tensor under either key is refused."""
    t = {**_layer_tensors("m.a"), **_layer_tensors("m.b"), "m.norm.weight": torch.ones(4)}
    qc = _qc(quantized_modules=["m.a", "m.b"])
    out = write_checkpoint(str(tmp_path / "ck"), t, MODEL_CFG, qc)
    with safe_open(os.path.join(out, "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
        assert keys == set(t) | {"m.a.weight", "m.a.qzeros", "m.b.weight", "m.b.qzeros"}
        for k in ("m.a.weight", "m.a.qzeros", "m.b.weight", "m.b.qzeros"):
            got = fh.get_tensor(k)
            assert got.dtype == torch.uint8 and torch.equal(got, PLACEHOLDER), k
    again = write_checkpoint(str(tmp_path / "again"), load_checkpoint_tensors(out), MODEL_CFG, qc)
    assert _snapshot(again) == _snapshot(out)
    for key, bad in (("m.b.weight", torch.zeros(16, 64)), ("m.a.qzeros", torch.zeros(2, 2, dtype=torch.int32)),
                     ("m.a.weight", torch.zeros(2, dtype=torch.uint8))):
        with pytest.raises(CheckpointError, match=re.escape(repr(key))):
            write_checkpoint(str(tmp_path / "bad"), {**t, key: bad}, MODEL_CFG, qc)
    assert not (tmp_path / "bad").exists()


def _snapshot(folder):
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


def test_existing_folder_refused_without_overwrite(tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_checkpoint(str(out), _tensors(), MODEL_CFG, _qc())
    assert _snapshot(out) == {"keep.txt": b"precious"}
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    # An empty folder is fine.
    empty = tmp_path / "empty"
    empty.mkdir()
    write_checkpoint(str(empty), _tensors(), MODEL_CFG, _qc())
    assert sorted(os.listdir(empty)) == ["config.json", "model.safetensors"]
    # A file in the way is refused too.
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):
        write_checkpoint(str(tmp_path / "file"), _tensors(), MODEL_CFG, _qc())


def test_overwrite_replaces_the_folder(tmp_path):
    out = tmp_path / "ck"
    write_checkpoint(str(out), _tensors(), MODEL_CFG, _qc(mode="sym"))
    (out / "stale.bin").write_bytes(b"old")
    write_checkpoint(str(out), _tensors(), MODEL_CFG, _qc(), overwrite=True)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]  # the old content is gone
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporary or backup folders left


def test_overwrite_refuses_what_is_not_a_checkpoint(tmp_path):
    """overwrite=True replaces an AFPQ checkpoint or an empty folder, nothing else (a user who
    swaps the CLI's two paths must not lose the source model folder)."""
    (tmp_path / "file").write_text("not a folder")
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "llama"}')
    (src / "model.safetensors").write_bytes(b"float weights")
    for target in ("file", "model"):
        before = _snapshot(tmp_path / target) if target == "model" else (tmp_path / target).read_text()
        with pytest.raises(CheckpointError, match="not an AFPQ checkpoint|is a file"):
            write_checkpoint(str(tmp_path / target), _tensors(), MODEL_CFG, _qc(), overwrite=True)
        after = _snapshot(tmp_path / target) if target == "model" else (tmp_path / target).read_text()
        assert after == before
    assert sorted(os.listdir(tmp_path)) == ["file", "model"]


def test_failing_extra_writer_leaves_old_folder_intact(tmp_path):
    out = tmp_path / "ck"
    write_checkpoint(str(out), _tensors(), MODEL_CFG, _qc())
    before = _snapshot(out)

    def boom(tmp):
        with open(os.path.join(tmp, "tokenizer.json"), "w") as fh:
            fh.write("{}")
        raise RuntimeError("tokenizer save failed")

    with pytest.raises(RuntimeError, match="tokenizer save failed"):
        write_checkpoint(str(out), {"x": torch.ones(2)}, {"other": 1}, _qc(mode="sym"), extra_writer=boom, overwrite=True)
    assert _snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    # Without an old folder: nothing is left behind either.
    with pytest.raises(RuntimeError):
        write_checkpoint(str(tmp_path / "new"), _tensors(), MODEL_CFG, _qc(), extra_writer=boom)
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_failed_final_rename_restores_the_old_folder(tmp_path, monkeypatch):
    """If moving the new folder into place fails after the old one was moved aside, the old
    folder must come back: the existing checkpoint is replaced only by a complete new one."""
    out = tmp_path / "ck"
    write_checkpoint(str(out), _tensors(), MODEL_CFG, _qc())
    before = _snapshot(out)
    real_replace = os.replace

    def flaky_replace(src, dst):
        if os.path.basename(str(src)).startswith(".ck.tmp-"):
            raise OSError("simulated rename failure")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    monkeypatch.setattr(atomic_dir, "_exchange", lambda a, b: False)  # the two-rename path
    with pytest.raises(OSError, match="simulated"):
        write_checkpoint(str(out), {"x": torch.ones(2)}, {}, _qc(), overwrite=True)
    monkeypatch.undo()
    assert _snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_extra_writer_files_land_in_the_checkpoint(tmp_path):
    def extra(tmp):
        with open(os.path.join(tmp, "tokenizer.json"), "w") as fh:
            fh.write('{"v": 1}')

    out = write_checkpoint(str(tmp_path / "ck"), _tensors(), MODEL_CFG, _qc(), extra_writer=extra)
    assert open(os.path.join(out, "tokenizer.json")).read() == '{"v": 1}'


def test_read_quant_config_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        read_quant_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_quant_config(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="quantization_config"):
        read_quant_config(str(tmp_path))
    d = _qc().to_dict()
    d["quant_method"] = "gptq"
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": d}))
    with pytest.raises(CheckpointError) as exc:
        read_quant_config(str(tmp_path))
    assert "quant_method" in str(exc.value) and "'gptq'" in str(exc.value) and "config.json" in str(exc.value)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint_tensors(str(tmp_path))
