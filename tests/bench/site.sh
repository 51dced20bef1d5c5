#!/usr/bin/env bash
# Benchmark on the LAN testbed (root): a site of NODES hosts in network
# namespaces on a bridge, the origin behind a tbf-shaped uplink. Measures, in
# one run on one testbed:
#   1. lanup: time until every node is connected to every other, origin bytes
#      / S, time from the fetcher's announcement to all staged vs S/W;
#   2. naive: every host downloads the release itself through the uplink;
#   3. proxy: every host downloads through nginx proxy_cache (cache lock on)
#      on one more LAN host;
#   4. one pair of nodes moving a BIG release over the unshaped LAN: the
#      peak RSS of each node and the LAN throughput from one peer.
# Not part of CI; needs root, iproute2, nginx and curl.
#
#   tests/bench/site.sh [NODES] [SIZE_MIB] [UPLINK] [BIG_MIB]
#   ONLY_BIG=1 tests/bench/site.sh      # part 4 alone
#   ONLY_LANUP=1 tests/bench/site.sh    # part 1 alone (no nginx needed)
#   TIMEOUT=1800 ONLY_LANUP=1 tests/bench/site.sh 4 8 64kbit   # a slow uplink
#   TREE=dir ONLY_LANUP=1 tests/bench/site.sh 4 0 16mbit       # the folder dir as the release
#   BASE=old TREE=new ONLY_LANUP=1 tests/bench/site.sh 4 0 64kbit
#       an update: every node stages old as 1.0 over an unshaped link, then
#       new is published as 2.0 (patches from 1.0) and measured
set -euo pipefail
cd "$(dirname "$0")/../.."
nodes=${1:-8} size_mib=${2:-64} uplink=${3:-16mbit} big_mib=${4:-1024}
[ -n "${ONLY_LANUP:-}" ] || command -v nginx > /dev/null || { echo "needs nginx (apt-get install -y nginx-light)" >&2; exit 2; }
command -v curl > /dev/null || { echo "needs curl" >&2; exit 2; }
cargo build --quiet --release -p lanup-cli
lanup=$PWD/target/release/lanup
work=$(mktemp -d /tmp/lanup-bench.XXXX)
id="lb$$"
. tests/bench/testbed.sh
cleanup() {
  testbed_down
  rm -rf "$work"
}
trap cleanup EXIT

# --- testbed -----------------------------------------------------------------
testbed_up "$id"
origin_ns="$id-o" origin_ip=10.77.1.2
attach "$origin_ns" "$origin_ip" po
tc -n "$origin_ns" qdisc add dev eth0 root tbf rate "$uplink" burst 32kb latency 100ms
proxy_ns="$id-p" proxy_ip=10.77.1.9
attach "$proxy_ns" "$proxy_ip" pp
hosts=()
for i in $(seq 0 $((nodes - 1))); do
  attach "$id-h$i" "10.77.1.$((10 + i))" "p$i"
  hosts+=("$id-h$i")
done
served() { in_ns "${hosts[0]}" curl -s "http://$origin_ip:8080/_lanup/stats" | sed 's/.*"bytes_served":\([0-9]*\).*/\1/'; }
now() { date +%s.%N; }
calc() { awk "BEGIN { printf \"%.3f\", $1 }"; }
# The time of the first log line containing TEXT in FILE, in seconds.
stamp() { date -d "$(grep -h "$1" "$2" | head -1 | sed 's/^\([^ ]*\).*/\1/')" +%s.%N; }

# --- release -----------------------------------------------------------------
mkdir -p "$work/app/bin" "$work/www"
if [ -n "${TREE:-}" ]; then
  # A release of the folder TREE (e.g. many small files) instead.
  cp -a "$TREE/." "$work/app/"
else
  head -c $((size_mib << 20)) /dev/urandom > "$work/app/bin/app"
  echo "level = 1" > "$work/app/app.conf"
fi
public=$("$lanup" keygen --out "$work/publisher.key" 2> /dev/null)
publish() {
  "$lanup" publish --dir "$1" --version "$2" --app app --url "http://$origin_ip:8080/" \
    --key "$work/publisher.key" --out "$work/www" > /dev/null 2>&1
}
ver=1.0
if [ -n "${BASE:-}" ]; then
  mkdir -p "$work/base"
  cp -a "$BASE/." "$work/base/"
  publish "$work/base" 1.0
  ver=2.0
else
  publish "$work/app" 1.0
