#!/usr/bin/env bash
# benches/tls.sh — TLS throughput of `qnbd serve` against qemu-nbd with the same credentials.
#
# 1 GiB of non-zero data (raw image, page-cached), read end to end by `nbdcopy --request-size=1M
# --connections=1 URI null:` (1 MiB sequential reads, 16 in flight, nbdcopy's default) over a Unix
# socket; plaintext, X.509 (TLS 1.3) and PSK. Prints the median of 3 runs of each, in MiB/s.
# Needs: qemu-nbd, nbdcopy, certtool, psktool; a release build of qnbd (QNBD, default
# target/release/qnbd).
set -euo pipefail
cd "$(dirname "$0")/.."
QNBD=${QNBD:-$PWD/target/release/qnbd}
W=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$W"' EXIT
cd "$W"
head -c 1G /dev/urandom > disk.raw
printf 'cn = ca\nca\ncert_signing_key\nexpiration_days = 3\n' > ca.info
printf 'cn = localhost\ndns_name = localhost\ntls_www_server\nencryption_key\nsigning_key\nexpiration_days = 3\n' > s.info
printf 'cn = client\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 3\n' > c.info
mkdir srv cli psk
certtool --generate-privkey --outfile ca-key.pem 2>/dev/null
certtool --generate-self-signed --load-privkey ca-key.pem --template ca.info --outfile ca-cert.pem 2>/dev/null
for p in srv/server:s cli/client:c; do
    f=${p%:*}; t=${p#*:}
    certtool --generate-privkey --outfile $f-key.pem 2>/dev/null
    certtool --generate-certificate --load-privkey $f-key.pem --load-ca-certificate ca-cert.pem \
        --load-ca-privkey ca-key.pem --template $t.info --outfile $f-cert.pem 2>/dev/null
done
cp ca-cert.pem srv/; cp ca-cert.pem cli/
psktool -u alice -p psk/keys.psk >/dev/null

x509="--object tls-creds-x509,id=tls0,endpoint=server,dir=$W/srv --tls-creds tls0"
pskargs="--object tls-creds-psk,id=tls0,endpoint=server,dir=$W/psk --tls-creds tls0"
declare -A URI=(
    [plain]="nbd+unix:///?socket=$W/s.sock"
    [x509]="nbds+unix:///?socket=$W/s.sock&tls-certificates=$W/cli"
    [psk]="nbds+unix://alice@/?socket=$W/s.sock&tls-psk-file=$W/psk/keys.psk"
)
declare -A ARGS=([plain]="" [x509]="$x509" [psk]="$pskargs")

median() { sort -n | sed -n 2p; }
printf '%-8s %-8s %10s\n' mode server MiB/s
for mode in plain x509 psk; do
    for srv in qnbd qemu-nbd; do
        rm -f s.sock
        if [ $srv = qnbd ]; then
            # shellcheck disable=SC2086
            "$QNBD" serve -r -f raw -t -k "$W/s.sock" ${ARGS[$mode]} disk.raw 2>/dev/null &
        else
            # shellcheck disable=SC2086
            qemu-nbd -r -f raw -t -k "$W/s.sock" ${ARGS[$mode]} disk.raw 2>/dev/null &
        fi
        pid=$!
        while [ ! -S s.sock ]; do sleep 0.05; done
        nbdcopy --request-size=1048576 --connections=1 "${URI[$mode]}" null: # warm the cache
        mibs=$(for i in 1 2 3; do
            s=$(date +%s.%N)
            nbdcopy --request-size=1048576 --connections=1 "${URI[$mode]}" null:
            e=$(date +%s.%N)
            echo "1024 / ($e - $s)" | bc -l
        done | median)
        printf '%-8s %-8s %10.0f\n' $mode $srv "$mibs"
        kill $pid; wait $pid 2>/dev/null || true
    done
done
