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

$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
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
