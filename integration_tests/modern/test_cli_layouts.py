"""The layout each backend writes from the CLI: AWQ at 4 bits writes the ``awq`` layout through
every engine (llm-compressor used to write ``gptq`` because the CLI's ``--layout gptq``
default reached it), GPTQ writes ``gptq``; an explicit ``--layout`` is honoured. Checked in
``config.json`` and in the shape of the stored ``qweight`` (awq: ``[in, out/8]``; gptq:
``[in*bits/32, out]``)."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("gptqmodel")
pytest.importorskip("llmcompressor")

from afpq_plugins.cli import main  # noqa: E402
from afpq_plugins.core.safetensors_io import read_header  # noqa: E402

CALIB = ["--nsamples", "4", "--calib-seqlen", "48", "--quiet"]


def _layout_and_shape(out: str):
    with open(os.path.join(out, "config.json"), encoding="utf-8") as fh:
        qc = json.load(fh)["quantization_config"]
    header, _, _ = read_header(os.path.join(out, "model.safetensors"))
    name = qc["quantized_modules"][0]
    return qc["layout"], tuple(header[f"{name}.qweight"]["shape"])


@pytest.mark.parametrize("method,backend,fmt,layout", [
    ("awq", "llmcompressor", "nf4", "awq"),
    ("awq", "gptqmodel", "nf4", "awq"),
    ("awq", "llmcompressor", "nf3", "gptq"),
    ("gptq", "llmcompressor", "nf4", "gptq"),
    ("gptq", "gptqmodel", "nf4", "gptq"),
])
def test_cli_layout_per_backend(folders, tmp_path, capsys, method, backend, fmt, layout):
    out = str(tmp_path / "o")
    rc = main(["quantize", folders["llama"], out, "--method", method, "--backend", backend, "--format", fmt,
               "--group-size", "32", *CALIB])
    assert rc == 0, capsys.readouterr().err
    got, shape = _layout_and_shape(out)
    assert got == layout
    q_proj_in, q_proj_out = 64, 64  # the tiny Llama's first quantized layer (self_attn.q_proj)
    bits = int(fmt[-1])
    assert shape == ((q_proj_in, q_proj_out // 8) if layout == "awq" else (q_proj_in * bits // 32, q_proj_out))


def test_explicit_layout_is_honoured(folders, tmp_path, capsys):
    out = str(tmp_path / "o")
    rc = main(["quantize", folders["llama"], out, "--method", "awq", "--backend", "llmcompressor", "--format", "nf4",
               "--group-size", "32", "--layout", "gptq", *CALIB])
    assert rc == 0, capsys.readouterr().err
    assert _layout_and_shape(out) == ("gptq", (64 * 4 // 32, 64))
