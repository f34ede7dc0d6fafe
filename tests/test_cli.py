"""The ``afpq`` CLI on a tiny offline model: quantize, eval --json, demo, errors."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

pytest.importorskip("transformers")

from _tiny import TEXT, tiny_llama_folder  # noqa: E402

from afpq_plugins import cli  # noqa: E402
from afpq_plugins.core.quantize import fake_quantize  # noqa: E402
from afpq_plugins.study import demo  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_llama_folder(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "eval.txt"
    p.write_text(TEXT * 3, encoding="utf-8")
    return str(p)


def _reference_ppl(folder, text_file, fmt, group_size, mode, seqlen, windows):
    """float64 NLL of the float model with weights fake-quantized by the core maths."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    for name, mod in model.named_modules():
        if fmt is not None and isinstance(mod, torch.nn.Linear) and name != "lm_head":
            mod.weight.data = fake_quantize(mod.weight.data, fmt, group_size, mode)
    ids = tok(open(text_file, encoding="utf-8").read(), return_tensors="pt").input_ids[0]
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            chunk = ids[w * seqlen:(w + 1) * seqlen].unsqueeze(0)
            logits = model(chunk).logits[0, :-1].double()
            lp = torch.log_softmax(logits, -1).gather(1, chunk[0, 1:, None]).squeeze(1)
            nll -= lp.sum().item()
            count += lp.numel()
    return math.exp(nll / count), count


