#!/usr/bin/env bash
# Where does an emu boot spend its guest instructions? Boots the default guest under
# `--accel emu` with VESSEL_EMU_PROFILE (one guest-RIP sample every 2000 instructions)
# and prints the hottest kernel functions. The symbols come from the guest itself: a
# first boot writes /proc/kallsyms to a scratch disk (KASLR off in both boots).
#
#   scripts/emu-profile.sh [TOP]      (default 30)
set -euo pipefail
cd "$(dirname "$0")/.."
TOP="${1:-30}"
scripts/guest-assets.sh >/dev/null
ASSETS="${VESSEL_ASSETS:-${XDG_CACHE_HOME:-$HOME/.cache}/vessel/assets}"
cargo build -q --release -p vessel
VESSEL="$PWD/target/release/vessel"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
run() {
    "$VESSEL" run --accel emu --memory 256M --kernel "$ASSETS/vmlinuz" \
        --initrd "$ASSETS/initramfs.cpio.gz" "$@" </dev/null >"$work/console.log" 2>&1
}
truncate -s 16M "$work/syms.img"
run --disk "$work/syms.img" --cmdline "console=ttyS0 panic=-1 nokaslr vessel.run=cat+/proc/kallsyms+>/dev/vda"
tr -d '\0' <"$work/syms.img" >"$work/kallsyms"
VESSEL_EMU_PROFILE="$work/profile" run --cmdline "console=ttyS0 panic=-1 nokaslr vessel.run=true"
python3 - "$work/kallsyms" "$work/profile.cpu0" "$TOP" <<'PY'
import bisect, collections, sys
syms = []
for line in open(sys.argv[1]):
    parts = line.split()
    if len(parts) >= 3 and parts[1] in "tTwW":
        syms.append((int(parts[0], 16), parts[2]))
syms.sort()
addrs = [a for a, _ in syms]
hits, total = collections.Counter(), 0
for line in open(sys.argv[2]):
    rip, n = line.split()
    rip, n = int(rip, 16), int(n)
    total += n
    if rip < 0xffff800000000000:
        hits["<user space>"] += n
        continue
    i = bisect.bisect_right(addrs, rip) - 1
    hits[syms[i][1] if i >= 0 else "?"] += n
print(f"{total} samples (one per 2000 guest instructions or per exit)")
for name, n in hits.most_common(int(sys.argv[3])):
    print(f"{100 * n / total:5.1f}%  {name}")
PY
