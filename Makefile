# Two entry points for a fresh clone: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
# Two stamps: the demo needs Parkway's runtime dependencies only; the tests add their extras.
RUNTIME_STAMP := $(VENV)/.runtime-stamp
TEST_STAMP    := $(VENV)/.test-stamp

.PHONY: demo test system-deps loadtest clean

$(RUNTIME_STAMP): setup.cfg pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed"'
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[fast]'
	@touch $(RUNTIME_STAMP)

$(TEST_STAMP): $(RUNTIME_STAMP)
	$(PIP) -e '.[test,fast,otel]'
	@touch $(TEST_STAMP)

## make demo: Parkway plus a mock OpenAI upstream on loopback; one signed request streams through it.
demo: $(RUNTIME_STAMP)
	$(VENV)/bin/parkway demo --once

## make test: lint, format and type checks, then every test. Installs what the tests need from Debian when it is missing.
test: $(TEST_STAMP) system-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy proxy
	$(PY) -m pytest

system-deps:
	@bash .ci/system-deps

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
