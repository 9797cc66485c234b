# `make chat` and `make test` set everything up on a fresh machine (Python >= 3.10).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0
# Where no NVIDIA GPU is present the CPU build of torch is installed first, so that
# the `torch` range in pyproject.toml does not pull a multi-GB CUDA build. Point
# TORCH_INDEX at PyTorch's CPU wheel index if your pip does not find a CPU wheel.
TORCH_INDEX ?=
# Options for `make chat`, e.g. make chat ARGS="--model sft-v2".
ARGS ?=

.PHONY: chat test install clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(BIN)/python -c "import torch" 2>/dev/null; then \
		$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_CPU)"; \
	fi
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

chat: install
	$(BIN)/rinna chat $(ARGS)

# Lint, format and types first (seconds), then the suite.
test: install
	$(BIN)/ruff check rinna_cli
	$(BIN)/ruff format --check rinna_cli
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache

# Benchmarks (benchmarks/bench.py; docs/benchmarks.md says what they measure). `bench` builds
# a random-weight model of rinna's full shape once (7.2 GB, cached in ~/.cache/rinna-cli-bench)
# and writes its report into docs/benchmarks.md; `bench-quick` runs a 4-layer model and only prints.
# LLAMA_CPP=<a built llama.cpp checkout> adds llama.cpp's Q8_0/Q4_0 figures (docs/benchmarks.md says how).
.PHONY: bench bench-quick

bench: install
	$(BIN)/python benchmarks/bench.py --write docs/benchmarks.md

bench-quick: install
	$(BIN)/python benchmarks/bench.py --layers 4 --turns 8 --new-tokens 8 --startup-runs 3 --stream-repeats 5
