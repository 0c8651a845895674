#!/usr/bin/env bash
# images/make-reference-images.sh OUTDIR
#
# Builds qnbd's reference image set with QEMU's own tools (qemu-img, qemu-io,
# qemu-nbd) and records what QEMU says about every image.  QEMU is the oracle:
# the conformance tests in qcow2-spec-tests/ run `qnbd info`, `qnbd map` and
# `qnbd convert` on each image and compare the answers with QEMU's.
#
# Every image is described in a comment block ("IMAGE: ...") right above the
# commands that build it, and in OUTDIR/MANIFEST.tsv (name, expected
# `qemu-img check` exit code, description).  Contents are deterministic (fixed
# patterns, a seeded PRNG) and so is the host file layout (see "Host file
# layout" below): two runs give byte-identical truth files except for
# snapshot dates and LUKS key material (uuid, iteration counts) in info.json.
# Still, truth belongs to the images it was recorded from: regenerate both
# together, never mix runs.
#
# Unless TRUTH=0, QEMU's ground truth for every image goes to OUTDIR/truth/:
#   NAME.info.json        qemu-img info --output=json --backing-chain -U -f FMT
#   NAME.map.json         qemu-img map --output=json -f FMT
#   NAME.check.json/.rc   qemu-img check --output=json, and its exit code
#                         (verified against the expected code in MANIFEST.tsv)
#   NAME.sha256           sha256 of the whole guest-visible disk (qemu-img
#                         convert -O raw)
#   NAME@SNAP.sha256      same, for every internal snapshot
#   NAME.nbd-*.json       nbdinfo --json --map=CONTEXT against qemu-nbd -r -A -B ...
#                         for base:allocation, qemu:allocation-depth and
#                         qemu:dirty-bitmap:<each consistent bitmap>
#   NAME.nbd-xdirty-BITMAP.map.json
#                         qemu-img map over NBD with x-dirty-bitmap (QEMU's own
#                         client view of the same bitmap: dirty = "data":false)
#   NAME.{map,sha256}-nosecret.err
#                         encrypted images only: the truth files above are made
#                         with the key; these hold qemu's refusal when the same
#                         command is given no key (what `qnbd map/convert` sees)
#   *.err                 stderr of any of the above (e.g. images qemu refuses)
#
# QEMU refuses some truth commands on purpose; those are listed by image in
# REFUSED below.  Any other failure of a QEMU tool fails the script, and so
# does a listed refusal that succeeds.
#
# Needs: qemu-img, qemu-io, qemu-nbd (qemu-utils; verified with 10.0.2),
#        python3, sha256sum, truncate; nbdinfo (libnbd-bin) for the NBD truth.
# Uses ${TMPDIR:-/tmp} for a short-lived socket directory; starts qemu-nbd
# processes only on unix sockets there and stops them by PID.
# Exit status: 0 if every image was built, every truth command succeeded or
# was refused as REFUSED says, and qemu's check exit codes matched
# MANIFEST.tsv; 1 otherwise; 2 on bad usage or a missing tool.
set -euo pipefail

if [ $# -ne 1 ]; then echo "usage: $0 OUTDIR" >&2; exit 2; fi
for t in qemu-img qemu-io qemu-nbd python3 sha256sum truncate; do
    command -v "$t" >/dev/null || { echo "missing tool: $t" >&2; exit 2; }
done
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$OUT"
rm -f MANIFEST.tsv
RUN=$(mktemp -d "${TMPDIR:-/tmp}/qnbd-refimg.XXXXXX")
NBD_PIDS=()
cleanup() {
    # only servers of this run (their command line names $RUN), never a reused PID
    for p in "${NBD_PIDS[@]:-}"; do
        [ -n "$p" ] && grep -qa -- "$RUN" "/proc/$p/cmdline" 2>/dev/null && kill "$p" 2>/dev/null || true
    done
    rm -rf "$RUN"
}
trap cleanup EXIT

log() { echo "== $*" >&2; }
# qio IMG CMD...   run qemu-io commands on a qcow2 image (quiet, fail on error)
qio() { local img=$1; shift; local a=(); for c in "$@"; do a+=(-c "$c"); done
        qemu-io -f qcow2 "${a[@]}" "$img" >/dev/null; }
qio_raw() { local img=$1; shift; local a=(); for c in "$@"; do a+=(-c "$c"); done
        qemu-io -f raw "${a[@]}" "$img" >/dev/null; }
# describe NAME EXPECTED_CHECK_RC TEXT   -> MANIFEST.tsv
describe() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> MANIFEST.tsv; }

# Small header/metadata poker used for the deliberately broken images.
# (qcow2 header offsets: 20 cluster_bits, 40 l1_table_offset, 48
#  refcount_table_offset, 72/80/88 incompatible/compatible/autoclear features,
#  96 refcount_order, 100 header_length; header extensions start at 72 in v2
#  and at header_length in v3.)
cat > "$RUN/qpoke.py" <<'PY'
import struct, sys
FIELDS = {"incompatible": 72, "compatible": 80, "autoclear": 88}
def rd(f, off, fmt):
    f.seek(off); return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
def wr(f, off, fmt, v):
    f.seek(off); f.write(struct.pack(fmt, v))
