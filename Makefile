# fedsim: `make demo` trains the quickstart federation; `make test` runs the test suite.
# Both create .venv (Python 3.11) if it is missing and install the pinned versions.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fedsim-installed

.PHONY: install demo test test-all clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/fedsim run scenarios/quickstart.yaml

test: install
	$(PY) -m pytest -q -p no:cacheprovider

# Everything, including tests marked slow.
test-all: install
	$(PY) -m pytest -q -p no:cacheprovider -m ""

clean:
	rm -rf runs .pytest_cache
