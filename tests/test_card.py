"""Model cards: every checkpoint folder we write gets a README.md (afpq_plugins.card)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("transformers")

from _tiny import TEXT, tiny_llama, tiny_llama_folder  # noqa: E402

from afpq_plugins import __version__, cli  # noqa: E402
from afpq_plugins.model import quantize_model_rtn, save_quantized  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_llama_folder(str(tmp_path_factory.mktemp("m") / "model"))


def _row(card: str, key: str) -> str:
    (line,) = [ln for ln in card.splitlines() if ln.startswith(f"| {key} |")]
    return line.split("|")[2].strip()


@pytest.mark.parametrize("fmt,mode,group,bpw", [
    ("nf3", None, 32, 3 + 2 * 16 / 32),      # codes + two fp16 scales per 32 weights
    ("nf4", "sym", 64, 4 + 16 / 64),         # one scale
    ("int3", None, 32, 3 + 2 * 16 / 32),     # scale + zero-point
])
def test_cli_checkpoint_has_a_card(folder, tmp_path, capsys, fmt, mode, group, bpw):
    out = str(tmp_path / "ck")
    argv = ["quantize", folder, out, "--format", fmt, "--group-size", str(group), "--quiet"]
    if mode:
        argv += ["--mode", mode]
    assert cli.main(argv) == 0, capsys.readouterr().err
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert _row(card, "format").startswith(f"`{fmt}`")
    assert _row(card, "group size") == str(group)
    assert _row(card, "mode").startswith(f"`{mode or ('zp' if fmt.startswith('int') else 'afpq')}`")
    assert float(_row(card, "bits per weight").split()[0]) == pytest.approx(bpw, abs=1e-3)
    assert _row(card, "method") == "`rtn` through afpq_plugins core"
    assert _row(card, "calibration") == "none (round to nearest)"
    assert _row(card, "written by") == f"afpq-plugins {__version__}"
    assert ("afpq " + " ".join(argv)) in card  # the command line, verbatim
    assert f'from_pretrained("{out}")' in card and f'LLM(model="{out}")' in card and "lm_eval --model hf" in card


def test_calibrated_card_names_the_dataset(folder, tmp_path, capsys):
    data = tmp_path / "mine.txt"
    data.write_text(TEXT * 4)
    out = str(tmp_path / "ck")
    assert cli.main(["quantize", folder, out, "--format", "nf3", "--group-size", "32", "--scale-search", "output",
                     "--nsamples", "2", "--calib-seqlen", "32", "--dataset", str(data), "--quiet"]) == 0
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert _row(card, "calibration") == "2 x 32 tokens from mine.txt, seed 0"
    assert _row(card, "scale search") == "`output`"


def test_python_api_save_writes_a_card(tmp_path):
    model = tiny_llama()
    qc = quantize_model_rtn(model, fmt="fp4", group_size=32)
    out = save_quantized(model, str(tmp_path / "py"), qc)
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert "written from Python" in card
    assert float(_row(card, "bits per weight").split()[0]) == pytest.approx(4 + 2 * 16 / 32)
    # the card does not disturb the checkpoint: it still loads
    from afpq_plugins.model import load_quantized

    load_quantized(out)
