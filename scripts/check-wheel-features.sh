#!/usr/bin/env bash
# Checks that the wheel's build (maturin: cargo on crates/flash-py alone)
# resolves every shared crate with the same features as the workspace build
# (`cargo test --workspace`), so that it reuses what that build compiled
# instead of compiling those crates, and every crate above them, a second
# time. Compares the two feature resolutions with `cargo tree` (nothing is
# compiled). On a mismatch it names the crate and its features on each side:
# add the missing features to the block at the end of
# crates/flash-py/Cargo.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

resolve() {
    cargo tree --locked -f '{p} [{f}]' --prefix none "$@" |
        sed 's/ (\*)$//; s/ (proc-macro)$//' | sort -u
}
workspace=$(resolve --workspace -e normal,dev)
wheel=$(resolve -p flash-py -e normal)
missing=$(comm -13 <(echo "$workspace") <(echo "$wheel"))
if [ -n "$missing" ]; then
    echo "error: the wheel's build resolves these crates with other features than the workspace build:" >&2
    while read -r line; do
        crate=${line%% v*}
        echo "  wheel:     $line" >&2
        echo "$workspace" | grep "^$crate v" | sed 's/^/  workspace: /' >&2
    done <<<"$missing"
    echo "(add the workspace's features to the end of crates/flash-py/Cargo.toml)" >&2
    exit 1
fi
echo "wheel build features: the same as the workspace build's"
