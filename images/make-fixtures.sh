#!/usr/bin/env bash
# images/make-fixtures.sh [--check] [OUTDIR]
#
# Rebuilds the small fixture images committed in images/ and their MANIFEST
# (recipe, sha256 and purpose of every file).  The fixtures are made with
# qemu-img and qemu-io only, from fixed byte patterns, so the same qemu
# version rebuilds them bit for bit.  Every file stays well under 300 KiB
# (small clusters keep the metadata small), which is what lets them live in
# git and be used by tests that must run without QEMU installed.
#
#   images/make-fixtures.sh            rebuild images/*.qcow2 ... and images/MANIFEST
#   images/make-fixtures.sh DIR        build into DIR instead
#   images/make-fixtures.sh --check    build into a scratch directory and compare
#                                      with the committed MANIFEST (exit 1 on drift)
#
# The recipe lines in MANIFEST are the exact commands run below (printed by
# `run`), so the MANIFEST cannot drift from this script.
# Needs: qemu-img, qemu-io (qemu-utils; the sums in MANIFEST come from 10.0.2),
#        sha256sum, stat.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CHECK=0
if [ "${1:-}" = --check ]; then CHECK=1; shift; fi
if [ $# -gt 1 ]; then echo "usage: $0 [--check] [OUTDIR]" >&2; exit 2; fi
for t in qemu-img qemu-io sha256sum stat; do
    command -v "$t" >/dev/null || { echo "missing tool: $t" >&2; exit 2; }
done

SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/qnbd-fixtures.XXXXXX")
trap 'rm -rf "$SCRATCH"; rm -f "${OUT:-$SCRATCH}/banner"' EXIT
if [ "$CHECK" = 1 ]; then OUT=$SCRATCH/out; mkdir -p "$OUT"
else OUT=${1:-$HERE}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd); fi
cd "$OUT"

