# gpucell — set-up, demo and tests. See README.md.
SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all deps build demo test test-unit fmt clippy clean

all: build

deps:
	scripts/install-deps.sh

build: deps
	$(CARGO) build --release --workspace

demo: build
	scripts/demo.sh

test: deps
	$(CARGO) test --workspace --no-fail-fast 2>&1 | tee target/test.log
	@! grep -q '^test result: FAILED' target/test.log

test-unit:
	$(CARGO) test --workspace

fmt:
	$(CARGO) fmt --all

clippy:
	$(CARGO) clippy --workspace --all-targets

clean:
	$(CARGO) clean
