# idealrt — the README's commands. Every target does its own setup.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
BUF_DIR := .cache/buf
BUF := $(BUF_DIR)/node_modules/.bin/buf

.PHONY: all demo test lint typecheck protos protos-check buf-lint bench fuzz faults install clean up

all: test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU torch first (a local CPU wheel here); nothing later may pull a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=strict
	rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/idealrt demo

up: $(STAMP)
	$(BIN)/idealrt up

$(BUF):
	mkdir -p $(BUF_DIR)
	cd $(BUF_DIR) && { test -f package.json || npm init -y >/dev/null; } && npm install --silent --no-audit --no-fund @bufbuild/buf@1.75.0

protos: $(STAMP)
	PY=$(BIN)/python bash scripts/gen-protos.sh

protos-check: protos
	@git diff --exit-code --stat -- gen/ || { echo "gen/ is out of date: run 'make protos' and commit"; exit 1; }
	@test -z "$$(git status --porcelain --untracked-files=all -- gen/)" || { git status --short -- gen/; echo "gen/ has untracked generated files"; exit 1; }

buf-lint: $(BUF)
	$(BUF) lint

lint: $(STAMP) buf-lint
	$(BIN)/ruff check .
	bash scripts/lint-imports.sh
	bash scripts/typecheck.sh

test: $(STAMP) lint protos-check
	bash scripts/test.sh

bench: $(STAMP)
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)

# Long property-based fuzz of every RPC (tests/fuzz; `make test` runs its short fixed-seed
# profile); FUZZ_EXAMPLES per RPC; the counts go to bench/results/fuzz.json.
FUZZ_EXAMPLES ?= 1000
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz IDEALRT_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) \
	IDEALRT_FUZZ_REPORT=bench/results/fuzz.json \
	bash scripts/test.sh tests/fuzz -m fuzz -o timeout=0

# Kills and outages of real service processes alone (tests/e2e/test_faults.py, ~2.5 min;
# `make test` runs them too).
faults: $(STAMP)
	bash scripts/test.sh tests/e2e/test_faults.py -m faults

clean:
	rm -rf $(VENV) .idealrt .cache build *.egg-info
