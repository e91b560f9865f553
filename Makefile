# Two commands do all the set-up: `make run` and `make test`.
# Both create (once) and reuse the virtual environment in .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=

# A local Prefect server, its work pool and a worker (README, "Running on a Prefect server").
# They are shortcuts for Prefect's own commands (docs/server.md). The server only answers clients
# that send its credentials: it checks PREFECT_SERVER_API_AUTH_STRING (by default the value of
# PREFECT_API_AUTH_STRING), and deploy, worker and every other client send PREFECT_API_AUTH_STRING.
PREFECT_PORT ?= 4200
POOL         ?= ckptflow-process
export PREFECT_SERVER_ANALYTICS_ENABLED = false

.PHONY: run test install clean-venv help server deploy worker

help:
	@echo "make run     run the whole pipeline on built-in defaults (ARGS='--epochs 3' to override)"
	@echo "make test    run the test suite"
	@echo "make server  start a Prefect server on 127.0.0.1:$(PREFECT_PORT) (SQLite) that requires PREFECT_API_AUTH_STRING"
	@echo "make deploy  create the work pool if missing and deploy everything in prefect.yaml"
	@echo "make worker  start a worker on the pool; deployments run from this checkout"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[formats,test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/ckptflow run $(ARGS)

# Two pytest workers: much of the suite waits on process start-up, servers and I/O. Tests that
# share a session fixture (the finished default run, the deployed server) keep to one worker.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup $(ARGS)

clean-venv:
	rm -rf $(VENV)

server: $(STAMP)
	@auth="$${PREFECT_SERVER_API_AUTH_STRING:-$$PREFECT_API_AUTH_STRING}"; \
	if [ -z "$$auth" ]; then \
		echo "make server: no credentials. Set PREFECT_API_AUTH_STRING=USER:PASSWORD here and in the clients' terminals (docs/server.md)." >&2; \
		exit 2; \
	fi; \
	PREFECT_SERVER_API_AUTH_STRING="$$auth" \
	PREFECT_UI_API_URL="$${PREFECT_UI_API_URL:-http://127.0.0.1:$(PREFECT_PORT)/api}" \
	exec $(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

deploy: $(STAMP)
	$(BIN)/prefect work-pool inspect $(POOL) >/dev/null 2>&1 || \
		$(BIN)/prefect work-pool create $(POOL) --type process
	$(BIN)/prefect --no-prompt deploy --all

worker: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/prefect worker start --pool $(POOL)
