# pyhv: every target installs what it needs first (system packages via apt, Python packages
# into .venv), so each works on a fresh Debian 12 machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: all deps venv install build run shell test lint bench wheel clean

all: install

deps:
	./scripts/install-system-deps.sh

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Build requirements live in the venv too (no build isolation), so `make build` can
# rebuild the extensions in place after a .pyx change.
$(STAMP): pyproject.toml setup.py | $(PY)
	$(MAKE) deps
	$(PY) -m pip install -q 'setuptools>=77' wheel 'Cython>=3.0.10,<3.4'
	$(PY) -m pip install -q --no-build-isolation -e '.[test,bench]'
	touch $@

install: $(STAMP) build

# Rebuild the Cython extensions in place when a .pyx/.pxd changed (editable install).
build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

# The main job: check the host, then run a command in the default guest (built on first
# use from Debian's kernel and busybox). `make shell` gives an interactive guest shell.
run: install
	$(VENV)/bin/pyhv doctor
	$(VENV)/bin/pyhv run -- sh -c 'uname -a; echo "pyhv: hello from the default guest"'

shell: install
	$(VENV)/bin/pyhv run

test: install
	$(VENV)/bin/ruff check src tests bench
	$(PY) -m pytest tests

bench: install
	$(PY) -m pytest bench --benchmark-only -p no:cacheprovider
	$(PY) -m bench.report

wheel: $(STAMP)
	PYTHON=$(PY) ./wheels/build.sh

clean:
	rm -rf build dist wheels/out src/*.egg-info
	find src -name '*.so' -delete -o -name '*.c' -path '*/hvcore/*' -delete
