# The two commands of the README's quick start:
#   make dev   sets everything up and runs `trellis dev`
#   make test  sets everything up and runs the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: dev test lint bench clean
# mypy reads the modules under their installed names (trellis.api, trellis.proxy) through
# these links; see mypy.ini.
TYPECHECK = build/typecheck/trellis

$(BIN)/python:
	$(PYTHON) -c 'import sys; sys.exit("Trellis needs Python 3.11 or newer") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)

# python-consul and python-consul2 ship the same top-level package ("consul") as py-consul,
# so they cannot share the environment: each goes in a directory of its own, which
# tests/test_integration_compat_clients.py imports it from (their one dependency beyond
# requests, six, is in the test extras).
CONSUL_CLIENTS = build/consul-clients

$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps --upgrade \
		--target $(CONSUL_CLIENTS)/python-consul 'python-consul==1.1.0'
	$(BIN)/python -m pip install --quiet --no-deps --upgrade \
		--target $(CONSUL_CLIENTS)/python-consul2 'python-consul2==0.1.5'
	touch $(STAMP)

dev: $(STAMP)
	$(BIN)/trellis dev

# Phony so that an existing build/typecheck gets links added since (terraform/): the recipe
# is idempotent and instant.
.PHONY: $(TYPECHECK)
$(TYPECHECK):
	mkdir -p $(TYPECHECK)
	ln -sfn ../../../api $(TYPECHECK)/api
	ln -sfn ../../../proxy $(TYPECHECK)/proxy
	ln -sfn ../../../terraform $(TYPECHECK)/terraform
	ln -sfn ../../../connect $(TYPECHECK)/connect

# tests/test_browsers_chromium.py drives Debian's Chromium through Playwright (never
# `playwright install`, which would download a browser of its own). Installing it needs root.
CHROMIUM = /usr/bin/chromium
$(CHROMIUM):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

test: $(STAMP) $(TYPECHECK) $(CHROMIUM)
	$(BIN)/ruff check api proxy connect terraform tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check api proxy connect terraform tests bench
	$(BIN)/ruff format --check api proxy connect terraform tests bench

bench: $(STAMP)
	$(BIN)/python bench/control_plane.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
