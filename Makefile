# The two commands a new user needs: `make demo` and `make test`.
# Both create .venv and install the package on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
WORKDIR ?= runs/demo
RESULTS ?= docs/results
PYTEST_ARGS ?=

.PHONY: install demo reproduce test test-fast lint bench pins clean

# The versions in constraints.txt, tested together (`make pins` renews them).
$(STAMP): setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,beam]'
	touch $(STAMP)

install: $(STAMP)

# Reference + five learners (uniform, three independent criteria, JEST) on embedded data,
# through the experiment harness (configs/studies/reproduce.py, study=demo).
demo: $(STAMP)
	$(BIN)/python experiments/compare.py configs/studies/reproduce.py:study=demo \
		--workdir $(WORKDIR) --out $(RESULTS)/demo

# The paper's findings at small scale (docs/results.md): every study, resumable (re-run to
# continue; finished runs are reused). Under 1 h 45 min on a 2-core CPU (docs/results.md).
REPRODUCE ?= runs/reproduce
JOBS ?= 2
reproduce: $(STAMP)
	for s in fig3 headline reference confusable; do \
		$(BIN)/python experiments/compare.py configs/studies/reproduce.py:study=$$s \
			--workdir $(REPRODUCE) --out $(RESULTS)/$$s --jobs $(JOBS) || exit 1; \
	done
	$(BIN)/python experiments/study_chunks.py --learner $(REPRODUCE)/uniform_seed0 \
		--name uniform-300 --reference $(REPRODUCE)/ref_curated --draws 20 --super 160 \
		--filter 0.8 --out $(RESULTS)/study_chunks/f0.8
	$(BIN)/python experiments/study_chunks.py --learner $(REPRODUCE)/conf_uniform_seed0 \
		--name confusable-uniform-300 --reference $(REPRODUCE)/ref_confusable --draws 20 \
		--super 160 --filter 0.8 --out $(RESULTS)/study_chunks/confusable_f0.8

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

# Renew constraints.txt: resolve the newest versions setup.py allows in a scratch venv and
# pin them all. Then `make clean test` and commit the file only if the suite passes.
PINS_VENV := .venv-pins
pins:
	rm -rf $(PINS_VENV) && $(PYTHON) -m venv $(PINS_VENV)
	$(PINS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PINS_VENV)/bin/python -m pip install --quiet -e '.[dev,beam]'
	{ sed -n '/^#/p' constraints.txt; \
	  $(PINS_VENV)/bin/python -m pip freeze --exclude-editable | grep -iv '^jest[-_]jax'; \
	} > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt
	rm -rf $(PINS_VENV)

clean:
	rm -rf $(VENV) $(PINS_VENV) runs .pytest_cache
