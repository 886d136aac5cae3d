# The commands of the README. Each sets itself up: a virtualenv in .venv with the pinned
# dependencies of deploy/constraints.txt, rebuilt when pyproject.toml or the pins change.
#
#   make check   the inner loop, under a minute: ruff, mypy --strict, and every test that starts
#                no broker or Triton process and is not `slow`, on all cores (pytest-xdist)
#   make test    before pushing, and CI (.ci/run): the same lint and types, then the whole suite,
#                the real broker and Triton and the fault suite included (~8.5 minutes)
#                (both install promtool and Prometheus from Debian when missing: `make tools`)
#   make help    this text
#
# Test tiers are pytest markers (tests/conftest.py): `stack` (starts or needs a broker or a
# tritonserver: set by fixture and enforced) and `slow` (torch on tiny checkpoints).
# `pytest -m "not stack and not slow"` is what check runs; a test file alone, `pytest FILE`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
READY := $(VENV)/.installed

.PHONY: help demo check test lint tools bench stack-up stack-status stack-down clean

help:
	@sed -n '/^#   make/,/^#   make help/p' Makefile | cut -c2-

demo: $(READY)
	$(BIN)/python -m service demo

# Bytecode is cached under .guardstream/pycache, not beside the sources (a __pycache__ folder in
# triton_models/ would look like a model repository), even where PYTHONDONTWRITEBYTECODE is set:
# without the cache every run compiles every module and rewrites every test module's asserts
# again, seconds of each run's collection.
check test lint: export PYTHONPYCACHEPREFIX := $(CURDIR)/.guardstream/pycache
check test lint: export PYTHONDONTWRITEBYTECODE :=

lint: $(READY)
	$(BIN)/ruff check service tests triton_models deploy
	$(BIN)/ruff format --check service tests triton_models deploy
	$(BIN)/mypy service deploy/kustomize.py deploy/monitoring/build.py triton_models/fill.py

check: lint tools
	$(BIN)/pytest -m "not stack and not slow" -n auto

test: lint tools
	$(BIN)/pytest

# The alert tests need promtool and a Prometheus server (tests/test_monitoring*.py), which no
# wheel carries: Debian's prometheus package, installed when missing, as root or through sudo.
tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then as_root=; else as_root="sudo -n"; fi; \
	  echo "installing Debian's prometheus (promtool and the server) for the alert tests"; \
	  $$as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    $$as_root apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

# guardstream against a bare Kafka loop, a bare Triton loop and a naive loop (minutes; a table
# on the terminal, the figures in .guardstream/bench/throughput.json); then what verdict reuse
# saves on a stream with 30 % duplicates and 10 % near-duplicates, against reuse off.
bench: $(READY)
	$(BIN)/python -m tests.benchmarks.throughput
	$(BIN)/python -m tests.benchmarks.known_content

stack-up stack-status stack-down: $(READY)
	$(BIN)/python -m service stack $(@:stack-%=%)

$(READY): pyproject.toml deploy/constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "guardstream needs Python 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c deploy/constraints.txt -e '.[stack,cpu-guard,demo,dev,hf-guard]'
	touch $@

clean:
	-$(BIN)/python -m service stack down
	rm -rf $(VENV) .guardstream
