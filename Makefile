# Two commands do all the set-up on a fresh machine (no GPU needed):
#   make quickstart   install what is missing, then run the quickstart sweep
#   make test         install what is missing, then run the test suite (.ci/run runs exactly this)
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install quickstart test fashion-mnist

install: $(VENV)/.installed

# torch first, pinned: its CPU wheel is local; an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
# pip byte-compiles what it installs on one core (about half of the install's time); compileall does the
# same on every core, skipping the packages' own test suites (a fifth of the code; nothing imports them).
# A few files are not Python 3.11 (torch's py312 test helpers): pip skips them silently, compileall
# reports them, hence `|| true` (a file left uncompiled only costs its import).
	$(PY) -m pip install -q --disable-pip-version-check --no-compile torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check --no-compile -e ".[dev]"
	$(PY) -m compileall -q -j 0 -x '/tests/|/testing/_internal/' \
	  "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" >/dev/null || true
	touch $@

fashion-mnist:
	@test -f $(FMNIST) || $(SUDO) apt-get install -y -q dataset-fashion-mnist \
	  || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist)

quickstart: install fashion-mnist
	$(VENV)/bin/diffsweep run search_spaces/quickstart.yaml --overwrite

# pytest exits 5 when it collects no tests; that is not a failure of the suite.
test: install fashion-mnist
# Four workers on any machine: most of the suite waits on Ray, MLflow and child processes, so four keep
# two cores busy (six overloaded Ray's start-up on two cores). loadfile keeps each file on one worker, so a
# module's shared sweep is made once (xdist's loadgroup marks are not honoured under pytest 9: their sweeps
# were made once per worker); tests/conftest.py orders the files longest first and --no-loadscope-reorder keeps that order.
	$(PY) -m pytest -q -n 4 --dist loadfile --no-loadscope-reorder; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi
