# graphprune: `make demo` and `make test` each set up .venv on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-zoo test-notorch bench mutate install clean

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

# The ONNX path in a real venv without torch: `pip install .` (not editable, no extras)
# plus pytest, then the tests marked `notorch` (in the modules that import no torch).
# Run from tests/, so graphprune comes from the installed package.  Not part of `make test`.
NOTORCH_VENV  ?= /tmp/gp-notorch-test
NOTORCH_TESTS := test_notorch.py test_blockperm.py test_layout.py test_onnx_sessions.py test_onnx_with_weights.py
test-notorch:
	rm -rf $(NOTORCH_VENV)
	$(PYTHON) -m venv $(NOTORCH_VENV)
	$(NOTORCH_VENV)/bin/pip install --quiet . pytest
	! $(NOTORCH_VENV)/bin/python -c "import torch" 2>/dev/null
	cd tests && $(NOTORCH_VENV)/bin/python -m pytest -q -p no:cacheprovider -m notorch --rootdir=.. -c ../pyproject.toml $(NOTORCH_TESTS)

bench: $(STAMP)
	$(PY) benchmarks/vs_torch_pruning.py --repeat 3
	$(PY) benchmarks/vs_onnxsim.py
	$(PY) benchmarks/group_convs.py
	$(PY) benchmarks/shrink_factorize.py

# Mutation testing (mutmut 3, config in [tool.mutmut] of pyproject.toml) of rules.py,
# importance.py, channels.py and passes/ against the fast tests that exercise them; prints
# the surviving mutants.  Slow: narrow it with MUTANTS, e.g.
#   make mutate MUTANTS='graphprune.importance*'
# passes/ installs as graphprune.passes: tests/mutmut_aliases.py (a pytest plugin the
# mutmut config loads) makes the mutated mutants/passes that package.
MUTANTS ?=
mutate: $(STAMP)
	$(PY) -m pip install --quiet -e ".[mutate]"
	$(VENV)/bin/mutmut run --max-children 2 $(MUTANTS)
	$(VENV)/bin/mutmut results

clean:
	rm -rf $(VENV) demo-out .pytest_cache mutants
