"""``--dataset``: your own calibration data (plain text, JSONL, a saved ``datasets`` folder).

The byte tokenizer (one token per byte) makes the token counts exact, so every window can be
checked against the text it must come from, and the "too short" threshold is known."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from _tiny import TEXT, tiny_llama_folder  # noqa: E402
from test_data import byte_tokenizer  # noqa: E402

from afpq_plugins import cli  # noqa: E402
from afpq_plugins.data import calibration_samples, load_dataset_texts  # noqa: E402
from afpq_plugins.methods import Calibration  # noqa: E402

ROWS = [f"Row {i}: " + TEXT[i * 37: i * 37 + 300] for i in range(6)]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture()
def jsonl(tmp_path):
    p = tmp_path / "calib.jsonl"
    p.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(ROWS)))
    return str(p)


def _windows_come_from(samples, tok, text):
    for s in samples:
        assert tok.decode(s) in text


def test_plain_text_windows_are_slices_of_the_file(tok, tmp_path):
    p = tmp_path / "c.txt"
    p.write_text(TEXT)
    texts = load_dataset_texts(str(p))
    assert texts == [TEXT]
    samples = calibration_samples(tok, 4, 64, texts=texts)
    assert [s.numel() for s in samples] == [64] * 4
    _windows_come_from(samples, tok, TEXT)


def test_jsonl_rows_joined_and_seeded(tok, jsonl):
    texts = load_dataset_texts(jsonl)
    assert texts == ROWS
    a = Calibration(3, 50, dataset=jsonl).samples(tok)
    b = Calibration(3, 50, dataset=jsonl).samples(tok)
    c = Calibration(3, 50, seed=1, dataset=jsonl).samples(tok)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not all(torch.equal(x, y) for x, y in zip(a, c))
    _windows_come_from(a, tok, "\n\n".join(ROWS))


def test_jsonl_errors_name_the_line_and_the_field(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "fine"}\n{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no field 'text' \(has: body\).*--text-field"):
        load_dataset_texts(str(p))
    p.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON object"):
        load_dataset_texts(str(p))
    p.write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match=r"field 'text' is int"):
        load_dataset_texts(str(p))


def test_other_field(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_text('{"body": "one"}\n\n{"body": "two"}\n')
    assert load_dataset_texts(str(p), text_field="body") == ["one", "two"]


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_dataset_is_refused(tmp_path, content):
    p = tmp_path / "e.txt"
    p.write_text(content)
    with pytest.raises(ValueError, match="holds no text"):
        load_dataset_texts(str(p))


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_dataset_texts(str(tmp_path / "nope.txt"))


def test_too_short_says_how_many_tokens_are_needed(tok, tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("x" * 100)  # 100 tokens with the byte tokenizer
    with pytest.raises(ValueError, match=r"100 tokens .* 4 samples x 32 tokens need 128"):
        Calibration(4, 32, dataset=str(p)).samples(tok)
    assert len(Calibration(3, 32, dataset=str(p)).samples(tok)) == 3  # 96 <= 100


def test_saved_datasets_folder_with_splits(tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ROWS[:3], "n": [1, 2, 3]}),
                               "validation": datasets.Dataset.from_dict({"text": ROWS[3:], "n": [4, 5, 6]})})
    path = str(tmp_path / "dd")
    dd.save_to_disk(path)
    assert load_dataset_texts(path) == ROWS[:3]  # default split: train
    assert load_dataset_texts(path, split="validation") == ROWS[3:]
    with pytest.raises(ValueError, match="has splits train, validation: choose one with --dataset-split"):
        load_dataset_texts(path, split="test")
    with pytest.raises(ValueError, match=r"no column 'body' \(has: text, n\)"):
        load_dataset_texts(path, text_field="body")
    single = str(tmp_path / "single")
    dd["validation"].save_to_disk(single)
    assert load_dataset_texts(single) == ROWS[3:]
    with pytest.raises(ValueError, match="single split"):
        load_dataset_texts(single, split="train")
    _windows_come_from(Calibration(2, 40, dataset=path, split="validation").samples(tok), tok, "\n\n".join(ROWS[3:]))


def test_describe_names_the_source(jsonl):
    assert "Austen" in Calibration(8, 256).describe()
    d = Calibration(8, 256, dataset=jsonl).describe()
    assert d.startswith("8 x 256 tokens from calib.jsonl (field 'text')")


# -- the CLI ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_llama_folder(str(tmp_path_factory.mktemp("m") / "model"))


def test_cli_output_search_calibrates_on_the_dataset(folder, jsonl, tmp_path, capsys):
    base = ["quantize", folder, None, "--format", "nf3", "--group-size", "32", "--scale-search", "output",
            "--nsamples", "4", "--calib-seqlen", "32", "--quiet"]

    def run(out, *extra):
        argv = list(base)
        argv[2] = str(tmp_path / out)
        assert cli.main(argv + list(extra)) == 0, capsys.readouterr().err
        from safetensors.torch import load_file

        return load_file(os.path.join(tmp_path / out, "model.safetensors"))

    mine, default = run("mine", "--dataset", jsonl), run("default")
    scales = [k for k in mine if k.endswith(".scales")]
    assert scales and any(not torch.equal(mine[k], default[k]) for k in scales)  # other data, other scales


def test_cli_dataset_errors(folder, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    assert cli.main(["quantize", folder, str(tmp_path / "a"), "--scale-search", "output", "--group-size", "32",
                     "--nsamples", "4", "--calib-seqlen", "32", "--dataset", str(short), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--dataset" in err and "4 samples x 32 tokens need 128" in err
    assert not (tmp_path / "a").exists()
    assert cli.main(["quantize", folder, str(tmp_path / "b"), "--group-size", "32", "--dataset", str(short),
                     "--quiet"]) == 2
    assert "not to plain RTN" in capsys.readouterr().err
    assert cli.main(["quantize", folder, str(tmp_path / "c"), "--scale-search", "output", "--group-size", "32",
                     "--dataset", str(tmp_path / "none.jsonl"), "--quiet"]) == 2
    assert "none.jsonl" in capsys.readouterr().err


ENGINES = [("gptq", "autogptq"), ("awq", "autoawq"), ("gptq", "gptqmodel"), ("awq", "gptqmodel"),
           ("gptq", "llmcompressor"), ("awq", "llmcompressor")]


@pytest.fixture(scope="module")
def folder128(tmp_path_factory):
    """hidden 128: AutoAWQ 0.2.9's clip search needs out_features % 64 == 0."""
    from _tiny import tiny_llama, tiny_tokenizer

    path = str(tmp_path_factory.mktemp("m128") / "model")
    t = tiny_tokenizer()
    tiny_llama(vocab_size=len(t), hidden=128).save_pretrained(path)
    t.save_pretrained(path)
    return path


