#!/bin/sh
# The C compiler flags of the agent's record helper (Makefile and setup.py).
echo "-O2 -g -shared -fPIC -Wall -Wextra -Werror -Isrc/bpf"
