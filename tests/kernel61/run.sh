#!/usr/bin/env bash
# make test-kernel61: boot Debian bookworm's 6.1 kernel in qemu-system-x86_64
# (software emulation; REDTAP_QEMU_KVM=1 to use /dev/kvm) with an initramfs
# holding the project's Python, libbpf and tests (initramfs.py, init.sh):
# the loader must load the object (verifier included) and the BPF tests
# must pass on 6.1. The kernel package is downloaded and unpacked under
# build/kernel61, never installed on this machine.
#
# tests/kernel61/xfail, when present, is a known failure on 6.1 (line 1:
# why; line 2: a regular expression its console output must match): the
# run then passes only if it still fails that way (strict, like pytest's
# xfail(strict=True)); delete the file once 6.1 passes.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=build/kernel61
PY=.venv/bin/python
XFAIL=tests/kernel61/xfail
mkdir -p "$OUT"

pick() { apt-cache depends linux-image-amd64 2>/dev/null |
         awk '/Depends: linux-image-6\.1\./ {print $2; exit}'; }
pkg=$(pick)
if [ -z "$pkg" ]; then apt-get update -qq; pkg=$(pick); fi
[ -n "$pkg" ] || { echo "kernel61: no linux-image-6.1 package known to apt" >&2; exit 1; }
kdir="$OUT/$pkg"
if [ ! -s "$kdir/vmlinuz" ]; then
    rm -rf "$kdir" "$OUT"/*.deb
    (cd "$OUT" && apt-get download -q "$pkg" 2>&1 | grep -v "unsandboxed" || true)
    deb=$(ls "$OUT"/"${pkg}"_*.deb)
    mkdir -p "$kdir/x"
    dpkg-deb -x "$deb" "$kdir/x"
    cp "$kdir"/x/boot/vmlinuz-* "$kdir/vmlinuz"
    rm -rf "$kdir/x" "$deb"
fi

# REDTAP_KERNEL61_OBJECT: check another build of the object (default: the package's)
"$PY" tests/kernel61/initramfs.py "$OUT/initramfs.cpio.gz" ${REDTAP_KERNEL61_OBJECT:+"$REDTAP_KERNEL61_OBJECT"}

accel=(-accel tcg -cpu max)
if [ "${REDTAP_QEMU_KVM:-0}" = 1 ]; then accel=(-accel kvm -cpu host); fi
echo "kernel61: booting $pkg (${accel[1]}), initramfs $(du -h "$OUT/initramfs.cpio.gz" | cut -f1)"
set +e
timeout 900 qemu-system-x86_64 "${accel[@]}" -m 2048 -smp 2 -nographic -no-reboot \
    -kernel "$kdir/vmlinuz" -initrd "$OUT/initramfs.cpio.gz" \
    -append "console=ttyS0 panic=-1 quiet loglevel=3" </dev/null > "$OUT/console.log" 2>&1
qrc=$?
set -e
tr -d '\r' < "$OUT/console.log" | sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g' > "$OUT/console.txt"
val() { grep -o "KERNEL61-$1=.*" "$OUT/console.txt" | head -1 | cut -d= -f2-; }
kernel=$(val UNAME); load=$(val LOAD); rc=$(val RC)
sed -n '/^KERNEL61-VERIFIER-BEGIN/,/^KERNEL61-VERIFIER-END/p' "$OUT/console.txt"
grep -E '^(FAILED|ERROR) |[0-9]+ (passed|failed)' "$OUT/console.txt" || true
case "$kernel" in
    6.1.*) ;;
    *) echo "kernel61: FAILED: no 6.1 kernel reported (qemu exit $qrc, console: $OUT/console.log)" >&2
       exit 1 ;;
esac
echo "kernel61: $kernel: load ${load:-?}, BTF $(val BTF), tests rc ${rc:-none}"
if [ "$load" = ok ] && [ "$rc" = 0 ]; then
    if [ -f "$XFAIL" ]; then
        echo "kernel61: XPASS (strict): 6.1 passes now; delete $XFAIL" >&2
        exit 1
    fi
    echo "kernel61: PASSED: the object loads and the BPF tests pass on $kernel"
    exit 0
fi
if [ -f "$XFAIL" ]; then
    # strict: the failure must be the known one (the pattern on the file's 2nd line)
    pattern=$(sed -n 2p "$XFAIL")
    if [ -n "$pattern" ] && ! grep -qE -- "$pattern" "$OUT/console.txt"; then
        echo "kernel61: FAILED on $kernel, not as $XFAIL expects (/$pattern/)" >&2
        exit 1
    fi
    echo "kernel61: XFAIL (known, $XFAIL): $(head -1 "$XFAIL")"
    exit 0
fi
echo "kernel61: FAILED on $kernel (console: $OUT/console.log)" >&2
exit 1
