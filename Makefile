# The two front-door commands (see README): `make demo` and `make test`.
# Both bootstrap everything they need on a fresh clone: the virtual environment with pinned
# dependencies, the numba cache, and the local Apache Kafka broker from ops/kafka.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11 ($(PYTHON)) is required"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==25.3
	$(BIN)/pip install --quiet --constraint requirements.lock -e '.[test]'
	touch $(STAMP)

demo: setup
	ops/kafka fetch
	$(BIN)/riskpipe demo

test: setup
	ops/kafka fetch
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/riskpipe bench kernel

clean:
	ops/kafka down || true
	rm -rf $(VENV) .riskpipe .pytest_cache
