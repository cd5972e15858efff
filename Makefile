# `make demo` runs the main job; `make test` runs the tests. Each creates or refreshes .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PIP := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: demo test install bench clean

install: $(STAMP)

# torch is pinned here (a CPU build); the package itself only asks for a compatible range
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[ann,serve,report,dev]'
	touch $(STAMP)

demo: $(STAMP)
	PATH=$(VENV)/bin:$$PATH bash scripts/demo.sh

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache
