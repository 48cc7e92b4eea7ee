#!/usr/bin/env bash
# The benchmark run on the GPU machine (no network, no Rust there):
#
#   STAGES="check load engine ttft sdk daemon" bash bench/device.sh
#
# with the release binary at .carry/flash, the SDK wheel at .carry/wheels/
# (bench/build-carry.sh) and the peers' wheels at .whl/
# (bench/fetch-wheels.sh). STAGES picks what runs (default: all, in this
# order; one device call has 10 minutes, so big runs split the stages over
# two calls on the same warm machine):
#   check   doctor, selftest (loads, device_map, engine ops, daemon), the
#           transformers compatibility of synthesized checkpoints;
#   load    the loaders side by side (steps 3-5 below); PEERS
#           narrows the peers (default: all five);
#   daemon  memory tier -> GPU and share-mode attach (DAEMON_SCENARIOS
#           "upload"), the swap workload ("swap"; SWAP_SECONDS, default 300),
#           the swap workload of full-size models from a cold page cache
#           beside the in-process cold load ("swap-cold", not in the
#           default; SWAPCOLD_SECONDS, default 60; SWAPCOLD_COMPRESS=1 with
#           the models stored compressed; SWAPCOLD_DISK_LOADS="1 0" and
#           SWAPCOLD_ROUNDS=N alternate the daemon's --disk-loads);
# SIZES (default "8b 0.6b") picks the checkpoints synthesized first.
#   engine  GPU engine vs transformers, decode/prefill vs roofline;
#   ttft    time to first token of `flash run` through the daemon
#           (GPU-resident, memory tier, cold from disk), in-process cold from
#           disk (--no-daemon) and of transformers; cold runs alternate with
#           the cold load (TTFT_ROUNDS rounds, default 3; TTFT_TRANSFORMERS=0
#           leaves out transformers' TTFT); TTFT_DAEMON=0 runs
#           only the in-process cold runs and the load, no daemon started;
#   first   first requests: `flash run` on a freshly started daemon with the
#           8B in memory or on the GPU, and the SDK's first load_model in a
#           fresh process against from_pretrained (FIRST_ROUNDS, default 3);
#   sdk     the SDK's GPU tests and its timing targets;
#   disk    what the disk rewards: block device settings, cold reads with
#           every read pattern (flash bench-disk), alternating;
#   cold    the fastest peer against flash (safetensors folder, flash
#           format, compressed flash format), whole checkpoints, fresh
#           processes, COLD_ROUNDS rounds in a Williams order (each place
#           and each predecessor once per design); median ratios;
#           COLD_PEER_TWICE=1 runs the peer twice a round (the noise floor);
#           DOCTOR_AFTER=1 probes the disk again after the loads, and the
#           doctor's limit is set against the fastest load;
#           COLD_IDLE seconds of idle disk after each eviction (default 0),
#           COLD_IDLE_VARIANTS adds flash contenders that wait longer;
#   compress  decode speed alone (CPU core, all cores, GPU) and the pinned
#           (memory tier) upload of the compressed model beside the plain;
#   probe   measurements behind design choices (PROBES, default "cold
#           pin"): cold 8B reads (direct, buffered, the best peer), the
#           pinning method (FLASH_PINNED) on a small cold load.
# Steps of the load stage:
#   1. install the wheels into /tmp/site;
#   2. flash doctor --json, flash selftest;
#   3. flash synth qwen3 8b and 0.6b into a scratch folder on the local disk,
#      flash pull --from each into the store (the flash format);
#   4. per model (8b first), per scenario (cold, warm): every peer loader in a
#      fresh python3 bench/peers.py process, then flash bench on the plain
#      safetensors folder and on the store model; flash bench --scenario
#      pinned on the store model;
#   5. a table: loader, model, scenario, seconds, GB/s, and the ratio of the
#      best peer's time to this time (>1: faster than every peer).
# Every JSON line goes to $OUT/results.jsonl (the lead copies $OUT back into
# bench/results/). Steps past the time budget (BUDGET seconds, default 540)
# are skipped, and say so.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$SECONDS
BUDGET=${BUDGET:-540}
OUT=${OUT:-$ROOT/bench/out}
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
: >"$RESULTS"
exec > >(tee -a "$OUT/device.log") 2>&1
export PYTHONUNBUFFERED=1

FLASH=${FLASH:-$ROOT/.carry/flash}
read -r -a PEERS <<<"${PEERS:-st_load_file st_safe_open fastsafetensors runai instanttensor}"
STAGES=${STAGES:-check load engine ttft sdk daemon}
: >"$RESULTS.cold"
stage() { [[ " $STAGES " == *" $1 "* ]]; }
PEER_TIMEOUT=${PEER_TIMEOUT:-150}

log() { printf '[%4ds] %s\n' "$((SECONDS - START))" "$*"; }
in_budget() { (( SECONDS - START < BUDGET )); }
skip() { # skip WHAT: record that a step was skipped for time
    log "SKIPPED (time budget): $1"
    printf '{"skipped": "%s", "reason": "time budget"}\n' "$1" >>"$RESULTS"
}

[ -x "$FLASH" ] || chmod +x "$FLASH" 2>/dev/null
if [ ! -x "$FLASH" ]; then
    echo "no flash binary at $FLASH" >&2
    exit 1
fi

