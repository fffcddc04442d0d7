# Two commands on a fresh machine: `make run` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
NATIVE := $(VENV)/.native$(if $(filter 1,$(LB_PURE_PYTHON)),-pure)
LBD_SOURCES := $(wildcard lbd/*.py lbd/*/*.py)

.PHONY: run test lint typecheck install native system-deps completions clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The package and its dependencies, editable; its compiled modules are built by $(NATIVE) below.
$(INSTALLED): pyproject.toml setup.py | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip 'setuptools>=77'
	LB_PURE_PYTHON=1 $(BIN)/python -m pip install --quiet --no-build-isolation -e '.[test]'
	touch $@

# lbd's per-request modules compiled in place with mypyc (setup.py lists them), rebuilt whenever an lbd
# source changes, so what runs is always what the sources say. LB_PURE_PYTHON=1 builds none (interpreted).
$(NATIVE): $(INSTALLED) setup.py $(LBD_SOURCES)
	find lbd -name '*.so' -delete
	$(BIN)/python setup.py --quiet build_ext --inplace
	rm -f $(VENV)/.native $(VENV)/.native-pure
	touch $@

install: $(NATIVE)
native: $(NATIVE)

# Demo backends from examples/servers.json in the background, lbd in the foreground (Ctrl-C stops both).
# The demo keeps its state in .lbd-demo/ (not your ~/.local/state/lbd), started afresh each time, so a
# mode switched or a server drained while trying things is gone at the next `make run`.
DEMO_STATE := .lbd-demo
run: $(NATIVE)
	@rm -rf $(DEMO_STATE); $(BIN)/python examples/demo_backends.py examples/servers.json & backends=$$!; \
	trap 'kill $$backends 2>/dev/null; wait $$backends 2>/dev/null' EXIT INT TERM; \
	sleep 0.5; $(BIN)/lbd start --config examples/lbd.toml --state-dir $(DEMO_STATE)

# Tools the end-to-end tests drive as a user would (curl; openssl, s_client for the TLS listener; tmux, a real
# terminal for `lbctl status --watch`; redis-server, the cluster store); installed from the system's packages when missing.
system-deps:
	@command -v openssl >/dev/null 2>&1 || { \
	  echo "installing openssl for the TLS tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null; }
	@command -v curl >/dev/null 2>&1 || { \
	  echo "installing curl for the end-to-end tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null; }
	@command -v tmux >/dev/null 2>&1 || { \
	  echo "installing tmux for the end-to-end tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux >/dev/null; }
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server for the cluster tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

lint: $(INSTALLED)
	$(BIN)/ruff check lbd lbctl tests bench examples
	$(BIN)/ruff format --check lbd lbctl tests bench examples

typecheck: $(INSTALLED)
	$(BIN)/mypy

test: $(NATIVE) system-deps lint typecheck
	$(BIN)/pytest

# `make soak`: ten minutes of mixed load through lbd while a backend flaps every 30 s, checking lbd's
# RSS, open fds and errors (bench/soak.py; SOAK_ARGS='--duration 60' for a short run).
.PHONY: soak
soak: $(NATIVE)
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

# lbctl's bash, zsh and fish completion scripts, generated from the Typer app (a test fails on drift).
completions: $(INSTALLED)
	$(BIN)/python -m lbctl.completions completions

clean:
	rm -rf $(VENV) $(DEMO_STATE) .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info build
	find lbd -name '*.so' -delete

# `make bench`: lbd against HAProxy and nginx straight on loopback, pinned (python -m bench.compare; e.g.
# BENCH_ARGS=--quick for a smoke run, BENCH_ARGS='--only haproxy,lbd-static'), then the routing and
# health-round microbenchmarks and the cost of registering one server into 10,000 (bench/registration.py).
# wrk, haproxy and nginx come from the system's packages when missing.
.PHONY: bench bench-deps
bench-deps:
	@PATH="$$PATH:/usr/sbin:/sbin"; command -v wrk >/dev/null 2>&1 || { \
	  echo "installing wrk for make bench"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
	@PATH="$$PATH:/usr/sbin:/sbin"; command -v haproxy >/dev/null 2>&1 || { \
	  echo "installing haproxy for make bench"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null; }
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server for make bench"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
	@PATH="$$PATH:/usr/sbin:/sbin"; command -v nginx >/dev/null 2>&1 || { \
	  echo "installing nginx-light for make bench"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null; }

bench: $(NATIVE) bench-deps
	$(BIN)/python -m bench.compare $(BENCH_ARGS)
	$(BIN)/python bench/microbench.py $(if $(findstring --quick,$(BENCH_ARGS)),--quick)
	$(BIN)/python bench/health_round.py
	$(BIN)/python -m bench.cluster $(if $(findstring --quick,$(BENCH_ARGS)),--quick)
	$(BIN)/python -m bench.cores $(if $(findstring --quick,$(BENCH_ARGS)),--quick)
	$(BIN)/python -m bench.registration $(if $(findstring --quick,$(BENCH_ARGS)),--servers 1000)

# `make simulate`: dynamic mode at 10,000 servers and 1,000,000 clients through lbd's real code, in
# process on a simulated clock (bench/simulate.py, about 6 minutes): a region outage and its recovery,
# a partial outage, a slow region; prints the targets as PASS/FAIL, writes plots and summary.json to
# bench/results/simulate (SIMULATE_ARGS='--out DIR' elsewhere, '--servers 1000 --clients 100000' for a
# smaller run, --help for the rest). matplotlib is the bench extra's (pyproject.toml), installed here.
.PHONY: simulate
BENCH_EXTRA := $(VENV)/.bench
$(BENCH_EXTRA): pyproject.toml | $(INSTALLED)
	LB_PURE_PYTHON=1 $(BIN)/python -m pip install --quiet --no-build-isolation -e '.[test,bench]'
	touch $@

simulate: $(NATIVE) $(BENCH_EXTRA)
	$(BIN)/python -m bench.simulate $(SIMULATE_ARGS)
