#!/bin/bash
# Many boots of one multi-vCPU emu guest, one after another (issue #13: "200 boots with
# 4 vCPUs: no hang, every vCPU online"). Each boot runs the guest assets' kernel and
# busybox initramfs, whose /init prints /sys/devices/system/cpu/online and powers off; a
# boot counts as good when the guest lists every vCPU online and powers itself off within
# the timeout. Prints the counts, the boot times (median, slowest) and the log of any bad
# boot (kept under $SMP_BOOTS_KEEP).
#
#   bench/smp-boots.sh [BOOTS] [CPUS]     defaults: 200 boots, 4 vCPUs
#   VESSEL_BIN=path                        the binary (default: target/release/vessel)
#   SMP_BOOTS_TIMEOUT=60                   seconds before a boot counts as hung
#   SMP_BOOTS_KEEP=/tmp/smp-boots          where bad boots' logs go
set -euo pipefail
cd "$(dirname "$0")/.."
boots=${1:-200}
cpus=${2:-4}
timeout_s=${SMP_BOOTS_TIMEOUT:-60}
keep=${SMP_BOOTS_KEEP:-/tmp/smp-boots}
assets=${VESSEL_ASSETS:-$HOME/.cache/vessel/assets}
bin=${VESSEL_BIN:-target/release/vessel}
if [ -z "${VESSEL_BIN:-}" ]; then
    cargo build --release -q -p vessel
fi
for f in vmlinuz initramfs.cpio.gz; do
    [ -f "$assets/$f" ] || { echo "smp-boots: $assets/$f missing: run scripts/guest-assets.sh" >&2; exit 1; }
done
want="0-$((cpus - 1))"
[ "$cpus" -eq 1 ] && want=0
mkdir -p "$keep"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
good=0 hung=0 offline=0
times=()
for i in $(seq 1 "$boots"); do
    start=$(date +%s.%N)
    rc=0
    timeout "$timeout_s" "$bin" run --accel emu --kernel "$assets/vmlinuz" \
        --initrd "$assets/initramfs.cpio.gz" --cpus "$cpus" --memory 256 \
        --cmdline "console=ttyS0 panic=-1 quiet vessel.run=cat+/sys/devices/system/cpu/online" \
        </dev/null >"$log" 2>&1 || rc=$?
    end=$(date +%s.%N)
    times+=("$(echo "$end - $start" | bc)")
    if [ "$rc" -eq 124 ] || ! grep -q "powered off" "$log"; then
        hung=$((hung + 1))
        cp "$log" "$keep/boot-$i-hung.log"
    elif ! grep -qx "$want" <(tr -d '\r' <"$log"); then
        offline=$((offline + 1))
        cp "$log" "$keep/boot-$i-offline.log"
    else
        good=$((good + 1))
    fi
    if [ $((i % 20)) -eq 0 ]; then
        echo "smp-boots: $i of $boots: $good good, $hung hung, $offline with a vCPU offline"
    fi
done
printf '%s\n' "${times[@]}" | python3 -c "
import sys, statistics
t = [float(x) for x in sys.stdin.read().split()]
print(f'smp-boots: {len(t)} boots with $cpus vCPUs: $good good, $hung hung, $offline with a vCPU offline; '
      f'boot to power-off median {statistics.median(t):.2f} s, slowest {max(t):.2f} s')
"
[ "$good" -eq "$boots" ]
