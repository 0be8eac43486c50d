# Two commands: `make run` (set up, then pretrain CL-MAE on the built-in digits) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Override for another platform, e.g. TORCH_SPEC="torch torchvision" or a CPU-only index.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup run test soak clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# Pretrain CL-MAE on digits, then k-NN of the encoder next to a random-init encoder of the same shape.
run: setup
	@out=runs/default-$$(date +%Y%m%d-%H%M%S); \
	$(VENV)/bin/clmae pretrain --output-dir $$out && \
	$(VENV)/bin/clmae eval knn --checkpoint $$out --no-progress

# Lint (ruff, configured in pyproject.toml), then the whole suite, one worker per core (at most 4: each worker
# imports torch, ~1 GB). Every test runs on one thread, so two cores halve the wall-clock.
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; n = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count(); print(min(4, n or 1))")
test: setup
	$(VENV)/bin/ruff check src tests benchmarks experiments scripts
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# Fault injection: 12 SIGKILLs at random points of a run, each followed by --resume (< 10 min).
soak: setup
	$(PY) scripts/soak_kill_resume.py --kills 12

clean:
	rm -rf runs .pytest_cache
