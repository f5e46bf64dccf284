# meter-grpc — run `make run` to serve, `make test` to prove it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
GLIDE_STAMP := $(VENV)/.installed-glide
PROTOS := $(wildcard protos/meter/v1/*.proto)
GEN_DIR := src

.PHONY: run test lint proto proto-check bench bench-transports install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m meter_grpc

test: $(STAMP) proto-check
	$(PY) -m pytest

# bench/ is linted once it exists.
LINT_DIRS := $(wildcard src tests bench)

# buf (the buf-bin wheel): STANDARD lint of protos/, and no breaking change in protos/meter
# against the merge-base with main (HEAD~1 on main; `make lint BUF_AGAINST=v0.1.0` for a tag).
lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_DIRS)
	$(VENV)/bin/ruff format --check $(LINT_DIRS)
	$(VENV)/bin/mypy
	$(VENV)/bin/buf lint
	$(PY) scripts/buf_breaking.py $(BUF_AGAINST)

# Regenerates the committed Python code of the protos (messages, gRPC stubs, mypy stubs).
proto: $(STAMP)
	$(PY) scripts/gen_protos.py $(GEN_DIR)

# Fails when the committed generated code differs from what the protos produce.
proto-check: $(STAMP)
	$(PY) scripts/gen_protos.py --check $(GEN_DIR)

bench: $(STAMP)
	$(PY) bench/bench.py
	$(PY) bench/propagation.py

# The optional extra `glide` (valkey-glide) is installed for this target only.
$(GLIDE_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e '.[dev,glide]'
	touch $(GLIDE_STAMP)

# Our RESP transport against valkey-glide: throughput, CPU per call, failure semantics.
bench-transports: $(GLIDE_STAMP)
	$(PY) bench/transports.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