cmd, path = sys.argv[1], sys.argv[2]
with open(path, "r+b") as f:
    if f.read(4) != b"QFI\xfb":
        sys.exit("not a qcow2 file")
    cs = 1 << rd(f, 20, ">I")
    if cmd in ("set-bit", "clear-bit"):            # set-bit IMG FIELD BIT
        off, bit = FIELDS[sys.argv[3]], int(sys.argv[4])
        v = rd(f, off, ">Q")
        wr(f, off, ">Q", v | (1 << bit) if cmd == "set-bit" else v & ~(1 << bit))
    elif cmd == "l2-set":                          # l2-set IMG GUEST_OFF HOST_OFF (sets COPIED)
        goff, host = int(sys.argv[3], 0), int(sys.argv[4], 0)
        n = cs // 8
        l1 = rd(f, 40, ">Q")
        l2 = rd(f, l1 + 8 * (goff // (cs * n)), ">Q") & 0x00fffffffffffe00
        if not l2:
            sys.exit("no L2 table for that guest offset")
        wr(f, l2 + 8 * ((goff // cs) % n), ">Q", host | (1 << 63))
    elif cmd == "refcount-set":                    # refcount-set IMG CLUSTER_INDEX VALUE (16-bit refcounts)
        idx, val = int(sys.argv[3], 0), int(sys.argv[4], 0)
        if rd(f, 96, ">I") != 4:
            sys.exit("refcount-set only handles refcount_bits=16")
        per = cs // 2
        rb = rd(f, rd(f, 48, ">Q") + 8 * (idx // per), ">Q") & ~(cs - 1)
        if not rb:
            sys.exit("no refcount block for that cluster")
        wr(f, rb + 2 * (idx % per), ">H", val)
    elif cmd == "reftable-offset":
        print(rd(f, 48, ">Q"))
    elif cmd == "del-ext":                         # del-ext IMG MAGIC (drop one header extension)
        magic = int(sys.argv[3], 0)
        start = 72 if rd(f, 4, ">I") == 2 else rd(f, 100, ">I")
        off, keep, found = start, [], False
        while True:
            typ, ln = rd(f, off, ">I"), rd(f, off + 4, ">I")
            if typ == 0:
                break
            data = f.read((ln + 7) & ~7)
            if typ == magic:
                found = True
            else:
                keep.append(struct.pack(">II", typ, ln) + data)
            off += 8 + ((ln + 7) & ~7)
        if not found:
            sys.exit("header extension %#x not present" % magic)
        blob = b"".join(keep) + bytes(8)           # remaining extensions + end marker
        f.seek(start)
        f.write(blob + bytes(off + 8 - start - len(blob)))
    else:
        sys.exit("unknown command")
PY
qpoke() { python3 "$RUN/qpoke.py" "$@"; }

# wait_gone PID : wait (max 10 s) until PID has exited.  A killed --fork'ed
# qemu-nbd is re-parented to PID 1 and may linger as a zombie until PID 1 reaps
# it; a zombie holds no files or locks any more, so it counts as gone.
wait_gone() {
    local i st
    for i in $(seq 200); do
        st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 0
        [ -z "$st" ] || [ "$st" = Z ] && return 0
        sleep 0.05
    done
    echo "process $1 did not exit" >&2; return 1
}
# start_rw_nbd IMG SOCKNAME : qemu-nbd read-write, persistent, forked on
# $RUN/SOCKNAME.sock; sets NBD_PID
start_rw_nbd() {
    local img=$1 sock="$RUN/$2.sock" pidf="$RUN/$2.pid"
    rm -f "$sock" "$pidf"
    # 'qemu-nbd --fork' exits 1 if the server printed any warning: trust the pid file
    qemu-nbd -t -f qcow2 -k "$sock" --pid-file="$pidf" --fork "$img" </dev/null >/dev/null 2>"$RUN/$2.err" || true
    [ -s "$pidf" ] && kill -0 "$(cat "$pidf")" || { cat "$RUN/$2.err" >&2; return 1; }
    NBD_PID=$(cat "$pidf"); NBD_PIDS+=("$NBD_PID")
}
# crash PID : SIGKILL a qemu-nbd we started and wait until it is gone
crash() { kill -9 "$1"; wait_gone "$1"; }

# A deterministic mixed compressible/incompressible raw source (4 MiB):
# 1 MiB pseudo-random, 1 MiB text, 1 MiB zeros, 1 MiB 0x5a.
python3 - "$RUN/mixed.raw" <<'PY'
import random, sys
r = random.Random(20240601)
with open(sys.argv[1], "wb") as f:
    f.write(bytes(r.getrandbits(8) for _ in range(1 << 20)))
    f.write((b"qcow2 oracle corpus line\n" * 50000)[: 1 << 20])
    f.write(bytes(1 << 20))
    f.write(b"\x5a" * (1 << 20))
PY

###############################################################################
# IMAGE: v2-compat010.qcow2 (64 MiB, 64k clusters, compat=0.10 / version 2)
#   Version-2 header (72-byte header, no feature bitmaps, no zero flag).
#   Data written unaligned across a cluster boundary; 'write -z' on an
#   unallocated range (v2 has no zero clusters: it stays unallocated) and on an
#   allocated range (v2 must store real zeroes / keep the cluster allocated).
log v2-compat010.qcow2
qemu-img create -q -f qcow2 -o compat=0.10 v2-compat010.qcow2 64M
qio v2-compat010.qcow2 'write -P 0x11 0 100k' 'write -P 0x12 1M 64k' \
    'write -z 4M 128k' 'write -z 1M 32k' 'write -P 0x13 63M 1M'
describe v2-compat010.qcow2 0 "qcow2 v2 (compat=0.10): data, write -z on unallocated and allocated ranges"

###############################################################################
# IMAGE: v2-backed.qcow2 -> v2-base.qcow2 (both compat=0.10)
#   v2 overlay over a v2 base: 'write -z' over backing data cannot use the
#   zero flag, so qemu allocates and writes zero-filled clusters; partial
#   cluster writes need copy-on-write from the backing file.
log v2-backed.qcow2
qemu-img create -q -f qcow2 -o compat=0.10 v2-base.qcow2 8M
qio v2-base.qcow2 'write -P 0xb2 0 8M'
qemu-img create -q -f qcow2 -o compat=0.10 -b v2-base.qcow2 -F qcow2 v2-backed.qcow2
qio v2-backed.qcow2 'write -z 1M 64k' 'write -P 0x22 2098688 1k'
describe v2-base.qcow2 0 "v2 base image fully written (backing of v2-backed.qcow2)"
describe v2-backed.qcow2 0 "v2 overlay: zero writes over backing data (no zero flag), partial-cluster COW"

###############################################################################
# IMAGE: v3-basic.qcow2 (64 MiB, 64k clusters, compat=1.1, refcount_bits=16)
#   The common case.  Unaligned data writes spanning clusters; a plain zero
#   cluster (write -z on unallocated = L2 zero flag, no host offset); a
#   preallocated zero cluster (write -z on allocated data without -u: zero flag
#   + host offset kept); a zero-with-unmap (write -z -u) that frees the
#   cluster; a discarded cluster (freed, refcount 0, hole left in the file);
#   data in the very last sector.
log v3-basic.qcow2
qemu-img create -q -f qcow2 -o compat=1.1 v3-basic.qcow2 64M
qio v3-basic.qcow2 'write -P 0x31 0 3k' 'write -P 0x32 33k 70k' \
    'write -z 1M 256k' \
    'write -P 0x33 2M 128k' 'write -z 2M 64k' \
    'write -P 0x34 3M 128k' 'write -z -u 3M 64k' \
    'write -P 0x35 5M 192k' 'discard 5M 64k' \
    'write -P 0x36 67108352 512'
describe v3-basic.qcow2 0 "qcow2 v3: unaligned data, zero clusters (plain, preallocated, unmapped), discard, last sector"

###############################################################################
# IMAGE: cluster-<N>.qcow2 for N = 512 .. 2M (13 images, 64 MiB each, v3)
#   Same write pattern in every cluster size: partial-cluster write, a write
#   crossing cluster (and for small clusters, L2-table) boundaries, a zero
#   range, a 1 MiB run, the last sector.  512-byte clusters give 64-entry L2
#   tables (an L2 table covers only 32 KiB) and a 2048-entry L1; 2 MiB clusters
#   give one L2 table for the whole disk.
for cs in 512 1k 2k 4k 8k 16k 32k 64k 128k 256k 512k 1M 2M; do
    log "cluster-$cs.qcow2"
    qemu-img create -q -f qcow2 -o cluster_size=$cs "cluster-$cs.qcow2" 64M
    qio "cluster-$cs.qcow2" 'write -P 0x41 512 1k' 'write -P 0x42 31k 70k' \
        'write -z 1M 256k' 'write -P 0x43 5M 1M' 'write -P 0x44 67108352 512'
    describe "cluster-$cs.qcow2" 0 "cluster_size=$cs: partial, boundary-crossing, zero and tail writes"
done

###############################################################################
# IMAGE: refcount-bits-<B>.qcow2 for B = 1 2 4 8 16 32 64 (16 MiB, 64k)
#   refcount_order 0..6.  For B >= 2 an internal snapshot raises refcounts to 2
#   and later writes force copy-on-write of shared clusters (COPIED flag
#   cleared on shared L2 entries).  With B = 1 the maximum refcount is 1, so no
#   snapshot is possible (qemu-img snapshot -c fails there by design).
for rb in 1 2 4 8 16 32 64; do
    log "refcount-bits-$rb.qcow2"
    qemu-img create -q -f qcow2 -o refcount_bits=$rb "refcount-bits-$rb.qcow2" 16M
    qio "refcount-bits-$rb.qcow2" 'write -P 0x51 0 1M' 'write -P 0x52 8M 64k'
    if [ "$rb" -ge 2 ]; then
        qemu-img snapshot -c snap "refcount-bits-$rb.qcow2"
        qio "refcount-bits-$rb.qcow2" 'write -P 0x53 256k 4k' 'write -P 0x54 12M 64k'
        describe "refcount-bits-$rb.qcow2" 0 "refcount_bits=$rb with one internal snapshot (refcount 2) and COW after it"
    else
        describe "refcount-bits-$rb.qcow2" 0 "refcount_bits=1 (max refcount 1, no snapshots possible)"
    fi
done

###############################################################################
# IMAGE: compressed-zlib.qcow2 / compressed-zstd.qcow2 (8 MiB, 64k)
#   compression_type=zlib (header byte 104 = 0, default) and zstd (=1,
#   incompatible feature bit 3).  Compressed clusters written with
#   'qemu-io write -c' (whole clusters), then a partial overwrite of a
#   compressed cluster (decompress + COW into a normal cluster), and a zero
#   write over a compressed cluster.  Compressed L2 entries carry no host
#   'offset' in qemu-img map and show "compressed": true.
for ct in zlib zstd; do
    log "compressed-$ct.qcow2"
    qemu-img create -q -f qcow2 -o compression_type=$ct "compressed-$ct.qcow2" 8M
    qio "compressed-$ct.qcow2" 'write -c -P 0x61 0 64k' 'write -c -P 0x62 128k 256k' \
        'write -c -P 0x63 1M 64k' 'write -P 0x64 160k 4k' 'write -z 1M 64k' \
        'write -c -P 0x65 4M 1M'
    describe "compressed-$ct.qcow2" 0 "compression_type=$ct: write -c clusters, partial overwrite of a compressed cluster, zero over compressed"
done

###############################################################################
# IMAGE: convert-compressed-zlib.qcow2 / convert-compressed-zstd.qcow2
#   'qemu-img convert -c' of a 4 MiB raw file holding random (incompressible),
#   text, zero and constant data: incompressible clusters are stored
#   uncompressed, zero clusters are skipped, the rest compressed.
for ct in zlib zstd; do
    log "convert-compressed-$ct.qcow2"
    qemu-img convert -c -f raw -O qcow2 -o compression_type=$ct "$RUN/mixed.raw" "convert-compressed-$ct.qcow2"
    describe "convert-compressed-$ct.qcow2" 0 "qemu-img convert -c ($ct) of mixed random/text/zero/constant data"
done

###############################################################################
# IMAGE: extended-l2.qcow2 (8 MiB, 64k clusters, extended_l2=on: 32 x 2 KiB subclusters)
#   128-bit L2 entries (offset word + 32-bit alloc bitmap + 32-bit zero bitmap;
#   incompatible feature bit 4).  Subcluster-sized and sub-subcluster writes,
#   a subcluster-granular zero write, a compressed cluster (no subcluster
#   bitmap), a whole-cluster zero write.
log extended-l2.qcow2
qemu-img create -q -f qcow2 -o extended_l2=on extended-l2.qcow2 8M
qio extended-l2.qcow2 'write -P 0x71 2k 2k' 'write -P 0x72 9k 1k' 'write -z 32k 4k' \
    'write -c -P 0x73 1M 64k' 'write -P 0x74 2M 64k' 'write -z 3M 64k' 'write -P 0x75 66k 2k'
describe extended-l2.qcow2 0 "extended_l2=on without backing: subcluster data/zero, compressed cluster"

###############################################################################
# IMAGE: extended-l2-backed.qcow2 -> extended-l2-base.qcow2
#   The point of subclusters: small writes to an overlay allocate only the
#   touched 2 KiB subclusters; the remaining subclusters of the same cluster
#   still read from the backing file (map alternates depth 0 / depth 1 inside
#   one cluster).  Also a subcluster zero write over backing data.
log extended-l2-backed.qcow2
qemu-img create -q -f qcow2 extended-l2-base.qcow2 4M
qio extended-l2-base.qcow2 'write -P 0x55 0 4M'
qemu-img create -q -f qcow2 -o extended_l2=on -b extended-l2-base.qcow2 -F qcow2 extended-l2-backed.qcow2
qio extended-l2-backed.qcow2 'write -P 0x66 2k 2k' 'write -P 0x67 9k 1k' 'write -z 32k 4k' \
    'write -P 0x68 1M 64k' 'write -z 2M 64k'
describe extended-l2-base.qcow2 0 "fully written base of extended-l2-backed.qcow2"
describe extended-l2-backed.qcow2 0 "extended_l2=on overlay: partial subcluster allocation, subcluster zero over backing"

###############################################################################
# IMAGE: extended-l2-2M.qcow2 (32 MiB, 2 MiB clusters -> 64 KiB subclusters)
log extended-l2-2M.qcow2
qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=2M extended-l2-2M.qcow2 32M
qio extended-l2-2M.qcow2 'write -P 0x76 64k 64k' 'write -P 0x77 3M 100k' 'write -z 8M 128k' 'write -P 0x78 10M 2M'
describe extended-l2-2M.qcow2 0 "extended_l2=on with 2 MiB clusters (64 KiB subclusters)"

###############################################################################
# IMAGE: datafile-raw.qcow2 + datafile-raw.qcow2.data (data_file_raw=on)
#   External data file (incompatible feature bit 2, header extension 0x44415441
#   holding the file name, autoclear bit 1 = raw).  qemu preallocates all L2
#   entries 1:1, so the .data file is a valid raw image of the guest disk.
log datafile-raw.qcow2
qemu-img create -q -f qcow2 -o data_file=datafile-raw.qcow2.data,data_file_raw=on datafile-raw.qcow2 8M
qio datafile-raw.qcow2 'write -P 0x81 64k 128k' 'write -z 1M 64k' 'write -P 0x82 7M 1M'
describe datafile-raw.qcow2 0 "external data file, data_file_raw=on (metadata preallocated, host offset == guest offset)"

###############################################################################
# IMAGE: datafile.qcow2 + datafile.qcow2.data (data_file_raw=off)
#   External data file without the raw guarantee: clusters are allocated on
#   demand; compressed writes and internal snapshots are not allowed.
log datafile.qcow2
qemu-img create -q -f qcow2 -o data_file=datafile.qcow2.data,data_file_raw=off datafile.qcow2 8M
qio datafile.qcow2 'write -P 0x83 2M 64k' 'write -P 0x84 0 64k' 'write -z 4M 64k'
describe datafile.qcow2 0 "external data file, data_file_raw=off (allocation on demand)"

###############################################################################
# IMAGE: lazy-refcounts-clean.qcow2 (compatible feature bit 0 set, closed cleanly)
log lazy-refcounts-clean.qcow2
qemu-img create -q -f qcow2 -o lazy_refcounts=on lazy-refcounts-clean.qcow2 16M
qio lazy-refcounts-clean.qcow2 'write -P 0x91 0 192k' 'write -P 0x92 8M 64k'
describe lazy-refcounts-clean.qcow2 0 "lazy_refcounts=on, cleanly closed (dirty bit clear, refcounts consistent)"

###############################################################################
# IMAGE: chain-top.qcow2 -> chain-mid.qcow2 -> chain-base.raw (depth 3)
#   Relative backing names, explicit backing formats (qcow2 / raw).
#   base.raw: 0xb0 in [0,2M), 0xb1 in [6M,7M), holes elsewhere.
#   mid: 0x3d in [1M,3M), zero cluster range [6M,6.5M) hiding base data.
#   top: zero cluster [0,64k) hiding base data, 0x70 in [1.5M,2.5M),
#        0x71 4 KiB at 7M (partial cluster -> COW from base).
#   qemu:allocation-depth then reports 1 (local), 2 (mid), 3 (base) and
#   0 for ranges allocated nowhere (none here: a raw base counts as allocated).
log chain-top.qcow2
qemu-img create -q -f raw chain-base.raw 8M
qio_raw chain-base.raw 'write -P 0xb0 0 2M' 'write -P 0xb1 6M 1M'
qemu-img create -q -f qcow2 -b chain-base.raw -F raw chain-mid.qcow2
qio chain-mid.qcow2 'write -P 0x3d 1M 2M' 'write -z 6M 512k'
qemu-img create -q -f qcow2 -b chain-mid.qcow2 -F qcow2 chain-top.qcow2
qio chain-top.qcow2 'write -P 0x70 1536k 1M' 'write -z 0 64k' 'write -P 0x71 7M 4k'
describe chain-base.raw 63 "raw bottom of the 3-deep chain (sparse raw file; qemu-img check does not support raw: exit 63)"
describe chain-mid.qcow2 0 "middle of the chain (qcow2 over raw)"
describe chain-top.qcow2 0 "top of a 3-deep chain qcow2->qcow2->raw with data/zeroes at every layer"

###############################################################################
# IMAGE: chain2-top.qcow2 -> chain2-base.qcow2 (qcow2 base, unallocated holes)
#   Like the above but the bottom is qcow2, so some ranges are allocated in no
#   layer at all: allocation-depth 0 ("absent"), and base:allocation hole.
log chain2-top.qcow2
qemu-img create -q -f qcow2 chain2-base.qcow2 8M
qio chain2-base.qcow2 'write -P 0xc0 0 1M' 'write -P 0xc1 4M 1M'
qemu-img create -q -f qcow2 -b chain2-base.qcow2 -F qcow2 chain2-top.qcow2
qio chain2-top.qcow2 'write -P 0xc2 512k 1M' 'write -z 4M 64k'
describe chain2-base.qcow2 0 "qcow2 base of chain2-top.qcow2"
describe chain2-top.qcow2 0 "2-deep qcow2 chain with ranges unallocated in every layer (depth 0)"

###############################################################################
# IMAGE: bitmaps.qcow2 (64 MiB) + bitmaps-mergesrc.qcow2
#   Persistent dirty bitmaps (bitmaps header extension 0x23852875, autoclear
#   bit 0), made dirty by real writes through qemu-io (qemu loads enabled
#   persistent bitmaps on read-write open and stores them on close).
#     b-auto      64k granularity, enabled the whole time       -> W1+W2+W3
#     b-512       512-byte granularity, enabled                 -> W1+W2+W3
#     b-1M        1 MiB granularity, enabled                    -> W1+W2+W3
#     b-disabled  created --disable, never enabled              -> clean
#     b-toggled   disabled, --enable before W2, --disable after -> W2 only
#     b-cleared   enabled, dirtied, then --clear                -> clean
#     b-merged    disabled; --merge b-toggled, plus --merge of bitmap 'src'
#                 from bitmaps-mergesrc.qcow2 (-b/-F)           -> W2 + [40M,40M+64k)
#   W1 = data 0..4k and 30M..30M+64k; W2 = data 10M..10M+100k (unaligned);
#   W3 = write -z 20M 1M and discard 30M 64k (zeroing and discard dirty too).
log bitmaps.qcow2
qemu-img create -q -f qcow2 bitmaps.qcow2 64M
qemu-img bitmap --add bitmaps.qcow2 b-auto
qemu-img bitmap --add -g 512 bitmaps.qcow2 b-512
qemu-img bitmap --add -g 1M bitmaps.qcow2 b-1M
qemu-img bitmap --add --disable bitmaps.qcow2 b-disabled
qemu-img bitmap --add --disable bitmaps.qcow2 b-toggled
qemu-img bitmap --add bitmaps.qcow2 b-cleared
qio bitmaps.qcow2 'write -P 0xa1 0 4k' 'write -P 0xa2 30M 64k'             # W1
qemu-img bitmap --enable bitmaps.qcow2 b-toggled
qio bitmaps.qcow2 'write -P 0xa3 10M 100k'                                  # W2
qemu-img bitmap --disable bitmaps.qcow2 b-toggled
qio bitmaps.qcow2 'write -z 20M 1M' 'discard 30M 64k'                       # W3
qemu-img bitmap --clear bitmaps.qcow2 b-cleared
qemu-img create -q -f qcow2 bitmaps-mergesrc.qcow2 64M
qemu-img bitmap --add bitmaps-mergesrc.qcow2 src
qio bitmaps-mergesrc.qcow2 'write -P 0xa4 40M 64k'
qemu-img bitmap --add --disable bitmaps.qcow2 b-merged
qemu-img bitmap --merge b-toggled bitmaps.qcow2 b-merged
qemu-img bitmap --merge src -b bitmaps-mergesrc.qcow2 -F qcow2 bitmaps.qcow2 b-merged
describe bitmaps-mergesrc.qcow2 0 "source image for the cross-file bitmap merge (bitmap 'src' dirty at 40M)"
describe bitmaps.qcow2 0 "7 persistent bitmaps: auto/disabled/toggled/cleared/merged, granularity 512..1M, dirtied by real writes"

###############################################################################
# IMAGE: bitmap-inuse.qcow2 (crash with an 'auto' bitmap loaded)
#   qemu-nbd opens the image read-write (which sets the in-use flag on the
#   enabled bitmap 'crashed' in the bitmap directory), a client writes through
#   NBD, then qemu-nbd is killed with SIGKILL, so the bitmap is left
#   flags=[in-use, auto] (= inconsistent).  qemu then refuses to export it
#   (qemu-nbd -B crashed: "Bitmap 'crashed' is inconsistent and cannot be
#   used"), 'qemu-img convert --bitmaps' fails without --skip-broken-bitmaps,
#   and 'qemu-img check' still reports no errors (exit 0).  Note: 'still-ok'
#   was created --disable (no 'auto' flag) and was never written to, yet it is
#   left flags=[in-use] too: qemu sets in-use on every persistent bitmap it
#   loads for a read-write open, enabled or not.
log bitmap-inuse.qcow2
qemu-img create -q -f qcow2 bitmap-inuse.qcow2 16M
qemu-img bitmap --add bitmap-inuse.qcow2 crashed
qemu-img bitmap --add --disable bitmap-inuse.qcow2 still-ok
qio bitmap-inuse.qcow2 'write -P 0xe1 0 64k'
start_rw_nbd bitmap-inuse.qcow2 inuse
qemu-io -f raw -c 'write -P 0xe2 2M 64k' -c flush "nbd+unix:///?socket=$RUN/inuse.sock" >/dev/null
crash "$NBD_PID"
describe bitmap-inuse.qcow2 0 "SIGKILLed writer: bitmaps left flags [in-use, auto] ('crashed') and [in-use] ('still-ok', disabled)"

###############################################################################
# IMAGE: bitmaps-autoclear-cleared.qcow2
#   Bitmaps extension present but autoclear bit 0 cleared, i.e. what is left
#   after a program without bitmap support opened the image read-write.  qemu
#   ignores the extension (warning: "a program lacking bitmap support modified
#   this file, so all bitmaps are now considered inconsistent"), the bitmap
#   directory/table clusters become leaked clusters: qemu-img check exit 3.
log bitmaps-autoclear-cleared.qcow2
qemu-img create -q -f qcow2 bitmaps-autoclear-cleared.qcow2 4M
qemu-img bitmap --add bitmaps-autoclear-cleared.qcow2 stale
qio bitmaps-autoclear-cleared.qcow2 'write -P 0xe3 0 64k'
qpoke clear-bit bitmaps-autoclear-cleared.qcow2 autoclear 0
describe bitmaps-autoclear-cleared.qcow2 3 "bitmaps extension with autoclear bit 0 cleared: bitmaps ignored, 3 leaked clusters"

###############################################################################
# IMAGE: snapshots.qcow2 (16 MiB) with internal snapshots s1, s2
#   Snapshot table, per-snapshot L1 copies, refcounts > 1 on shared clusters,
#   COW after each snapshot.  Snapshot contents can be read with
#   'qemu-nbd -r -l s1 IMG' or 'qemu-img convert -l snapshot.name=s1'.
log snapshots.qcow2
qemu-img create -q -f qcow2 snapshots.qcow2 16M
qio snapshots.qcow2 'write -P 0xd1 0 2M' 'write -P 0xd2 8M 64k'
qemu-img snapshot -c s1 snapshots.qcow2
qio snapshots.qcow2 'write -P 0xd3 1M 64k' 'write -z 8M 64k' 'write -P 0xd4 12M 128k'
qemu-img snapshot -c s2 snapshots.qcow2
qio snapshots.qcow2 'write -P 0xd5 0 4k' 'discard 12M 64k'
describe snapshots.qcow2 0 "two internal snapshots with COW between them"

###############################################################################
# IMAGE: corrupt-bit.qcow2 : only the 'corrupt' incompatible bit (bit 1) set.
#   qemu refuses read-write open ("Image is corrupt; cannot be opened
#   read/write"), allows read-only; check finds nothing (exit 0); check -r all
#   clears the bit.
log corrupt-bit.qcow2
qemu-img create -q -f qcow2 corrupt-bit.qcow2 4M
qio corrupt-bit.qcow2 'write -P 0xc5 0 64k'
qpoke set-bit corrupt-bit.qcow2 incompatible 1
describe corrupt-bit.qcow2 0 "corrupt flag set in header, metadata otherwise consistent"

###############################################################################
# IMAGE: corrupt-overlap.qcow2 : real corruption detected by qemu.
#   The L2 entry for guest cluster 0 is pointed at the refcount table; the
#   next write through qemu-io hits qemu's metadata overlap check, qemu prints
#   "Marking image as corrupt: Preventing invalid write on metadata (overlaps
#   with refcount table)" and sets the corrupt bit itself.  check: 1 error
#   (refcount=1 reference=2) + 1 leaked cluster -> exit 2.
log corrupt-overlap.qcow2
qemu-img create -q -f qcow2 corrupt-overlap.qcow2 4M
qio corrupt-overlap.qcow2 'write -P 0xc6 0 64k'
qpoke l2-set corrupt-overlap.qcow2 0 "$(qpoke reftable-offset corrupt-overlap.qcow2)"
if qemu-io -f qcow2 -c 'write -P 0xc7 0 4k' corrupt-overlap.qcow2 >/dev/null 2>"$RUN/overlap.err"; then
    echo "expected the overlapping write to fail" >&2; exit 1
fi
grep -q 'Marking image as corrupt' "$RUN/overlap.err"
describe corrupt-overlap.qcow2 2 "L2 entry points into the refcount table; qemu marked the image corrupt"

###############################################################################
# IMAGE: dirty-lazy-refcounts.qcow2 : crash with lazy refcounts.
#   lazy_refcounts=on, qemu-nbd (read-write) allocates clusters for an NBD
#   client, then is SIGKILLed: the dirty bit (incompatible bit 0) stays set
#   and the refcounts of the new clusters were never written.  qemu-img check
#   (read-only) reports 'refcount=0 reference=1' + OFLAG_COPIED errors -> exit 2;
#   any read-write open by qemu repairs it automatically.
log dirty-lazy-refcounts.qcow2
qemu-img create -q -f qcow2 -o lazy_refcounts=on dirty-lazy-refcounts.qcow2 16M
start_rw_nbd dirty-lazy-refcounts.qcow2 dirty
qemu-io -f raw -c 'write -P 0xf1 0 192k' -c 'write -P 0xf2 8M 64k' -c flush \
    "nbd+unix:///?socket=$RUN/dirty.sock" >/dev/null
crash "$NBD_PID"
describe dirty-lazy-refcounts.qcow2 2 "dirty bit set after SIGKILL with lazy_refcounts=on; refcounts stale (check: corruptions)"

###############################################################################
# IMAGE: leaked-cluster.qcow2 : one cluster with refcount 1 and no reference.
#   File extended by one cluster whose refcount is set to 1 -> check exit 3
#   ("Leaked cluster N refcount=1 reference=0"); check -r leaks fixes it.
log leaked-cluster.qcow2
qemu-img create -q -f qcow2 leaked-cluster.qcow2 4M
qio leaked-cluster.qcow2 'write -P 0xf3 0 64k'
sz=$(stat -c %s leaked-cluster.qcow2)
truncate -s $((sz + 65536)) leaked-cluster.qcow2
qpoke refcount-set leaked-cluster.qcow2 $((sz / 65536)) 1
describe leaked-cluster.qcow2 3 "one leaked cluster (refcount 1, no reference)"

###############################################################################
# IMAGE: feature-unknown-incompatible.qcow2 / -compatible / -autoclear
#   An unknown incompatible bit (40) must make a reader refuse the image
#   (qemu: "Unsupported qcow2 feature(s): Unknown incompatible feature:
#   10000000000"); an unknown compatible bit must be ignored; an unknown
#   autoclear bit must be accepted and cleared on the first read-write open.
log feature-unknown-*.qcow2
for kind in incompatible compatible autoclear; do
    qemu-img create -q -f qcow2 "feature-unknown-$kind.qcow2" 4M
    qio "feature-unknown-$kind.qcow2" 'write -P 0xf4 0 64k'
    qpoke set-bit "feature-unknown-$kind.qcow2" "$kind" 40
done
describe feature-unknown-incompatible.qcow2 1 "unknown incompatible feature bit 40: must be refused (qemu cannot open it: check exit 1)"
describe feature-unknown-compatible.qcow2 0 "unknown compatible feature bit 40: must be ignored"
describe feature-unknown-autoclear.qcow2 0 "unknown autoclear feature bit 40: accept, clear on read-write open"

###############################################################################
# IMAGE: prealloc-metadata.qcow2 : preallocation=metadata
#   Every L2 entry allocated up front; host clusters exist but were never
#   written (sparse file) -> qemu-img map "data": true, "zero": true.
log prealloc-metadata.qcow2
qemu-img create -q -f qcow2 -o preallocation=metadata prealloc-metadata.qcow2 4M
qio prealloc-metadata.qcow2 'write -P 0xf5 1M 4k'
describe prealloc-metadata.qcow2 0 "preallocation=metadata: all clusters allocated, mostly unwritten"

###############################################################################
# IMAGE: large-sparse.qcow2 : 5 GiB virtual, tiny file.
#   Writes straddling the 2 GiB and 4 GiB boundaries (32-bit overflow traps)
#   and the last sector; several L1 entries / L2 tables (one L2 covers 512 MiB).
log large-sparse.qcow2
qemu-img create -q -f qcow2 large-sparse.qcow2 5G
qio large-sparse.qcow2 'write -P 0xf6 2147450880 64k' 'write -P 0xf7 4294934528 64k' \
    'write -P 0xf8 5368708608 512'
describe large-sparse.qcow2 0 "5 GiB sparse: writes across 2 GiB and 4 GiB, last sector"

###############################################################################
# IMAGE: unaligned-size.qcow2 : virtual size 1000448 bytes (not a multiple of
#   the 64k cluster size): the last cluster is partial; NBD export size is not
#   4k-aligned either.
log unaligned-size.qcow2
qemu-img create -q -f qcow2 unaligned-size.qcow2 1000448
qio unaligned-size.qcow2 'write -P 0xf9 999936 512' 'write -P 0xfa 0 1k'
describe unaligned-size.qcow2 0 "virtual size 1000448 (partial last cluster), data in the last sector"

###############################################################################
# IMAGE: luks-encrypted.qcow2 : encrypt.format=luks (secret 'oracle').
#   For engines that do not implement encryption: must refuse cleanly.
#   qemu: --object secret,id=sec0,data=oracle --image-opts
#   driver=qcow2,file.filename=luks-encrypted.qcow2,encrypt.key-secret=sec0
log luks-encrypted.qcow2
qemu-img create -q -f qcow2 --object secret,id=sec0,data=oracle \
    -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10 luks-encrypted.qcow2 4M
qemu-io --object secret,id=sec0,data=oracle -c 'write -P 0xfb 0 64k' --image-opts \
    driver=qcow2,file.filename=luks-encrypted.qcow2,encrypt.key-secret=sec0 >/dev/null
describe luks-encrypted.qcow2 0 "LUKS-encrypted qcow2 (secret 'oracle'): must be refused cleanly without the key"

###############################################################################
# IMAGE: plain.raw : sparse raw image (16 MiB) with data, holes and a tail.
log plain.raw
qemu-img create -q -f raw plain.raw 16M
qio_raw plain.raw 'write -P 0x01 0 4k' 'write -P 0x02 1M 1M' 'write -P 0x03 16776704 512'
describe plain.raw 63 "sparse raw file (check is not supported for raw: exit 63)"

###############################################################################
# IMAGE: rawbase-top.qcow2 -> rawbase.raw (-F raw, two layers)
#   The everyday "qcow2 overlay on a raw disk" shape: the raw base has no
#   backing of its own and is read through as layer depth 1.  base: 0xa0 in
#   [0,1M), a hole, 0xa1 in [3M,4M).  top: a 1 KiB write at 100k (COW of the
#   rest of the cluster from raw data), a zero cluster over raw data, a
#   discard over raw data (v3 keeps a zero cluster there), a write into the
#   base's hole.
log rawbase-top.qcow2
qemu-img create -q -f raw rawbase.raw 4M
qio_raw rawbase.raw 'write -P 0xa0 0 1M' 'write -P 0xa1 3M 1M'
qemu-img create -q -f qcow2 -b rawbase.raw -F raw rawbase-top.qcow2
qio rawbase-top.qcow2 'write -P 0xa2 100k 1k' 'write -z 512k 128k' 'discard 3M 64k' \
    'write -P 0xa3 2M 64k'
describe rawbase.raw 63 "raw base of rawbase-top.qcow2 (check is not supported for raw: exit 63)"
describe rawbase-top.qcow2 0 "qcow2 over raw (-F raw): COW from raw, zero and discard over raw data"

###############################################################################
# IMAGE: probe-top.qcow2 -> probe-base.qcow2 and
#        probe-raw-top.qcow2 -> probe-raw-base.raw
#   The backing format header extension (0xe2792aca) is removed after
#   creation, so the backing file's format must be probed: qcow2 magic ->
#   qcow2, anything else -> raw.  qemu-img info then prints no
#   backing-filename-format for the top layer.  (Current qemu-img refuses to
#   create such images, but older ones did and they are still around.)
log probe-top.qcow2
qemu-img create -q -f qcow2 probe-base.qcow2 4M
qio probe-base.qcow2 'write -P 0xb3 0 1M' 'write -z 2M 64k'
qemu-img create -q -f qcow2 -b probe-base.qcow2 -F qcow2 probe-top.qcow2
qpoke del-ext probe-top.qcow2 0xe2792aca
qio probe-top.qcow2 'write -P 0xb4 512k 4k'
describe probe-base.qcow2 0 "qcow2 base of probe-top.qcow2"
describe probe-top.qcow2 0 "backing format extension absent: qcow2 backing file found by probing"
log probe-raw-top.qcow2
qemu-img create -q -f raw probe-raw-base.raw 4M
qio_raw probe-raw-base.raw 'write -P 0xb5 0 1M'
qemu-img create -q -f qcow2 -b probe-raw-base.raw -F raw probe-raw-top.qcow2
qpoke del-ext probe-raw-top.qcow2 0xe2792aca
qio probe-raw-top.qcow2 'write -P 0xb6 0 4k'
describe probe-raw-base.raw 63 "raw base of probe-raw-top.qcow2"
describe probe-raw-top.qcow2 0 "backing format extension absent: raw backing file found by probing"

###############################################################################
# IMAGE: short-backing-top.qcow2 (8 MiB) -> short-backing-base.qcow2 (3 MiB + 3 KiB)
#   The backing file is shorter than the overlay, and ends in the middle of a
#   cluster: reads past its end are zeroes, the cluster straddling its end is
#   partly backing data and partly zero, and a small write there copies only
#   what the backing file has.  Data is also written past the backing end.
log short-backing-top.qcow2
qemu-img create -q -f qcow2 short-backing-base.qcow2 3148800
qio short-backing-base.qcow2 'write -P 0xc8 0 3148800'
qemu-img create -q -f qcow2 -b short-backing-base.qcow2 -F qcow2 short-backing-top.qcow2 8M
qio short-backing-top.qcow2 'write -P 0xc9 1M 4k' 'write -P 0xca 3M 1k' 'write -P 0xcb 6M 64k'
describe short-backing-base.qcow2 0 "qcow2 base (3 MiB + 3 KiB, partial last cluster) of short-backing-top.qcow2"
describe short-backing-top.qcow2 0 "8 MiB overlay over a shorter backing file ending mid-cluster"

###############################################################################
# IMAGE: short-raw-top.qcow2 (4 MiB) -> short-raw-base.raw (1000000 bytes)
#   A raw backing file whose length is not a multiple of 512: qemu rounds its
#   size up to 1000448 and reads the 448-byte tail as zeroes.  The overlay
#   writes into the cluster holding the raw file's end (COW of a partial
#   sector) and past it.
log short-raw-top.qcow2
truncate -s 1000000 short-raw-base.raw
qio_raw short-raw-base.raw 'write -P 0xcc 0 999424'
python3 -c 'import sys
with open(sys.argv[1], "r+b") as f:
    f.seek(999424); f.write(b"\xcd" * 576)' short-raw-base.raw
qemu-img create -q -f qcow2 -b short-raw-base.raw -F raw short-raw-top.qcow2 4M
qio short-raw-top.qcow2 'write -P 0xce 983040 1k' 'write -P 0xcf 2M 64k'
describe short-raw-base.raw 63 "raw file of 1000000 bytes (not sector aligned): qemu sees 1000448"
describe short-raw-top.qcow2 0 "overlay over a raw backing file shorter than it and not sector aligned"

###############################################################################
# IMAGE: v2-chain-top.qcow2 (v2) -> v2-chain-mid.qcow2 (v2) -> v2-chain-base.raw
#   A 3-deep chain of version-2 images (header extensions, including the
#   backing format, follow the 72-byte v2 header).  v2 has no zero flag:
#   'write -z' over backing data allocates zero-filled clusters, and qemu
#   ignores a 'discard' of overlay data (dropping the cluster would expose the
#   backing data and v2 cannot say "zero" instead), so [6M,6M+128k) keeps 0xda.
log v2-chain-top.qcow2
qemu-img create -q -f raw v2-chain-base.raw 8M
qio_raw v2-chain-base.raw 'write -P 0xd6 0 4M' 'write -P 0xd7 6M 1M'
qemu-img create -q -f qcow2 -o compat=0.10 -b v2-chain-base.raw -F raw v2-chain-mid.qcow2
qio v2-chain-mid.qcow2 'write -P 0xd8 1M 1M' 'write -z 3M 128k'
qemu-img create -q -f qcow2 -o compat=0.10 -b v2-chain-mid.qcow2 -F qcow2 v2-chain-top.qcow2
qio v2-chain-top.qcow2 'write -P 0xd9 1536k 1k' 'write -z 256k 64k' \
    'write -P 0xda 6M 128k' 'discard 6M 64k' 'write -P 0xdb 5M 64k'
describe v2-chain-base.raw 63 "raw bottom of the v2 chain"
describe v2-chain-mid.qcow2 0 "v2 middle layer over raw: data and zero writes over backing data"
describe v2-chain-top.qcow2 0 "3-deep chain of v2 images: zero writes and discard over backing data, COW"

###############################################################################
# IMAGE: extended-l2-zstd.qcow2 (8 MiB, 64k clusters, extended_l2=on, zstd)
#   Both newer incompatible features at once (bits 3 and 4): zstd-compressed
#   clusters in 128-bit L2 entries, subcluster data and zero writes, a
#   partial overwrite of a compressed cluster (decompress + COW into a normal
#   cluster with every subcluster allocated), zero over a compressed cluster.
log extended-l2-zstd.qcow2
qemu-img create -q -f qcow2 -o extended_l2=on,compression_type=zstd extended-l2-zstd.qcow2 8M
qio extended-l2-zstd.qcow2 'write -c -P 0x79 0 64k' 'write -c -P 0x7a 256k 128k' \
    'write -P 0x7b 260k 2k' 'write -P 0x7c 1M 6k' 'write -z 1028k 2k' \
    'write -c -P 0x7d 2M 64k' 'write -z 2M 64k' 'write -c -P 0x7e 7M 1M'
describe extended-l2-zstd.qcow2 0 "extended_l2=on + compression_type=zstd: compressed clusters, subclusters, COW of a compressed cluster"

###############################################################################
# Host file layout
#   qemu allocates clusters with fallocate(), so a partly written cluster is
#   left with an "unwritten" extent after the written blocks.  Whether
#   SEEK_HOLE calls such an extent a hole depends on the page cache (ext4
#   reports it as data once someone has read it), and qemu-img map's "zero"
#   flag inside allocated clusters follows SEEK_HOLE: the same file would
#   give different maps before and after any read.  So every file is
#   rewritten block by block, all-zero blocks as real holes and everything
#   else as written data; real holes seek the same whatever is cached, and
#   the truth below then holds for every later reader of these files.
#   (fallocate --dig-holes is not enough: it skips what SEEK_HOLE already
#   calls a hole, unwritten extents included.)
log "rewrite files: zero blocks as holes, no unwritten extents"
cat > "$RUN/sparsify.py" <<'PY'
import os, sys
def data_ranges(fd, size):
    # what SEEK_DATA/SEEK_HOLE call data; whatever they call a hole reads as
    # zeroes anyway (that is all an unwritten extent holds)
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        off = end
for path in sys.argv[1:]:
    st = os.stat(path)
    bs = max(st.st_blksize, 4096)
    tmp = path + ".sparse-tmp"
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        for start, end in data_ranges(src.fileno(), st.st_size):
            src.seek(start)
            for off in range(start, end, bs):
                block = src.read(min(bs, end - off))
                if block.count(0) != len(block):
                    dst.seek(off)
                    dst.write(block)
        dst.truncate(st.st_size)
    os.chmod(tmp, st.st_mode & 0o7777)
    os.replace(tmp, path)
PY
files=()
for f in *; do [ -f "$f" ] && [ "$f" != MANIFEST.tsv ] && files+=("$f"); done
python3 "$RUN/sparsify.py" "${files[@]}"

###############################################################################
# Ground truth
###############################################################################
fmt_of() { case "$1" in *.raw) echo raw;; *) echo qcow2;; esac; }
# The truth commands QEMU refuses, per image (info, map, convert, snapshots:
# the listing of internal snapshots).  Their stderr is the truth there (the
# tests expect qnbd to refuse too).  qemu-img check's exit code is not listed
# here: MANIFEST.tsv holds it.
declare -A REFUSED=(
    [feature-unknown-incompatible.qcow2]="info map convert snapshots"
)
# truth_cmd NAME WHAT OUT ERR CMD...   run a truth command, stdout to OUT and
# stderr to ERR; a failure not listed in REFUSED, or a listed refusal that
# succeeds, fails the script (rc_all=1).  Returns the command's status.
truth_cmd() {
    local name=$1 what=$2 out=$3 err=$4 refused=0 rc=0
    shift 4
    case " ${REFUSED[$name]:-} " in *" $what "*) refused=1;; esac
    "$@" > "$out" 2> "$err" || rc=$?
    if [ "$rc" != 0 ] && [ "$refused" = 0 ]; then
        echo "FAILED: $what of $name exited $rc (not a listed refusal): $(head -c 600 "$err")" >&2
        rc_all=1
    elif [ "$rc" = 0 ] && [ "$refused" = 1 ]; then
        echo "NOT REFUSED: $what of $name succeeded, REFUSED lists it as refused" >&2
        rc_all=1
    fi
    return "$rc"
}
rc_all=0
for name in "${!REFUSED[@]}"; do
    awk -F'\t' -v n="$name" '$1 == n { found = 1 } END { exit !found }' MANIFEST.tsv ||
        { echo "REFUSED names $name, which is not in MANIFEST.tsv" >&2; rc_all=1; }
done
if [ "${TRUTH:-1}" != 0 ]; then
    mkdir -p truth
    have_nbdinfo=1; command -v nbdinfo >/dev/null || { have_nbdinfo=0; log "nbdinfo missing: skipping NBD truth"; }
    while IFS=$'\t' read -r name want desc; do
        fmt=$(fmt_of "$name"); t="truth/$name"
        log "truth $name"
        open=(-f "$fmt" "$name"); objs=()
        if [ "$name" = luks-encrypted.qcow2 ]; then
            objs=(--object secret,id=sec0,data=oracle)
            open=(--image-opts "driver=qcow2,file.filename=$name,encrypt.key-secret=sec0")
        fi
        truth_cmd "$name" info "$t.info.json" "$t.info.err" \
            qemu-img info --output=json --backing-chain -U -f "$fmt" "$name" || true
        truth_cmd "$name" map "$t.map.json" "$t.map.err" \
            qemu-img map "${objs[@]}" --output=json "${open[@]}" || true
        set +e
        qemu-img check "${objs[@]}" --output=json "${open[@]}" > "$t.check.json" 2> "$t.check.err"
        got=$?
        set -e
        echo "$got" > "$t.check.rc"
        if [ "$got" != "$want" ]; then
            echo "MISMATCH: qemu-img check $name exited $got, manifest says $want" >&2; rc_all=1
        fi
        if truth_cmd "$name" convert /dev/null "$t.sha256.err" \
            qemu-img convert "${objs[@]}" -O raw "${open[@]}" "$RUN/flat.raw"; then
            sha256sum < "$RUN/flat.raw" | cut -d' ' -f1 > "$t.sha256"
        fi
        rm -f "$RUN/flat.raw"
        if [ "${#objs[@]}" -gt 0 ]; then
            # the same commands without the key, as a plain command line gives them
            qemu-img map --output=json -f "$fmt" "$name" > /dev/null 2> "$t.map-nosecret.err" &&
                echo "qemu-img map opened $name without its key" >&2 && rc_all=1
            qemu-img convert -O raw -f "$fmt" "$name" "$RUN/flat.raw" 2> "$t.sha256-nosecret.err" &&
                echo "qemu-img convert opened $name without its key" >&2 && rc_all=1
            rm -f "$RUN/flat.raw"
        fi
        # internal snapshots
        snaps=
        if truth_cmd "$name" snapshots "$RUN/snapshots" "$RUN/snapshots.err" \
            qemu-img snapshot "${objs[@]}" -U -l "${open[@]}"; then
            snaps=$(awk 'NR>2 {print $2}' "$RUN/snapshots")
        fi
        for s in $snaps; do
            qemu-img convert -U -f "$fmt" -O raw -l "snapshot.name=$s" "$name" "$RUN/flat.raw"
            sha256sum < "$RUN/flat.raw" | cut -d' ' -f1 > "$t@$s.sha256"; rm -f "$RUN/flat.raw"
        done
        [ "$have_nbdinfo" = 1 ] || continue
        [ -s "$t.map.json" ] || continue           # qemu cannot read it: no NBD truth
        # consistent bitmaps (those not flagged in-use)
        bms=$(python3 -c 'import json,sys
d=json.load(open(sys.argv[1]))[0]
for b in d.get("format-specific",{}).get("data",{}).get("bitmaps",[]):
    if "in-use" not in b["flags"]: print(b["name"])' "$t.info.json")
        nbdargs=(-r -t -A -k "$RUN/truth.sock" --pid-file="$RUN/truth.pid" --fork)
        for b in $bms; do nbdargs+=(-B "$b"); done
        rm -f "$RUN/truth.sock" "$RUN/truth.pid"
        # note: 'qemu-nbd --fork' exits 1 whenever the server printed anything
        # on stderr (e.g. a warning) even though it is up and serving, so
        # judge by the pid file instead of the exit status.
        if [ "$name" = luks-encrypted.qcow2 ]; then
            qemu-nbd "${objs[@]}" "${nbdargs[@]}" "${open[@]}" </dev/null >/dev/null 2> "$t.nbd.err" || true
        else
            qemu-nbd "${nbdargs[@]}" -f "$fmt" "$name" </dev/null >/dev/null 2> "$t.nbd.err" || true
        fi
        if [ ! -s "$RUN/truth.pid" ] || ! kill -0 "$(cat "$RUN/truth.pid")" 2>/dev/null; then
            echo "qemu-nbd did not start for $name" >&2; rc_all=1; continue
        fi
        npid=$(cat "$RUN/truth.pid"); NBD_PIDS+=("$npid")
        uri="nbd+unix:///?socket=$RUN/truth.sock"
        nbdinfo --json --map=base:allocation "$uri" > "$t.nbd-base-allocation.json"
        nbdinfo --json --map=qemu:allocation-depth "$uri" > "$t.nbd-allocation-depth.json"
        for b in $bms; do
            nbdinfo --json --map="qemu:dirty-bitmap:$b" "$uri" > "$t.nbd-dirty-bitmap-$b.json"
            qemu-img map --output=json --image-opts \
                "driver=nbd,server.type=unix,server.path=$RUN/truth.sock,x-dirty-bitmap=qemu:dirty-bitmap:$b" \
                > "$t.nbd-xdirty-$b.map.json"
        done
        kill "$npid"; wait_gone "$npid"
        find truth -name "$name.*.err" -size 0 -delete
    done < MANIFEST.tsv
    find truth -name '*.err' -size 0 -delete
fi
log "done: $(wc -l < MANIFEST.tsv) images in $OUT (manifest: MANIFEST.tsv)"
exit $rc_all
