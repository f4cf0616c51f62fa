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

# py-consul's own test suite runs against Trellis (tests/test_pyconsul_suite.py), from the
# source distribution of the py-consul the test extras install (wheels carry no tests). It is
# downloaded here, never at test time; the test unpacks a fresh copy of it for every run.
PY_CONSUL_VERSION = 1.8.0
PY_CONSUL_SDIST = build/py-consul/py_consul-$(PY_CONSUL_VERSION).tar.gz

# Its asyncio client's tests need aiohttp and pytest-asyncio: they go in a directory of their
# own that only that run puts on its path (installed in the environment, pytest-asyncio would
# plug itself into every run of Trellis's own suite).
PY_CONSUL_DEPS = build/py-consul/deps

$(PY_CONSUL_SDIST): | $(BIN)/python
	$(BIN)/python -m pip download --quiet --no-binary :all: --no-deps \
		--dest build/py-consul 'py-consul==$(PY_CONSUL_VERSION)'
	$(BIN)/python -m pip install --quiet --upgrade --target $(PY_CONSUL_DEPS) 'aiohttp==3.14.5'
	$(BIN)/python -m pip install --quiet --upgrade --no-deps --target $(PY_CONSUL_DEPS) \
		'pytest-asyncio==1.5.0'
	test -f $@

$(STAMP): $(BIN)/python setup.cfg pyproject.toml $(PY_CONSUL_SDIST)
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
