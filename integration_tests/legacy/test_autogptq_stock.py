"""The adapter leaves stock AutoGPTQ alone, and stock loaders refuse AFPQ checkpoints.

* An INT ``BaseQuantizeConfig`` quantized in this process (adapter imported and
  registered, an AFPQ quantization already run) writes the same bytes, file for file,
  as the same run in a fresh process that never imports ``afpq_plugins`` (it loads the
  CPU shims from ``patches/autogptq_cpu.py`` by path; both runs use them). The one
  exception is upstream's: safetensors serialises the file's metadata map in a
  per-process hash order, so two stock runs already differ in those header bytes; the
  safetensors file is compared as parsed header plus byte-identical tensor data.
* Stock AutoGPTQ (no adapter) and stock transformers must not load an AFPQ checkpoint,
  from a local folder or from a hub repository: the refusal placeholders
  (``<layer>.weight`` / ``<layer>.qzeros``, uint8 ``[1]``) make them stop at a size mismatch.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from _tiny import TEXT, tiny_llama_folder, tiny_tokenizer

with warnings.catch_warnings(record=True):
    pytest.importorskip("auto_gptq")
    import afpq_plugins.autogptq as A
    from auto_gptq import AutoGPTQForCausalLM

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))

# Runs stock AutoGPTQ INT GPTQ (bits 4, group 32, act-order, asymmetric) on CPU.
INT_RUN = textwrap.dedent(
    '''
    import importlib.util, logging, os, sys, warnings
    import torch

    def load_cpu_shims(root):
        spec = importlib.util.spec_from_file_location("autogptq_cpu", os.path.join(root, "patches", "autogptq_cpu.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    def int_run(root, src, out, ids):
        with warnings.catch_warnings(record=True):
            from auto_gptq import AutoGPTQForCausalLM, BaseQuantizeConfig
        logging.getLogger("auto_gptq").setLevel(logging.WARNING)
        cpu = load_cpu_shims(root)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            cfg = BaseQuantizeConfig(bits=4, group_size=32, desc_act=True, sym=False)
            with cpu.allow_cpu_from_pretrained():
                model = AutoGPTQForCausalLM.from_pretrained(src, cfg, torch_dtype=torch.float32)
            examples = [{"input_ids": torch.tensor([ids[i:i + 64]]), "attention_mask": torch.ones(1, 64, dtype=torch.long)}
                        for i in range(0, 256, 64)]
            with cpu.cpu_quantize():
                model.quantize(examples)
            model.save_quantized(out)
            return type(model.model.model.layers[0].self_attn.q_proj).__module__
        finally:
            torch.set_num_threads(threads)
    '''
)

SUBPROCESS_MAIN = textwrap.dedent(
    '''
    import json, sys
    root, src, out, ids = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    print("LAYER", int_run(root, src, out, ids))
    assert not [m for m in sys.modules if m.startswith("afpq_plugins")], "the stock run imported afpq_plugins"
    '''
)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return tiny_llama_folder(str(tmp_path_factory.mktemp("stock") / "llama"))


@pytest.fixture(scope="module")
def ids():
    return tiny_tokenizer()(TEXT).input_ids[:256]


@pytest.fixture(scope="module")
def afpq_checkpoint(llama_folder, ids, tmp_path_factory):
    cfg = A.AFPQQuantizeConfig(bits=3, fmt="nf3", group_size=32, desc_act=True)
    model = AutoGPTQForCausalLM.from_pretrained(llama_folder, cfg, torch_dtype=torch.float32)
    model.quantize(A.examples_from_ids([torch.tensor(ids[i:i + 64]) for i in range(0, 256, 64)]))
    out = str(tmp_path_factory.mktemp("afpq") / "q")
    model.save_quantized(out)
    return out


def _clean_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ""  # the stock run must not even see the package on its path
    env["AFPQ_PLUGINS_AUTOLOAD"] = "0"  # nor the installed package's start-up hook (_afpq_autoload)
    return env


def test_int_checkpoint_is_byte_identical_to_stock(llama_folder, ids, afpq_checkpoint, tmp_path):
    assert A.is_registered()
    stock_out = str(tmp_path / "stock")
    proc = subprocess.run(
        [sys.executable, "-c", INT_RUN + SUBPROCESS_MAIN, ROOT, llama_folder, stock_out, json.dumps(ids)],
        capture_output=True, text=True, env=_clean_env(), cwd=str(tmp_path), timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LAYER auto_gptq.nn_modules.qlinear" in proc.stdout

    ns: dict = {}
    exec(compile(INT_RUN, "INT_RUN", "exec"), ns)
    here_out = str(tmp_path / "here")
    layer_module = ns["int_run"](ROOT, llama_folder, here_out, ids)
    assert layer_module.startswith("auto_gptq.nn_modules.qlinear")

    files = sorted(os.listdir(stock_out))
    assert files == sorted(os.listdir(here_out))
    assert "quantize_config.json" in files and any(f.endswith(".safetensors") for f in files)
    _, mismatch, errors = filecmp.cmpfiles(stock_out, here_out, files, shallow=False)
    assert not errors
    # safetensors 0.x writes the header's __metadata__ map in hash order, which changes
    # from process to process: two *stock* runs differ there (and only there). Those
    # files must match byte for byte in the tensor data and as parsed headers.
    for f in mismatch:
        assert f.endswith(".safetensors"), f"{f} differs from the stock run"
        a, b = _safetensors_parts(os.path.join(stock_out, f)), _safetensors_parts(os.path.join(here_out, f))
        assert a[0] == b[0], f"{f}: headers differ"
        assert a[1] == b[1], f"{f}: tensor bytes differ"
    with open(os.path.join(here_out, "quantize_config.json"), encoding="utf-8") as fh:
        assert json.load(fh)["quant_method"] == "gptq"


def _safetensors_parts(path):
    """(parsed JSON header, raw tensor bytes) of a safetensors file."""
    import struct

    with open(path, "rb") as fh:
        raw = fh.read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


STOCK_LOAD = textwrap.dedent(
    '''
    import sys, warnings
    with warnings.catch_warnings(record=True):
        from auto_gptq import AutoGPTQForCausalLM
    try:
        AutoGPTQForCausalLM.from_quantized(sys.argv[1], device="cpu")
    except Exception as exc:
        print("REFUSED", type(exc).__name__, exc)
    else:
        print("LOADED")
    assert not [m for m in sys.modules if m.startswith("afpq_plugins")]
    '''
)


def test_stock_autogptq_refuses_afpq_checkpoint(afpq_checkpoint, tmp_path):
    proc = subprocess.run([sys.executable, "-c", STOCK_LOAD, afpq_checkpoint], capture_output=True, text=True,
                          env=_clean_env(), cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REFUSED" in proc.stdout, proc.stdout


def _fake_hub_repo(checkpoint: str, cache: str, repo: str = "someone/afpq-model") -> str:
    """Lay ``checkpoint`` out as a downloaded hub repository in the cache folder ``cache``."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = os.path.join(cache, "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(base, "refs"))
    with open(os.path.join(base, "refs", "main"), "w") as fh:
        fh.write(commit)
    shutil.copytree(checkpoint, os.path.join(base, "snapshots", commit))
    return repo


