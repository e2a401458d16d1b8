# redtap: build the BPF object, run the demo, run the tests.
.DELETE_ON_ERROR:
SHELL := /bin/bash

CLANG   ?= clang
VENV    ?= .venv
PY      := $(VENV)/bin/python
OUT     := build
BPF_OBJ := $(OUT)/redtap.bpf.o
PKG_OBJ := src/pyloader/data/redtap.bpf.o
BPF_SRC := $(wildcard src/bpf/*.c src/bpf/*.h)
CC      ?= cc
# the agent's record helper (src/native: C called through ctypes, no CPython API)
NATIVE_SO := src/pyloader/data/librecordfmt.so

BPF_CFLAGS := $(shell sh src/bpf/cflags.sh)  # one source with setup.py

.PHONY: all bpf deps venv demo demo-cluster test test-unit test-bpf test-e2e test-cluster test-container test-kernel61 bench soak clean

all: bpf

bpf: $(PKG_OBJ) $(NATIVE_SO)

NATIVE_SRC := $(wildcard src/native/*.c)

$(NATIVE_SO): $(NATIVE_SRC) $(wildcard src/native/*.h) src/bpf/redtap.h src/native/cflags.sh
	mkdir -p $(dir $@)
	$(CC) $(shell sh src/native/cflags.sh) -o $@ $(NATIVE_SRC)

$(BPF_OBJ): $(BPF_SRC) vmlinux.h | $(OUT)
	$(CLANG) $(BPF_CFLAGS) -c src/bpf/redtap.bpf.c -o $@

$(PKG_OBJ): $(BPF_OBJ)
	mkdir -p $(dir $@)
	cp $< $@

$(OUT):
	mkdir -p $@

# Debian packages and a venv with the package installed (idempotent).
deps:
	@bash scripts/install-deps.sh

venv: deps
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q -e '.[test]'

demo: venv bpf
	$(PY) -m pyloader.lab.demo

# Two nodes (Flannel VXLAN, Services, a hostNetwork server), one agent per node,
# records of both merged; then the same traffic with --attach bridge, compared.
demo-cluster: venv bpf
	$(PY) -m pyloader.lab.democluster

# The cluster end-to-end tests alone (also part of `make test`).
test-cluster: venv bpf
	$(PY) -m pytest -q tests/e2e/test_cluster.py

test: venv bpf
	$(PY) -m pytest -q tests

test-unit: venv bpf
	$(PY) -m pytest -q tests/unit

test-bpf: venv bpf
	$(PY) -m pytest -q tests/bpf

test-e2e: venv bpf
	$(PY) -m pytest -q tests/e2e

# The container image built and run with podman (minutes: debootstrap, apt, pip; cached
# in /var/cache/redtap and podman's layers). `make test` skips it.
test-container: venv bpf
	REDTAP_CONTAINER_TEST=1 $(PY) -m pytest -q tests/e2e/test_container.py

# The BPF object loaded and the BPF tests run on Debian's 6.1 kernel, booted in
# qemu (software emulation, ~4 min; the kernel package cached in build/kernel61).
test-kernel61: venv bpf
	bash tests/kernel61/run.sh

# Overhead of redtap under load (not part of `make test`; root, ~7 min):
# results in bench/results/latest.{json,md}. BENCH_ARGS=--quick for a smoke run.
bench: venv bpf
	$(PY) bench/run.py $(BENCH_ARGS)

# Memory over time (not part of `make test`; root; SOAK_MINUTES, default 60): the
# agent as a node runs it, log only and names + metrics side by side, at a steady
# rate; RSS curve, records vs nginx's count, losses. bench/results/soak-latest.*
soak: venv bpf
	$(PY) bench/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(OUT) $(PKG_OBJ) $(NATIVE_SO)
