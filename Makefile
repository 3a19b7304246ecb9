# Entry points (see README.md): `make demo`, `make test` (what .ci/run calls) and `make test-fast`.
# All install first. The test tiers are pytest markers (tests/conftest.py):
#   test-fast       no SGLang server started (-m "not server and not slow"), several tests at once
#   test            everything but the scenario runs: the tests without a server several at a
#                   time, then the server tests one at a time (both phases run; it fails if either did)
#   test-scenarios  the long scenario runs (start-up storm, benchmark run) kept out of `make test`
# The install is a virtualenv inside the checkout; pip's own cache (~/.cache/pip) is reused,
# and a stamp file makes a second run a no-op until pyproject.toml changes. What it installs is
# byte-compiled (keep it: where PYTHONDONTWRITEBYTECODE is set, as on the development box, nothing
# else would, and every server start would compile SGLang from source) by compileall on every core
# rather than by pip one file at a time; a file this Python cannot compile (torch ships one written
# for 3.12) is skipped, as pip skips it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pfs-installed

PYTEST := $(PY) -m pytest -q -p no:cacheprovider
# workers for the tests without a server: they mostly wait on sockets and child processes
JOBS ?= 4

.PHONY: install demo test test-fast test-scenarios replicate clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --progress-bar off --no-compile -e '.[test]'
	$(PY) -m compileall -qq -j 0 $$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))') || true
	touch $(STAMP)

demo: install
	$(PY) examples/demo.py

test: install
	@status=0; \
	$(PYTEST) -n $(JOBS) --durations=10 -m "not server and not scenario" tests || status=$$?; \
	$(PYTEST) --durations=15 -m "server and not scenario" tests || status=$$?; \
	exit $$status

test-fast: install
	$(PYTEST) -n $(JOBS) --durations=10 -m "not server and not slow and not scenario" tests

test-scenarios: install
	$(PYTEST) --durations=15 -m scenario tests

replicate: install
	$(PY) -m pfs_sglang.train replicate out/replication --report-dir docs/replication

clean-venv:
	rm -rf $(VENV)
