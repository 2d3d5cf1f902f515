# Two entry points for a fresh clone: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test system-deps loadtest clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,fast,otel]'
	@touch $(STAMP)

## make demo: Parkway plus a mock OpenAI upstream on loopback; one signed request streams through it.
demo: $(STAMP)
	$(VENV)/bin/parkway demo --once

## make test: lint, format and type checks, then every test. Installs what the tests need from Debian when it is missing.
test: $(STAMP) system-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy proxy
	$(PY) -m pytest

system-deps:
	@bash .ci/system-deps

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