fi
S=$(find "$work/app" -type f -printf '%s\n' | awk '{s+=$1} END {print s}')
rate_bps=$(awk -v u="$uplink" 'BEGIN {
  n = u + 0; s = tolower(u); sub(/^[0-9.]+/, "", s);
  m = (s == "kbit") ? 1e3 : (s == "mbit") ? 1e6 : (s == "gbit") ? 1e9 : 8;
  printf "%d", n * m / 8 }')
in_ns "$origin_ns" "$lanup" origin --dir "$work/www" --listen "$origin_ip:8080" > /dev/null 2> "$work/origin.log" &
for _ in $(seq 50); do served > /dev/null 2>&1 && break; sleep 0.1; done
echo "release: $S bytes; uplink $uplink = $rate_bps B/s; S/W = $(calc "$S / $rate_bps") s; $nodes nodes"

if [ -z "${ONLY_BIG:-}" ]; then
# --- 1. lanup ----------------------------------------------------------------
# Waits until every node logged that it staged release $1.
wait_staged() {
  local t0 staged
  t0=$(now)
  while :; do
    staged=0
    for i in $(seq 0 $((nodes - 1))); do
      grep -q "release staged and verified release=$1 " "$work/n$i.log" 2> /dev/null && staged=$((staged + 1))
    done
    [ $staged = "$nodes" ] && break
    [ "$(calc "($(now) - $t0 > ${TIMEOUT:-600})")" = "1.000" ] && { echo "lanup: $1 timed out" >&2; exit 1; }
    sleep 0.1
  done
}
# The base crosses an unshaped link: only the update is measured.
[ -n "${BASE:-}" ] && tc -n "$origin_ns" qdisc del dev eth0 root
before=$(served)
t_start=$(now)
for i in $(seq 0 $((nodes - 1))); do
  LANUP_LOG=info in_ns "${hosts[$i]}" "$lanup" node --state "$work/n$i" \
    --origin "http://$origin_ip:8080/" --trust-publisher "$public" --site bench \
    --poll-interval 1h 2> "$work/n$i.log" &
done
if [ -n "${BASE:-}" ]; then
  wait_staged 1.0
  tc -n "$origin_ns" qdisc add dev eth0 root tbf rate "$uplink" burst 32kb latency 100ms
  publish "$work/app" 2.0
  before=$(served)
  t_check=$(now)
  "$lanup" check --state "$work/n0" > /dev/null
fi
wait_staged "$ver"
t_staged=$(now)
lanup_bytes=$(($(served) - before))
announced=$(grep -h "release announced.*release=$ver " "$work"/n*.log | sed 's/^\([^ ]*\).*/\1/' | sort | head -1)
t_announce=$(date -d "$announced" +%s.%N)
# Connected: from the first node's start to the moment the last node had
# found all the others ("peer found" lines, one per peer).
first_start=$(for i in $(seq 0 $((nodes - 1))); do stamp "node starting" "$work/n$i.log"; done | sort -n | head -1)
all_found=$(for i in $(seq 0 $((nodes - 1))); do
  date -d "$(grep -h "peer found" "$work/n$i.log" | sed -n "$((nodes - 1))p" | sed 's/^\([^ ]*\).*/\1/')" +%s.%N
done | sort -n | tail -1)
connected=$(calc "$all_found - $first_start")
lanup_time=$(calc "$t_staged - $t_announce")
for i in $(seq 0 $((nodes - 1))); do
  "$lanup" verify --manifest "$work/www" --dir "$work/n$i/staging/$ver" --trust "$public" > /dev/null \
    || { echo "node $i staged wrong bytes" >&2; exit 1; }
done
fetchers=$(grep -l "downloading release from the origin release=$ver " "$work"/n*.log | wc -l)
echo "lanup: all $nodes connected after ${connected}s; all staged ${lanup_time}s after the announcement" \
  "($(calc "$lanup_time / ($S / $rate_bps)") x S/W); origin bytes $lanup_bytes = $(calc "$lanup_bytes / $S") x S;" \
  "$fetchers node(s) downloaded"
# The manifest crosses before the announcement: from the check, it counts.
[ -n "${BASE:-}" ] && echo "update: all staged $(calc "$t_staged - $t_check")s after lanup check;" \
  "its uplink bytes take $(calc "$lanup_bytes / $rate_bps")s at the link's rate"
for ns in "${hosts[@]}"; do for p in $(ip netns pids "$ns"); do kill "$p" 2> /dev/null || true; done; done
sleep 1
[ -n "${ONLY_LANUP:-}" ] && exit 0

