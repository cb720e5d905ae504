# Two commands on a fresh machine: `make report` (set up + main job) and `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup report test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

report: $(STAMP)
	$(BIN)/fpgrad report --out reports

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2
	$(MAKE) --no-print-directory lint

lint: $(STAMP)
	$(BIN)/ruff check fpgrad tests scripts
	$(BIN)/python -m mypy

clean:
	rm -rf $(VENV)
