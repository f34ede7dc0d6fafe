"""Real-size paths on tiny models (issue 23): sharded checkpoints, streaming RTN, dtypes,
tied heads, MoE coverage, non-regular files.

References: the in-memory RTN path (streaming must give the same bytes), the single-file
checkpoint (a sharded one must load to the same logits), transformers' own sharded
naming, and hand-damaged folders (each a named error).
"""

from __future__ import annotations

import json
import os
import shutil
import threading

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from _ckpt_tools import logits  # noqa: E402
from _tiny import tiny_llama, tiny_tokenizer  # noqa: E402
from afpq_plugins import cli  # noqa: E402
from afpq_plugins.core.checkpoint import (  # noqa: E402
    INDEX_NAME,
    CheckpointError,
    CheckpointSnapshot,
    load_checkpoint_tensors,
    parse_size,
    write_checkpoint,
)
from afpq_plugins.core.spec import QuantSpec  # noqa: E402
from afpq_plugins.model import load_quantized, quantize_model_rtn, save_quantized  # noqa: E402
from afpq_plugins.streaming import NotStreamable, quantize_rtn_streaming  # noqa: E402

SPEC = QuantSpec("nf4", 32)
SHARD = "40KB"  # forces several shards on the tiny models


def _float_folder(path, dtype=torch.bfloat16, tie=False, shard="30KB"):
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), tie=tie).to(dtype)
    model.save_pretrained(str(path), max_shard_size=shard)
    tok.save_pretrained(str(path))
    return str(path)


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.numel() else t


def _shards(path):
    return sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return _float_folder(tmp_path_factory.mktemp("src") / "bf16")


@pytest.fixture(scope="module")
def streamed(src, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("q") / "nf4")
    quantize_rtn_streaming(src, out, SPEC, max_shard_size=SHARD)
    return out


# -- sizes and names -------------------------------------------------------------------------------
def test_parse_size_follows_transformers():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("1GiB") == 2**30 and parse_size("500MB") == 5 * 10**8
    assert parse_size(123) == 123 and parse_size("40KB") == 40_000
    for bad in ("5 parsecs", "", "-1GB", 0):
        with pytest.raises(ValueError):
            parse_size(bad)


# -- streaming RTN = in-memory RTN, byte for byte ------------------------------------------------
def test_streaming_equals_in_memory_bytes(src, streamed, tmp_path):
    from transformers import AutoModelForCausalLM

    shards = _shards(streamed)
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors", shards
    assert os.path.isfile(os.path.join(streamed, INDEX_NAME))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32) if _tf5() else \
        AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32)
    qc = quantize_model_rtn(model, spec=SPEC, progress=False)
    mem = save_quantized(model, str(tmp_path / "mem"), qc, dtype=torch.bfloat16)
    assert _shards(mem) == ["model.safetensors"]  # default 5GB: one file, as before
    a, b = load_checkpoint_tensors(streamed), load_checkpoint_tensors(mem)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(_raw(a[k]), _raw(b[k])), k
    cfg = json.load(open(os.path.join(streamed, "config.json")))
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    assert cfg["quantization_config"] == json.load(open(os.path.join(mem, "config.json")))["quantization_config"]


def _tf5() -> bool:
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


def test_sharded_checkpoint_loads_like_single_file(streamed, tmp_path):
    """Project loader and transformers plugin read the shards; same logits as the single file."""
    import afpq_plugins  # noqa: F401
    from transformers import AutoModelForCausalLM

    one = str(tmp_path / "one")
    tensors = load_checkpoint_tensors(streamed)
    with CheckpointSnapshot(streamed) as snap:
        cfg, qc = dict(snap.config), snap.quant_config()
    cfg.pop("quantization_config")
    write_checkpoint(one, tensors, cfg, qc)
    assert _shards(one) == ["model.safetensors"]
    ref = load_quantized(one)
    assert next(ref.parameters()).dtype == torch.bfloat16  # the source's dtype, kept
    want = logits(ref)
    assert torch.equal(logits(load_quantized(streamed)), want)
    hf_one = logits(AutoModelForCausalLM.from_pretrained(one))
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(streamed)), hf_one)
    assert (hf_one - want).abs().max() < 0.05  # transformers' own dtype choice: same model


def test_streaming_checks_each_layer_once(src, tmp_path, monkeypatch):
    from afpq_plugins.core import spec as spec_mod

    calls = []
    real = spec_mod.QuantSpec.layer

    def layer(self, in_f, out_f, name="weight", layout=None):
        calls.append(name)
        return real(self, in_f, out_f, name, layout)

    monkeypatch.setattr(spec_mod.QuantSpec, "layer", layer)
    res = quantize_rtn_streaming(src, str(tmp_path / "o"), SPEC, max_shard_size=SHARD)
    assert len(calls) == len(res.qc.quantized_modules) == 14


