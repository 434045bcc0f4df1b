# Every target creates .venv on first use and installs what it needs, so a fresh clone needs nothing
# but python3. torch is pinned to the CPU build that pip finds locally; an unpinned torch would pull
# a multi-GB CUDA build. CI and this Makefile use tensorflow-cpu (see README for GPU users).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONHASHSEED ?= 0

.PHONY: demo test lint format bench examples clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[tensorflow-cpu,torch,test,dev,examples,progress]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tfreg.parity --quick

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

examples: $(STAMP)
	for ex in lasso_logistic_regression cnn_weight_regularization linear_regression \
	          tf_gradient_accumulation dropout_batchnorm; do \
		$(PY) -m examples.$$ex || exit 1; \
	done

bench: $(STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
