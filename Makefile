# The two commands: `make demo` (the main job) and `make test` (the test suite).
# Each works on a fresh machine: creates .venv, installs a CPU torch first when none is present
# (never a bare `torch`, which pulls a multi-GB CUDA build), installs the project, runs.
# DeepSpeed is installed without prebuilt ops (DS_BUILD_OPS=0); its CPU comm op is JIT-built once
# into TORCH_EXTENSIONS_DIR by the distributed tests (needs g++).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.anchorcontext-installed

.PHONY: venv demo test test-oldest bench gpu-check gpu-wheels lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[dev,deepspeed]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m anchorcontext train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The Hugging Face integration on the oldest transformers the project supports (pyproject: >=5.0), in its own venv:
# the cache argument's name, how a model on eager finds its attention function and TRL differ across 5.x.
OLDEST_VENV ?= .venv-oldest
OLDEST_TRANSFORMERS ?= transformers==5.0.0
OLDEST_TESTS ?= tests/test_patch.py tests/test_hf_packing.py tests/test_trl.py tests/test_trainer.py tests/test_zoo.py
test-oldest:
	test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -c "import torch" 2>/dev/null || $(OLDEST_VENV)/bin/python -m pip install -q $(TORCH_SPEC)
	$(OLDEST_VENV)/bin/python -m pip install -q -e ".[dev]" "$(OLDEST_TRANSFORMERS)"
	$(OLDEST_VENV)/bin/python -c "import transformers; assert transformers.__version__ == '$(OLDEST_TRANSFORMERS)'.split('==')[1], transformers.__version__"
	$(OLDEST_VENV)/bin/python -m pytest -q -p no:cacheprovider $(OLDEST_TESTS)

bench: $(STAMP)
	$(PY) -m anchorcontext bench $(ARGS)

gpu-check:
	bash scripts/gpu_check.sh $(ARGS)

# Wheels for the offline GPU machine (Python 3.12, x86_64): DeepSpeed (sdist-only on PyPI, built here without
# ops) and what its image lacks (pydantic stack, hjson; datasets/dill/multiprocess without their deps, which the
# image has). ~6 MB. Carry .whl/ to it; scripts/gpu_check.sh installs only the modules the image is missing.
GPU_PY ?= 3.12
gpu-wheels: $(STAMP)
	mkdir -p .whl
	DS_BUILD_OPS=0 $(PY) -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$$($(PY) -c 'import importlib.metadata as m; print(m.version("deepspeed"))')"
	$(PY) -m pip download -q --only-binary=:all: --python-version $(GPU_PY) --platform manylinux2014_x86_64 \
		-d .whl pydantic hjson
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PY) --platform manylinux2014_x86_64 \
		-d .whl datasets dill multiprocess

lint: $(STAMP)
	$(PY) -m ruff check anchorcontext tests benchmarks scripts

clean:
	rm -rf $(VENV) $(OLDEST_VENV) runs .pytest_cache