def test_stock_autogptq_refuses_afpq_checkpoint_from_the_hub(afpq_checkpoint, tmp_path):
    """From a hub repository (no quantize_config.json), AutoGPTQ 0.7.1 takes config.json's
    quantization_config, ignores quant_method "afpq" and would load the codes into INT
    QuantLinear layers; the qzeros placeholder stops it."""
    cache = str(tmp_path / "hub")
    repo = _fake_hub_repo(afpq_checkpoint, cache)
    env = dict(_clean_env(), HF_HUB_CACHE=cache, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", STOCK_LOAD, repo], capture_output=True, text=True,
                          env=env, cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("REFUSED ValueError"), proc.stdout + proc.stderr[-3000:]
    assert '"qzeros"' in proc.stdout and "torch.Size([1])" in proc.stdout, proc.stdout


STOCK_HF_LOAD = textwrap.dedent(
    '''
    import sys
    from transformers import AutoModelForCausalLM
    try:
        AutoModelForCausalLM.from_pretrained(sys.argv[1])
    except Exception as exc:
        print("REFUSED", type(exc).__name__, exc)
    else:
        print("LOADED")
    assert not [m for m in sys.modules if m.startswith("afpq_plugins")]
    '''
)


def test_stock_transformers_refuses_afpq_checkpoint(afpq_checkpoint, tmp_path):
    """transformers 4.53 skips the unknown quant_method, then stops at the weight placeholder."""
    proc = subprocess.run([sys.executable, "-c", STOCK_HF_LOAD, afpq_checkpoint], capture_output=True, text=True,
                          env=_clean_env(), cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("REFUSED RuntimeError"), proc.stdout
    assert "size mismatch for weight" in proc.stdout and "torch.Size([1])" in proc.stdout, proc.stdout
    assert "Unknown quantization type, got afpq" in proc.stderr


def test_unregister_restores_stock_methods():
    from auto_gptq.modeling._base import BaseGPTQForCausalLM

    wrapped = BaseGPTQForCausalLM.__dict__["quantize"]
    A.unregister()
    try:
        assert not A.is_registered()
        assert not hasattr(BaseGPTQForCausalLM.__dict__["quantize"], "__afpq_original__")
    finally:
        A.register()
    assert A.is_registered()
    assert BaseGPTQForCausalLM.__dict__["quantize"] is not wrapped  # a fresh wrapper, same behaviour


def test_registered_scopes_the_wraps_and_side_effects_reports_them():
    import afpq_plugins

    assert afpq_plugins.side_effects()["autogptq"] == "wrapped"  # import afpq_plugins.autogptq did it
    A.unregister()
    try:
        assert afpq_plugins.side_effects()["autogptq"] == "off"
        with A.registered():
            assert A.is_registered()
        assert not A.is_registered()  # back to the state before the block
    finally:
        A.register()
    with A.registered():  # already registered: stays registered after the block
        pass
    assert A.is_registered()


def test_int_config_in_afpq_entry_points_is_not_touched(llama_folder):
    """Without the CPU shim, stock from_pretrained still refuses a CPU-only INT run."""
    from auto_gptq import BaseQuantizeConfig

    if torch.cuda.is_available():
        pytest.skip("the stock CUDA guard only fires without CUDA")
    with pytest.raises(EnvironmentError, match="CUDA"):
        AutoGPTQForCausalLM.from_pretrained(llama_folder, BaseQuantizeConfig(bits=4, group_size=32))