# 1. Wheels.
if ls .whl/*.whl >/dev/null 2>&1; then
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        log "wheel install failed: the non-safetensors peers will report errors"
    fi
else
    log "no .whl/: only the safetensors peers can run"
fi

CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '-')
CARD=${CARD:-unknown}
log "card $CARD, flash $("$FLASH" --version 2>/dev/null)"
# The host CPU: CPU decode speeds (issue 13's 1 GB/s per core) depend on it.
log "cpu $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) threads"

# Scratch on the local disk (not tmpfs: the disk is what is measured).
SCRATCH=${SCRATCH:-/var/tmp/flash-bench}
mkdir -p "$SCRATCH"
if [ "$(stat -f -c %T "$SCRATCH")" = "tmpfs" ]; then
    SCRATCH=$ROOT/.bench-scratch
    mkdir -p "$SCRATCH"
fi
export FLASH_HOME=$SCRATCH/store
mkdir -p "$FLASH_HOME"
df -h "$SCRATCH" | tail -1
log "scratch $SCRATCH ($(stat -f -c %T "$SCRATCH")), store $FLASH_HOME"

# 2. Doctor and self-test.
# CHECKS picks the checks (default: all): doctor selftest daemon torch.
CHECKS=${CHECKS:-doctor selftest daemon torch}
check() { [[ " $CHECKS " == *" $1 "* ]]; }
if stage check; then
if check doctor; then
    log "flash doctor --json"
    if "$FLASH" doctor --json >"$OUT/doctor.json"; then
        cat "$OUT/doctor.json"
        echo
    else
        log "doctor failed (rc $?)"
    fi
fi
if check selftest; then
    log "flash selftest (loads: plain, compressed, safetensors; device_map; corrupted chunks; engine ops and forward)"
    "$FLASH" selftest --require-gpu 2>&1 | grep -v "^ok " | tail -25
    log "selftest rc ${PIPESTATUS[0]}"
fi
if check daemon; then
    log "flash selftest --daemon"
    "$FLASH" selftest --daemon --require-gpu 2>&1 | tail -12
    log "selftest --daemon rc ${PIPESTATUS[0]}"
fi
if check torch; then
    log "transformers loads what flash synth writes (tests/gpu/test_synth_torch.py)"
    rm -rf "$SCRATCH/compat"
    "$FLASH" -q synth qwen3 tiny "$SCRATCH/compat/qwen3-tiny" --seed 1
    "$FLASH" -q synth llama tiny "$SCRATCH/compat/llama-tiny" --seed 1 --dtype fp32 --shard-size 60000
    FLASH_SYNTH_DIR="$SCRATCH/compat/qwen3-tiny:$SCRATCH/compat/llama-tiny" \
        timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_synth_torch.py 2>&1 | tail -3
fi
fi

# flash bench --device exists only in some versions of the CLI.
DEVICE_FLAG=()
if "$FLASH" bench --help 2>/dev/null | grep -q -- '--device'; then
    DEVICE_FLAG=(--device cuda:0)
fi

# Appends flash's JSON lines to the results, tagged with what was benched.
tag() { # tag LABEL MODEL SCENARIO
    python3 -c '
import json, sys
label, model, scenario, card = sys.argv[1:5]
for line in sys.stdin:
    line = line.strip()
    if not line.startswith("{"):
        if line:
            print(line, file=sys.stderr)
        continue
    try:
        d = json.loads(line)
    except ValueError:
        print(line, file=sys.stderr)
        continue
    d["target"] = label
    if d.get("model") not in (None, model):
        d["path"] = d["model"]
    d["model"] = model
    if d.get("scenario") not in (None, scenario):
        d["scenario_reported"] = d["scenario"]
    d["scenario"] = scenario
    d.setdefault("card", card)
    print(json.dumps(d), flush=True)
' "$1" "$2" "$3" "$CARD"
}

json_lines() { # json_lines: keep stdout lines that are JSON objects, tag the card
    python3 -c '
import json, sys
for line in sys.stdin:
    line = line.strip()
    if not line.startswith("{"):
        if line: print(line, file=sys.stderr)
        continue
    try: d = json.loads(line)
    except ValueError:
        print(line, file=sys.stderr); continue
    d.setdefault("card", sys.argv[1]); d.setdefault("stage", sys.argv[2])
    print(json.dumps(d), flush=True)' "$CARD" "$1" | tee -a "$RESULTS"
}
evict_all() { # evict_all DIR: every file of DIR out of the page cache (and drop_caches as root)
    python3 - "$1" <<'PY'
import os, sys
for root, _, files in os.walk(sys.argv[1]):
    for f in files:
        fd = os.open(os.path.join(root, f), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
PY
    sync
    [ -w /proc/sys/vm/drop_caches ] && echo 3 >/proc/sys/vm/drop_caches
    log "evicted $1 from the page cache"
}
run_peer() { # run_peer LOADER DIR MODEL SCENARIO
    local line
    # diskwatch: the block device's requests while it ran (sizes, depth, latency).
    line=$(timeout "$PEER_TIMEOUT" python3 bench/diskwatch.py "$2" -- python3 bench/peers.py --loader "$1" --model-dir "$2" \
        --model "$3" --scenario "$4" --card "$CARD" 2>"$OUT/peer.err" | tail -1)
    local rc=$?
    if [ -z "$line" ]; then
        line=$(printf '{"loader": "%s", "model": "%s", "scenario": "%s", "card": "%s", "error": "no output (rc %s): %s"}' \
            "$1" "$3" "$4" "$CARD" "$rc" "$(tail -c 300 "$OUT/peer.err" | tr '"\n\\' "' /")")
    fi
    echo "$line" | tee -a "$RESULTS"
}

run_flash() { # run_flash LABEL MODEL SCENARIO TARGET
    if [ "$3" = "cold" ]; then
        # The same eviction the peers get (flash bench evicts too).
        [ -d "$4" ] && python3 bench/peers.py --evict-only --model-dir "$4" 2>/dev/null
    fi
    timeout "$PEER_TIMEOUT" "$FLASH" -q bench "$4" "${DEVICE_FLAG[@]}" --scenario "$3" --json \
        2>"$OUT/flash.err" | tag "$1" "$2" "$3" | tee -a "$RESULTS"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" != 0 ]; then
        log "flash bench $4 --scenario $3: rc $rc: $(tail -c 400 "$OUT/flash.err")"
        printf '{"loader": "flash", "target": "%s", "model": "%s", "scenario": "%s", "card": "%s", "error": "rc %s"}\n' \
            "$1" "$2" "$3" "$CARD" "$rc" >>"$RESULTS"
    fi
}

# 3. Checkpoints: written once each (the stages after check need them).
declare -A DIRS STORE
SIZES=${SIZES-8b 0.6b}
PACKED=${PACKED-1}
[ "$PACKED" = 0 ] && PACKED=""
[ "$STAGES" = check ] && SIZES=""
for size in $SIZES; do
    model=qwen3-$size
    dir=$SCRATCH/$model
    if ! in_budget; then skip "synth $model"; continue; fi
    if [ ! -f "$dir/config.json" ]; then
        rm -rf "$dir"
        log "flash synth qwen3 $size $dir"
        "$FLASH" -q synth qwen3 "$size" "$dir" || { log "synth $model failed"; continue; }
    fi
    DIRS[$model]=$dir
    # The import, timed, verbatim and (PACKED=1, the default) compressed:
    # the compressed model is bench/$model-packed.
    for kind in plain ${PACKED:+packed}; do
        name=bench/$model
        flags=(--no-compress)
        if [ "$kind" = packed ]; then name=bench/$model-packed; flags=(--compress); fi
        if "$FLASH" -q info "$name" >/dev/null 2>&1; then
            STORE[$model-$kind]=$name
            continue
        fi
        log "flash pull --from $dir --name $name ${flags[*]}"
        t0=$(date +%s.%N)
        if "$FLASH" -q pull --from "$dir" --name "$name" --force "${flags[@]}" --json >"$OUT/pull.json"; then
            STORE[$model-$kind]=$name
            python3 - "$OUT/pull.json" "$model" "$kind" "$t0" "$(date +%s.%N)" "$CARD" <<'PY' | tee -a "$RESULTS"
import json, sys
r = json.load(open(sys.argv[1]))
print(json.dumps({"loader": "flash-import", "model": sys.argv[2], "scenario": sys.argv[3],
                  "seconds": round(float(sys.argv[5]) - float(sys.argv[4]), 3),
                  "stored_bytes": r["bytes"], "tensor_bytes": r["tensor_bytes"],
                  "ratio": round(r["bytes"] / r["tensor_bytes"], 4), "card": sys.argv[6], "stage": "import"}))
PY
        else
            log "pull $name failed: its runs are skipped"
        fi
    done
    STORE[$model]=${STORE[$model-plain]:-}
    du -sh "$dir" "$FLASH_HOME" 2>/dev/null
done
df -h "$SCRATCH" | tail -1

# Disk: what the disk rewards. The block device's settings, then
# cold reads of the 8B checkpoint's shards with every read pattern
# (flash bench-disk: DISK_PATTERNS, or the doctor's candidates), the order
# rotated each round, first DISK_LIMIT bytes of each shard.
if stage disk && [ -n "${DIRS[qwen3-8b]:-}" ]; then
    log "== disk: block devices"
    for q in /sys/block/*/queue; do
        dev=$(basename "$(dirname "$q")")
        case $dev in loop*|ram*) continue ;; esac
        printf '%s:' "$dev"
        for k in max_sectors_kb max_hw_sectors_kb nr_requests read_ahead_kb scheduler rotational logical_block_size nomerges; do
            printf ' %s=%s' "$k" "$(cat "$q/$k" 2>/dev/null | tr -d '\n')"
        done
        printf ' hw_queues=%s\n' "$(ls "/sys/block/$dev/mq" 2>/dev/null | wc -l)"
    done
    findmnt -no SOURCE,FSTYPE,OPTIONS -T "$SCRATCH" || true
    pat_args=()
    for p in ${DISK_PATTERNS:-}; do pat_args+=(--pattern "$p"); done
    log "== disk: read patterns, ${DISK_ROUNDS:-3} rounds, first ${DISK_LIMIT:-2G} of each shard"
    timeout 400 "$FLASH" bench-disk "${DIRS[qwen3-8b]}" "${pat_args[@]}" --rounds "${DISK_ROUNDS:-3}" \
        --limit "${DISK_LIMIT:-2G}" --json | json_lines disk
    # The best two by median go on to the full cold comparison below.
    BEST_PATTERNS=$(python3 - "$RESULTS" <<'PY'
import json, sys, collections
by = collections.defaultdict(list)
for line in open(sys.argv[1]):
    try: d = json.loads(line)
    except ValueError: continue
    if d.get("stage") == "disk" and "pattern" in d and "round" in d:
        by[d["pattern"]].append(d["gbps"])
med = sorted(((sorted(v)[len(v)//2], p) for p, v in by.items()), reverse=True)
print(" ".join(p for _, p in med[:2]))
PY
)
    log "best patterns by median: $BEST_PATTERNS"
fi

# Cold: the fastest peer against flash, whole checkpoints, fresh processes,
# COLD_ROUNDS rounds (default 5) in a Williams order (williams_row): the
# safetensors folder and the flash format with the loader's defaults, plus
# the safetensors folder with each of COLD_PATTERNS (default: the disk
# stage's best two) and the flash format with each of COLD_FLAGS (flags of
# `flash bench`). Per-round times and the median ratio at the end.
# The machine's NUMA layout and the GPU's node: fastsafetensors runs its
# reader threads and bounce buffers on the GPU's node.
numa_layout() {
    local bus node
    bus=$(nvidia-smi --query-gpu=pci.bus_id --format=csv,noheader 2>/dev/null | head -1 | tr 'A-F' 'a-f')
    bus=${bus#0000}
    GPU_CPUS=$(cat "/sys/bus/pci/devices/$bus/local_cpulist" 2>/dev/null)
    node=$(cat "/sys/bus/pci/devices/$bus/numa_node" 2>/dev/null)
    log "numa: nodes $(ls -d /sys/devices/system/node/node* 2>/dev/null | wc -l), GPU $bus on node ${node:-?} with CPUs ${GPU_CPUS:-?}, online CPUs $(cat /sys/devices/system/cpu/online)"
    for n in /sys/devices/system/node/node*; do
        [ -d "$n" ] && log "  $(basename "$n"): CPUs $(cat "$n/cpulist"), $(grep -m1 MemTotal "$n/meminfo" | awk '{print $4 " " $5}')"
    done
    # Every CPU local to the GPU is no binding at all.
    [ "$GPU_CPUS" = "$(cat /sys/devices/system/cpu/online)" ] && GPU_CPUS=
    return 0
}
GPU_CPUS=
# The order of the cold contenders: a Williams design. Over its rounds (N
# for N contenders, 2N when N is odd) every contender takes every place in
# the round once and follows every other contender once, so neither a place
# nor a neighbour (the peer's process exit, what it leaves in memory)
# favours anyone. A plain rotation keeps each contender's predecessor the
# same in every round. Rounds past the design repeat it.
williams_len() { if (($1 % 2)); then echo $((2 * $1)); else echo "$1"; fi; }
williams_row() { # williams_row N ROUND (1-based): N indices, space-separated
    local n=$1 r k v row=() out=()
    r=$((($2 - 1) % $(williams_len "$1")))
    for ((k = 0; k < n; k++)); do
        if ((k == 0)); then v=0; elif ((k % 2)); then v=$(((k + 1) / 2)); else v=$((n - k / 2)); fi
        row+=($(((v + r) % n)))
    done
    if ((r >= n)); then
        for ((k = n - 1; k >= 0; k--)); do out+=("${row[$k]}"); done
        row=("${out[@]}")
    fi
    echo "${row[@]}"
}
cold_stage() { # cold_stage MODEL...
    for model in "$@"; do
        dir=${DIRS[$model]:-}
        [ -n "$dir" ] || continue
        contenders=("peer:fastsafetensors" "flash:$dir" )
        [ -n "${STORE[$model]:-}" ] && contenders+=("flash:${STORE[$model]}")
        [ -n "${STORE[$model-packed]:-}" ] && contenders+=("flash:${STORE[$model-packed]}")
        for p in ${COLD_PATTERNS:-${BEST_PATTERNS:-}}; do
            # io_uring depths (qdN) exist in the disk probe only, not in loads.
            if [[ "$p" == *:qd* ]]; then log "cold: $p is a probe-only pattern, left out"; continue; fi
            contenders+=("flash:$dir:$p")
        done
        # COLD_FLAGS: "NAME=FLAG,FLAG ..." (e.g. s16=--staging-size=16M,--chunk-size=16M),
        # each a contender on the flash format labelled flash-format@NAME.
        # The same flags on the compressed model (flash-compressed@NAME).
        for f in ${COLD_FLAGS:-}; do
            [ -n "${STORE[$model]:-}" ] && contenders+=("flags:${STORE[$model]}:$f")
            [ -n "${STORE[$model-packed]:-}" ] && contenders+=("flags:${STORE[$model-packed]}:$f")
        done
        # COLD_BIND=1: the flash folder and format again with the process
        # bound to the CPUs of the GPU's NUMA node (taskset; memory follows
        # first touch), as fastsafetensors binds its reader threads.
        if [ "${COLD_BIND:-0}" = 1 ] && [ -n "$GPU_CPUS" ]; then
            contenders+=("bind:$dir:")
            [ -n "${STORE[$model]:-}" ] && contenders+=("bind:${STORE[$model]}:")
        fi
        # COLD_IDLE_VARIANTS: "SECONDS ..." each a contender on the flash
        # format (and the compressed one) that waits that long after the
        # eviction before its process starts (flash-format@idleN): whether
        # the disk reads faster after an idle spell, as the peer's timed read
        # comes after seconds of imports (it did not: cold-idle results).
        for secs in ${COLD_IDLE_VARIANTS:-}; do
            [ -n "${STORE[$model]:-}" ] && contenders+=("idle:${STORE[$model]}:$secs")
            [ -n "${STORE[$model-packed]:-}" ] && contenders+=("idle:${STORE[$model-packed]}:$secs")
        done
        # COLD_PEER_TWICE=1: the peer twice a round (fastsafetensors#2), the
        # control: how far one loader's time moves between two runs of a
        # round, which bounds what any per-round ratio can show.
        [ "${COLD_PEER_TWICE:-0}" = 1 ] && contenders+=("peer:fastsafetensors:2")
        n=${#contenders[@]}
        log "cold $model: ${n} contenders in a Williams design of $(williams_len "$n") rounds: ${contenders[*]}"
        for round in $(seq 1 "${COLD_ROUNDS:-5}"); do
            if ! in_budget; then skip "cold $model round $round"; continue; fi
            log "== cold $model round $round (order $(williams_row "$n" "$round"))"
            position=0; prev=
            for i in $(williams_row "$n" "$round"); do
                c=${contenders[$i]}
                position=$((position + 1))
                # KIND:TARGET:REST, REST a read pattern (flash) or NAME=FLAGS (flags).
                IFS=: read -r kind target rest <<<"$c"
                pattern=; flags=; idle=${COLD_IDLE:-0}
                case $kind in
                    flags) flags=$rest ;;
                    idle) idle=$((idle + rest)) ;;
                    *) pattern=$rest ;;
                esac
                # Every contender: the eviction, then COLD_IDLE seconds (plus
                # an idle variant's own) of an idle disk, then its process.
                python3 bench/peers.py --evict-only --model-dir "$dir" 2>/dev/null
                [ "$idle" != 0 ] && sleep "$idle"
                if [ "$kind" = peer ]; then
                    label=$target
                    [ -n "$rest" ] && label="$target#$rest"
                    run_peer "$target" "$dir" "$model" cold | python3 -c '
import json, sys
for l in sys.stdin:
    d = json.loads(l); d["loader"] = sys.argv[2]; d["round"] = int(sys.argv[1]); d["stage"] = "cold"
    d["position"] = int(sys.argv[3]); d["after"] = sys.argv[4] or None; print(json.dumps(d))' "$round" "$label" "$position" "$prev" >>"$RESULTS.cold"
                    tail -1 "$RESULTS.cold"
                else
                    label=flash-safetensors
                    [ "$target" != "$dir" ] && label=flash-format
                    [[ "$target" == *-packed ]] && label=flash-compressed
                    extra=()
                    if [ -n "$pattern" ]; then extra=(--pattern "$pattern"); label="$label@$pattern"; fi
                    if [ -n "$flags" ]; then
                        IFS=, read -r -a extra <<<"${flags#*=}"
                        label="$label@${flags%%=*}"
                    fi
                    [ "$kind" = idle ] && label="$label@idle$rest"
                    wrap=()
                    if [ "$kind" = bind ]; then wrap=(taskset -c "$GPU_CPUS"); label="$label@numa-bound"; fi
                    timeout "$PEER_TIMEOUT" python3 bench/diskwatch.py "$FLASH_HOME" -- "${wrap[@]}" "$FLASH" -q bench "$target" "${DEVICE_FLAG[@]}" --scenario cold \
                        --loader flash "${extra[@]}" --json 2>"$OUT/flash.err" | tag "$label" "$model" cold |
                        python3 -c '
import json, sys
for l in sys.stdin:
    d = json.loads(l); d["round"] = int(sys.argv[1]); d["stage"] = "cold"; d["loader"] = d["target"]
    d["position"] = int(sys.argv[2]); d["after"] = sys.argv[3] or None; print(json.dumps(d))' "$round" "$position" "$prev" >>"$RESULTS.cold"
                    tail -1 "$RESULTS.cold"
                fi
                prev=$label
            done
        done
    done
}
doctor_vs_loads() { # the doctor's disk limit against the fastest cold load of the run
    python3 - "$RESULTS.cold" "$OUT"/doctor.json "$OUT"/doctor-after.json <<'PY' | tee -a "$OUT/cold-table.txt"
import json, os, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
# A compressed load's rate counts decoded bytes: it may exceed the disk's.
loads = [d for d in rows if d.get("gbps") and not d.get("error") and "compressed" not in d.get("loader", "")]
if not loads:
    sys.exit()
best = max(loads, key=lambda d: d["gbps"])
print(f"fastest cold load: {best['gbps']:.2f} GB/s ({best['loader']}, {best['model']}, round {best.get('round')})")
for f in sys.argv[2:]:
    if os.path.exists(f):
        d = json.load(open(f))
        limit = d.get("disk_read_gbps")
        if limit:
            ok = "at or above" if limit >= best["gbps"] else "BELOW"
            print(f"  {os.path.basename(f)}: disk limit {limit:.2f} GB/s ({d.get('disk_best_pattern')}), {ok} the fastest load")
PY
}
cold_table() {
    cat "$RESULTS.cold" >>"$RESULTS" 2>/dev/null
    python3 - "$RESULTS.cold" <<'PY' | tee "$OUT/cold-table.txt"
import json, sys, collections, statistics
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = collections.defaultdict(dict)
for d in rows:
    if d.get("seconds") is not None and not d.get("error"):
        by[(d["model"], d["round"])][d["loader"]] = d["seconds"]
for model in sorted({m for m, _ in by}):
    rounds = sorted(r for m, r in by if m == model)
    loaders = sorted({l for (m, _), v in by.items() if m == model for l in v})
    print(f"cold {model}: seconds per round (fresh processes, page cache dropped before each)")
    print("round " + " ".join(f"{l[:34]:>34}" for l in loaders))
    for r in rounds:
        print(f"{r:>5} " + " ".join(f'{by[(model, r)].get(l, float("nan")):>34.2f}' for l in loaders))
    peer = "fastsafetensors"
    med = {l: statistics.median([by[(model, r)][l] for r in rounds if l in by[(model, r)]]) for l in loaders}
    print("median " + " ".join(f"{med[l]:>33.2f}" for l in loaders))
    if peer in med:
        for l in loaders:
            if l == peer: continue
            worst = max((by[(model, r)][l] / by[(model, r)][peer] for r in rounds if l in by[(model, r)] and peer in by[(model, r)]), default=float("nan"))
            print(f"  {l}: median ratio to {peer} {med[l] / med[peer]:.3f}, worst round {worst:.3f}")
    # What the block device was asked (bench/diskwatch.py): medians per loader.
    disk = collections.defaultdict(list)
    for d in rows:
        if d.get("model") == model and isinstance(d.get("disk"), dict) and d["disk"].get("reads"):
            disk[d["loader"]].append(d["disk"])
    if disk:
        print(f"  block device, medians: {'loader':<34} {'KiB/req':>8} {'ms/req':>7} {'in flight':>9} {'busy':>5}")
        for l, ds in sorted(disk.items()):
            m = lambda k: statistics.median([x[k] for x in ds if x.get(k) is not None] or [float("nan")])
            print(f"  {'':<21} {l[:34]:<34} {m('req_kib'):>8.0f} {m('ms_per_req'):>7.2f} {m('inflight_mean'):>9.1f} {m('busy_share'):>5.2f}")
    # Carryover: each loader's runs right after a run of the peer (its
    # process exit) against its runs after anything else.
    after = collections.defaultdict(lambda: ([], []))
    for d in rows:
        if d.get("model") == model and d.get("seconds") is not None and "after" in d and not d.get("error") \
                and not d["loader"].startswith(peer):
            after[d["loader"]][0 if (d["after"] or "").startswith(peer) else 1].append(d["seconds"])
    for l, (a, o) in sorted(after.items()):
        if a and o:
            print(f"  {l}: right after {peer} median {statistics.median(a):.2f} s ({len(a)} runs), after others {statistics.median(o):.2f} s ({len(o)})")
    setup = [d["setup_seconds"] for d in rows if d.get("model") == model and d.get("loader") == peer and "setup_seconds" in d]
    if setup:
        print(f"  {peer}: {statistics.median(setup):.1f} s from its eviction to its timed read (imports, CUDA context; median)")
PY
}
# The 8B first (the headline), the smaller COLD_LATE_MODELS after the
# compression stage.
stage cold && numa_layout && cold_stage ${COLD_MODELS:-qwen3-8b}


# Compression: decoding alone (one CPU core, every core, the GPU
# in one launch) and the memory-tier path (the stored image in pinned memory
# uploaded, decoded on the GPU as it lands) for the compressed model, with
# the plain model's upload beside it.
if stage compress; then
    for model in ${COMPRESS_MODELS:-qwen3-8b}; do
        packed=${STORE[$model-packed]:-}
        [ -n "$packed" ] || continue
        if ! in_budget; then skip "compress $model"; continue; fi
        log "== compress: $model stored size, decode speed, pinned upload"
        "$FLASH" info "$packed" --json | python3 -c '
import json, sys
i = json.load(sys.stdin)
print(json.dumps({"loader": "flash-info", "model": sys.argv[1], "scenario": "stored", "size": i["size"],
                  "stored_bytes": i["stored_bytes"], "ratio": round(i["stored_bytes"] / i["size"], 4),
                  "card": sys.argv[2], "stage": "compress"}))' "$model" "$CARD" | tee -a "$RESULTS"
        timeout 150 "$FLASH" -q bench "$packed" "${DEVICE_FLAG[@]}" --scenario decode --json |
            tag flash-compressed "$model" decode | json_lines compress
        # The same CPU rows with the portable scalar decoder, for the ratio
        # of the vector one (`flash doctor` names the one in use).
        FLASH_CPU_DECODER=scalar timeout 150 "$FLASH" -q bench "$packed" --device cpu --scenario decode --json |
            tag flash-compressed-scalar-decoder "$model" decode | json_lines compress
        for target in "$packed" "${STORE[$model-plain]:-}"; do
            [ -n "$target" ] && in_budget || continue
            label=flash-format; [ "$target" = "$packed" ] && label=flash-compressed
            timeout 150 "$FLASH" -q bench "$target" "${DEVICE_FLAG[@]}" --scenario pinned --json |
                tag "$label" "$model" pinned | json_lines compress
        done
        # The daemon's own path: the compressed model in its memory tier
        # (the tier counts its stored bytes), uploaded to the GPU tier.
        if [ "${DAEMON_UPLOAD:-1}" = 1 ] && in_budget; then
            "$FLASH" start --mem-pool 12G --http off && {
                timeout 120 "$FLASH" bench-daemon --scenario upload --model "$packed" --repeat 3 --json |
                    json_lines compress
                "$FLASH" ps --json | python3 -c '
import json, sys
ps = json.load(sys.stdin)
for m in ps if isinstance(ps, list) else ps.get("models", []):
    print(json.dumps({"loader": "daemon-ps", "model": m.get("model"), "tier": m.get("tier"), "bytes": m.get("bytes"), "stage": "compress"}))' | tee -a "$RESULTS" || true
                "$FLASH" stop
            }
        fi
    done
fi

if stage cold; then
    cold_stage ${COLD_LATE_MODELS-qwen3-0.6b}
    # DOCTOR_AFTER=1: the doctor's disk probe again once the loads are done,
    # beside the one of the check stage, against the loads' rates.
    if [ "${DOCTOR_AFTER:-0}" = 1 ] && in_budget; then
        log "flash doctor --json (after the cold loads)"
        "$FLASH" doctor --json >"$OUT/doctor-after.json" || log "doctor failed (rc $?)"
    fi
    cold_table
    doctor_vs_loads
fi

# 4. Loads.
LOAD_MODELS="qwen3-8b qwen3-0.6b"
stage load || LOAD_MODELS=""
for model in $LOAD_MODELS; do
    dir=${DIRS[$model]:-}
    [ -n "$dir" ] || continue
    for scenario in cold warm; do
        if ! in_budget; then skip "$model $scenario"; continue; fi
        log "== $model $scenario"
        for peer in "${PEERS[@]}"; do
            if ! in_budget; then skip "$peer $model $scenario"; continue; fi
            run_peer "$peer" "$dir" "$model" "$scenario"
        done
        in_budget && run_flash flash-safetensors "$model" "$scenario" "$dir"
        if [ -n "${STORE[$model]:-}" ] && in_budget; then
            run_flash flash-format "$model" "$scenario" "${STORE[$model]}"
        fi
    done
    if [ -n "${STORE[$model]:-}" ]; then
        if in_budget; then
            log "== $model pinned"
            run_flash flash-format "$model" pinned "${STORE[$model]}"
        else
            skip "$model pinned"
        fi
    fi
done

# 6. The engine: GPU forward vs transformers, speed vs roofline,
#    time to first token of `flash run` and of transformers.
M8=${STORE[qwen3-8b]:-}
D8=${DIRS[qwen3-8b]:-}
if stage engine; then
    log "== engine: GPU engine vs transformers (Qwen3-0.6B, Llama-3-1B shapes, 64 positions)"
    FLASH_BIN=$FLASH FLASH_ENGINE_DIR=$SCRATCH/engine timeout 300 \
        python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_engine_vs_transformers.py \
        >"$SCRATCH/engine-test.log" 2>&1
    # The agreement lines (each path against each reference), then the verdict.
    grep '^{"model"' "$SCRATCH/engine-test.log" | json_lines engine
    grep -E "Error|assert|passed|failed" "$SCRATCH/engine-test.log" | tail -8
    if [ -n "$M8" ]; then
        log "== engine: decode and prefill, $M8"
        timeout 240 "$FLASH" -q bench-engine "$M8" --prompt-len 512 --decode 128 --repeat 3 --json | json_lines engine
    fi
fi
# Probes behind design choices (not targets): cold reads of the 8B by read
# mode, and the pinning method's effect on a small cold load (FLASH_PINNED,
# alternating). The IPC-vs-VMM attach probe retired once answered (rounded
# cuMemAlloc + IPC; results in bench/results/*attach*).
PROBES=${PROBES:-cold pin}
probe() { [[ " $PROBES " == *" $1 "* ]]; }
if stage probe; then
    # Cold reads of the 8B, alternating: the best peer, flash O_DIRECT,
    # flash buffered (kernel readahead), the raw disk loader.
    if probe cold && [ -n "$D8" ]; then
        for i in 1 2; do
            log "== probe: qwen3-8b cold, round $i"
            run_peer fastsafetensors "$D8" qwen3-8b cold
            for io in direct buffered; do
                evict_all "$D8"
                timeout 120 "$FLASH" -q bench "$D8" "${DEVICE_FLAG[@]}" --scenario cold --io "$io" --json |
                    tag "flash-$io" qwen3-8b cold | json_lines probe
            done
            evict_all "$D8"
            timeout 120 "$FLASH" -q bench "$D8" "${DEVICE_FLAG[@]}" --scenario cold --loader disk --json |
                tag disk qwen3-8b cold | json_lines probe
        done
    fi
    D06=${DIRS[qwen3-0.6b]:-}
    if probe pin && [ -n "$D06" ]; then
        for i in 1 2 3; do
            for pin in alloc huge; do
                log "== probe: qwen3-0.6b cold, FLASH_PINNED=$pin ($i)"
                evict_all "$D06"
                FLASH_PINNED=$pin timeout 120 "$FLASH" -q bench "$D06" "${DEVICE_FLAG[@]}" --scenario cold --loader flash --json |
                    python3 -c 'import json,sys
for l in sys.stdin:
    if l.startswith("{"):
        d=json.loads(l); d["pinned"]=sys.argv[1]; d["target"]="flash-safetensors"; d["model"]="qwen3-0.6b"; print(json.dumps(d))' "$pin" | json_lines probe
            done
        done
    fi
fi
if stage ttft && [ -n "$M8" ] && [ "${TTFT_DAEMON:-1}" = 0 ]; then
    # The in-process cold path alone, no daemon running: the cold load and
    # `flash run --no-daemon`, alternating, the order swapped every round.
    for i in $(seq 1 "${TTFT_ROUNDS:-3}"); do
        for what in $( ((i % 2)) && echo "load run" || echo "run load"); do
            evict_all "$FLASH_HOME/models/bench/qwen3-8b"
            if [ "$what" = load ]; then
                log "== TTFT: in-process round $i: the load alone (flash bench)"
                timeout 120 "$FLASH" -q bench "$M8" "${DEVICE_FLAG[@]}" --scenario cold --loader flash --json | json_lines ttft
            else
                log "== TTFT: in-process round $i: flash run --no-daemon"
                python3 bench/ttft.py flash --flash "$FLASH" --model "$M8" --label qwen3-8b --scenario cold-no-daemon --no-daemon --extra=-v --card "$CARD" | json_lines ttft
            fi
        done
    done
elif stage ttft && [ -n "$M8" ]; then
    if true; then
        if [ "${TTFT_TRANSFORMERS:-1}" = 1 ]; then
            log "== TTFT: transformers (python -c start, from_pretrained, generate)"
            python3 bench/ttft.py transformers --model-dir "$D8" --label qwen3-8b --scenario warm --card "$CARD" | json_lines ttft
        fi
        log "== TTFT: flash run through the daemon (GPU-resident, memory tier, cold from disk)"
        "$FLASH" start --mem-pool 20G --http 127.0.0.1:7777 && {
            # Warm-up: builds the GPU engine once (kernels from the on-disk cache);
            # it stays, without a lease, between requests.
            "$FLASH" run "$M8" "hi" --raw --max-tokens 1 --temperature 0 >/dev/null
            "$FLASH" load "$M8" --gpu 0 2>&1 | tail -1
            for i in 1 2; do
                python3 bench/ttft.py flash --flash "$FLASH" --model "$M8" --label qwen3-8b --scenario gpu-resident --card "$CARD" | json_lines ttft
            done
            "$FLASH" load "$M8" --memory 2>&1 | tail -1
            "$FLASH" unload "$M8" --tier gpu 2>&1 | tail -1
            python3 bench/ttft.py flash --flash "$FLASH" --model "$M8" --label qwen3-8b --scenario memory-tier --card "$CARD" | json_lines ttft
            "$FLASH" unload "$M8" 2>&1 | tail -1
            # Cold runs, alternating with the cold load they are compared with
            # (the disk's speed drifts by +-20 % between runs): the load alone
            # (flash bench), flash run through the daemon (the default), and
            # flash run --no-daemon (this process streams the model to the
            # GPU; -v logs the load's parts).
            for i in $(seq 1 "${TTFT_ROUNDS:-3}"); do
                log "== TTFT: cold round $i: the load alone (flash bench)"
                evict_all "$FLASH_HOME/models/bench/qwen3-8b"
                timeout 120 "$FLASH" -q bench "$M8" "${DEVICE_FLAG[@]}" --scenario cold --loader flash --json | json_lines ttft
                log "== TTFT: cold round $i: flash run through the daemon"
                evict_all "$FLASH_HOME/models/bench/qwen3-8b"
                python3 bench/ttft.py flash --flash "$FLASH" --model "$M8" --label qwen3-8b --scenario cold --card "$CARD" | json_lines ttft
                "$FLASH" unload "$M8" 2>&1 | tail -1
                log "== TTFT: cold round $i: flash run --no-daemon"
                evict_all "$FLASH_HOME/models/bench/qwen3-8b"
                python3 bench/ttft.py flash --flash "$FLASH" --model "$M8" --label qwen3-8b --scenario cold-no-daemon --no-daemon --extra=-v --card "$CARD" | json_lines ttft
            done
            # The engine's buffers appear as a reservation (ENGINES) in the GPU tier.
            "$FLASH" status 2>&1 | sed -n 8,12p
            "$FLASH" stop
        }
    fi
fi

# First requests, as a user meets them: a freshly started daemon with the
# 8B in its memory tier (or on the GPU), one `flash run` with a chat prompt
# (TTFT from the client's process start); then the SDK's first
# `load_model(backend="transformers")` in a fresh Python process against
# `from_pretrained` in a fresh process, alternating (FIRST_ROUNDS, default 3).
# FIRST_PARTS picks them: "run sdk" (default).
FIRST_PARTS=${FIRST_PARTS:-run sdk}
if stage first && [ -n "$M8" ] && [[ " $FIRST_PARTS " == *" run "* ]]; then
    for i in $(seq 1 "${FIRST_ROUNDS:-3}"); do
        in_budget || { skip "first requests round $i"; continue; }
        for where in memory gpu; do
            "$FLASH" stop >/dev/null 2>&1
            evict_all "$FLASH_HOME/models/bench/qwen3-8b"
            "$FLASH" start --mem-pool 20G --http 127.0.0.1:7777 >/dev/null || continue
            if [ "$where" = memory ]; then "$FLASH" load "$M8" --memory | tail -1; else "$FLASH" load "$M8" --gpu 0 | tail -1; fi
            log "== first request, fresh daemon, model in $where (round $i)"
            python3 bench/ttft.py flash --flash "$FLASH" --model "$M8" --label qwen3-8b --chat \
                --scenario "first-$where" --card "$CARD" |
                python3 -c 'import json,sys
for l in sys.stdin:
    if l.startswith("{"):
        d=json.loads(l); d["round"]=int(sys.argv[1]); print(json.dumps(d))' "$i" | json_lines first
            # Where the daemon's time went: its warm-up, the engine's build.
            grep -a "GPU prepared\|GPU engine built" "$FLASH_HOME/daemon.log" | tail -2
        done
    done
    "$FLASH" stop >/dev/null 2>&1
fi
if stage first && [ -n "$M8" ] && [[ " $FIRST_PARTS " == *" sdk "* ]]; then
    if ls .carry/wheels/flashtensors-*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site-sdk .carry/wheels/flashtensors-*.whl &&
            export PYTHONPATH=/tmp/site-sdk:${PYTHONPATH:-}
    fi
    # Compiled bytecode: pip writes it at install, so a user's imports read
    # .pyc files. Where the site-packages of torch and transformers hold none
    # and cannot be written (every process would compile the model stack
    # again), the bytecode goes to a writable cache that the warm-up run
    # below fills; FIRST_PYCACHE=0 measures without it.
    python3 - <<'PY' | tee "$OUT/pycache.txt"
import importlib.util, os
for m in ("torch", "transformers"):
    spec = importlib.util.find_spec(m)
    d = os.path.dirname(spec.origin) if spec and spec.origin else None
    if d:
        cached = os.path.isdir(os.path.join(d, "__pycache__"))
        print(f"{m}: {d} __pycache__={'yes' if cached else 'no'} writable={'yes' if os.access(d, os.W_OK) else 'no'}")
PY
    if [ "${FIRST_PYCACHE:-1}" = 1 ] && grep -q "__pycache__=no writable=no" "$OUT/pycache.txt"; then
        export PYTHONPYCACHEPREFIX=$SCRATCH/pycache
        log "no bytecode beside torch/transformers and not writable: PYTHONPYCACHEPREFIX=$PYTHONPYCACHEPREFIX"
    fi
    if python3 -c 'import flashtensors' 2>/dev/null; then
        "$FLASH" start --mem-pool 20G --http off >/dev/null && "$FLASH" load "$M8" --memory | tail -1
        # Warms the page cache (and the bytecode cache above); the SDK's run
        # imports its own modules once too.
        python3 bench/first_load.py transformers --model-dir "$D8" --card "$CARD" --warmup | json_lines first
        python3 bench/first_load.py flash --store "$FLASH_HOME" --model "$M8" --model-dir "$D8" \
            --card "$CARD" --warmup | json_lines first
        "$FLASH" unload "$M8" --tier gpu >/dev/null 2>&1
        for i in $(seq 1 "${FIRST_ROUNDS:-3}"); do
            in_budget || { skip "first load_model round $i"; continue; }
            for who in $( ((i % 2)) && echo "flash transformers" || echo "transformers flash"); do
                log "== first load_model in a fresh process: $who (round $i)"
                "$FLASH" unload "$M8" --tier gpu >/dev/null 2>&1
                python3 bench/first_load.py "$who" --store "$FLASH_HOME" --model "$M8" --model-dir "$D8" \
                    --round "$i" --card "$CARD" | json_lines first
            done
        done
        "$FLASH" stop >/dev/null 2>&1
        # Where building the model goes (its imports), on this machine's CPU.
        python3 bench/first_load.py imports --model-dir "$D8" --card "$CARD" | json_lines first >/dev/null
    else
        log "flashtensors is not importable (the sdk wheel): first load_model skipped"
    fi
fi

# 7. The Python SDK: GPU tests, then the timing targets.
if stage sdk; then
    if ls .carry/wheels/flashtensors-*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site-sdk .carry/wheels/flashtensors-*.whl &&
            export PYTHONPATH=/tmp/site-sdk:${PYTHONPATH:-}
        log "== sdk: GPU tests"
        FLASH_BIN=$FLASH timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_sdk_gpu.py 2>&1 | tail -8
        if [ -n "$D8" ]; then
            log "== sdk: timing targets (Qwen3-8B-shaped)"
            FLASH_SDK_BENCH=1 FLASH_SDK_BENCH_NO_ASSERT=1 FLASH_SDK_BENCH_MODEL=$D8 \
                FLASH_SDK_BENCH_STORE=$SCRATCH/sdk-store FLASH_BIN=$FLASH timeout 300 \
                python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_sdk_gpu.py -k bench 2>&1 |
                json_lines sdk >/dev/null
            grep '"stage": "sdk"' "$RESULTS" || true
            rm -rf "$SCRATCH/sdk-store"
        fi
    else
        log "no .carry/wheels/flashtensors-*.whl (bench/build-carry.sh): the sdk stage is skipped"
    fi
fi

# 8. The daemon: memory tier -> GPU, share-mode attach, swap workload.
DAEMON_SCENARIOS=${DAEMON_SCENARIOS:-upload swap}
if stage daemon && [ -n "$M8" ] && [[ $DAEMON_SCENARIOS == *upload* ]]; then
    log "== daemon: upload (memory tier -> GPU) and attach (share mode), $M8"
    # -vv: the daemon logs each acquire's phases (daemon.log).
    "$FLASH" -vv start --mem-pool 20G --http off && {
        # Attach on a fresh GPU tier, then after five unload/upload cycles
        # of the same 16 GB image (the driver's allocations churned).
        timeout 120 "$FLASH" bench-daemon --scenario attach --model "$M8" --repeat 20 --json | json_lines daemon
        timeout 240 "$FLASH" bench-daemon --scenario upload --model "$M8" --repeat 5 --json | json_lines daemon
        timeout 120 "$FLASH" bench-daemon --scenario attach --model "$M8" --repeat 20 --json | json_lines daemon
        grep -a "acquire" "$FLASH_HOME/daemon.log" | grep -a "tensors_ms" | tail -4
        "$FLASH" stop
    }
fi
if stage daemon && [[ " $DAEMON_SCENARIOS " == *" swap "* ]]; then
    # 100 models of ~0.34 GB: the 8B safetensors folder goes first (disk).
    rm -rf "$SCRATCH/qwen3-8b"
    SWAP_SECONDS=${SWAP_SECONDS:-300}
    log "== daemon: swap workload, 100 models, 4 clients, Zipf 1.0, ${SWAP_SECONDS}s"
    "$FLASH" start --mem-pool 14G --gpu-budget 3.5G --http 127.0.0.1:7777 && {
        timeout 300 "$FLASH" -q bench-daemon --scenario swap --synth qwen3:0.6b --layers 1 --models 100 --duration 0 >/dev/null
        timeout $((SWAP_SECONDS + 120)) "$FLASH" bench-daemon --scenario swap --synth qwen3:0.6b --layers 1 \
            --models 100 --clients 4 --zipf 1.0 --duration "$SWAP_SECONDS" --json | json_lines daemon
        curl -s 127.0.0.1:7777/metrics >"$OUT/daemon-metrics.txt" || true
        "$FLASH" status --json >"$OUT/daemon-status.json" || true
        "$FLASH" stop
    }
fi

if stage daemon && [[ " $DAEMON_SCENARIOS " == *" swap-cold "* ]]; then
    # The swap workload from a cold page cache, at full model size: 30
    # Qwen3-0.6B-shaped models (1.19 GB each), a GPU tier of 3 and a memory
    # tier of 6, Zipf 1.0; 1 client, then 4, each on a freshly started
    # daemon with the store evicted from the page cache (the daemon reads
    # with O_DIRECT, so it stays cold). The in-process cold load of one of
    # the models is measured before, between and after, as the reference.
    # SWAPCOLD_COMPRESS=1: the same with the models stored compressed (the
    # same budgets in bytes: the memory tier holds about 9 of them).
    SWAPCOLD_SECONDS=${SWAPCOLD_SECONDS:-60}
    swap_flags=(--synth qwen3:0.6b --models 30)
    SWAP_MODEL=bench/qwen3-0.6b-000
    swap_label=flash-format
    if [ "${SWAPCOLD_COMPRESS:-0}" = 1 ]; then
        swap_flags+=(--compress)
        SWAP_MODEL=bench/qwen3-0.6b-c-000
        swap_label=flash-compressed
    fi
    swap_ref() {
        evict_all "$FLASH_HOME/models/bench"
        timeout 60 "$FLASH" -q bench "$SWAP_MODEL" "${DEVICE_FLAG[@]}" --scenario cold --loader flash --json |
            tag "$swap_label" qwen3-0.6b cold | json_lines swap-cold
    }
    log "== daemon: swap from a cold page cache, 30 x qwen3-0.6b ($swap_label), GPU 3, memory 6, ${SWAPCOLD_SECONDS}s per run"
    "$FLASH" start --mem-pool 7000M --gpu-budget 3500M --http off &&
        timeout 300 "$FLASH" -q bench-daemon --scenario swap "${swap_flags[@]}" --duration 0 >/dev/null
    "$FLASH" stop >/dev/null 2>&1
    swap_ref
    # SWAPCOLD_DISK_LOADS: the daemon's --disk-loads for each run (default
    # "1", its default; "1 0" alternates turns on the disk with loads side
    # by side, round by round).
    for round in $(seq 1 "${SWAPCOLD_ROUNDS:-1}"); do
        for clients in 1 4; do
            for disk_loads in ${SWAPCOLD_DISK_LOADS:-1}; do
                in_budget || { skip "swap-cold $clients clients, disk loads $disk_loads, round $round"; continue; }
                evict_all "$FLASH_HOME/models/bench"
                "$FLASH" start --mem-pool 7000M --gpu-budget 3500M --http off --disk-loads "$disk_loads" && {
                    timeout $((SWAPCOLD_SECONDS + 120)) "$FLASH" bench-daemon --scenario swap "${swap_flags[@]}" \
                        --clients "$clients" --zipf 1.0 --duration "$SWAPCOLD_SECONDS" --json |
                        python3 -c 'import json,sys
for l in sys.stdin:
    if l.startswith("{"):
        d=json.loads(l); d["page_cache"]="cold"; d["clients"]=int(sys.argv[1]); d["models_stored"]=sys.argv[2]
        d["disk_loads"]=int(sys.argv[3]); d["round"]=int(sys.argv[4])
        d["loader"]="flash-daemon"; d["model"]="30 x qwen3-0.6b ("+sys.argv[2]+")"
        a=d.get("all") or {}; d["p50_s"]=a.get("p50_s"); d["p99_s"]=a.get("p99_s")
        d["from_disk"]=(d.get("by_source") or {}).get("disk", {}).get("count", 0); print(json.dumps(d))' \
                            "$clients" "$swap_label" "$disk_loads" "$round" |
                        json_lines swap-cold
                    "$FLASH" status --json >"$OUT/swap-cold-$clients-$disk_loads-$round-status.json" || true
                    "$FLASH" stop
                }
            done
            swap_ref
        done
    done
fi

# 5. The table.
log "done; results in $RESULTS"
python3 - "$RESULTS" <<'EOF' | tee "$OUT/table.txt"
import json, sys

PEERS = {"st_load_file", "st_safe_open", "fastsafetensors", "runai", "instanttensor"}
rows = []
for line in open(sys.argv[1]):
    try:
        d = json.loads(line)
    except ValueError:
        continue
    if not isinstance(d, dict) or "loader" not in d and "target" not in d or "stage" in d:
        continue
    name = d.get("loader") or "flash"
    if "target" in d:
        name = d["target"] if name in ("flash", None) else f'{name}@{d["target"]}'
    secs = next((d[k] for k in ("seconds", "secs", "time_s") if d.get(k) is not None), None)
    gbps = next((d[k] for k in ("gbps", "gb_per_s") if d.get(k) is not None), None)
    if gbps is None and secs and d.get("bytes"):
        gbps = d["bytes"] / secs / 1e9
    rows.append((name, d.get("model", "?"), d.get("scenario", "?"), secs, gbps, d.get("error"),
                 d.get("loader") in PEERS and "target" not in d))

best = {}
for name, model, scen, secs, gbps, err, is_peer in rows:
    if is_peer and secs and not err:
        key = (model, scen)
        best[key] = min(best.get(key, float("inf")), secs)

print(f'{"loader":<32} {"model":<11} {"scenario":<8} {"seconds":>8} {"GB/s":>7} {"vs best peer":>12}')
for name, model, scen, secs, gbps, err, is_peer in rows:
    if err or secs is None:
        print(f'{name:<32} {model:<11} {scen:<8} {"-":>8} {"-":>7} {"-":>12}  {str(err)[:60]}')
        continue
    b = best.get((model, scen))
    ratio = f"{secs / b:.2f}x" if b else "-"
    print(f'{name:<32} {model:<11} {scen:<8} {secs:>8.2f} {gbps or 0:>7.2f} {ratio:>12}')
print("vs best peer = seconds / the fastest peer's seconds for that model and scenario; < 1 is faster.")

# The other stages: one line each, the measured fields only.
SKIP = {"card", "stage", "stderr_tail"}
for line in open(sys.argv[1]):
    try:
        d = json.loads(line)
    except ValueError:
        continue
    if not isinstance(d, dict) or "stage" not in d:
        continue
    fields = []
    for k, v in d.items():
        if k in SKIP or isinstance(v, (dict, list)):
            continue
        if isinstance(v, float):
            v = f"{v:.4g}"
        fields.append(f"{k}={v}")
    print(f'[{d["stage"]}] ' + " ".join(fields)[:220])
EOF
log "total ${SECONDS}s"
