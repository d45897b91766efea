# The two commands of the README contract: `make demo` and `make test`.
# Each creates .venv when missing and installs the project into it; a second run only
# re-checks the install (fast), keyed on pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= demo-out

.PHONY: demo test install lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q tests

demo: install
	$(BIN)/ddeseg demo --out $(DEMO_OUT)

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
