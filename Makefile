# caictl: set-up, tests, the offline pipeline and benchmarks. Every target sets up .venv/ first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; a plain `torch` requirement can pull a multi-GB CUDA build on a CPU machine.
TORCH ?= torch==2.13.0
# llama.cpp (the test suite's OpenAI-compatible server) builds from source; keep the build portable.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF

# full-pipeline settings: MODEL empty builds the offline random-weight model.
RUN ?= demo
MODEL ?=
ENGINE ?= hf
BASE_URL ?=

.PHONY: setup test full-pipeline bench clean

$(BIN)/.core-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e .
	touch $@

$(BIN)/.test-installed: $(BIN)/.core-installed
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

setup: $(BIN)/.test-installed

test: $(BIN)/.test-installed
	$(BIN)/python -m pytest -q

full-pipeline: $(BIN)/.core-installed
	PATH="$(abspath $(BIN)):$$PATH" RUN="$(RUN)" MODEL="$(MODEL)" ENGINE="$(ENGINE)" BASE_URL="$(BASE_URL)" \
		bash examples/full-pipeline.sh

bench: $(BIN)/.core-installed
	$(BIN)/python benchmarks/bench_revise.py --preset tiny
	$(BIN)/python benchmarks/bench_revise.py --preset small
	$(BIN)/python benchmarks/bench_revise.py --preset small --no-few-shot

clean:
	rm -rf $(VENV) runs .pytest_cache
