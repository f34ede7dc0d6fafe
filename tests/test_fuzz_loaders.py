"""Fuzz: damaged and hostile variants of a tiny checkpoint through every loader.

A seeded generator corrupts the safetensors header (dtypes, shapes, offsets, entries,
metadata, nesting), the file's bytes (truncation, trailing data, header length), the
``quantization_config`` values and the model config. Each variant goes through
``afpq_plugins.model.load_quantized`` and (for the variants that reach the plugin)
transformers' ``from_pretrained`` after ``import afpq_plugins``. The only acceptable
outcomes: a model whose logits equal the unmodified checkpoint's, or
:class:`~afpq_plugins.core.checkpoint.CheckpointError` (the project's named error).
Any other exception fails the test and prints the variant.

``AFPQ_FUZZ_SEED`` / ``AFPQ_FUZZ_N`` change the seed and the number of variants.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from _ckpt_tools import join, logits, read_config, split, tiny_llama_checkpoint, write_config  # noqa: E402
from afpq_plugins.core.checkpoint import CheckpointError  # noqa: E402
from afpq_plugins.core.safetensors_io import load_file, save_file  # noqa: E402
from afpq_plugins.model import load_quantized  # noqa: E402

SEED = int(os.environ.get("AFPQ_FUZZ_SEED", "20261126"))
N = int(os.environ.get("AFPQ_FUZZ_N", "72"))
N_HF = max(N // 3, 8)

_VALUES = [None, -1, 0, 1, 3, 4, 4.0, 1.5, 1e308, 2**70, "x", "", "nf4", "fp4", "int4", "zp", "awq", True,
           [], {}, [None], ["model"], {"a": 1}]


def _weights(folder):
    return os.path.join(folder, "model.safetensors")


# -- mutation operators: each edits a copy of the checkpoint folder; returns a description ----------
def _header_field(rng, folder):
    h, _, d = split(_weights(folder))
    key = rng.choice(sorted(k for k in h if k != "__metadata__"))
    field = rng.choice(["dtype", "shape", "data_offsets"])
    e = h[key]
    b, en = e["data_offsets"]
    pools = {
        "dtype": ["F32", "F16", "BF16", "I32", "U8", "F64", "I64", "X9", 5, None, ["F32"]],
        "shape": [[], [-1], [d * 2 for d in e["shape"]], e["shape"] + [1], [float(x) for x in e["shape"]],
                  ["3"], None, [2**40], [0], [x for x in e["shape"]][::-1]],
        "data_offsets": [[b + 1, en + 1], [en, b], [b, en + 4], [-b - 1, en], [0, en - b], [b, en, 0], "x",
                         [b + 0.5, en], [b, 2**66]],
    }
    e[field] = rng.choice(pools[field])
    join(_weights(folder), h, d)
    return f"header {key}.{field} = {e[field]!r:.80}"


def _header_entry(rng, folder):
    h, _, d = split(_weights(folder))
    keys = sorted(k for k in h if k != "__metadata__")
    key = rng.choice(keys)
    op = rng.choice(["delete", "rename", "duplicate", "metadata", "nest"])
    text = None
    if op == "delete":
        del h[key]
    elif op == "rename":
        h[key + "x"] = h.pop(key)
    elif op == "duplicate":
        other = rng.choice(keys)
        text = json.dumps(h)[:-1] + f',{json.dumps(key)}:{json.dumps(h[other])}}}'
    elif op == "metadata":
        h["__metadata__"] = rng.choice([1, [], {"a": 1}, {"a": None}, "x", {"a": {"b": "c"}}])
    else:
        depth = rng.choice([50, 5000, 200000])
        text = json.dumps(h)[:-1] + ',"deep":' + "[" * depth + "]" * depth + "}"
    join(_weights(folder), h, d, raw_text=text)
    return f"header {op} {key}"


def _bytes(rng, folder):
    p = _weights(folder)
    raw = open(p, "rb").read()
    op = rng.choice(["truncate", "trailing", "hlen"])
    if op == "truncate":
        raw = raw[: rng.randrange(0, len(raw))]
    elif op == "trailing":
        raw = raw + bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 64])))
    else:
        raw = rng.choice([0, 1, 7, 2**63, len(raw)]).to_bytes(8, "little") + raw[8:]
    with open(p, "wb") as fh:
        fh.write(raw)
    return f"bytes {op}"


def _quant_config(rng, folder):
    cfg = read_config(folder)
    qc = cfg["quantization_config"]
    key = rng.choice(sorted(set(qc) - {"quant_method"}))
    if rng.random() < 0.2:
        del qc[key]
        what = f"del quantization_config.{key}"
    else:
        qc[key] = rng.choice(_VALUES)
        what = f"quantization_config.{key} = {qc[key]!r}"
    write_config(folder, cfg)
    return what


def _scales(rng, folder):
    t = load_file(_weights(folder))
    meta = split(_weights(folder))[0].get("__metadata__")
    key = rng.choice(sorted(k for k in t if k.endswith(("scales", "scales_neg", "g_idx"))))
    x = t[key].clone()
    i = rng.randrange(x.numel())
    val = rng.choice([float("nan"), float("inf"), -1.0, -1e-3]) if x.is_floating_point() else rng.choice([-1, 99])
    x.view(-1)[i] = val
    t[key] = x
    save_file(t, _weights(folder), metadata=meta)
    return f"{key}[{i}] = {val}"


def _model_config(rng, folder):
    cfg = read_config(folder)
    key = rng.choice(["hidden_size", "vocab_size", "intermediate_size", "num_hidden_layers", "num_key_value_heads",
                      "model_type", "tie_word_embeddings"])
    cfg[key] = rng.choice([0, -1, 3, 2**40, 1.5, "x", None, [], "llama", "gpt2"])
    write_config(folder, cfg)
    return f"config.{key} = {cfg[key]!r}"


def _whole_config(rng, folder):
    cfg = read_config(folder)
    if rng.random() < 0.5:
        write_config(folder, rng.choice(["[]", "null", '"x"', "{", "", "[" * 100000]))
        return "config.json replaced"
    cfg["quantization_config"] = rng.choice(["afpq", [], 5, None])
    write_config(folder, cfg)
    return f"quantization_config = {cfg['quantization_config']!r}"


#: (operator, whether transformers' own from_pretrained reaches the plugin with it)
_OPS = [(_header_field, True), (_header_entry, True), (_bytes, True), (_quant_config, True), (_scales, True),
        (_model_config, False), (_whole_config, False)]


def _variants(n, hf_only=False, seed=SEED):
    rng = random.Random(seed)
    ops = [op for op, hf in _OPS if hf or not hf_only]
    return [(i, ops[i % len(ops)], rng.randrange(2**32)) for i in range(n)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path, model = tiny_llama_checkpoint(tmp_path_factory.mktemp("fuzz") / "base")
    return path, logits(model)


def _run(loader, base_path, ref, variants, tmp_path):
    bad = []
    for i, op, seed in variants:
        folder = str(tmp_path / f"v{i}")
        shutil.copytree(base_path, folder)
        what = op(random.Random(seed), folder)
        try:
            model = loader(folder)
        except CheckpointError:
            pass
        except Exception as exc:  # noqa: BLE001 - the point of the test
            bad.append(f"{what}: {type(exc).__name__}: {str(exc)[:200]}")
        else:
            if not torch.equal(logits(model), ref):
                bad.append(f"{what}: loaded, but the logits differ from the checkpoint's")
        shutil.rmtree(folder, ignore_errors=True)
    assert not bad, f"{len(bad)} of {len(variants)} variants (seed {SEED}):\n" + "\n".join(bad)


def test_fuzz_project_loader(base, tmp_path):
    _run(load_quantized, *base, _variants(N), tmp_path)


def test_fuzz_transformers_loader(base, tmp_path):
    import afpq_plugins  # noqa: F401  (registers quant_method "afpq")
    from transformers import AutoModelForCausalLM

    _run(AutoModelForCausalLM.from_pretrained, *base, _variants(N_HF, hf_only=True, seed=SEED + 1), tmp_path)
