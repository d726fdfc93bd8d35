# The user's verbs. `make demo` and `make test` work on a fresh machine: both create .venv when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed on its own first: on this CPU machine pip resolves it to the local CPU wheel;
# on a GPU box use e.g. `make setup TORCH_SPEC="torch>=2.4"`.
TORCH_SPEC ?= torch==2.13.0
# faiss build: cpu (faiss-cpu) or gpu (faiss-gpu-cu12); exactly one is installed.
FAISS ?= cpu
DATA ?= data/synthetic
SHARDS ?= shards/synthetic
RUN ?=
ARGS ?=
PYTEST_ARGS ?=
# pytest-xdist workers; the multi-process tests share one group and run one after another on one worker
TEST_WORKERS ?= 2

.PHONY: setup demo test test-quick shards pretrain linear-probe finetune retrieval emotion real-motion bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,$(FAISS)]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m mgfm.demo --data $(DATA) --shards $(SHARDS) $(ARGS)

shards: setup
	$(PY) -m mgfm.demo --data $(DATA) --shards $(SHARDS) --until shards

pretrain: setup
	$(VENV)/bin/accelerate launch --quiet --config_file recipes/accelerate/single_cpu.yaml pretrain.py shards=$(SHARDS) $(ARGS)

linear-probe: setup
	$(PY) eval/linear_probe.py $(if $(RUN),run=$(RUN)) shards=$(SHARDS) $(ARGS)

finetune: setup
	$(PY) eval/finetune.py $(if $(RUN),run=$(RUN)) shards=$(SHARDS) $(ARGS)

retrieval: setup
	$(PY) eval/retrieval.py $(if $(RUN),run=$(RUN)) shards=$(SHARDS) $(ARGS)

emotion: setup
	$(PY) eval/emotion.py $(if $(RUN),run=$(RUN)) shards=$(SHARDS) $(ARGS)

# pretraining on the ../shared/data real-motion sets (RECIPE, default recipes/pretrain/real_motion_cpu.yaml),
# 3 seeds, both probes on every snapshot: runs/real-motion/table.md
RECIPE ?=
real-motion: setup
	$(PY) -m experiments.real_motion $(if $(RECIPE),--recipe $(RECIPE)) $(ARGS)

bench: setup
	$(PY) benchmarks/bench_loader.py
	$(PY) benchmarks/bench_pretrain.py
	$(PY) benchmarks/bench_retrieval.py
	$(PY) benchmarks/bench_semi_headroom.py $(if $(RUN),--run $(RUN)) --shards $(SHARDS)

# everything, as CI runs it (.ci/run); test-quick: the tests not marked slow, a few minutes
test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

test-quick: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