def test_non_finite_weight_stops_the_stream_and_writes_nothing(src, tmp_path):
    from afpq_plugins.core.safetensors_io import load_file, save_file

    bad = _copy(src, tmp_path / "nan")
    key = "model.layers.1.mlp.up_proj.weight"
    with CheckpointSnapshot(bad) as snap:
        f = snap.source(key)
    t = load_file(f)
    t[key][3, 5] = float("nan")
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=key):
        quantize_rtn_streaming(bad, str(tmp_path / "o"), SPEC, max_shard_size=SHARD)
    assert sorted(os.listdir(tmp_path)) == ["nan"]


def test_output_search_and_pickled_sources_do_not_stream(src, tmp_path):
    with pytest.raises(NotStreamable, match="output scale search"):
        quantize_rtn_streaming(src, str(tmp_path / "o"), QuantSpec("nf4", 32, scale_search="output"))
    pick = tmp_path / "pickled"
    pick.mkdir()
    shutil.copyfile(os.path.join(src, "config.json"), pick / "config.json")
    torch.save({}, pick / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=f"{pick}: no model.safetensors"):
        quantize_rtn_streaming(str(pick), str(tmp_path / "o"), SPEC)


# -- damaged shards and index: named errors, in every loader ---------------------------------------
def _copy(src, dst):
    shutil.copytree(src, str(dst))
    return str(dst)


def _loaders(path):
    import afpq_plugins  # noqa: F401
    from transformers import AutoModelForCausalLM

    return {"project": lambda: load_quantized(path), "transformers": lambda: AutoModelForCausalLM.from_pretrained(path)}


def _second_shard(path):
    return os.path.join(path, _shards(path)[1])


def _truncate(p):
    f = _second_shard(p)
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) - 7)
    return os.path.basename(f)


def _missing(p):
    f = _second_shard(p)
    os.remove(f)
    return os.path.basename(f)


def _bad_index_json(p):
    with open(os.path.join(p, INDEX_NAME), "w") as fh:
        fh.write("{not json")
    return INDEX_NAME


def _index_escapes(p):
    idx = json.load(open(os.path.join(p, INDEX_NAME)))
    k = next(iter(idx["weight_map"]))
    idx["weight_map"][k] = "../elsewhere.safetensors"
    json.dump(idx, open(os.path.join(p, INDEX_NAME), "w"))
    return "elsewhere"


def _index_moves_key(p):
    idx = json.load(open(os.path.join(p, INDEX_NAME)))
    names = sorted(set(idx["weight_map"].values()))
    k = next(k for k, v in idx["weight_map"].items() if v == names[0])
    idx["weight_map"][k] = names[1]
    json.dump(idx, open(os.path.join(p, INDEX_NAME), "w"))
    return k


def _both_layouts(p):
    shutil.copyfile(_second_shard(p), os.path.join(p, "model.safetensors"))
    return "both"


@pytest.mark.parametrize("damage", [_truncate, _missing, _bad_index_json, _index_escapes, _index_moves_key,
                                    _both_layouts])
def test_damaged_sharded_checkpoint_is_a_named_error(streamed, tmp_path, damage):
    path = _copy(streamed, tmp_path / "d")
    what = damage(path)
    for who, load in _loaders(path).items():
        with pytest.raises(CheckpointError) as err:
            load()
        assert what in str(err.value), (who, str(err.value))


def test_foreign_shard_and_stamp_disagreement(streamed, src, tmp_path):
    """A shard of another save (fp4 instead of nf4): its stamp disagrees with config.json."""
    other = str(tmp_path / "fp4")
    quantize_rtn_streaming(src, other, QuantSpec("fp4", 32), max_shard_size=SHARD)
    path = _copy(streamed, tmp_path / "mix")
    name = _shards(path)[1]
    shutil.copyfile(os.path.join(other, name), os.path.join(path, name))
    for who, load in _loaders(path).items():
        with pytest.raises(CheckpointError, match=name) as err:
            load()
        assert "another quantization_config" in str(err.value) or "different saves" in str(err.value), who
    # the config alone changed (fp4 in config.json, nf4 tensors)
    path2 = _copy(streamed, tmp_path / "cfg")
    cfg = json.load(open(os.path.join(path2, "config.json")))
    cfg["quantization_config"].update(format="fp4", table=None)
    cfg["quantization_config"].pop("table")
    json.dump(cfg, open(os.path.join(path2, "config.json"), "w"))
    for who, load in _loaders(path2).items():
        with pytest.raises(CheckpointError, match="model-0000|index.json"):
            load()
    # the index of the other save (same tensor names and shards): its stamp disagrees
    path3 = _copy(streamed, tmp_path / "idx")
    shutil.copyfile(os.path.join(other, INDEX_NAME), os.path.join(path3, INDEX_NAME))
    with pytest.raises(CheckpointError, match="index.json: written with another quantization_config"):
        load_quantized(path3)


