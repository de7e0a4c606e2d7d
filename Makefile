# The two commands: `make demo` (the main job on its embedded offline default) and `make test`.
# Each creates the virtualenv on first use; the dev extra pins torch==2.13.0 (on these machines pip
# takes the local CPU build of it) for the parity tests.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

.PHONY: install demo test
install: $(STAMP)

demo: $(STAMP)
	$(PY) -m train.squad

test: $(STAMP)
	$(PY) -m pytest -q -n 2
