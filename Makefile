# Two commands do all the set-up: `make run` and `make test`.
# Both create (once) and reuse the virtual environment in .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: run test install clean-venv help

help:
	@echo "make run    run the whole pipeline on built-in defaults (ARGS='--epochs 3' to override)"
	@echo "make test   run the test suite"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[formats,test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/ckptflow run $(ARGS)

test: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m pytest $(ARGS)

clean-venv:
	rm -rf $(VENV)
