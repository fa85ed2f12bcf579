# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.dedn-installed

export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install lint test test-fast demo server benchmark gpu-check clean

# pip: --quiet drops progress chatter only (warnings and errors still print); no version nag.
PIP := $(PY) -m pip --disable-pip-version-check
# setuptools' editable install of this flat layout always emits an informational BuildBackendWarning
# ("Editable installation. Please be careful with folders ... same name as your package"); no
# setting avoids it (compat mode would put the repo root on sys.path). Only that one message is
# ignored, only for that one pip call.
QUIET_EDITABLE := PYTHONWARNINGS="ignore:Editable installation$${PYTHONWARNINGS:+,$$PYTHONWARNINGS}"

$(STAMP): pyproject.toml
	@echo "dedn: installing into $(VENV) (the first time takes a few minutes)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PIP) install --quiet --upgrade pip
# The pinned torch is the CPU build on these machines; an unpinned one pulls CUDA (GBs).
	@$(PIP) install --quiet torch==2.13.0
	@$(QUIET_EDITABLE) $(PIP) install --quiet -e '.[test]'
	@touch $(STAMP)
	@echo "dedn: installed (editable) into $(VENV)"

install: $(STAMP)

# The layers of docs/design.md (import-linter's contracts in pyproject.toml) and ruff's rules, in seconds.
lint: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q tests

# The edit loop: every test but the slow ones (marker `slow`: Ray jobs, sweeps, clusters), in two processes
# (pytest-xdist, a module's tests together: its Ray and fixtures are made once). Measured: about 100 s
# instead of 150 on the 2-core machine, where one process leaves a core idle while it waits for Ray. The
# full suite stays in one process: its time goes to Ray Train runs that already fill both cores, and two
# processes were no faster (docs/development.md#tests).
test-fast: lint
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow" tests

demo: $(STAMP)
	$(PY) jobs/train.py

# Team mode: PostgreSQL + an MLflow server with basic auth and proxied artifacts (docs/team.md).
# SERVER_ARGS passes options, e.g. make server SERVER_ARGS="--data-dir /srv/dedn-team --port 5000".
server: $(STAMP)
	$(PY) jobs/server.py start $(SERVER_ARGS)

benchmark: $(STAMP)
	$(PY) bench/benchmark.py --quick

# One command on a GPU node, under 8 minutes: GEMM peaks, step times, the DDP loop held vs streamed,
# bf16 vs fp32 (bench/gpu_check.py). Needs a CUDA build of torch (the pinned CPU build above has no CUDA);
# on a bare node without this venv: PYTHONPATH=. python bench/gpu_check.py (docs/performance.md).
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .import_linter_cache
