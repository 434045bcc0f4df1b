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
# One stamp per set of extras: `make docs` adds the docs extra on top of $(STAMP)'s install (pip
# only adds what is missing), so `make test` never installs the documentation tools.
EXTRAS := tensorflow-cpu,torch,test,dev,examples,progress
DOCS_STAMP := $(VENV)/.installed-docs
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONHASHSEED ?= 0

.PHONY: demo test test-slow lint format bench examples docs docs-images clean wheel-check

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[$(EXTRAS),docs]'
	touch $(DOCS_STAMP)

demo: $(STAMP)
	$(PY) -m tfreg.parity --quick

# The suite minus the `slow` sweeps (the long seed sweeps and benchmark smoke runs), kept under
# ~10 minutes on 2 cores; CI runs `make test-slow` after it, so every test runs in CI.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

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
	          tf_gradient_accumulation masked_sequence_accumulation dropout_batchnorm \
	          structured_pruning; do \
		$(PY) -m examples.$$ex || exit 1; \
	done

# The site, into site/ (--strict: a broken link or reference, or a public name without a docstring,
# fails). The pictures are committed PNGs under docs/images/: `make docs-images` redraws them.
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# Redraws docs/images/ (about 8 minutes) from the examples at their default, small sizes and the
# --plot of `tfreg-parity --quick`, as 64-colour PNGs (~220 KB in all).
docs-images: $(STAMP)
	for ex in linear_regression cnn_weight_regularization dropout_batchnorm \
	          tf_gradient_accumulation structured_pruning lasso_logistic_regression; do \
		$(PY) -m examples.$$ex --out docs/images || exit 1; \
	done
	$(PY) -m tfreg.parity --quick --plot docs/images
	$(PY) docs/_hooks/shrink_png.py docs/images/*.png

bench: $(STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) build dist site *.egg-info .pytest_cache .ruff_cache .mypy_cache
