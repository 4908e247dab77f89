# Two commands do all set-up on a fresh clone:
#   make demo   create/refresh .venv, then run the main job (python -m jobs.demo)
#   make test   create/refresh .venv, then run the whole test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint bench venv clean

venv: $(STAMP)

# Re-install whenever the pins or the package metadata change (a stale .venv is rebuilt in place).
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -c "from pipeline.flows.kernels import native; native.load()"  # build the C++ flow nodes once (~1 min)
	$(PY) -c "from pipeline.extensions import prebuild_deepspeed_ops; prebuild_deepspeed_ops()"  # DeepSpeed's CPU comm op
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m jobs.demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

# the inner loop's tier (about 1 minute on 2 cores): the flow, models, data, config, metrics, imports; no
# multi-process training, servers or fault injection (those run in `make test` and CI)
FAST := tests/flows tests/models tests/data tests/test_config.py tests/test_metrics.py tests/test_imports.py \
        tests/test_dist.py
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(FAST) $(ARGS)

# the house checks CI runs before the tests: ruff (lint + format), and nothing in the product refers outside
# the repository
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	@! grep -rnE '\.\./(s)hared' README.md docs pipeline jobs launch benchmarks tests Makefile pyproject.toml \
		requirements.txt Dockerfile .ci || (echo "make lint: the lines above refer outside the repository"; exit 1)

bench: $(STAMP)
	$(PY) benchmarks/ica.py

clean:
	rm -rf $(VENV) build *.egg-info