# --- 2. naive: every host downloads it ---------------------------------------
before=$(served)
t0=$(now)
for ns in "${hosts[@]}"; do
  in_ns "$ns" curl -s -o /dev/null "http://$origin_ip:8080/bin/app" &
done
while [ -n "$(for ns in "${hosts[@]}"; do ip netns pids "$ns"; done)" ]; do sleep 0.1; done
naive_time=$(calc "$(now) - $t0")
naive_bytes=$(($(served) - before))
echo "naive: ${naive_time}s, origin bytes $naive_bytes = $(calc "$naive_bytes / $S") x S"

# --- 3. a caching proxy on the LAN -------------------------------------------
caching_proxy "$proxy_ns" "$work/nginx" "$proxy_ip:8081" "http://$origin_ip:8080"
sleep 1
before=$(served)
t0=$(now)
for ns in "${hosts[@]}"; do
  in_ns "$ns" curl -s -o "$work/proxy-$ns.bin" "http://$proxy_ip:8081/bin/app" &
done
while [ -n "$(for ns in "${hosts[@]}"; do ip netns pids "$ns"; done)" ]; do sleep 0.1; done
proxy_time=$(calc "$(now) - $t0")
proxy_bytes=$(($(served) - before))
good=0
for ns in "${hosts[@]}"; do cmp -s "$work/proxy-$ns.bin" "$work/app/bin/app" && good=$((good + 1)); done
rm -f "$work"/proxy-*.bin
echo "proxy: ${proxy_time}s, origin bytes $proxy_bytes = $(calc "$proxy_bytes / $S") x S ($good of $nodes copies intact)"
echo "lanup vs naive: time $(calc "$lanup_time / $naive_time"), uplink bytes $(calc "$lanup_bytes / $naive_bytes")"
echo "lanup vs proxy: time $(calc "$lanup_time / $proxy_time"), uplink bytes $(calc "$lanup_bytes / $proxy_bytes")"
for p in $(ip netns pids "$proxy_ns"); do kill "$p" 2> /dev/null || true; done

fi # ONLY_BIG

# --- 4. a big release between two nodes on the unshaped LAN ------------------
tc -n "$origin_ns" qdisc del dev eth0 root
rm -rf "$work/www" "$work/app"
mkdir -p "$work/big/bin" "$work/bigwww"
head -c $((big_mib << 20)) /dev/urandom > "$work/big/bin/app"
"$lanup" publish --dir "$work/big" --version 2.0 --app app --url "http://$origin_ip:8080/" \
  --key "$work/publisher.key" --out "$work/bigwww" > /dev/null 2>&1
for p in $(ip netns pids "$origin_ns"); do kill "$p" 2> /dev/null || true; done
sleep 0.5
in_ns "$origin_ns" "$lanup" origin --dir "$work/bigwww" --listen "$origin_ip:8080" > /dev/null 2> "$work/origin2.log" &
sleep 1
# The node with an origin fetches it alone; then a node without an origin
# joins and takes everything from that one peer over the LAN.
LANUP_LOG=info in_ns "${hosts[0]}" "$lanup" node --state "$work/b0" --origin "http://$origin_ip:8080/" \
  --trust-publisher "$public" --site big --poll-interval 1h 2> "$work/b0.log" &
until grep -q "release staged and verified" "$work/b0.log" 2> /dev/null; do sleep 0.2; done
LANUP_LOG=info in_ns "${hosts[1]}" "$lanup" node --state "$work/b1" \
  --trust-publisher "$public" --site big --poll-interval 1h 2> "$work/b1.log" &
until grep -q "release staged and verified" "$work/b1.log" 2> /dev/null; do sleep 0.2; done
# Each node is the only process in its namespace.
hwm() { awk '/VmHWM/ {print int($2 / 1024)}' "/proc/$(ip netns pids "$1" | head -1)/status"; }
rss0=$(hwm "${hosts[0]}") rss1=$(hwm "${hosts[1]}")
t_a=$(stamp "release announced" "$work/b1.log")
t_s=$(stamp "release staged and verified" "$work/b1.log")
big_s=$((big_mib << 20))
secs=$(calc "$t_s - $t_a")
"$lanup" verify --manifest "$work/bigwww" --dir "$work/b1/staging/2.0" --trust "$public" > /dev/null \
  || { echo "the peer staged wrong bytes" >&2; exit 1; }
echo "big ($big_mib MiB): peak RSS fetcher ${rss0} MiB (origin download, then serving), peer ${rss1} MiB (LAN download);" \
  "the peer took ${secs}s from announcement to staged = $(calc "$big_s / $secs / 1048576") MiB/s from one peer, assembly included"
