PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck proto install clean bench up down

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m services.demo

# The suite mostly waits on PostgreSQL servers and cdc processes, so more pytest-xdist
# workers than cores pays: on 2 cores, 4 workers took 239 s, 2 took 315 s, serial 446 s;
# 4 workers with the slow tests scheduled first (tests/conftest.py) 179-192 s.
# Each worker starts its own PostgreSQL server. TEST_WORKERS=0 runs serially; ARGS: more
# pytest options (e.g. ARGS='-m "not slow and not e2e"').
TEST_WORKERS ?= 4

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist worksteal $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

typecheck: $(STAMP)
	$(PY) -m mypy

proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/cdc_proto/v1/*.proto proto/cdc_proto/v2/*.proto

clean:
	rm -rf $(VENV) .demo build *.egg-info

# Docker path (needs a Docker engine): the local platform stack from docker/.
up:
	docker compose -f docker/docker-compose.yml up -d

down:
	docker compose -f docker/docker-compose.yml down

# `make bench`: pg_recvlogical (limit) vs Debezium embedded (peer) vs ours, same workload, one
# run; writes docs/benchmarks.md. `make bench-quick` (or `make bench ARGS=--quick`): < 1 min.
.PHONY: bench-quick
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m bench $(ARGS)

bench-quick: $(BENCH_STAMP)
	$(PY) -m bench --quick $(ARGS)

# `make chaos`: the fault-injection scenarios in tests/chaos (kill -9 of each stage and of
# `cdc run`, source restart, sink database down, network partition, sink write errors, poison
# rows), one at a time, a few minutes in all. Not part of `make test`. Prints the results
# table and writes it to build/chaos-results.md. ARGS: more pytest options (e.g. -k sink).
.PHONY: chaos
chaos: $(STAMP)
	CDC_CHAOS=1 $(PY) -m pytest -q -p no:cacheprovider tests/chaos $(ARGS)
