# Sourced by the test scripts: Python environments made once per machine
# and reused, as scripts/test-vllm.sh does for vLLM's.
#
#   env=$(ci_env NAME PYTHON REQUIREMENT...)
#
# prints the folder of a virtual environment of interpreter PYTHON with the
# REQUIREMENTs installed (each a requirements file or a pip requirement),
# under $FLASHTENSORS_CI_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/flashtensors-ci)
# as NAME-<key>, the key a hash of the interpreter's version and the
# requirements' text: a change of either makes a new environment (older ones
# of NAME are removed). Its stamp `.complete` is written after a complete
# install only; a folder without it is removed and made again. CI runs on a
# fresh clone each time, and installing the same packages into a fresh
# environment cost it about 40 s a run. Packages a run installs on top (the
# wheel under test, with --force-reinstall) are replaced by the next run.

ci_env() {
    local name=$1 py=$2
    shift 2
    local cache=${FLASHTENSORS_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/flashtensors-ci}
    local key
    key=$({
        "$py" -c 'import sys; print(sys.version)'
        local r
        for r in "$@"; do
            if [ -f "$r" ]; then cat "$r"; else echo "$r"; fi
        done
    } | sha256sum | cut -c1-16)
    local env=$cache/$name-$key
    mkdir -p "$cache"
    (
        # One install at a time on a machine (two CI runs, or a person and CI).
        exec 9>"$cache/.lock-$name"
        flock 9
        if [ -f "$env/.complete" ] && "$env/bin/python" -c '' 2>/dev/null; then
            exit 0
        fi
        find "$cache" -mindepth 1 -maxdepth 1 -type d -name "$name-*" -exec rm -rf {} +
        "$py" -m venv "$env" >&2
        local args=() r
        for r in "$@"; do
            if [ -f "$r" ]; then args+=(-r "$r"); else args+=("$r"); fi
        done
        "$env/bin/python" -m pip install -q --disable-pip-version-check "${args[@]}" >&2
        touch "$env/.complete"
    ) || return 1
    echo "$env"
}
