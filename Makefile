# `make demo` and `make test` are all the set-up a fresh machine needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A dropped connection mid-wheel (seen here on a 55 MB pyarrow) must not fail a fresh install: retry and resume.
PIP_RETRIES := --retries 10 --resume-retries 10
# The newest releases pyproject.toml allows (what `pip install vtprune` gives a user today), torch still pinned.
VENV_LATEST := .venv-latest
PY_LATEST := $(VENV_LATEST)/bin/python
STAMP_LATEST := $(VENV_LATEST)/.installed

.PHONY: demo demo-qwen test test-latest clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch/torchvision pinned in the same command so no dependency can swap them for another build.
	$(PY) -m pip install --quiet $(PIP_RETRIES) -c constraints.txt torch==2.14.1 torchvision==0.29.1 -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vtprune demo

# The same sweep on the embedded LLaVA's Qwen2-VL twin (M-RoPE, no [CLS], a patch merger).
demo-qwen: $(STAMP)
	$(VENV)/bin/vtprune demo --model embedded-qwen --out vtprune-demo-qwen

test: $(STAMP)
	$(PY) -m pytest -q

$(STAMP_LATEST): pyproject.toml
	$(PYTHON) -m venv $(VENV_LATEST)
	$(PY_LATEST) -m pip install --quiet --upgrade pip
	# No constraints file: pip resolves the newest transformers, lmms-eval, timm, ... in pyproject's ranges.
	$(PY_LATEST) -m pip install --quiet $(PIP_RETRIES) --upgrade torch==2.14.1 torchvision==0.29.1 -e '.[dev]'
	touch $(STAMP_LATEST)

test-latest: $(STAMP_LATEST)
	$(PY_LATEST) -c "import transformers; print('transformers', transformers.__version__)"
	$(PY_LATEST) -m pytest -q

clean:
	rm -rf $(VENV) $(VENV_LATEST) .pytest_cache
