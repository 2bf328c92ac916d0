# Two commands do all the set-up on a fresh machine:
#   make demo   - the main job: apply a policy to a tiny built-in pipeline and show what moved
#   make test   - the test suite
#
# torch is installed first, pinned, so pip never picks a build for you behind your back:
# on a machine whose pip has a local CPU wheel this takes seconds; elsewhere it is PyPI's
# default build (CUDA on Linux). To use another build, install it into .venv first
# (.venv/bin/pip install torch --index-url ...) or pass TORCH_SPEC=...; an importable
# torch in .venv is never replaced.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# make demo installs offloadkit and what it runs on; make test adds the test extra (quantization
# backends, peft, hypothesis, import-linter).
STAMP := $(VENV)/.installed
CORE_STAMP := $(VENV)/.installed-core

.PHONY: install demo test clean

install: $(STAMP)

$(CORE_STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e .
	@touch $@

$(STAMP): $(CORE_STAMP)
	$(BIN)/python -m pip install -q -e ".[test]"
	@touch $@

demo: $(CORE_STAMP)
	$(BIN)/offloadkit demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --maxprocesses=4

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
