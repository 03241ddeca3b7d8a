# Two commands matter: `make serve` and `make test`. Everything else is a step of theirs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEPS   := $(VENV)/.deps-installed
APT_STAMP := $(VENV)/.apt-installed
# `make serve` leaves the address to the settings (PLEXUS_HOST, PLEXUS_PORT, a
# config file: defaults 127.0.0.1:8000); `make serve PORT=9000` still works.

.PHONY: serve test install system-deps js-deps lint typecheck pytest jstest autobahn-env bench mutation clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(DEPS): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(DEPS)

serve: install
	$(BIN)/plexus serve $(if $(filter command line,$(origin HOST)),--host $(HOST)) $(if $(filter command line,$(origin PORT)),--port $(PORT))

# System packages the tests use: Debian's chromium for the browser tests,
# redis-server for the multi-node tests (each test starts its own on a free
# loopback port) and nginx for the load-balancer test. Installed only when missing.
system-deps:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

js-deps:
	@if [ -f clients/js/package.json ]; then cd clients/js && (npm ci --no-audit --no-fund --silent || npm install --no-audit --no-fund --silent); fi

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: install
	$(BIN)/mypy --strict src

jstest: js-deps
	@if [ -f clients/js/package.json ]; then cd clients/js && npm test; fi

# The Autobahn suite needs pyenv's Python 2.7; without it the test skips
# (except under CI=true, where it must run).
autobahn-env:
	@tests/conformance/install_autobahn.sh || [ $$? -eq 3 ]

pytest: install system-deps js-deps autobahn-env
	$(BIN)/python -m pytest -q

test: lint typecheck jstest pytest

bench: install
	$(BIN)/python -m bench

# Mutation testing (not part of `make test`): mutmut mutates the modules listed
# in pyproject.toml ([tool.mutmut] only_mutate) and runs the fast tests against
# each mutant. From scratch every time (about a minute), so the report never
# mixes old results with new code. Survivors: artifacts/mutation/report.md;
# fails while one is neither killed nor judged equivalent in docs/testing.md.
MUTATION_DEPS := $(VENV)/.mutation-installed
MUTATION_JOBS ?= 2

$(MUTATION_DEPS): pyproject.toml | $(DEPS)
	$(BIN)/pip install --quiet -e '.[dev,mutation]'
	touch $@

mutation: $(MUTATION_DEPS)
	rm -rf mutants
	mkdir -p artifacts/mutation
	$(BIN)/mutmut run --max-children $(MUTATION_JOBS) >artifacts/mutation/mutmut.log 2>&1 \
	  || { tail -c 4000 artifacts/mutation/mutmut.log; exit 1; }
	$(BIN)/python -m tests.mutation

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache plexus-data artifacts mutants
