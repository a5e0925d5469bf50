# One entry point for setup and tests. `make test` works on a fresh machine:
# it creates .venv, installs (once; reinstalls only when the install inputs change),
# builds the Cython codec, runs ruff and pytest.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.compresszoo-installed
EXT_STAMP := $(VENV)/.compresszoo-ext-built
PYX := $(wildcard platform/compresszoo/ans/*.pyx)

.PHONY: install build test lint demo bench mutation clean

install: $(STAMP)

# torch/torchvision come from this machine's disk (pip finds them there); compressai is
# the test oracle, installed with --no-deps because its numpy<2 pin is not needed.
$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q setuptools wheel "cython>=3.0" "numpy>=1.26"
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	$(PY) -m pip install -q --no-deps compressai==1.2.8 pytorch-msssim torch-geometric
	touch $(STAMP)

$(EXT_STAMP): $(STAMP) $(PYX) setup.py
	$(PY) setup.py -q build_ext --inplace
	touch $(EXT_STAMP)

build: $(EXT_STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check platform pipelines benchmarks tests cluster

test: build lint
	$(PY) -m pytest -q tests

DEMO_MODEL ?= bmshj2018-hyperprior-mse-q8-N8-M12@champion
DEMO_IMAGE = $$($(PY) -c "import os, skimage.data as d; print(os.path.join(os.path.dirname(d.__file__), 'astronaut.png'))")

# The main job on embedded defaults (local Ray, ./demo folder storage, sqlite ./mlflow.db):
# the four MSE smoke models, then one MS-SSIM model fine-tuned from its registered MSE
# parent (the documented recipe), then a real image through a registered model with the CLI.
demo: build
	$(PY) pipelines/train_zoo.py --preset smoke --workdir demo
	$(PY) pipelines/train_zoo.py --preset smoke --workdir demo --metrics ms-ssim --archs bmshj2018-hyperprior
	$(PY) -m compresszoo.cli encode $(DEMO_IMAGE) -o demo/astronaut.czoo --model $(DEMO_MODEL)
	$(PY) -m compresszoo.cli info demo/astronaut.czoo
	$(PY) -m compresszoo.cli decode demo/astronaut.czoo -o demo/astronaut_decoded.png --model $(DEMO_MODEL)

# Mutation score of the core policy modules (benchmarks/mutation.py with mutmut 3): a
# measurement like a benchmark, not part of `make test`. MUTATION_ARGS, e.g. "--children 1"
# or "--only codec/gate.py".
MUTATION_ARGS ?=
mutation: build
	$(PY) -c "import mutmut" 2>/dev/null || $(PY) -m pip install -q "mutmut>=3.8,<4"
	$(PY) benchmarks/mutation.py $(MUTATION_ARGS)

clean:
	rm -rf build platform/compresszoo/ans/*.so platform/compresszoo/ans/_rans.c $(EXT_STAMP)