# SIGKILL during a sharded save: tests/test_concurrency.py::test_killed_saves_leave_one_complete_version[sharded]


# -- not a regular file: a named error, never a hang ------------------------------------------------
def _no_hang(fn, seconds=20):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it blocks."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "blocked on a non-regular file"
    return box


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
@pytest.mark.parametrize("victim", ["config.json", "model.safetensors", "shard"])
def test_fifo_in_place_of_a_checkpoint_file_is_a_named_error(streamed, tmp_path, capsys, victim):
    sharded = victim == "shard"
    path = _copy(streamed, tmp_path / "f") if sharded else None
    if not sharded:
        path = str(tmp_path / "single")
        write_checkpoint(path, load_checkpoint_tensors(streamed), _cfg_without_qc(streamed), _qc(streamed))
    name = _shards(path)[1] if sharded else victim
    os.remove(os.path.join(path, name))
    os.mkfifo(os.path.join(path, name))
    box = _no_hang(lambda: load_quantized(path))
    assert isinstance(box.get("error"), CheckpointError) and "FIFO" in str(box["error"]) and name in str(box["error"])
    box = _no_hang(lambda: cli.main(["eval", path, "--quiet", "--windows", "1"]))
    assert box.get("value") == 2, box
    err = capsys.readouterr().err
    assert name in err and ("FIFO" in err or "no config.json" in err), err


def _cfg_without_qc(path):
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg.pop("quantization_config")
    return cfg


def _qc(path):
    with CheckpointSnapshot(path) as snap:
        return snap.quant_config()


def test_integer_float_tensor_and_pickled_folder_are_named(streamed, tmp_path, capsys):
    tensors = load_checkpoint_tensors(streamed)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int16)
    bad = str(tmp_path / "int")
    write_checkpoint(bad, tensors, _cfg_without_qc(streamed), _qc(streamed))
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' is stored as torch.int16"):
        load_quantized(bad)
    pick = tmp_path / "pickled"
    pick.mkdir()
    shutil.copyfile(os.path.join(streamed, "config.json"), pick / "config.json")
    cfg = _cfg_without_qc(streamed)
    json.dump(cfg, open(pick / "config.json", "w"))
    torch.save({"x": torch.zeros(1)}, pick / "pytorch_model.bin")
    assert cli.main(["eval", str(pick), "--quiet", "--windows", "1"]) == 2
    err = capsys.readouterr().err
    assert str(pick) in err and "pytorch_model.bin" in err


# -- dtypes and tied heads through the CLI ----------------------------------------------------------
def test_cli_keeps_source_dtype_and_dtype_overrides(src, tmp_path, capsys):
    out = str(tmp_path / "keep")
    assert cli.main(["quantize", src, out, "--group-size", "32", "--max-shard-size", SHARD, "--quiet"]) == 0
    assert "streaming" in capsys.readouterr().out
    t = load_checkpoint_tensors(out)
    assert t["model.embed_tokens.weight"].dtype == torch.bfloat16 and t["model.norm.weight"].dtype == torch.bfloat16
    out2 = str(tmp_path / "f16")
    assert cli.main(["quantize", src, out2, "--group-size", "32", "--dtype", "float16"]) == 0
    err = capsys.readouterr().err
    assert "float tensors written as torch.float16" in err and "quantization in float32 on cpu" in err
    cfg = json.load(open(os.path.join(out2, "config.json")))
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "float16"
    assert load_checkpoint_tensors(out2)["lm_head.weight"].dtype == torch.float16
    assert next(load_quantized(out2).parameters()).dtype == torch.float16
    assert cli.main(["eval", out, "--windows", "1", "--seqlen", "32"]) == 0  # a bf16 checkpoint, in float32
    assert "afpq model evaluated in torch.float32 on cpu" in capsys.readouterr().err


