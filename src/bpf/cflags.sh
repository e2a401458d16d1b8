#!/bin/sh
# The clang flags of the BPF object: the one source for the Makefile and setup.py.
# Run from the repository root; prints the flags on one line.
case "${BPF_ARCH:-$(uname -m)}" in
    x86_64|amd64|x86) arch=x86 ;;
    aarch64|arm64) arch=arm64 ;;
    ppc64le|powerpc) arch=powerpc ;;
    s390x|s390) arch=s390 ;;
    riscv64|riscv) arch=riscv ;;
    *) arch=x86 ;;
esac
echo "-target bpf -g -O2 -Wall -Werror -D__TARGET_ARCH_$arch -I. -Isrc/bpf -mcpu=v3"
