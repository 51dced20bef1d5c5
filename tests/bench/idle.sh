#!/usr/bin/env bash
# What an idle site costs each of its nodes (root): for each size in SIZES,
# a site of that many nodes on the loopback of a network namespace of its
# own, every node peered by address to two bootstrap nodes (TOPOLOGY=star,
# as a site behind a router without multicast) or connected to every other
# node, one connection a pair, the lower dialling (TOPOLOGY=full, as mDNS
# connects a LAN), a 64 KiB release staged at every
# node. After SETTLE seconds at rest, for MEASURE seconds: the CPU each node
# used (mean, and the busiest node), the bytes the site moved on the
# loopback (all traffic in the namespace is the nodes' own, plus the
# fetcher's polls), and each node's RSS. Not part of CI; needs root and
# iproute2.
#
#   tests/bench/idle.sh [SIZES...]            # default: 8 32 64 128
#   LANUP=path/to/lanup TOPOLOGY=full tests/bench/idle.sh 8 32
set -euo pipefail
cd "$(dirname "$0")/../.."
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(8 32 64 128)
topology=${TOPOLOGY:-star} settle=${SETTLE:-40} measure=${MEASURE:-60}
if [ -z "${LANUP:-}" ]; then
  cargo build --quiet --release -p lanup-cli
  LANUP=$PWD/target/release/lanup
fi
work=$(mktemp -d /tmp/lanup-idle.XXXX)
ns="lid$$"
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2> /dev/null || true; done
  wait 2> /dev/null || true
  ip netns pids "$ns" 2> /dev/null | xargs -r kill -9 2> /dev/null || true
  ip netns del "$ns" 2> /dev/null || true
  [ -n "${KEEP:-}" ] && echo "kept $work" >&2 || rm -rf "$work"
}
trap cleanup EXIT
ip netns add "$ns"
ip -n "$ns" link set lo up
in_ns() { ip netns exec "$ns" "$@"; }
hz=$(getconf CLK_TCK)

public=$("$LANUP" keygen --out "$work/publisher.key" 2> /dev/null)
mkdir -p "$work/app"
head -c 65536 /dev/urandom > "$work/app/data.bin"
"$LANUP" publish --dir "$work/app" --version 1.0 --app app --url "http://127.0.0.1:8080/" \
  --key "$work/publisher.key" --out "$work/www" > /dev/null 2>&1
ip netns exec "$ns" "$LANUP" origin --dir "$work/www" --listen 127.0.0.1:8080 > "$work/origin.log" 2>&1 &
pids+=($!)

lo_bytes() { in_ns awk '$1 == "lo:" {print $2}' /proc/net/dev; }
# Every node's CPU ticks read at once, without a process per node (a busy
# machine would stretch the window node by node): into the array ticks.
snapshot() {
  ticks=()
  local p f
  for p in "${node_pids[@]}"; do
    read -r -a f < "/proc/$p/stat"
    ticks+=($((f[13] + f[14])))
  done
}

printf '%-6s %-8s %12s %12s %14s %14s %12s %12s\n' nodes topology "cpu/node %" "busiest %" "LAN B/s/node" "LAN B/s site" "RSS MiB" "peak MiB"
for n in "${sizes[@]}"; do
  node_pids=()
  for i in $(seq 0 $((n - 1))); do
    peers=()
    if [ "$topology" = full ]; then
      for j in $(seq $((i + 1)) $((n - 1))); do peers+=(--peer "/ip4/127.0.0.1/tcp/$((5000 + j))"); done
    else
      for j in 0 1; do [ "$j" = "$i" ] || peers+=(--peer "/ip4/127.0.0.1/tcp/$((5000 + j))"); done
    fi
    ip netns exec "$ns" "$LANUP" node --state "$work/n$n-$i" --listen "/ip4/127.0.0.1/tcp/$((5000 + i))" \
      "${peers[@]}" --no-mdns --site idle --origin "http://127.0.0.1:8080/" \
      --trust-publisher "$public" > "$work/n$n-$i.log" 2>&1 &
    node_pids+=($!)
    pids+=($!)
  done
  deadline=$((SECONDS + 300))
  for i in $(seq 0 $((n - 1))); do
    until [ -d "$work/n$n-$i/staging/1.0" ]; do
      ((SECONDS < deadline)) || { echo "node $i of $n did not stage 1.0 in 300 s" >&2; exit 1; }
      sleep 0.5
    done
  done
  sleep "$settle"
  b0=$(lo_bytes)
  t0=$EPOCHREALTIME
  snapshot
  c0=("${ticks[@]}")
  sleep "$measure"
  snapshot
  t1=$EPOCHREALTIME
  b1=$(lo_bytes)
  window=$(echo "$t1 - $t0" | bc)
  total=0 busiest=0 rss=0 peak=0
  for k in "${!node_pids[@]}"; do
    p=${node_pids[$k]}
    used=$((ticks[k] - c0[k]))
    total=$((total + used))
    ((used > busiest)) && busiest=$used
    rss=$((rss + $(awk '/^VmRSS/ {print $2}' "/proc/$p/status")))
    hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$p/status")
    ((hwm > peak)) && peak=$hwm
  done
  # Loopback counts each byte once (sent and received on lo).
  site_bps=$(((b1 - b0) / measure))
  printf '%-6s %-8s %12s %12s %14s %14s %12s %12s\n' "$n" "$topology" \
    "$(echo "scale=2; $total * 100 / ($hz * $window * $n)" | bc)" \
    "$(echo "scale=2; $busiest * 100 / ($hz * $window)" | bc)" \
    "$((site_bps / n))" "$site_bps" \
    "$(echo "scale=1; $rss / 1024 / $n" | bc)" "$(echo "scale=1; $peak / 1024" | bc)"
  for p in "${node_pids[@]}"; do kill "$p" 2> /dev/null || true; done
  for p in "${node_pids[@]}"; do wait "$p" 2> /dev/null || true; done
done
