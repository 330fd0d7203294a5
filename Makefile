# Two front-door commands (README):  `make run`  and  `make test`.
# Both set up everything they need on a fresh machine: a venv, the pinned
# CPU build of torch (first, so nothing pulls a CUDA build), the package, and
# the helm/kubectl binaries the chart tests use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
TOOLS := .tools

.PHONY: setup tools run test proto bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: pyproject.toml setup.py | $(BIN)/python
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[engine,dev]'
	touch $@

setup: $(VENV)/.installed

tools: $(TOOLS)/bin/helm

$(TOOLS)/bin/helm:
	bash deploy/tools/install-helm.sh $(TOOLS)

run: setup
	$(BIN)/dex up

test: setup tools
	PATH="$(CURDIR)/$(BIN):$(CURDIR)/$(TOOLS)/bin:$$PATH" $(BIN)/python -m pytest -q -p no:cacheprovider tests

proto: setup
	$(BIN)/python -m dexserve.v1.generate

bench: setup
	$(BIN)/dex bench --json

clean:
	rm -rf $(VENV) $(TOOLS)
