# The commands of the README. Each sets itself up: a virtualenv in .venv with the pinned
# dependencies of deploy/constraints.txt, rebuilt when pyproject.toml or the pins change.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
READY := $(VENV)/.installed

.PHONY: demo test bench stack-up stack-status stack-down clean

demo: $(READY)
	$(BIN)/python -m service demo

test: $(READY)
	$(BIN)/ruff check service tests triton_models deploy
	$(BIN)/ruff format --check service tests triton_models deploy
	$(BIN)/mypy service deploy/kustomize.py triton_models/fill.py
	$(BIN)/pytest

# guardstream against a bare Kafka loop, a bare Triton loop and a naive loop (minutes; a table
# on the terminal, the figures in .guardstream/bench/throughput.json).
bench: $(READY)
	$(BIN)/python -m tests.benchmarks.throughput

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
