# The two commands of the quick start, `make demo` and `make test`, work on a
# fresh machine: they create .venv when it is missing and install what they need.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench typecheck fuzz clean

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

# Coverage-guided fuzzing (atheris) of the frame scanner, the handshake checks,
# the PROXY protocol parser, the router and the config loader: FUZZ_SECONDS per
# target, then a table of inputs and findings (fuzz/README.md).
FUZZ_SECONDS ?= 60
fuzz: $(STAMP)
	@$(BIN)/python -c "import atheris" 2>/dev/null || $(BIN)/python -m pip install --quiet -e '.[test,fuzz]'
	$(BIN)/python -m fuzz.run --seconds $(FUZZ_SECONDS)

typecheck: $(STAMP)
	$(BIN)/mypy --strict wsproxy/proto wsproxy/balance wsproxy/config

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .hypothesis
