#!/usr/bin/env bash
# benches/peer.sh [OPTIONS] — build qnbd (release) and run the peer benchmark against qemu-nbd
# and nbdkit (benches/peer/peer.py --help lists the options; benches/README.md the figures).
#   benches/peer.sh --quick        ~2 minutes: the main jobs over a Unix socket
#   benches/peer.sh                ~11 minutes: every job over a Unix socket, three over TCP
#   benches/peer.sh --verify       fio crc32c verification of qnbd's write paths
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${QNBD_NO_BUILD:-}" ]; then
    cargo build --release --quiet --bin qnbd
fi
exec python3 benches/peer/peer.py "$@"
