#!/usr/bin/env bash
# Install what building, the demo and the tests need (Debian packages).
# Idempotent: installs only what is missing. Needs root (or sudo).
set -euo pipefail
PKGS=(clang llvm libbpf-dev libbpf1 bpftool iproute2 iptables nginx-light wrk curl tshark
      python3-venv make openssl tmux prometheus hey
      podman runc debootstrap logrotate rsyslog util-linux
      qemu-system-x86 busybox-static)  # the last two: make test-kernel61
need=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if ((${#need[@]})); then
    echo "installing: ${need[*]}"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# nginx from the package starts a system service we do not want on :80
systemctl disable --now nginx >/dev/null 2>&1 || true
# and the prometheus package (used by tests to evaluate the documented PromQL) its own
systemctl disable --now prometheus prometheus-node-exporter >/dev/null 2>&1 || true
