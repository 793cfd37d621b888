# Two commands do everything on a fresh machine (see README.md):
#   make demo   serve the embedded default model with KV eviction and show what was freed
#   make test   the CPU test suite (what CI runs)
# Both build the per-machine virtualenv and fetch the offline assets first (once).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: env assets demo test test-gpu clean-venv-link

env:
	@$(PYTHON) scripts/bootstrap.py

assets: env
	@$(PY) -m judgeq_vllm.cli assets fetch

demo: assets
	@$(PY) -m judgeq_vllm.cli demo

test: assets
	@$(PY) -m pytest -m "not gpu" -ra --timeout=1800 $(PYTEST_ARGS)

# On the GPU host (vLLM from the wheelhouse, see README.md): the GPU-marked tests only.
test-gpu:
	@$(PYTHON) -m pytest -m gpu -ra $(PYTEST_ARGS)

clean-venv-link:
	@rm -f $(VENV)
