# Two commands do all the set-up on a fresh machine:
#   make demo   -> create .venv, install hfgen, train on the built-in shapes data and write samples
#   make test   -> create .venv, install hfgen with dev extras, run the whole test suite offline
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# torch is installed first, from TORCH_SPEC: the words are passed to pip unquoted, so pip options work, e.g.
#   make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
# (on Linux PyPI's torch is a multi-GB CUDA build). Quote a specifier with < or >: TORCH_SPEC="'torch>=2.4'".
TORCH_SPEC ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found; run 'make PYTHON=python3 ...'"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

.PHONY: install demo test lint
install: $(VENV)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(PY) examples/demo.py

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests

lint: install
	$(VENV)/bin/ruff check hfgen pipelines training tests examples benchmarks
	$(VENV)/bin/ruff format --check hfgen pipelines training tests examples benchmarks