@pytest.mark.parametrize("tie", [True, False])
def test_quantized_head_of_tied_and_untied_models_loads_everywhere(tmp_path, tie):
    """``--skip`` with no value quantizes lm_head; a tied one is untied on purpose (float embedding kept)."""
    import afpq_plugins  # noqa: F401
    from transformers import AutoModelForCausalLM

    src = _float_folder(tmp_path / "src", dtype=torch.float32, tie=tie, shard="5GB")
    out = str(tmp_path / "q")
    assert cli.main(["quantize", src, out, "--group-size", "32", "--skip", "--quiet"]) == 0
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert "lm_head" in cfg["quantization_config"]["quantized_modules"]
    assert cfg["tie_word_embeddings"] is False
    t = load_checkpoint_tensors(out)
    assert t["model.embed_tokens.weight"].dtype == torch.float32 and "lm_head.qweight" in t
    # reference: the in-memory path on the same float model
    ref = AutoModelForCausalLM.from_pretrained(src)
    quantize_model_rtn(ref, spec=QuantSpec("nf4", 32, skip=()), progress=False)
    assert ref.config.tie_word_embeddings is False
    want = logits(ref)
    assert torch.equal(logits(load_quantized(out)), want)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out)), want)


# -- MoE: what stays float is said, --require-all refuses ------------------------------------------
def _tiny_moe(path, arch):
    import transformers

    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, num_experts_per_tok=2, max_position_embeddings=128)
    if arch == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(num_local_experts=4, **common))
    else:
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            num_experts=4, moe_intermediate_size=64, head_dim=16, **common))
    model.eval().save_pretrained(str(path))
    tiny_tokenizer().save_pretrained(str(path))
    return str(path), model


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_moe_coverage_is_stated_and_require_all_refuses(tmp_path, capsys, arch):
    src, model = _tiny_moe(tmp_path / "moe", arch)
    fused = any(p.dim() == 3 for p in model.parameters())  # transformers 5: fused 3-D experts
    out = str(tmp_path / "q")
    assert cli.main(["quantize", src, out, "--group-size", "32"]) == 0
    err = capsys.readouterr().err
    summary = next(line for line in err.splitlines() if line.startswith("quantized "))
    qc = _qc(out)
    experts = [n for n in qc.quantized_modules if ".experts." in n]
    assert summary.startswith(f"quantized {len(qc.quantized_modules)} layers: {len(experts)} expert")
    if fused:
        line = next(line for line in err.splitlines() if line.startswith("float: "))
        n3 = sum(p.numel() for p in model.parameters() if p.dim() == 3)
        share = 100.0 * n3 / sum(p.numel() for p in model.parameters())
        assert f"{share:.1f}% of the model's parameters" in line and "experts" in line
        assert not experts
        assert cli.main(["quantize", src, str(tmp_path / "r"), "--group-size", "32", "--require-all"]) == 2
        assert "--require-all" in capsys.readouterr().err and not os.path.exists(tmp_path / "r")
    else:  # transformers 4.x: nn.Linear experts, quantized like any Linear
        assert len(experts) == 2 * 4 * 3  # 2 layers x 4 experts x (gate, up, down) / (w1, w2, w3)
        assert cli.main(["quantize", src, str(tmp_path / "r"), "--group-size", "32", "--require-all",
                         "--quiet"]) == 0
    x = torch.randint(1, 255, (1, 5))
    assert torch.isfinite(logits(load_quantized(out), x)).all()


def test_tensor_reads_survive_partial_reads(tmp_path, monkeypatch):
    """One read returns at most ~2 GiB on Linux: a large tensor arrives in pieces. With every read
    cut to 7 bytes the tensors still equal what was written; a file cut short is a named error."""
    from afpq_plugins.core import safetensors_io as S
    g = torch.Generator().manual_seed(0)
    want = {"a": torch.randn(5, 13, generator=g), "b": torch.arange(11, dtype=torch.int32),
            "c": torch.randn(3, generator=g).to(torch.bfloat16)}
    path = str(tmp_path / "t.safetensors")
    S.save_file(want, path)
    real, calls = os.preadv, []
    def short(fd, bufs, offset):
        calls.append(offset)
        return real(fd, [bufs[0][:7]], offset)
    monkeypatch.setattr(S.os, "preadv", short)
    got = S.load_file(path)
    assert len(calls) > 40 and set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k])
    infos, _, start = S.read_header(path)
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        size = fh.tell()
    with open(path, "r+b") as fh:
        fh.truncate(size - 3)
    with S.open_regular(path) as fh, pytest.raises(S.SafetensorsError, match=r"c.*short read"):
        S.read_tensor(fh, infos["c"], start, "c")
