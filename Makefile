# The two commands: `make demo` (the main job) and `make test` (the test suite).
# Both create/update the project virtualenv first (tools/setup_env.sh, idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean

setup:
	@VENV=$(VENV) bash tools/setup_env.sh

demo: setup
	$(PY) tools/demo.py

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) tools/benchmark_psa.py

clean:
	rm -rf $(VENV) outputs work_dirs
