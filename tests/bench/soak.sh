#!/usr/bin/env bash
# Soak on the LAN testbed (root): a site of NODES hosts (mDNS, one origin
# behind a tbf-shaped uplink) takes RELEASES releases back to back, mixed
# full and delta, while a chaos loop SIGKILLs and restarts random nodes
# (never node 0, whose figures show what a long uptime does),
# takes the origin away for a while, and one node serves corrupted chunks
# for a while. At the end: every node staged the last release (checked),
# uplink bytes against the sum of each release's new-chunk bytes, and per
# node RSS, open files and threads at releases 1, 10, 20 and the last, and the
# idle CPU of the nodes between releases. Not part of CI.
#
#   tests/bench/soak.sh [NODES] [RELEASES] [UPLINK] [SIZE_MIB]
set -euo pipefail
cd "$(dirname "$0")/../.."
nodes=${1:-8} releases=${2:-30} uplink=${3:-1mbit} size_mib=${4:-4}
command -v curl > /dev/null || { echo "needs curl" >&2; exit 2; }
cargo build --quiet --release -p lanup-cli
# The corrupting node needs the fault hook, which only debug builds honour.
cargo build --quiet -p lanup-cli
work=$(mktemp -d /tmp/lanup-soak.XXXX)
# Copies: a build during the soak does not change the nodes it restarts.
cp target/release/lanup "$work/lanup"
cp target/debug/lanup "$work/lanup-debug"
lanup=$work/lanup
faulty_lanup=$work/lanup-debug
id="ls$$"
. tests/bench/testbed.sh
cleanup() {
  [ -n "${chaos_pid:-}" ] && kill "$chaos_pid" 2> /dev/null || true
  testbed_down
  [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

testbed_up "$id"
origin_ns="$id-o" origin_ip=10.77.2.2
attach "$origin_ns" "$origin_ip" po
tc -n "$origin_ns" qdisc add dev eth0 root tbf rate "$uplink" burst 32kb latency 100ms
hosts=()
for i in $(seq 0 $((nodes - 1))); do
  attach "$id-h$i" "10.77.2.$((10 + i))" "p$i"
  hosts+=("$id-h$i")
done
served() { in_ns "${hosts[0]}" curl -s -m 5 "http://$origin_ip:8080/_lanup/stats" | sed 's/.*"bytes_served":\([0-9]*\).*/\1/'; }
calc() { awk "BEGIN { printf \"%.3f\", $1 }"; }

public=$("$lanup" keygen --out "$work/publisher.key" 2> /dev/null)
mkdir -p "$work/www" "$work/app/bin"
start_origin() {
  in_ns "$origin_ns" "$lanup" origin --dir "$work/www" --listen "$origin_ip:8080" >> "$work/origin.log" 2>&1 &
}
# Node i, with the fault hook when FAULT is set.
start_node() {
  local i=$1 bin=$lanup env=()
  if [ -n "${2:-}" ]; then bin=$faulty_lanup; env=(LANUP_FAULT_CORRUPT_CHUNKS=1); fi
  env LANUP_LOG=info "${env[@]}" ip netns exec "${hosts[$i]}" "$bin" node --state "$work/n$i" \
    --origin "http://$origin_ip:8080/" --trust-publisher "$public" --site soak \
    --poll-interval 5s >> "$work/n$i.log" 2>&1 &
}
node_pid() { ip netns pids "${hosts[$1]}" | head -1; }

# Release k: odd ones are new files (full), even ones edit 64 KiB of the
# previous one and add a small file (delta).
publish() {
  local k=$1
  if [ $((k % 2)) = 1 ]; then
    head -c $((size_mib << 20)) /dev/urandom > "$work/app/bin/app"
  else
    local at=$(( (RANDOM * 32768 + RANDOM) % ((size_mib << 20) - 65536) ))
    head -c 65536 /dev/urandom | dd of="$work/app/bin/app" bs=1 seek="$at" conv=notrunc status=none
    head -c 20000 /dev/urandom > "$work/app/extra-$k.dat"
  fi
  rm -rf "$work/next" && mkdir -p "$work/next"
  "$lanup" publish --dir "$work/app" --version "1.$k" --app app --url "http://$origin_ip:8080/" \
    --key "$work/publisher.key" --out "$work/next" > /dev/null 2>&1
  # Files first, the manifest last: a node that sees the manifest finds
  # its files.
  find "$work/next" -type f ! -name 'AutoUpdater.xml*' -printf '%P\n' | while read -r f; do
    mkdir -p "$(dirname "$work/www/$f")"; cp "$work/next/$f" "$work/www/$f.tmp"; mv "$work/www/$f.tmp" "$work/www/$f"
  done
  cp "$work/next/AutoUpdater.xml.sig" "$work/www/AutoUpdater.xml.sig.tmp"
  cp "$work/next/AutoUpdater.xml" "$work/www/AutoUpdater.xml.tmp"
  mv "$work/www/AutoUpdater.xml.sig.tmp" "$work/www/AutoUpdater.xml.sig"
  mv "$work/www/AutoUpdater.xml.tmp" "$work/www/AutoUpdater.xml"
}
# Bytes of release k's chunks that release k-1 did not have.
new_bytes() {
  "$lanup" inspect "$work/next" --json > "$work/m$1.json"
  python3 - "$work" "$1" << 'PY'
import json, sys
work, k = sys.argv[1], int(sys.argv[2])
def chunks(n):
    try:
        m = json.load(open(f"{work}/m{n}.json"))
    except FileNotFoundError:
        return {}
    return {c["hash"]: c["size"] for f in m["files"] for c in f.get("chunks", [])}
now, before = chunks(k), chunks(k - 1)
print(sum(s for h, s in now.items() if h not in before))
PY
}
staged_all() { # VERSION
  local n=0
  for i in $(seq 0 $((nodes - 1))); do
    [ -f "$work/n$i/releases/$1/AutoUpdater.xml" ] && n=$((n + 1))
  done
  [ $n = "$nodes" ]
}
sample() { # LABEL
  for i in $(seq 0 $((nodes - 1))); do
    local pid; pid=$(node_pid "$i")
    [ -n "$pid" ] || continue
    echo "$1 node$i rss_kib=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")" \
      "fds=$(ls "/proc/$pid/fd" | wc -l) threads=$(awk '/Threads/ {print $2}' "/proc/$pid/status")" \
      "up_s=$(ps -o etimes= -p "$pid" | tr -d ' ')"
  done | tee -a "$work/samples.txt"
}
idle_cpu() { # percent of a core per node over 60 s, nodes not restarted meanwhile
  local -A t0
  for i in $(seq 0 $((nodes - 1))); do
    local pid; pid=$(node_pid "$i"); [ -n "$pid" ] || continue
    t0[$i]="$pid $(awk '{print $14 + $15}' "/proc/$pid/stat")"
  done
  sleep 60
  for i in "${!t0[@]}"; do
    read -r pid t <<< "${t0[$i]}"
    [ -e "/proc/$pid/stat" ] || continue
    local t1; t1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    echo "node$i $(calc "($t1 - $t) / $(getconf CLK_TCK) / 60 * 100")%"
  done
}

start_origin
for _ in $(seq 50); do served > /dev/null 2>&1 && break; sleep 0.1; done
publish 1
total_new=$(new_bytes 1)
for i in $(seq 0 $((nodes - 1))); do start_node "$i"; done

# The chaos loop: a random node (not node 0) killed (SIGKILL) and restarted
# every 20-40 s; after a while the origin goes away for 90 s; one node
# serves corrupted chunks until it is killed again.
(
  set +e
  round=0
  while [ ! -e "$work/stop-chaos" ]; do
    sleep $((20 + RANDOM % 20))
    [ -e "$work/stop-chaos" ] && break
    round=$((round + 1))
    # Node 0 is never killed: its figures show what weeks of uptime do.
    v=$((1 + RANDOM % (nodes - 1)))
    pid=$(node_pid "$v")
    [ -n "$pid" ] && kill -9 "$pid" && echo "chaos: killed node $v" >> "$work/chaos.log"
    sleep 5
    if [ $round = 4 ]; then
      start_node "$v" corrupt; echo "chaos: node $v restarted serving corrupted chunks" >> "$work/chaos.log"
    else
      start_node "$v"; echo "chaos: node $v restarted" >> "$work/chaos.log"
    fi
    if [ $round = 6 ]; then
      # The origin counts from zero when it starts again: what it served
      # so far is kept.
      served >> "$work/served-earlier"
      for p in $(ip netns pids "$origin_ns"); do kill "$p"; done
      echo "chaos: origin away" >> "$work/chaos.log"
      sleep 90
      start_origin; echo "chaos: origin back" >> "$work/chaos.log"
    fi
  done
) &
chaos_pid=$!

t_begin=$(date +%s)
for k in $(seq 1 "$releases"); do
  if [ "$k" -gt 1 ]; then
    publish "$k"
    total_new=$((total_new + $(new_bytes "$k")))
  fi
  t0=$(date +%s)
  until staged_all "1.$k"; do
    [ $(( $(date +%s) - t0 )) -gt 900 ] && { echo "release 1.$k: not staged everywhere after 900 s" >&2; KEEP=1; exit 1; }
    sleep 1
  done
  echo "release 1.$k staged on all $nodes nodes after $(( $(date +%s) - t0 )) s; origin served $(served) bytes since it last started"
  case $k in 1|10|20|"$releases") sample "release $k";; esac
done
# The chaos stops; once every node has settled, its idle CPU.
touch "$work/stop-chaos"
wait "$chaos_pid" 2> /dev/null || true
chaos_pid=
sleep 30
idle_cpu | sed 's/^/idle cpu (no release under way): /'
for i in $(seq 0 $((nodes - 1))); do
  "$lanup" verify --manifest "$work/www" --dir "$work/n$i/staging/1.$releases" --trust "$public" > /dev/null \
    || { echo "node $i staged wrong bytes" >&2; exit 1; }
done
total=$(( $(served) + $(awk '{ s += $1 } END { print s + 0 }' "$work/served-earlier" 2> /dev/null || echo 0) ))
wire=$(tc -n "$origin_ns" -s qdisc show dev eth0 | grep -o 'Sent [0-9]*' | head -1 | cut -d' ' -f2)
echo "uplink: $wire bytes on the wire (headers included)"
echo "soak: $releases releases in $(( $(date +%s) - t_begin )) s; every node verified on 1.$releases;" \
  "origin served $total bytes for $total_new bytes of new chunks ($(calc "$total / $total_new") x)"
cat "$work/chaos.log"
