#!/usr/bin/env bash
# A node's memory while it rebuilds a large release from patches, on
# loopback (no root): a release of FILES files of FILE_MIB MiB each (1 GiB
# by default), then a new release with a few bytes inserted in each file.
# One node stages the first release, then the second from patches against
# it; prints the bytes it took from the origin, its CPU and its peak RSS
# (VmHWM) while it did. Not part of CI.
#
#   tests/bench/patch_memory.sh [FILES] [FILE_MIB]
#
# LANUP=path runs another binary; LEVEL (default 3) is the publish level.
set -euo pipefail
cd "$(dirname "$0")/../.."
files=${1:-16} file_mib=${2:-64}
if [ -z "${LANUP:-}" ]; then
  cargo build --quiet --release -p lanup-cli
  LANUP=$PWD/target/release/lanup
fi
level=${LEVEL:-3}
work=$(mktemp -d /tmp/lanup-patchmem.XXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done
  wait 2> /dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/old" "$work/new"
for i in $(seq 1 "$files"); do
  head -c $((file_mib << 20)) /dev/urandom > "$work/old/part$i.bin"
done
# The new release: each file with 100 bytes inserted at three places.
python3 - "$work" "$files" << 'EOF'
import os, sys
work, files = sys.argv[1], int(sys.argv[2])
for i in range(1, files + 1):
    data = bytearray(open(f"{work}/old/part{i}.bin", "rb").read())
    for at in (len(data) // 5, len(data) // 2, len(data) * 4 // 5):
        data[at:at] = os.urandom(100)
    open(f"{work}/new/part{i}.bin", "wb").write(data)
EOF

port=$((20000 + RANDOM % 20000))
url="http://127.0.0.1:$port/"
public=$("$LANUP" keygen --out "$work/publisher.key" 2> /dev/null)
mkdir -p "$work/www"
"$LANUP" origin --dir "$work/www" --listen "127.0.0.1:$port" > "$work/origin.log" 2>&1 &
pids+=($!)
served() { curl -s "${url}_lanup/stats" | python3 -c 'import json, sys; print(json.load(sys.stdin)["bytes_served"])'; }
"$LANUP" publish --dir "$work/old" --version 1.0 --app mem --url "$url" --key "$work/publisher.key" \
  --out "$work/www" --level "$level" > /dev/null 2>&1
"$LANUP" node --state "$work/node" --listen "/ip4/127.0.0.1/tcp/$((port + 1))" --no-mdns \
  --origin "$url" --trust-publisher "$public" --site mem --poll-interval 1h > "$work/node.log" 2>&1 &
node=$!
pids+=($node)
wait_staged() {
  local t0
  t0=$(date +%s)
  # Staged means verified: the folder exists while it is being filled.
  until grep -q "release staged and verified release=$1 " "$work/node.log"; do
    [ $(($(date +%s) - t0)) -gt 1800 ] && { echo "$1 not staged in 1800 s" >&2; exit 1; }
    sleep 0.5
  done
}
wait_staged 1.0
hwm_old=$(awk '/VmHWM/ { print $2 }' "/proc/$node/status")
# Peak RSS so far is from staging 1.0; reset it to see 2.0 alone.
echo 5 > "/proc/$node/clear_refs" 2> /dev/null || true
t0=$(date +%s.%N)
"$LANUP" publish --dir "$work/new" --version 2.0 --app mem --url "$url" --key "$work/publisher.key" \
  --out "$work/www" --level "$level" > /dev/null 2>&1
publish_s=$(echo "$(date +%s.%N) - $t0" | bc)
before=$(served)
cpu0=$(awk '{ print $14 + $15 }' "/proc/$node/stat")
"$LANUP" check --state "$work/node" > /dev/null
wait_staged 2.0
cpu=$(awk -v c0="$cpu0" '{ printf "%.1f", ($14 + $15 - c0) / 100 }' "/proc/$node/stat")
hwm=$(awk '/VmHWM/ { print $2 }' "/proc/$node/status")
took=$(($(served) - before))
patches=$(grep -c '<Patch ' "$work/www/AutoUpdater.xml" || true)
echo "release: $files files of $file_mib MiB; $patches patch segments; publish of 2.0 at level $level: ${publish_s}s"
echo "2.0 from the origin: $took bytes; node CPU to stage it: ${cpu}s"
echo "node peak RSS: $((hwm_old / 1024)) MiB while staging 1.0, $((hwm / 1024)) MiB while staging 2.0 from patches"
