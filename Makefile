# Two commands on a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# torch first, pinned to the CPU build that lies on these machines' disk, so nothing pulls
# a multi-GB CUDA build; elsewhere the plain `torch>=2.5` requirement of pyproject applies.
TORCH_PIN ?= torch==2.13.0

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN) || $(BIN)/pip install -q "torch>=2.5"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

serve: install
	$(BIN)/afd-serve $(ARGS)

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

.PHONY: install serve test lint
