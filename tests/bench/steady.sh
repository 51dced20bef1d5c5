#!/usr/bin/env bash
# A node's footprint over time, on loopback (no root): NODES nodes with
# static peers and one origin take RELEASES releases of SIZE_MIB new bytes
# each; after every release, each node's RSS; then, with nothing under way,
# each node's CPU over WINDOW seconds (percent of one core). Not part of CI.
#
#   tests/bench/steady.sh [NODES] [RELEASES] [SIZE_MIB] [WINDOW]
#
# LANUP=path runs another binary (e.g. an older build, for a comparison).
set -euo pipefail
cd "$(dirname "$0")/../.."
nodes=${1:-8} releases=${2:-12} size_mib=${3:-12} window=${4:-60}
if [ -z "${LANUP:-}" ]; then
  cargo build --quiet --release -p lanup-cli
  LANUP=$PWD/target/release/lanup
fi
work=$(mktemp -d /tmp/lanup-steady.XXXX)
base=$((20000 + RANDOM % 20000))
origin="127.0.0.1:$base"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done
  wait 2> /dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

public=$("$LANUP" keygen --out "$work/publisher.key" 2> /dev/null)
mkdir -p "$work/www"
"$LANUP" origin --dir "$work/www" --listen "$origin" > "$work/origin.log" 2>&1 &
pids+=($!)
for i in $(seq 0 $((nodes - 1))); do
  peers=()
  for j in $(seq 0 $((nodes - 1))); do
    [ "$j" = "$i" ] || peers+=(--peer "/ip4/127.0.0.1/tcp/$((base + 1 + j))")
  done
  "$LANUP" node --state "$work/n$i" --listen "/ip4/127.0.0.1/tcp/$((base + 1 + i))" "${peers[@]}" \
    --no-mdns --origin "http://$origin/" --trust-publisher "$public" --site steady \
    --poll-interval 2s > "$work/n$i.log" 2>&1 &
  pids+=($!)
done
node_pids=("${pids[@]:1}")

for r in $(seq 1 "$releases"); do
  rm -rf "$work/app" "$work/next" && mkdir -p "$work/app"
  head -c $((size_mib << 20)) /dev/urandom > "$work/app/a$r.bin"
  "$LANUP" publish --dir "$work/app" --version "1.0.$r" --app steady --url "http://$origin/" \
    --key "$work/publisher.key" --out "$work/next" > /dev/null 2>&1
  # Files first, the manifest last.
  (cd "$work/next" && find . -type f ! -name 'AutoUpdater.xml*' -exec cp --parents {} "$work/www/" \;)
  cp "$work/next/AutoUpdater.xml.sig" "$work/www/AutoUpdater.xml.sig"
  cp "$work/next/AutoUpdater.xml" "$work/www/AutoUpdater.xml"
  t0=$(date +%s)
  until [ "$(ls -d "$work"/n*/staging/"1.0.$r" 2> /dev/null | wc -l)" -ge "$nodes" ]; do
    [ $(( $(date +%s) - t0 )) -gt 300 ] && { echo "release 1.0.$r not staged everywhere in 300 s" >&2; KEEP=1; exit 1; }
    sleep 0.5
  done
  rss=""
  for p in "${node_pids[@]}"; do rss="$rss $(awk '/VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$p/status")"; done
  echo "release $r staged everywhere after $(( $(date +%s) - t0 )) s; RSS MiB:$rss"
done

sleep 10
tick=$(getconf CLK_TCK)
declare -A t0
for p in "${node_pids[@]}"; do t0[$p]=$(awk '{ print $14 + $15 }' "/proc/$p/stat"); done
sleep "$window"
i=0
for p in "${node_pids[@]}"; do
  t1=$(awk '{ print $14 + $15 }' "/proc/$p/stat")
  awk "BEGIN { printf \"idle cpu node$i: %.2f%% of a core over $window s\n\", 100 * ($t1 - ${t0[$p]}) / $tick / $window }"
  i=$((i + 1))
done
