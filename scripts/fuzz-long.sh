#!/usr/bin/env bash
# Long fuzzing runs that add to the README's "CPU time fuzzed so far" figures.
#
#   scripts/fuzz-long.sh [--seconds N] [--corpus DIR] [--ledger FILE] [--readme]
#                        [--force] [TARGET...|all]
#
# Builds `fuzz-run` (crates/fuzzing; the dev profile, with debug assertions and overflow
# checks, as the README's figures) and runs each target in turn, one process each, for
# N seconds of wall time (default 3600), under `nice -n 19`, keeping what it learns in a
# corpus folder that later runs start from (default ~/.cache/vessel/fuzz-corpus). Each
# run appends one line to the ledger (default fuzz/ledger.tsv: date, commit, target,
# wall seconds, inputs, CPU seconds, panics). It then prints each target's totals over
# the whole ledger as the rows of the README's table; with --readme it writes them into
# README.md's table (the text under it, which says which runs they were, is yours to
# update). A panic leaves its input in target/fuzz-artifacts and makes the exit
# status 1; the other targets still run.
#
# Fuzzing takes a whole core for as long as it runs: on a shared machine it slows
# builds and spoils timing runs. So the script refuses to start while the 1-minute load
# average is at or above VESSEL_FUZZ_MAX_LOAD (default: half the cores) unless --force,
# and it checks again before each target (and stops there) so that a long run gives way
# when other work starts.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=3600
corpus="${HOME}/.cache/vessel/fuzz-corpus"
ledger=fuzz/ledger.tsv
readme=false
force=false
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) seconds="$2"; shift 2 ;;
        --corpus) corpus="$2"; shift 2 ;;
        --ledger) ledger="$2"; shift 2 ;;
        --readme) readme=true; shift ;;
        --force) force=true; shift ;;
        -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "fuzz-long: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done
case "$seconds" in
    ''|*[!0-9]*) echo "fuzz-long: --seconds takes whole seconds" >&2; exit 2 ;;
esac
[ ${#targets[@]} -gt 0 ] || targets=(all)

cores=$(nproc)
max_load="${VESSEL_FUZZ_MAX_LOAD:-$(awk -v c="$cores" 'BEGIN { print c / 2 }')}"
busy() {
    local load
    load=$(cut -d' ' -f1 /proc/loadavg)
    awk -v l="$load" -v m="$max_load" 'BEGIN { exit !(l >= m) }'
}
if ! $force && busy; then
    echo "fuzz-long: the machine is busy (load $(cut -d' ' -f1 /proc/loadavg), limit" \
        "$max_load on $cores cores): not fuzzing now; --force to run anyway" >&2
    exit 3
fi

nice -n 19 cargo build -q -p fuzzing --bin fuzz-run
bin="${CARGO_TARGET_DIR:-target}/debug/fuzz-run"
if [ "${targets[0]}" = all ]; then
    mapfile -t targets < <("$bin" --list)
fi
mkdir -p "$corpus" "$(dirname "$ledger")"
if [ ! -e "$ledger" ]; then
    printf '# date\tcommit\ttarget\twall_s\tinputs\tcpu_s\tpanics\n' >"$ledger"
fi
commit=$(git rev-parse --short HEAD 2>/dev/null || echo -)

status=0
for t in "${targets[@]}"; do
    if ! $force && busy; then
        echo "fuzz-long: the machine became busy: stopping before $t" >&2
        status=3
        break
    fi
    echo "fuzz-long: $t for ${seconds} s" >&2
    out=$(nice -n 19 "$bin" --seconds "$seconds" --corpus "$corpus" "$t") || status=1
    echo "$out"
    # fuzz-run: NAME: N inputs, X CPU-s, K outcomes, corpus C, P panics
    line=$(grep -E "^fuzz-run: $t: " <<<"$out" | tail -n 1 || true)
    if [ -z "$line" ]; then
        echo "fuzz-long: $t ended without its figures (killed, or aborted)" >&2
        status=1
        continue
    fi
    read -r inputs cpu panics < <(sed -E \
        's/^fuzz-run: [^:]+: ([0-9]+) inputs, ([0-9.]+) CPU-s, .* ([0-9]+) panics$/\1 \2 \3/' \
        <<<"$line")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(date -u +%F)" "$commit" "$t" "$seconds" \
        "$inputs" "$cpu" "$panics" >>"$ledger"
done

# Each target's totals over the ledger, as the README table's rows.
rows=$(awk -F'\t' '
    /^#/ || NF < 7 { next }
    !($3 in cpu) { order[n++] = $3 }
    { inputs[$3] += $5; cpu[$3] += $6 }
    END {
        for (i = 0; i < n; i++) {
            t = order[i]; m = inputs[t] / 1e6
            printf "| `%s` | %s M | %.0f s (%.2f CPU-h) |\n", t,
                (m < 10 ? sprintf("%.2f", m) : sprintf("%.1f", m)), cpu[t], cpu[t] / 3600
        }
    }' "$ledger")
echo "$rows"
if $readme; then
    # The rows between the table's header and its first blank line.
    awk -v rows="$rows" '
        /^  \| target \| inputs \| CPU time \|$/ { print; header = 1; next }
        header == 1 && /^  \| --- / {
            print
            n = split(rows, r, "\n")
            for (i = 1; i <= n; i++) print "  " r[i]
            header = 2; next
        }
        header == 2 && /^  \|/ { next }
        header == 2 { header = 3 }
        { print }' README.md >README.md.new
    mv README.md.new README.md
    echo "fuzz-long: README.md's table updated; say which runs they were under it" >&2
fi
exit "$status"
