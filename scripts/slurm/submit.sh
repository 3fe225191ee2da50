#!/bin/bash
# Submit an experiment grid to Slurm: one array task per cell, then a merge job that runs after the
# whole array has ended (afterany: a failed cell still gets a table, and the merge exits non-zero).
#
#   [QTALE_CPUS=2] [QTALE_MEM=8G] scripts/slurm/submit.sh BINARY CONFIG OUT CACHE [-- extra flags]
#
# BINARY: a prebuilt experiment binary (cargo build --release; e.g. target/release/main-table), on a
# path every node sees. OUT and CACHE must be shared by all nodes. Extra flags (e.g. --limit 100,
# --device cuda) are passed to every task and to the merge, so the cells' keys match; --threads is
# set from QTALE_CPUS for all of them (threads are part of the numerics and of the stage keys).
set -euo pipefail
if [ $# -lt 4 ]; then sed -n 2,11p "$0"; exit 2; fi
BIN=$(realpath "$1"); CONFIG=$(realpath "$2"); OUT=$(realpath -m "$3"); CACHE=$(realpath -m "$4")
CPUS=${QTALE_CPUS:-2}; MEM=${QTALE_MEM:-8G}
shift 4; if [ "${1:-}" = "--" ]; then shift; fi
ARGS="$*"
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT" "$CACHE"
# One line per cell in --list: "  N  name  cell KEY state".
N=$("$BIN" --config "$CONFIG" --out "$OUT" --cache "$CACHE" --threads "$CPUS" --list $ARGS \
    | grep -c ' cell [0-9a-f]\{16\} ')
[ "$N" -ge 1 ] || { echo "no cells in $CONFIG" >&2; exit 1; }
export QTALE_BIN="$BIN" QTALE_CONFIG="$CONFIG" QTALE_OUT="$OUT" QTALE_CACHE="$CACHE" QTALE_ARGS="$ARGS"
ARRAY=$(sbatch --parsable --export=ALL --array=0-$((N - 1)) --cpus-per-task="$CPUS" --mem="$MEM" \
    --chdir="$OUT" "$HERE/cell.sbatch")
MERGE=$(sbatch --parsable --export=ALL --dependency=afterany:"$ARRAY" --cpus-per-task="$CPUS" \
    --mem="$MEM" --chdir="$OUT" "$HERE/merge.sbatch")
echo "submitted $N cells as array job $ARRAY, merge job $MERGE (logs in $OUT)"
