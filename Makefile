# graphprune: `make demo` and `make test` each set up .venv on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-zoo bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/graphprune demo --out demo-out

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

test-zoo: $(STAMP)
	$(PY) -m pytest -q -n 2 -m zoo tests

bench: $(STAMP)
	$(PY) benchmarks/vs_torch_pruning.py --repeat 3
	$(PY) benchmarks/vs_onnxsim.py
	$(PY) benchmarks/group_convs.py
	$(PY) benchmarks/shrink_factorize.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
