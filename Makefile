# Two entry points (see README.md): `make demo` and `make test`. Both install first.
# The install is a virtualenv inside the checkout; pip's own cache (~/.cache/pip) is reused,
# and a stamp file makes a second run a no-op until pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pfs-installed

.PHONY: install demo test replicate clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --progress-bar off -e '.[test]'
	touch $(STAMP)

demo: install
	$(PY) examples/demo.py

test: install
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 tests

replicate: install
	$(PY) -m pfs_sglang.train replicate out/replication --report-dir docs/replication

clean-venv:
	rm -rf $(VENV)
