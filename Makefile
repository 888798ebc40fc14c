# The README's two commands: `make run` and `make test`. Each creates .venv when it is
# missing and installs the project into it (pinned torch/torchvision from constraints.txt),
# with the `ray` extra so that the Ray executor's test runs rather than skips; both are
# quick once the venv exists.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stitchbench-installed

.PHONY: install run test bench lint clean-runs

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev,ray]"
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/stitchbench run

# The tests on every core (pytest-xdist); the shared trained workspace is made once.
test: $(STAMP)
	$(PY) -m pytest -n auto --dist loadgroup

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only -s

lint: $(STAMP)
	$(VENV)/bin/ruff check stitchbench plugins tests benchmarks

# This workspace's results (runs, artifacts, models, caches); registry/ is kept.
clean-runs: $(STAMP)
	$(VENV)/bin/stitchbench clean
