#!/usr/bin/env bash
# Issue #17's guest program through many moves in a row: a counter with the wall clock,
# checksummed memory a writer keeps rewriting, a TCP connection to a host peer and a file
# kept open on a virtio disk, through CYCLES cycles of snapshot -> kill -> restore -> live
# migration (emu, a TAP in a test namespace; needs root), each cycle checking that the
# count goes on without a gap or repeat, the peer got every line, the guest's clock is
# within 1 s of the host's and the writer goes on; at the end the file holds every
# record in order and the checksums hold. Then the plain snapshot -> restore loop
# (counter and clock only) the same number of times.
#
#   bench/snapshot-soak.sh [CYCLES]      (default 100, the issue's figure)
#
# Prints each test's time and its cycle count; a failed cycle fails the script and names
# the file that holds the test's whole output.
set -euo pipefail
cd "$(dirname "$0")/.."
CYCLES="${1:-100}"
cargo test -q -p vessel --test snapshot --no-run
log="$(mktemp -t vessel-soak-XXXXXX.log)"
for t in a_guest_keeps_its_tcp_connection_and_open_file_across_restore_and_live_migration \
         snapshot_and_restore_cycles_in_a_row; do
    start=$(date +%s.%N)
    VESSEL_HOSTIO_CYCLES="$CYCLES" VESSEL_SNAPSHOT_CYCLES="$CYCLES" \
        cargo test -q -p vessel --test snapshot -- --exact "$t" --nocapture >"$log" 2>&1 ||
        { grep -A 4 -E "panicked" "$log"; echo "$t failed; its whole output: $log"; exit 1; }
    grep -E "cycles of|test result|behind the host|writes" "$log" | tail -n 6
    echo "$t: $CYCLES cycles in $(echo "$(date +%s.%N) - $start" | bc) s"
done
