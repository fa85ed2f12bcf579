# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.dedn-installed

export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install test demo benchmark clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The pinned torch is the CPU build on these machines; an unpinned one pulls CUDA (GBs).
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) jobs/train.py

benchmark: $(STAMP)
	$(PY) jobs/benchmark.py --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
