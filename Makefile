# Two commands from a fresh clone:  `make demo` (the main job)  and  `make test` (the test suite).
# Both create or reuse a virtual environment in $(VENV) and install what they need into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0: on a machine without an NVIDIA GPU pip serves the CPU build where one is available.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,bench,mpi,transformers
STAMP := $(VENV)/.moe-comm-installed

.PHONY: demo test venv ext clean

$(STAMP): pyproject.toml $(wildcard setup.py) $(shell find csrc -type f 2>/dev/null)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

venv: $(STAMP)

# The main job: a small DeepSeek-V3-style MoE model trained with expert + pipeline (DualPipeV) parallelism,
# then the dispatch/combine bandwidth benchmark. CPU ranks over gloo without a GPU, one rank per GPU with.
demo: $(STAMP)
	$(PY) examples/train_moe.py
	$(PY) -m moe_comm.bench

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
