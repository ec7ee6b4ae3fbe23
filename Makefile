# fedge — everything from zero on a fresh machine: `make test`, `make demo`, `make bench`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Debian packages the build and the tests need; installed only when missing.
# python3-dev: Python.h for CMake's Development.Module (fedge._core) and for
# building systemd-python (with libsystemd-dev).
APT_PKGS := build-essential cmake ninja-build pkg-config libsystemd-dev systemd \
            dpkg-dev fakeroot lintian python3-venv python3-dev git
CORE_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/*.hpp csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h) \
                CMakeLists.txt pyproject.toml

.PHONY: test demo bench lint apt deps core clean deb deb-lint

apt: $(VENV)/.stamp-apt
$(VENV)/.stamp-apt:
	@missing=""; for p in $(APT_PKGS); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@mkdir -p $(VENV) && touch $@

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: the CPU build lies on disk; a looser pin pulls CUDA wheels.
$(VENV)/.stamp-torch: $(VENV)/.stamp-apt | $(VENV)/bin/python
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q "scikit-build-core>=0.10" "pybind11>=2.12"
	touch $@

deps: $(VENV)/.stamp-deps
$(VENV)/.stamp-deps: $(VENV)/.stamp-torch $(CORE_SOURCES)
	$(PIP) install -q --no-build-isolation -e ".[test,systemd]"
	touch $@

core: deps
	$(PY) -c "import fedge.core as c; print(c.info())"

lint: deps
	$(VENV)/bin/ruff check fedge tests bench

# The suite on TEST_WORKERS processes (pytest-xdist; a test file stays on one worker,
# so its module fixtures are built once), then the Debian package's tests alone: they
# install into / (dpkg, adduser) and purge again, which no other test should overlap.
TEST_WORKERS ?= 2
test: deps lint
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile --ignore=tests/debian_package tests
	$(PY) -m pytest -q -ra tests/debian_package

demo: deps
	$(VENV)/bin/fedge demo

bench: deps
	@failed=""; for b in bench/*.py; do \
	  case $$b in bench/_*|bench/gpu_check.py) continue;; esac; \
	  echo "== $$b"; $(PY) $$b || failed="$$failed $$b"; done; \
	  if [ -n "$$failed" ]; then echo "bench: failed:$$failed" >&2; exit 1; fi

# The Debian package: dist/fedge_VERSION_amd64.deb (packaging/build_deb.py; the
# staging venv is cached in build/deb). DEB_VERSION=0.3.0-2 to override.
DEB_VERSION ?=
deb: deps
	$(PY) packaging/build_deb.py --out dist $(if $(DEB_VERSION),--version $(DEB_VERSION))

# lintian on the package, failing on any error (slow: ~200 ELF objects from the
# wheels; CI runs it after `make test`).
deb-lint: deb
	lintian --fail-on error --tag-display-limit 0 $$(ls -t dist/fedge_*_amd64.deb | head -1)

clean:
	rm -rf build dist *.egg-info $(VENV)
