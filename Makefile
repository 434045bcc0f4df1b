# Every target creates .venv on first use and installs what it needs, so a fresh clone needs only
# python3 (with venv) and make. torch is pinned to 2.13.0: on this project's machines pip finds a
# local CPU-only wheel for it, while an unpinned torch would pull a multi-GB CUDA build (on other
# Linux machines PyPI's torch is the CUDA build too: point pip at PyTorch's CPU wheel index there).
# CI and this Makefile use tensorflow-cpu (see README for GPU users); constraints.txt pins the
# versions the tests were validated against.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONHASHSEED ?= 0

.PHONY: demo test lint format bench examples clean wheel-check

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[tensorflow-cpu,torch,test,dev,examples,progress]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tfreg.parity --quick

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# Builds the sdist and wheel and installs the wheel into fresh venvs, one per extra set
# (tensorflow-cpu, torch, both): see .ci/wheel_check.
wheel-check: $(STAMP)
	bash .ci/wheel_check $(PY)

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

examples: $(STAMP)
	for ex in lasso_logistic_regression cnn_weight_regularization linear_regression \
	          tf_gradient_accumulation masked_sequence_accumulation dropout_batchnorm; do \
		$(PY) -m examples.$$ex || exit 1; \
	done

bench: $(STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache
