# The two commands: `make demo` (the main job) and `make test` (linters, then the test suite);
# `make docs` builds the documentation. Each creates/updates the project virtualenv first
# (tools/dev/setup_env.sh, idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo lint test docs bench clean

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

# docs/en (Markdown via MyST) into outputs/docs/html: a fresh build (-E), every warning an error
# (-W --keep-going), nitpicky references (-n), internal links and anchors resolved; no network
docs: setup
	$(PY) -m sphinx -E -W --keep-going -n -q -b html docs/en outputs/docs/html
	@echo "docs: outputs/docs/html/index.html"

bench: setup
	$(PY) tools/analysis_tools/benchmark_psa.py

clean:
	rm -rf $(VENV) outputs work_dirs