MAX_BYTES=$((300 * 1024))
MANIFEST_TMP=$SCRATCH/MANIFEST
RECIPE=()
# shell_quote ARG   ARG as a shell word: bare when harmless, else single-quoted
shell_quote() {
    if [[ $1 =~ ^[A-Za-z0-9_./=,:+-]+$ ]]; then printf '%s' "$1"
    else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
# run CMD...   run a command and remember it as a recipe line
run() {
    local line="" a
    for a in "$@"; do line+="$(shell_quote "$a") "; done
    RECIPE+=("${line% }")
    "$@" >/dev/null
}
# qio IMG FMT CMD...   qemu-io with one -c per command, recorded as one recipe line
qio() {
    local img=$1 fmt=$2; shift 2
    local a=(); for c in "$@"; do a+=(-c "$c"); done
    run qemu-io -f "$fmt" "${a[@]}" "$img"
}
# fixture NAME EXERCISES   append NAME's block to the manifest, reset the recipe
fixture() {
    local name=$1 what=$2 size
    size=$(stat -c %s "$name")
    if [ "$size" -ge "$MAX_BYTES" ]; then
        echo "$name is $size bytes, fixtures must stay under $MAX_BYTES" >&2; exit 1
    fi
    {
        echo "[$name]"
        echo "sha256: $(sha256sum < "$name" | cut -d' ' -f1)"
        echo "size: $size"
        echo "exercises: $what"
        for r in "${RECIPE[@]}"; do echo "recipe: $r"; done
        echo
    } >> "$MANIFEST_TMP"
    RECIPE=()
}


QEMU_VERSION=$(qemu-img --version | sed -n '1s/^qemu-img version \([0-9.]*\).*/\1/p')
cat > "$MANIFEST_TMP" <<EOF
# Fixture images committed in images/, rebuilt by images/make-fixtures.sh
# (qemu-img/qemu-io $QEMU_VERSION).  One block per file:
#   [NAME]      file name in images/
#   sha256:     sha256 of the file itself (not of the guest disk)
#   size:       file size in bytes (all under 300 KiB)
#   exercises:  what the file is for
#   recipe:     the exact commands that built it, in order, run in images/
# Files made from other files' recipes (backing files) come first.

EOF

rm -f banner default.qcow2 base.raw overlay.qcow2 v2.qcow2 subclusters.qcow2 \
    compressed-zstd.qcow2 bitmap.qcow2

###############################################################################
# default.qcow2: what `qnbd serve images/default.qcow2` exports in the README.
#   64 MiB virtual, 16 KiB clusters, v3.  Guest layout:
#     [0, 16k)          banner text ("qnbd default image: ...", 64-byte lines)
#     [1M, 1M+64k)      0x51 ('Q') in four whole clusters
#     [2M, 2M+16k)      zero cluster (L2 zero flag, no host cluster)
#     [3M+14000, +5000) 0x6e ('n'), unaligned, across a cluster boundary
#     [64M-4k, 64M)     0xee in the last 4 KiB
#     elsewhere         unallocated (reads as zeroes)
#   The banner is one 64-byte line in a pattern file that qemu-io repeats to
#   fill the write, so a hex dump of the guest disk shows where it starts.
BANNER='qnbd default image: cluster 0 of a 64 MiB qcow2 (16 KiB clusters)'
printf '%-63s\n' "$BANNER" > banner
RECIPE+=("printf '%-63s\\n' $(shell_quote "$BANNER") > banner")
run qemu-img create -q -f qcow2 -o cluster_size=16k default.qcow2 64M
qio default.qcow2 qcow2 'write -s banner 0 16k' 'write -P 0x51 1M 64k' \
    'write -z 2M 16k' 'write -P 0x6e 3159728 5000' 'write -P 0xee 67104768 4k'
run rm banner
fixture default.qcow2 "the README's example image: text banner, whole-cluster data, a zero cluster, an unaligned write, the last 4 KiB"

###############################################################################
# base.raw + overlay.qcow2: a two-layer chain with a relative backing name, a
#   raw backing file (-F raw) shorter than the overlay (256 KiB vs 1 MiB),
#   4 KiB clusters.  overlay: a zero cluster hiding base data, a partial
#   write (COW from base), a whole cluster over base data, data past the end
#   of the base.
run qemu-img create -q -f raw base.raw 256k
qio base.raw raw 'write -P 0xb0 0 128k' 'write -P 0xb1 192k 64k'
fixture base.raw "raw backing file of overlay.qcow2 (data, a hole, data up to its end)"
run qemu-img create -q -f qcow2 -o cluster_size=4k -b base.raw -F raw overlay.qcow2 1M
qio overlay.qcow2 qcow2 'write -z 0 4k' 'write -P 0x0a 10k 1k' 'write -P 0x0b 64k 4k' \
    'write -P 0x0c 512k 8k'
fixture overlay.qcow2 "qcow2 over a shorter raw backing file: zero cluster over backing data, COW, data past the backing end"

###############################################################################
# v2.qcow2: version 2 header (compat=0.10), 4 KiB clusters, 1 MiB.  No zero
#   flag: 'write -z' over data keeps a zero-filled allocated cluster,
#   'write -z' over nothing stays unallocated.
run qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4k v2.qcow2 1M
qio v2.qcow2 qcow2 'write -P 0x21 0 6k' 'write -z 4k 4k' 'write -z 256k 8k' 'write -P 0x22 1044480 4k'
fixture v2.qcow2 "qcow2 v2 (72-byte header, no feature fields, no zero clusters)"

###############################################################################
# subclusters.qcow2: extended_l2=on, 16 KiB clusters = 32 x 512-byte
#   subclusters, 1 MiB.  Sub-cluster data, a subcluster zero range, a
#   compressed (zlib) cluster, a partial overwrite of another compressed one.
run qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=16k subclusters.qcow2 1M
qio subclusters.qcow2 qcow2 'write -P 0x31 512 1k' 'write -P 0x32 5k 512' 'write -z 8k 2k' \
    'write -c -P 0x33 64k 16k' 'write -c -P 0x34 128k 16k' 'write -P 0x35 129k 512'
fixture subclusters.qcow2 "extended L2 entries: subcluster allocation and zero bitmaps, compressed clusters"

###############################################################################
# compressed-zstd.qcow2: compression_type=zstd, 4 KiB clusters, 1 MiB.
#   Compressed clusters of constant data, a zero write over one of them, an
#   uncompressed cluster.  One compressed cluster per write: qemu compresses
#   the clusters of one request in parallel and places them in completion
#   order, which would make the file layout differ from run to run.
run qemu-img create -q -f qcow2 -o compression_type=zstd,cluster_size=4k compressed-zstd.qcow2 1M
qio compressed-zstd.qcow2 qcow2 'write -c -P 0x41 0 4k' 'write -c -P 0x41 4k 4k' \
    'write -c -P 0x41 8k 4k' 'write -c -P 0x42 64k 4k' 'write -z 4k 4k' 'write -P 0x43 128k 4k'
fixture compressed-zstd.qcow2 "zstd-compressed clusters (incompatible feature bit 3), zero over compressed"

###############################################################################
# bitmap.qcow2: two persistent dirty bitmaps, 4 KiB clusters, 1 MiB.
#   'live' (enabled, 4 KiB granularity) is dirtied by the writes after it was
#   added; 'off' was created disabled and stays clean.
run qemu-img create -q -f qcow2 -o cluster_size=4k bitmap.qcow2 1M
qio bitmap.qcow2 qcow2 'write -P 0x51 0 4k'
run qemu-img bitmap --add -g 4k bitmap.qcow2 live
run qemu-img bitmap --add --disable bitmap.qcow2 off
qio bitmap.qcow2 qcow2 'write -P 0x52 64k 8k' 'write -z 512k 4k'
fixture bitmap.qcow2 "persistent bitmaps: 'live' dirty at [64k,72k) and [512k,516k), 'off' disabled and clean"

if [ "$CHECK" = 1 ]; then
    if diff -u "$HERE/MANIFEST" "$MANIFEST_TMP"; then
        echo "fixtures: rebuilt images match images/MANIFEST"
    else
        echo "fixtures: rebuilt images differ from images/MANIFEST (qemu version?)" >&2; exit 1
    fi
else
    cp "$MANIFEST_TMP" "$OUT/MANIFEST"
    echo "fixtures: $(grep -c '^\[' "$OUT/MANIFEST") files in $OUT (see MANIFEST)"
fi