@pytest.mark.parametrize("fmt,mode,layout", [("nf3", None, "gptq"), ("fp4", "sym", "awq"), ("int4", None, "gptq")])
def test_quantize_then_eval_json_matches_reference(folder, text_file, tmp_path, capsys, fmt, mode, layout):
    out = str(tmp_path / "ck")
    argv = ["quantize", folder, out, "--method", "rtn", "--format", fmt, "--group-size", "32",
            "--layout", layout, "--quiet"]
    if mode == "sym":
        argv.append("--sym")
    assert cli.main(argv) == 0
    cfg = json.load(open(os.path.join(out, "config.json")))
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "afpq" and qc["format"] == fmt and qc["group_size"] == 32
    assert qc["layout"] == layout and qc["mode"] == (mode or ("zp" if fmt.startswith("int") else "afpq"))
    capsys.readouterr()
    assert cli.main(["eval", out, "--text", text_file, "--seqlen", "64", "--windows", "3", "--json", "--quiet"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    res = json.loads(last)
    ref_ppl, ref_tokens = _reference_ppl(folder, text_file, fmt, 32, mode, 64, 3)
    assert res["tokens"] == ref_tokens == 3 * 63
    assert res["ppl"] == pytest.approx(ref_ppl, rel=1e-4)


def test_eval_float_folder(folder, text_file, capsys):
    assert cli.main(["eval", folder, "--text", text_file, "--seqlen", "64", "--windows", "2", "--json", "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ref_ppl, ref_tokens = _reference_ppl(folder, text_file, None, -1, None, 64, 2)
    assert res["kind"] == "float" and res["tokens"] == ref_tokens
    assert res["ppl"] == pytest.approx(ref_ppl, rel=1e-4)


def test_quantize_errors_are_clear(folder, tmp_path, capsys):
    assert cli.main(["quantize", folder, str(tmp_path / "a"), "--format", "fp5", "--quiet"]) == 2
    assert "unknown format 'fp5'" in capsys.readouterr().err
    assert cli.main(["quantize", folder, str(tmp_path / "b"), "--format", "int4", "--sym", "--quiet"]) == 2
    assert "does not support mode 'sym'" in capsys.readouterr().err
    # 48 does not divide in_features 64: the error names the layer and nothing is written.
    assert cli.main(["quantize", folder, str(tmp_path / "c"), "--format", "nf4", "--group-size", "48", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "model.layers.0.self_attn.q_proj" in err and "group_size 48" in err
    assert not (tmp_path / "c").exists()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("x")
    assert cli.main(["quantize", folder, str(tmp_path / "d"), "--format", "nf4", "--group-size", "32", "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "d" / "keep.txt").read_text() == "x"
    assert cli.main(["quantize", "no/such/model", str(tmp_path / "e"), "--quiet"]) == 2
    assert "no/such/model" in capsys.readouterr().err


def test_eval_lm_eval_options_are_checked(folder, capsys):
    """``afpq eval --lm-eval``: what it cannot honour is refused by name before anything runs (the
    run itself: integration_tests/modern/test_lm_eval.py)."""
    import importlib.util

    for extra in (["--text", "x.txt"], ["--windows", "2"], ["--json"]):
        assert cli.main(["eval", folder, "--lm-eval", "afpq_pride_ppl", *extra, "--quiet"]) == 2
        assert f"{extra[0]} is not supported with --lm-eval" in capsys.readouterr().err
    for extra in (["--lm-eval-backend", "vllm"], ["--lm-eval-args", "--limit 1"]):
        assert cli.main(["eval", folder, *extra, "--quiet"]) == 2
        assert f"{extra[0]} applies only with --lm-eval TASKS" in capsys.readouterr().err
    if importlib.util.find_spec("lm_eval") is None:
        assert cli.main(["eval", folder, "--lm-eval", "afpq_pride_ppl", "--quiet"]) == 2
        assert "needs lm-eval" in capsys.readouterr().err
    elif importlib.util.find_spec("vllm") is None:
        assert cli.main(["eval", folder, "--lm-eval", "afpq_pride_ppl", "--lm-eval-backend", "vllm", "--quiet"]) == 2
        assert "needs vLLM" in capsys.readouterr().err


def test_lm_eval_argv_windows(folder):
    """Both backends score windows of ``--seqlen`` tokens: lm-eval's vLLM backend scores
    ``max_length - 2`` (docs/lm_eval.md), its hf backend ``max_length``."""
    from afpq_plugins.lm_eval_tasks import TASKS_DIR

    def model_args(argv):
        return dict(kv.split("=", 1) for kv in argv[argv.index("--model_args") + 1].split(","))

    hf = cli.lm_eval_argv(folder, "afpq_pride_ppl", "hf", 512, "float32", ["--limit", "1"])
    assert hf[1:3] == ["-m", "lm_eval"] and hf[hf.index("--model") + 1] == "hf"
    assert model_args(hf) == {"pretrained": folder, "max_length": "512", "dtype": "float32"}
    assert hf[hf.index("--include_path") + 1] == TASKS_DIR and hf[-2:] == ["--limit", "1"]
    vl = cli.lm_eval_argv(folder, "afpq_pride_ppl", "vllm", 512, "float32")
    assert vl[1:3] == ["-m", "afpq_plugins.vllm.lm_eval"] and vl[vl.index("--model") + 1] == "vllm"
    assert model_args(vl)["max_length"] == "514" and model_args(vl)["enforce_eager"] == "True"


def test_eval_refuses_foreign_quant_method(folder, tmp_path, capsys):
    import shutil

    dst = tmp_path / "gptq_int"
    shutil.copytree(folder, dst)
    cfg = json.load(open(dst / "config.json"))
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    json.dump(cfg, open(dst / "config.json", "w"))
    assert cli.main(["eval", str(dst), "--quiet"]) == 2
    assert "'gptq'" in capsys.readouterr().err


def test_demo_table_layout():
    results = {("int3", "zp", None, 64): 40.0, ("nf3", "afpq", None, 64): 30.5, ("fp4", "sym", None, 64): 25.25,
               ("nf4", "afpq", "mse", 64): 21.0}
    table = demo.format_demo_table(20.0, results, [64])
    lines = table.splitlines()
    assert lines[0] == "| method | 3-bit g64 | 4-bit g64 |"
    assert "| fp32 (Q4_1-derived) | 20.00 | 20.00 |" in lines
    assert "| INT (scale + zero) | 40.00 | - |" in lines
    assert "| NF AFPQ (two scales) | 30.50 | - |" in lines
    assert "| FP sym (one scale) | - | 25.25 |" in lines
    assert "| NF AFPQ + scale search | - | 21.00 |" in lines
    se = demo.format_demo_table(20.0, results, [64], {("int3", "zp", None, 64): 1.234}, 0.5).splitlines()
    assert "| fp32 (Q4_1-derived) | 20.00 +- 0.50 | 20.00 +- 0.50 |" in se
    assert "| INT (scale + zero) | 40.00 +- 1.23 | - |" in se and "| FP sym (one scale) | - | 25.25 |" in se
    plan = demo.demo_plan(quick=True)  # the demo is a preset of the accuracy study
    assert len(plan) == 14 and {c.group_size for c in plan} == {64}
    assert len(demo.demo_plan(quick=False)) == 28
    assert plan[-1].search == "output" and demo.DEMO_ROWS[-1].label == "NF AFPQ + output-aware scale search"


def test_demo_runs_end_to_end_on_tiny_model(folder, text_file, monkeypatch, capsys, tmp_path):
    from afpq_plugins import data
    from afpq_plugins.data import load_model_and_tokenizer

    monkeypatch.setattr(cli, "_load_float", lambda arg: (folder, *load_model_and_tokenizer(folder)))
    monkeypatch.setattr(data, "eval_text_path", lambda: text_file)
    out_json = tmp_path / "demo.json"
    assert cli.main(["demo", "--quick", "--seqlen", "64", "--windows", "2", "--group-size", "32",
                     "--json-out", str(out_json), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| NF AFPQ (two scales) |" in out and "| method | 3-bit g32 | 4-bit g32 |" in out
    rows = json.loads(out_json.read_text())["rows"]
    assert len(rows) == 14 and all(math.isfinite(r["ppl"]) for r in rows)
    assert {r["scale_search"] for r in rows} == {"minmax", "mse", "output"}