@pytest.mark.parametrize("method,engine", ENGINES)
def test_every_calibrated_engine_calibrates_on_the_dataset(folder128, jsonl, tmp_path, monkeypatch, capsys,
                                                           method, engine):
    """Each engine of this venv, through the CLI: its windows are cut from --dataset (spied where the
    registry's Calibration cuts them), and it writes a checkpoint."""
    from afpq_plugins import data
    from afpq_plugins import methods

    why = methods._METHODS[method, engine].missing()
    if why:
        pytest.skip(why)
    seen = []
    real = data.calibration_samples

    def spy(tokenizer, nsamples, seqlen, seed=0, paths=None, texts=None, source=""):
        seen.append(texts)
        return real(tokenizer, nsamples, seqlen, seed=seed, paths=paths, texts=texts, source=source)

    monkeypatch.setattr(data, "calibration_samples", spy)
    out = tmp_path / "q"
    rc = cli.main(["quantize", folder128, str(out), "--method", method, "--backend", engine, "--format", "nf3",
                   "--group-size", "32", "--nsamples", "4", "--calib-seqlen", "32", "--dataset", jsonl, "--quiet"])
    assert rc == 0, capsys.readouterr().err[-3000:]
    assert seen and all(t == ROWS for t in seen), seen
    assert json.load(open(out / "config.json"))["quantization_config"]["quant_method"] == "afpq"
