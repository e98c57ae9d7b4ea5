# Two commands from a fresh Debian machine: `make run` (the platform) and `make test`.
VENV := .venv
BIN := $(VENV)/bin
# rustup's cargo, also where a non-login shell's PATH lacks ~/.cargo/bin (scripts/bootstrap.sh).
CARGO := $(or $(shell command -v cargo),$(HOME)/.cargo/bin/cargo)

.PHONY: install run test test-unit test-faults lint format services services-down status bench load

install:  ## system packages (apt) and the project in .venv
	@scripts/bootstrap.sh

run: install  ## services, db init, demo traffic, Dagster UI on 127.0.0.1:3000; Ctrl-C stops
	@$(BIN)/engagement run

test: install lint  ## everything CI runs: lint, unit and integration tests on real services
	$(BIN)/pytest

test-unit: install
	$(BIN)/pytest -m "not integration and not faults"

test-faults: install  ## fault scenarios on real (partly private) services; a table of lost, doubled, recovery
	$(BIN)/pytest tests/faults

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy engagement_dagster
	$(CARGO) fmt --manifest-path native/Cargo.toml --check
	PYO3_PYTHON=$(CURDIR)/$(BIN)/python $(CARGO) clippy --manifest-path native/Cargo.toml --release -q -- -D warnings

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
	$(CARGO) fmt --manifest-path native/Cargo.toml

services: install  ## local PostgreSQL, Redis and Kafka only
	@$(BIN)/engagement services up

services-down:
	@$(BIN)/engagement services down

status:
	@$(BIN)/engagement services status

bench: install  ## the benchmark (table, then JSON, saved in bench/results/); BENCH_ARGS to shorten
	$(BIN)/engagement bench $(BENCH_ARGS)

load: install  ## 10,000 changes/s for 10 minutes: slot lag and stream memory over time
	$(BIN)/engagement bench --load $(LOAD_ARGS)
