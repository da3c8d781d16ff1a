# ckd-study: `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PRESET ?= quick
KERNEL ?= ckd-study

.DEFAULT_GOAL := help
.PHONY: help setup test lab reproduce figures bench clean-notebooks

help: ## list the targets
	@echo "ckd-study make targets:"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'
	@echo "variables: PRESET=$(PRESET) (smoke|quick|paper), PYTHON=$(PYTHON), VENV=$(VENV)"

setup: ## create .venv, install the package (editable, with dev extras), register the Jupyter kernel
	@echo ">> creating virtual environment $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)
	@echo ">> installing ckd-study and its dependencies (torch takes a few minutes)"
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -e ".[dev]"
	@echo ">> registering the Jupyter kernel '$(KERNEL)' inside $(VENV)"
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (ckd-study)"
	@echo ">> done: run 'make test'"

test: ## run the test suite (CPU, minutes; real-data tests need CKD_DATA_DIR or data/)
	@echo ">> running pytest"
	$(PY) -m pytest

lab: ## start JupyterLab on the notebooks
	@echo ">> starting JupyterLab in notebooks/"
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

reproduce: ## run every notebook in order with papermill into reports/<preset>/ (resumable)
	@echo ">> reproducing the study with PRESET=$(PRESET)"
	$(PY) -m ckd_study reproduce --preset $(PRESET)

figures: ## rebuild every table and figure of PRESET from stored results, without training
	@echo ">> rebuilding tables and figures for PRESET=$(PRESET) from results/"
	$(PY) -m ckd_study figures --preset $(PRESET)

bench: ## side-by-side speed benchmark: our engine vs the conventional KD loop (resnet32x4->8x4, resnet56->20)
	@echo ">> benchmarking (writes benchmarks/results/)"
	$(PY) benchmarks/bench_training.py
	$(PY) benchmarks/bench_training.py --teacher resnet56 --student resnet20

clean-notebooks: ## strip outputs from the committed notebooks
	@echo ">> stripping notebook outputs"
	$(PY) -m ckd_study strip notebooks/*.ipynb
