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

BPF_CFLAGS := -target bpf -g -O2 -Wall -Werror -D__TARGET_ARCH_x86 \
	-I. -Isrc/bpf -mcpu=v3

.PHONY: all bpf deps venv demo test test-unit test-bpf test-e2e bench clean

all: bpf

bpf: $(PKG_OBJ)

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
	$(PY) -m pyloader.demo

test: venv bpf
	$(PY) -m pytest -q tests

test-unit: venv bpf
	$(PY) -m pytest -q tests/unit

test-bpf: venv bpf
	$(PY) -m pytest -q tests/bpf

test-e2e: venv bpf
	$(PY) -m pytest -q tests/e2e

clean:
	rm -rf $(OUT) $(PKG_OBJ)
