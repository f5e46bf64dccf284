# meter-grpc — run `make run` to serve, `make test` to prove it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The interpreter the .venv must be built by: a .venv made by another Python (or another
# version of it) is rebuilt. Recorded in $(PY_STAMP) and compared on every make.
PY_ID := $(shell $(PYTHON) -c 'import sys; print(sys.version.split()[0], sys.base_prefix)' 2>/dev/null)
PY_STAMP := $(VENV)/.python
GLIDE_STAMP := $(VENV)/.installed-glide
PROTOS := $(wildcard protos/meter/v1/*.proto)
GEN_DIR := src

.PHONY: run test lint proto proto-check bench bench-transports install clean destroy-data FORCE

# Rewritten only when the interpreter differs from the one recorded (a .venv from before
# the stamp existed is asked directly), which makes $(STAMP) out of date and rebuilds the
# .venv from scratch.
PY_ASK := import sys; print(sys.version.split()[0], sys.base_prefix)
$(PY_STAMP): FORCE
	@if [ -z "$(PY_ID)" ]; then echo "PYTHON=$(PYTHON) does not run: give a Python 3.11+ interpreter, e.g. make run PYTHON=python3.12" >&2; exit 2; fi
	@recorded="$$(cat $(PY_STAMP) 2>/dev/null || $(PY) -c '$(PY_ASK)' 2>/dev/null)"; \
	if [ "$$recorded" = "$(PY_ID)" ] && [ ! -f $(PY_STAMP) ]; then echo "$(PY_ID)" > $(PY_STAMP); fi; \
	if [ "$$recorded" != "$(PY_ID)" ]; then \
		if [ -d $(VENV) ]; then echo "$(VENV) was built by another Python: rebuilding it with $(PYTHON) ($(PY_ID))"; fi; \
		rm -rf $(VENV); mkdir -p $(VENV); echo "$(PY_ID)" > $(PY_STAMP); \
	fi

FORCE:

$(STAMP): pyproject.toml $(PY_STAMP)
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
	$(PY) bench/watch.py
	$(PY) bench/keycheck.py
	$(PY) bench/export.py

# The optional extra `glide` (valkey-glide) is installed for this target only.
$(GLIDE_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e '.[dev,glide]'
	touch $(GLIDE_STAMP)

# Our RESP transport against valkey-glide: throughput, CPU per call, failure semantics.
bench-transports: $(GLIDE_STAMP)
	$(PY) bench/transports.py $(BENCH_ARGS)

# Build products and caches only: var/ (licenses, usage, admin token, signing key) stays.
clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Deletes var/: every license, usage counter, the admin token and the signing key (license
# files already issued can no longer be verified with a new key). Asks first; CONFIRM=yes
# skips the question.
destroy-data:
	@echo "WARNING: this deletes $(CURDIR)/var: all licenses, usage, the admin token and the signing key."
	@if [ "$(CONFIRM)" != "yes" ]; then \
		printf 'Type "destroy" to go on: '; read answer; [ "$$answer" = destroy ] || { echo "kept var/"; exit 1; }; \
	fi
	rm -rf var
