#!/bin/busybox sh
# /init of the kernel61 initramfs: load the BPF object with the project's
# loader (pyloader.tracer, as the agent does), run the BPF tests, report
# with KERNEL61-* lines on the console, power off.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t bpf bpf /sys/fs/bpf
. /etc/redtap-kernel61.env
export PATH=/bin:/sbin LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
export HOME=/tmp PYTHONDONTWRITEBYTECODE=1 REDTAP_FUZZ_EXAMPLES=${REDTAP_FUZZ_EXAMPLES:-100}
echo "KERNEL61-UNAME=$(uname -r)"
if [ -r /sys/kernel/btf/vmlinux ]; then echo "KERNEL61-BTF=yes"; else echo "KERNEL61-BTF=no"; fi
cd "$REPO"
if "$PYTHON" -c "from pyloader.kernel.tracer import Tracer; Tracer.load().close()" 2>/tmp/load.err; then
    echo "KERNEL61-LOAD=ok"
    "$PYTHON" -m pytest -q -p no:cacheprovider -o addopts= --color=no tests/bpf
    echo "KERNEL61-RC=$?"
else
    echo "KERNEL61-LOAD=failed: $(grep -m1 '^pyloader.errors.BpfError' /tmp/load.err)"
    echo "KERNEL61-VERIFIER-BEGIN"
    bpftool prog loadall "${REDTAP_BPF_OBJECT:-src/pyloader/data/redtap.bpf.o}" /sys/fs/bpf/redtap type tc 2>&1 |
        grep -v '^$' | tail -n 40
    echo "KERNEL61-VERIFIER-END"
    echo "KERNEL61-RC=load"
fi
sync
poweroff -f
