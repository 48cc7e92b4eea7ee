#!/usr/bin/env bash
# Cold whole-file reads of a checkpoint's shards by tools other than flash,
# beside flash's own probe of the same pattern, alternating round by round
# (page cache dropped before each): does flash's reader get what the disk
# gives to a plain `dd`?
#
#   FLASH=.carry/flash ROUNDS=3 bash bench/disk-dd.sh DIR [CARD] >> results.jsonl
#
# Contenders (one JSON line each per round, "loader" names it):
#   dd-direct-per-file   one `dd iflag=direct bs=16M` per shard, all at once
#                        (fastsafetensors 0.5's reading without GDS: a thread
#                        per file, 16 MiB O_DIRECT reads, one at a time);
#   dd-buffered-per-file the same without O_DIRECT (kernel readahead);
#   dd-direct-stream     one `dd iflag=direct bs=16M` over the shards in turn;
#   flash@PATTERN        `flash bench-disk --pattern PATTERN` (PATTERNS);
#   flash-load           `flash bench DIR --scenario cold` (a whole load);
#   flash-load@PATTERN   the same with `--pattern PATTERN`;
#   fastsafetensors, fastsafetensors-buffered
#                        bench/peers.py (FASTSAFETENSORS_ODIRECT=0 for the
#                        second), when PEER=1.
# Each line carries disk_read_bytes: what the block device read while the
# contender ran (/proc/diskstats, all processes; for the peer, its timed
# region only, with its threads and its steady rate).
set -uo pipefail
DIR=$1
CARD=${2:-unknown}
FLASH=${FLASH:-.carry/flash}
ROUNDS=${ROUNDS:-3}
PATTERNS=${PATTERNS:-direct:per-file:4x16M direct:shared:16x32M}
mapfile -t FILES < <(ls "$DIR"/*.safetensors)
BYTES=$(stat -c %s "${FILES[@]}" | awk '{s += $1} END {print s}')

DEV=$(basename "$(readlink "/sys/dev/block/$(stat -c '%Hd:%Ld' "${FILES[0]}")")")
sectors() { awk -v d="$DEV" '$3 == d {print $6}' /proc/diskstats; }
drop() { sync; echo 1 >/proc/sys/vm/drop_caches; }
emit() { # emit LOADER SECONDS ROUND DISK_BYTES
    printf '{"loader": "%s", "model": "%s", "scenario": "cold-read", "seconds": %s, "gbps": %s, "bytes": %s, "disk_read_bytes": %s, "card": "%s", "round": %s, "stage": "disk-dd"}\n' \
        "$1" "$(basename "$DIR")" "$2" "$(awk -v b="$BYTES" -v s="$2" 'BEGIN {printf "%.3f", b / s / 1e9}')" "$BYTES" "$4" "$CARD" "$3"
}
timed() { # timed CMD...: prints the seconds CMD took
    local t0 t1
    t0=$(date +%s.%N)
    "$@" >/dev/null 2>&1
    t1=$(date +%s.%N)
    awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}'
}
per_file() { # per_file DD_FLAGS...
    local pids=() f
    for f in "${FILES[@]}"; do dd if="$f" of=/dev/null bs=16M "$@" status=none & pids+=($!); done
    wait "${pids[@]}"
}
stream() { local f; for f in "${FILES[@]}"; do dd if="$f" of=/dev/null bs=16M iflag=direct status=none; done; }

contenders=(dd-direct-per-file dd-buffered-per-file dd-direct-stream flash-load)
for p in $PATTERNS; do contenders+=("flash@$p"); done
[ "${PEER:-0}" = 1 ] && contenders+=(fastsafetensors fastsafetensors-buffered)
# CONTENDERS replaces the list; flash-load@PATTERN is a whole load with that
# read pattern.
[ -n "${CONTENDERS:-}" ] && read -r -a contenders <<<"$CONTENDERS"
tagged() { # tagged LOADER ROUND DISK_SECTORS_BEFORE: JSON lines from stdin, labelled
    python3 -c '
import json, sys
for l in sys.stdin:
    d = json.loads(l)
    if "seconds" not in d:
        continue
    out = {"loader": sys.argv[1], "model": sys.argv[2], "scenario": "cold-read", "seconds": d["seconds"],
           "gbps": d["gbps"], "bytes": d.get("bytes"), "card": sys.argv[3], "round": int(sys.argv[4]), "stage": "disk-dd",
           "disk_read_bytes": d.get("disk_read_bytes", (int(sys.argv[6]) - int(sys.argv[5])) * 512)}
    for k in ("threads_max", "disk_gbps_steady", "setup_seconds", "stats"):
        if k in d: out[k] = d[k]
    print(json.dumps(out))' "$1" "$(basename "$DIR")" "$CARD" "$2" "$3" "$(sectors)"
}
n=${#contenders[@]}
for round in $(seq 1 "$ROUNDS"); do
    for k in $(seq 0 $((n - 1))); do
        c=${contenders[$(((round + k) % n))]}
        drop
        s0=$(sectors)
        case $c in
            dd-direct-per-file) t=$(timed per_file iflag=direct); emit "$c" "$t" "$round" $(( ($(sectors) - s0) * 512 )) ;;
            dd-buffered-per-file) t=$(timed per_file); emit "$c" "$t" "$round" $(( ($(sectors) - s0) * 512 )) ;;
            dd-direct-stream) t=$(timed stream); emit "$c" "$t" "$round" $(( ($(sectors) - s0) * 512 )) ;;
            # (the output first: the sectors after are read once it is done)
            flash@*)
                out=$("$FLASH" -q bench-disk "$DIR" --pattern "${c#flash@}" --rounds 1 --limit 1000G --json 2>/dev/null | grep '"round"') ;;
            flash-load)
                out=$("$FLASH" -q bench "$DIR" --scenario cold --loader flash --json 2>/dev/null) ;;
            flash-load@*)
                out=$("$FLASH" -q bench "$DIR" --scenario cold --loader flash --pattern "${c#flash-load@}" --json 2>/dev/null) ;;
            fastsafetensors)
                out=$(python3 bench/peers.py --loader fastsafetensors --model-dir "$DIR" --scenario cold 2>/dev/null) ;;
            fastsafetensors-buffered)
                out=$(FASTSAFETENSORS_ODIRECT=0 python3 bench/peers.py --loader fastsafetensors --model-dir "$DIR" \
                    --scenario cold 2>/dev/null) ;;
        esac
        case $c in flash*|fastsafetensors*) printf '%s\n' "$out" | tagged "$c" "$round" "$s0" ;; esac
    done
done
