"""README.md is the front door: short, and every command and name in it is real.

What runs elsewhere: the examples (tests/test_examples.py), lm-eval (integration_tests/modern/
test_lm_eval.py), the wheel and ``afpq --version`` (tests/test_installed.py). Here: every
``afpq`` command line parses with the real parser, every ``make`` target, pip extra, link and
imported name exists."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import tomllib

import pytest

from _plain import REPO

README = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
LINES = README.splitlines()


def _code_spans():
    """Commands in ```bash blocks and in `backticks`."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        out += [ln.split("  #")[0].strip() for ln in block.splitlines() if ln.strip()]
    out += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", README, flags=re.S))
    return out


def test_short_and_opens_with_the_two_commands():
    assert len(LINES) <= 200
    first = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1).splitlines()
    assert first[0].startswith("make demo") and first[1].startswith("make test")


def test_make_targets_exist():
    makefile = open(os.path.join(REPO, "Makefile")).read()
    for cmd in _code_spans():
        if cmd.startswith("make "):
            assert re.search(rf"^{re.escape(cmd.split()[1])}:", makefile, flags=re.M), cmd


def test_every_afpq_command_parses():
    from afpq_plugins.cli import build_parser

    cmds = [c for c in _code_spans() if c.startswith("afpq ")]
    assert len(cmds) >= 4
    for cmd in cmds:
        argv = shlex.split(cmd)[1:]
        if argv == ["--version"]:
            continue
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:  # argparse: a flag or a choice the CLI does not have
            pytest.fail(f"README command does not parse: {cmd} ({exc})")


def test_pip_extras_exist():
    extras = tomllib.load(open(os.path.join(REPO, "pyproject.toml"), "rb"))["project"]["optional-dependencies"]
    named = set(re.findall(r'afpq-plugins\[(\w+)\]', README)) | set(re.findall(r"\[(\w+)\]: lm-eval", README))
    assert named and named <= set(extras), named - set(extras)


def test_links_exist():
    for target in re.findall(r"\]\(((?:docs|examples)/[^)#]+|LICENSE)\)", README):
        assert os.path.exists(os.path.join(REPO, target)), target


@pytest.mark.parametrize("module,names", [
    ("afpq_plugins.core", ["QuantSpec"]),
    ("afpq_plugins.methods", ["quantize", "Calibration"]),
    ("afpq_plugins.model", ["save_quantized"]),
    ("afpq_plugins.autogptq", ["AFPQQuantizeConfig"]),
    ("afpq_plugins.autoawq", ["quantize_awq"]),
    ("afpq_plugins.gptqmodel", ["GPTQModel", "QuantizeConfig"]),
    ("afpq_plugins.llmcompressor", ["AFPQGPTQModifier", "save"]),
    ("afpq_plugins.hf", ["AFPQConfig"]),
    ("afpq_plugins.lm_eval_tasks", ["TASK"]),
])
def test_names_in_the_entry_table_exist(module, names):
    assert f"from {module} import" in README or module.rsplit(".", 1)[-1] in README
    try:
        mod = importlib.import_module(module)
        found = {n: hasattr(mod, n) for n in names}  # some adapters import their engine on attribute access
    except ImportError as exc:  # the engine lives in the other venv
        pytest.skip(f"{module}: {exc}")
    assert all(found.values()), found
