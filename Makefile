# The two commands of the quick start, `make demo` and `make test`, work on a
# fresh machine: they create .venv when it is missing and install what they need.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench typecheck clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
	  echo "could not create $(VENV): on Debian, install python3-venv (apt-get install python3-venv)"; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m wsproxy.demo

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/run.py

typecheck: $(STAMP)
	$(BIN)/mypy --strict wsproxy/proto wsproxy/balance wsproxy/config

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .hypothesis
	rm -f wsproxy/*/*.so wsproxy/*/*.mypyc-source-sha256   # extensions setup.py built in place
