"""The CLI's engine choice on the legacy venv: a model type AutoGPTQ 0.7.1 / AutoAWQ 0.2.9 do
not know (Gemma 3) and an engine of the modern venv are one-line errors naming the type,
the engine and where another engine is."""

from __future__ import annotations

import pytest

pytest.importorskip("auto_gptq")
transformers = pytest.importorskip("transformers")

from _tiny import tiny_tokenizer  # noqa: E402

from afpq_plugins.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = tiny_tokenizer()
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    path = str(tmp_path_factory.mktemp("gemma3") / "model")
    Gemma3ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("method,engine", [("gptq", "AutoGPTQ 0.7.1"), ("awq", "AutoAWQ 0.2.9")])
def test_unsupported_type_names_type_engine_and_alternative(gemma3, tmp_path, capsys, method, engine):
    assert main(["quantize", gemma3, str(tmp_path / "o"), "--method", method, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"'gemma3_text' is not supported by {engine}" in err
    assert "gptqmodel is not installed here: use .venv-modern" in err
    assert not (tmp_path / "o").exists()


def test_modern_engine_missing_here(gemma3, tmp_path, capsys):
    assert main(["quantize", gemma3, str(tmp_path / "o"), "--method", "gptq", "--backend", "gptqmodel"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gptqmodel is not installed in this environment" in err and ".venv-modern" in err


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from _tiny import tiny_llama_folder

    return tiny_llama_folder(str(tmp_path_factory.mktemp("llama") / "model"))


@pytest.mark.parametrize("method,fmt,extra,layout", [
    ("awq", "nf4", [], "awq"),  # AutoAWQ's GEMM layout at 4 bits
    ("awq", "nf3", [], "gptq"),
    ("awq", "nf4", ["--layout", "gptq"], "gptq"),  # asked for: honoured
    ("gptq", "nf4", [], "gptq"),
])
def test_cli_layout_per_legacy_backend(llama, tmp_path, capsys, method, fmt, extra, layout):
    import json
    import os

    from afpq_plugins.core.safetensors_io import read_header

    out = str(tmp_path / "o")
    rc = main(["quantize", llama, out, "--method", method, "--format", fmt, "--group-size", "32", "--nsamples", "4",
               "--calib-seqlen", "48", "--quiet", *extra])
    assert rc == 0, capsys.readouterr().err
    with open(os.path.join(out, "config.json"), encoding="utf-8") as fh:
        qc = json.load(fh)["quantization_config"]
    assert qc["layout"] == layout
    header, _, _ = read_header(os.path.join(out, "model.safetensors"))
    shape = tuple(header[f"{qc['quantized_modules'][0]}.qweight"]["shape"])
    bits = int(fmt[-1])
    assert shape == ((64, 64 // 8) if layout == "awq" else (64 * bits // 32, 64))
