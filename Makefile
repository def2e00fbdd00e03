# `make demo` and `make test` are all the set-up a fresh machine needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch/torchvision pinned in the same command so no dependency can swap them for another build.
	$(PY) -m pip install --quiet -c constraints.txt torch==2.14.1 torchvision==0.29.1 -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vtprune demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
