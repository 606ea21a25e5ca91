# The two commands: `make demo` (the main job) and `make test` (linters, then the test suite).
# Both create/update the project virtualenv first (tools/dev/setup_env.sh, idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo lint test bench clean

setup:
	@VENV=$(VENV) bash tools/dev/setup_env.sh

# ends by comparing the fresh numbers with the README's (configs/tables/results/tiny.json)
demo: setup
	$(PY) tools/reproduce.py tiny --work-dir outputs/demo --check

# OpenMMLab's linters (flake8, isort, yapf) as local pre-commit hooks: the tree must be clean
lint: setup
	PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/pre-commit run --all-files --show-diff-on-failure

test: lint
	$(PY) -m pytest -n auto --dist loadfile $(PYTEST_ARGS)

bench: setup
	$(PY) tools/analysis_tools/benchmark_psa.py

clean:
	rm -rf $(VENV) outputs work_dirs
