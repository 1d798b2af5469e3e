# The two commands a new user needs: `make demo` and `make test`.
# Both create .venv and install the package on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
WORKDIR ?= runs/demo
RESULTS ?= docs/results
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint bench clean

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,beam]'
	touch $(STAMP)

install: $(STAMP)

# Reference + five learners (uniform, three independent criteria, JEST) on embedded data.
demo: $(STAMP)
	$(BIN)/python experiments/compare_methods.py --workdir $(WORKDIR) --out $(RESULTS)

# Whole suite, slow end-to-end tests included (that is what CI runs). worksteal: a worker
# that runs out of tests takes half of the other's queue, so no long test is left alone at the end.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist worksteal $(PYTEST_ARGS) tests

# Everything but the tests marked slow.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist worksteal -m "not slow" $(PYTEST_ARGS) tests

lint: $(STAMP)
	$(BIN)/ruff check jest_jax configs experiments tests

bench: $(STAMP)
	$(BIN)/python experiments/bench_train.py
	$(BIN)/python experiments/bench_selection.py
	$(BIN)/python experiments/bench_input.py
	$(BIN)/python experiments/bench_cache.py

clean:
	rm -rf $(VENV) runs .pytest_cache
