# PCBM Studio. `make run` sets up and starts the demo; `make test` sets up and runs the tests.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup run test test-fast bench bench-quick browser-deps lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

# Browser tests need Debian's Chromium (never `playwright install`). Installed when we may (root + apt).
browser-deps:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
		|| echo "warning: could not install chromium; browser tests will be skipped"; \
	fi

run: setup
	$(VENV)/bin/pcbm demo

test: setup browser-deps lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow and not browser" $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench.run_all

bench-quick: setup
	$(PY) -m bench.run_all --quick

# ruff's rules are in pyproject.toml; `make test` runs this first.
lint: setup
	$(VENV)/bin/ruff check .

# Reliability and security (docs/reliability.md). `make test` runs the bounded versions of
# these; the long modes below record their numbers in bench/results.json.
.PHONY: fuzz-long crash-loop load audit

fuzz-long: setup
	FUZZ_MAX_TIME=$${FUZZ_MAX_TIME:-1200} FUZZ_MAX_EXAMPLES=$${FUZZ_MAX_EXAMPLES:-50} FUZZ_SAVE=1 \
		$(PY) -m pytest -p no:cacheprovider -s tests/reliability/test_fuzz_api.py -k schemathesis $(PYTEST_ARGS)

crash-loop: setup
	$(PY) -m bench.crash_loop --iterations $${CRASH_ITERATIONS:-200}

load: setup
	$(PY) -m bench.load --users $${LOAD_USERS:-50} --duration $${LOAD_DURATION:-180}

audit: setup
	$(PY) scripts/pip_audit.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
