# Two commands set everything up on a fresh machine:
#   make quickstart   - install, then run the offline main job
#   make test         - install, then run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install quickstart test stress bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -e ".[dev]"

quickstart: install
	$(BIN)/python -m tl_lightning fit --config configs/quickstart.yaml

# 4 workers (pytest-xdist) on any core count: most tests wait on processes they start; loadgroup keeps the
# SLURM cluster tests on one worker
test: install
	$(BIN)/python -m pytest -q -n 4 --dist loadgroup --durations=20 --timeout=1200 tests

stress: install  # the suite 3 times, each while two CPU-bound processes compete for the cores
	bash tests/stress.sh 3

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf runs lightning_logs .pytest_cache
