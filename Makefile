# The two commands of the quick start, `make demo` and `make test`, work on a
# fresh machine: they create .venv when it is missing and install what they need.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
# pip's output goes to a log shown only when the install fails (make demo stays quiet)
PIP_QUIET := --quiet --disable-pip-version-check

.PHONY: demo test bench typecheck fuzz conformance clean wheel

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
	  echo "could not create $(VENV): on Debian, install python3-venv (apt-get install python3-venv)"; exit 1; }
	$(BIN)/python -m pip install $(PIP_QUIET) --upgrade pip
	$(BIN)/python -m pip install $(PIP_QUIET) -e '.[test]'
	@touch $(STAMP) $(DEMO_STAMP)

# The demo needs the runtime and trio-websocket only (the `demo` extra), not the test tools.
$(DEMO_STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
	  echo "could not create $(VENV): on Debian, install python3-venv (apt-get install python3-venv)"; exit 1; }
	@echo "installing wsproxy and the demo's backends into $(VENV) (log: $(VENV)/install.log)"
	@$(BIN)/python -m pip install $(PIP_QUIET) -e '.[demo]' >$(VENV)/install.log 2>&1 || { cat $(VENV)/install.log; exit 1; }
	@touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	@$(BIN)/python -m wsproxy.demo

# The wheel an operator installs (README: Install): dist/wsproxy-VERSION-*.whl
wheel: $(STAMP)
	$(BIN)/python -m build --wheel --outdir dist .

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

# `make conformance [CASES='1 2 6.3.* 7.9.1'] [REUSE_DIRECT=1]`: the Autobahn|Testsuite
# fuzzing client against Autobahn's echo servers, directly and through wsproxy
# (conformance/run.py; not part of `make test`). Autobahn|Testsuite runs only on
# Python 2.7 (PY27, e.g. pyenv's): it gets its own virtualenv, made with a
# pinned virtualenv that still supports 2.7, and pinned requirements.
PY27      ?= $(shell for p in python2.7 $$HOME/.pyenv/versions/2.7*/bin/python2.7; do \
               $$p -c 'import sys; assert sys.version_info[:2] == (2, 7)' 2>/dev/null && { echo $$p; break; }; done)
AB_VENV   := .venv-autobahn
AB_STAMP  := $(AB_VENV)/.installed
CASES     ?=
REUSE_DIRECT ?=

$(AB_STAMP): conformance/requirements-py27.txt
	@test -n '$(PY27)' && $(PY27) -c 'import sys; assert sys.version_info[:2] == (2, 7)' 2>/dev/null || { \
	  echo "make conformance needs Python 2.7 (Autobahn|Testsuite runs on nothing else): set PY27=/path/to/python2.7"; exit 1; }
	rm -rf $(AB_VENV)
	$(PY27) -m pip install --quiet --disable-pip-version-check --target $(AB_VENV)/.virtualenv 'virtualenv==16.7.12'
	PYTHONPATH=$(AB_VENV)/.virtualenv $(PY27) -m virtualenv --quiet --no-download $(AB_VENV)
	$(AB_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r conformance/requirements-py27.txt
	@touch $(AB_STAMP)

conformance: $(STAMP) $(AB_STAMP)
	$(BIN)/python conformance/run.py --wstest $(AB_VENV)/bin/wstest --python2 $(AB_VENV)/bin/python \
	  --cases '$(CASES)' $(if $(REUSE_DIRECT),--reuse-direct)

clean:
	rm -rf $(VENV) $(AB_VENV) build dist *.egg-info .pytest_cache .mypy_cache .hypothesis
	rm -f wsproxy/*/*.so wsproxy/*/*.mypyc-source-sha256   # extensions setup.py built in place
