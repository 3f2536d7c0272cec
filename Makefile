# gpucell — set-up, demo and tests. See README.md.
SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

TRIPLE      := x86_64-unknown-linux-gnu
AGENT       := target/$(TRIPLE)/release/gpucell-agent
GPUCELL     := target/release/gpucell
STATE_DIR   ?= /var/lib/gpucell
TEST_STATE  := $(CURDIR)/target/test-state

# Fuzzing (docs/security.md): each target in fuzz/ for FUZZ_SECONDS (default 60).
FUZZ_SECONDS ?= 60

.PHONY: fuzz all deps agent build guest demo test test-unit test-vm test-nested test-flavours test-gpu test-gpu-prepare test-gpu-fake test-shim test-many bench bench-shim fmt clippy clean

all: build

deps:
	scripts/install-deps.sh

# The agent is PID 1 in the guest: a static binary, built for an explicit target so that
# crt-static applies to it and not to build scripts or proc macros.
agent:
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release -p gpucell-agent --target $(TRIPLE)

build: deps agent
	$(CARGO) build --release -p gpucell

guest: build
	$(GPUCELL) --state-dir $(STATE_DIR) guest build --agent $(AGENT)

demo: guest
	GPUCELL=$(GPUCELL) GPUCELL_STATE_DIR=$(STATE_DIR) scripts/demo.sh

# Everything: unit, fixture and CLI tests, the VM tests under TCG, the nested test host.
test: deps agent
	mkdir -p target
	$(CARGO) build -p gpucell
	# The default guest boots the microVM kernel: compiled from Debian's linux-source-6.1
	# once (386 s on a fresh idle 2-core machine, far longer under load), then cached in $(TEST_STATE)/guest/cache/kernels
	# with its build tree, which the driver flavour's modules are compiled against.
	target/debug/gpucell --state-dir $(TEST_STATE) guest build --agent $(AGENT)
	# The nvidia-550 driver flavour: compiled from scratch once (about 6 min on 2 cores),
	# then cached in $(TEST_STATE)/guest/cache by its inputs; its TCG test is in
	# crates/guest/tests/driver.rs.
	target/debug/gpucell --state-dir $(TEST_STATE) guest build --flavour nvidia-550 --agent $(AGENT)
	GPUCELL_TEST_STATE_DIR=$(TEST_STATE) $(CARGO) test --workspace --no-fail-fast 2>&1 | tee target/test.log; \
	  test $${PIPESTATUS[0]} -eq 0
	NESTED_GPUCELL_BIN_DIR=$(CURDIR)/target/debug NESTED_GUEST_DIR=$(TEST_STATE)/guest/default \
	  NESTED_DRIVER_GUEST_DIR=$(TEST_STATE)/guest/nvidia-550 $(MAKE) test-nested

# The containerd shim alone: its unit tests and, under Debian's containerd (fetched once
# into target/containerd by scripts/fetch-containerd.sh), ctr run/kill/delete and a
# containerd restart, about 40 s under TCG (docs/shim.md). `make test` runs the same tests
# as part of the workspace's.
test-shim: deps agent
	$(CARGO) build -p gpucell
	target/debug/gpucell --state-dir $(TEST_STATE) guest build --agent $(AGENT)
	GPUCELL_TEST_STATE_DIR=$(TEST_STATE) $(CARGO) test -p gpucell-shim
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) scripts/fuzz.sh $(FUZZ_TARGETS)

test-unit:
	$(CARGO) test --workspace

# The nested test host (an L1 VM with an emulated IOMMU, edu devices, real KVM and VFIO).
# It takes gpucell from target/release unless NESTED_GPUCELL_BIN_DIR names other binaries.
# Then the harness's own check: an L1 that crashes is restarted once (docs/nested-test-host.md).
test-nested: agent
	tests/nested/run.sh
	NESTED_QUIET=1 tests/nested/run.sh harness-retry

# The in-guest half of CUDA support on a machine with a real NVIDIA driver (docs/cuda.md):
# skips where /dev/nvidiactl is absent. It builds nothing with cargo: `make test-gpu-prepare`
# puts the static agent and busybox in tests/gpu/prebuilt/, which travels with the tree.
test-gpu:
	scripts/test-gpu.sh

test-gpu-prepare: agent
	scripts/test-gpu.sh prepare

# The same harness against a fake driver (root, no GPU): its plumbing, not CUDA.
test-gpu-fake:
	tests/gpu/fake/run.sh

# The driver flavours CI does not build (nvidia-535: another 6 min), each checked with
# `gpucell guest test` under TCG (no GPU: the driver must stop at ENODEV).
test-flavours: agent
	$(CARGO) build -p gpucell
	for f in nvidia-550 nvidia-535; do \
	  target/debug/gpucell --state-dir $(TEST_STATE) guest build --flavour $$f --agent $(AGENT) && \
	  GPUCELL_ACCEL=tcg target/debug/gpucell --state-dir $(TEST_STATE) guest test $$f || exit 1; \
	done

bench: build
	bench/image/run.sh

# MANY (default 20) sandboxes of 256 MiB at once must start, run and stop cleanly; also
# QEMU's memory beyond guest RAM per sandbox (bench/results/memory.md).
test-many: agent
	$(CARGO) build -p gpucell
	target/debug/gpucell --state-dir $(TEST_STATE) guest build --agent $(AGENT)
	GPUCELL=target/debug/gpucell GPUCELL_STATE_DIR=$(TEST_STATE) bench/memory/run.sh

# ctr run --rm busybox true: through the shim, gpucell run, runc (bench/results/shim.md).
bench-shim: agent
	$(CARGO) build -p gpucell -p gpucell-shim
	target/debug/gpucell --state-dir $(TEST_STATE) guest build --agent $(AGENT)
	GPUCELL_STATE_DIR=$(TEST_STATE) bench/shim/run.sh
	bench/sandbox/run.sh
	bench/net/run.sh

fmt:
	$(CARGO) fmt --all

clippy:
	$(CARGO) clippy --workspace --all-targets

clean:
	$(CARGO) clean
