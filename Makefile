# Two entry points: `make run` (transcribe the bundled sample with the embedded tiny.en)
# and `make test` (the whole suite). Both set everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python
SAMPLE ?= streamd/data/jfk.wav
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.cache/jax

.PHONY: install system run test lint bench-deps clean cluster cluster-down

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

system:
	bash scripts/install-system-deps.sh

run: system install
	$(VENV)/bin/streamd transcribe $(SAMPLE)

# Two workers, a test file each at a time (module fixtures such as a daemon stay in one
# process); TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: system install lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The benchmarks' extras and the peer (bench/peer_localagreement.py); see pyproject.toml.
bench-deps: install
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) -m pip install -q --no-deps 'whisperlivekit==0.2.26'

# 3 NATS nodes, 2 streamd nodes and HAProxy on loopback ports (docs/scale-out.md);
# CLUSTER_PIPELINE=echo runs the daemons on the echo pipeline (no model) instead of tiny.en.
cluster: system install
	bash scripts/cluster.sh up

cluster-down:
	bash scripts/cluster.sh down

# ruff, and mypy on models/ and streamd/ (pyproject.toml [tool.mypy]); `make test` runs it
# first, so CI does too.
lint: install
	$(VENV)/bin/ruff check streamd models clients tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .cache
