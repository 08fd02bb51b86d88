# Every target creates .venv itself, so a fresh clone needs only `make run` or `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-slow check sim bench jepsen clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# A local 3-node cluster in the foreground (Ctrl-C stops it); kvctl talks to it from another shell.
run: $(STAMP)
	$(BIN)/kvctl cluster up --nodes 3 --shards 8 --replication 3 --data-dir data/cluster --foreground

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

check: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

sim: $(STAMP)
	$(BIN)/python -m raft.sim --seeds 2000 --start-seed 1

jepsen: $(STAMP)
	$(BIN)/python -m jepsen_like run --workload register --nemesis kill,pause,partition \
		--time 60 --nodes 5 --shards 4 --concurrency 10 --seed 1 --out runs/jepsen

bench: $(STAMP)
	$(BIN)/python tests/benchmarks/raft_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
