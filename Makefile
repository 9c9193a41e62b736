# The two commands: `make demo` (set up + run the pipeline on the default model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# The CPU wheel of torch that pip finds on this kind of machine; installed before the project so
# that pyproject's torch range is already satisfied and no CUDA build is pulled.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test test-slow lint demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,ray,deepspeed]"
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

test-slow: setup
	$(BIN)/pytest -q -m slow

demo: setup
	$(BIN)/rlaif models pull smollm2-135m
	$(BIN)/rlaif run configs/demo.yaml

bench: setup
	$(PY) benchmarks/roofline.py
	$(PY) benchmarks/generation.py

clean:
	rm -rf $(VENV) build *.egg-info
