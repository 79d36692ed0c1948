# Two commands do everything on a fresh clone: `make demo` and `make test` (both set up .venv first).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test test-fast demo bench docs docker clean

# Idempotent: re-runs only when the install recipe or the dependency list changes.
# tools/setup_system.sh: apt packages for multi-node launches (ssh, pdsh, OpenMPI); a no-op when present.
$(VENV)/.installed: pyproject.toml tools/setup_env.sh tools/setup_system.sh
	bash tools/setup_system.sh
	bash tools/setup_env.sh $(VENV)
	touch $@

setup: $(VENV)/.installed

# Every tier: unit (one process), distributed (2-4 gloo ranks), e2e (the CLI as a user runs it).
# The unit tier runs on two workers, one test file each (a file's module fixtures are built once); the distributed
# and e2e tiers launch 2-4 ranks per test and run one test at a time. Both run even if the first fails.
test: setup
	rc=0; \
	OMP_NUM_THREADS=1 $(PY) -m pytest tests/unit -n 2 --dist loadfile --durations=15 || rc=1; \
	OMP_NUM_THREADS=1 $(PY) -m pytest tests/distributed tests/e2e --durations=25 || rc=1; \
	exit $$rc

test-fast: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -m "not slow"

demo: setup
	bash tools/demo.sh

bench: setup
	$(PY) benchmarks/preprocess.py --output benchmarks/results/preprocess.json

# The README's config reference is generated from the dataclasses (tests/unit/test_readme.py checks it).
docs: setup
	$(PY) -m neox.config.reference --update-readme README.md

# The GPU and CPU images (no Docker engine on the dev machines; tests/unit/test_dockerfile.py checks both files).
IMAGE ?= neox
docker:
	docker build -f Dockerfile -t $(IMAGE):gpu .
	docker build -f Dockerfile.cpu -t $(IMAGE):cpu .

clean:
	rm -rf runs .pytest_cache
