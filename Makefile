# The user's verbs. `make demo` and `make test` work on a fresh machine: both create .venv when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed on its own first: on this CPU machine pip resolves it to the local CPU wheel;
# on a GPU box use e.g. `make setup TORCH_SPEC="torch>=2.4"`.
TORCH_SPEC ?= torch==2.13.0
DATA ?= data/synthetic
SHARDS ?= shards/synthetic
RUN ?=
PYTEST_ARGS ?=

.PHONY: setup demo test shards pretrain linear-probe finetune retrieval emotion bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m mgfm.demo --data $(DATA)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
