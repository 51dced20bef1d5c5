#!/usr/bin/env bash
# Benchmark on the LAN testbed (root): for each site size, one testbed of
# NODES hosts on a bridge with real mDNS, the origin behind a tbf-shaped
# uplink, and in the same run:
#   floor   one download of the release through the uplink (curl): S at the
#           link's TCP payload rate;
#   cold    nodes started after the release is published: first start to
#           every node staged;
#   steady  nodes running, a new release published, `lanup check` on a node
#           that is not the fetcher: the check to every node staged, and the
#           tail (the fetcher's last origin byte to every node staged);
#   delta   the same with a release that differs by three 64 KiB edits;
#   join    a new release, and a node started 3 s into its download: every
#           node staged, the origin's bytes;
#   proxy   every host downloads the release through nginx proxy_cache (the
#           cache lock on) on one more LAN host, cold cache.
# Origin bytes are counted by `lanup origin` for every lanup figure.
# All hosts share this machine's disk, so N nodes syncing their staged
# files at the same moment wait for one disk doing N disks' work; DISK=tmpfs
# puts the run on memory instead, as if each host had a disk of its own.
# Not part of CI; needs root, iproute2, nginx and curl.
#
#   tests/bench/sizes.sh [NODESxMIB ...]      # default: 6x16 8x64 16x64
#   UPLINK=16mbit tests/bench/sizes.sh 8x64
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v nginx > /dev/null || { echo "needs nginx (apt-get install -y nginx-light)" >&2; exit 2; }
command -v curl > /dev/null || { echo "needs curl" >&2; exit 2; }
uplink=${UPLINK:-16mbit}
sizes=("$@")
((${#sizes[@]})) || sizes=(6x16 8x64 16x64)
cargo build --quiet --release -p lanup-cli
lanup=$PWD/target/release/lanup
. tests/bench/testbed.sh

now() { date +%s.%N; }
calc() { awk "BEGIN { printf \"%.2f\", $1 }"; }
# The time of the first (or, with LAST=1, the last) log line matching RE in
# the files.
stamp() {
  local re=$1; shift
  local line
  if [ -n "${LAST:-}" ]; then line=$(grep -h -- "$re" "$@" | sort | tail -1); else line=$(grep -h -- "$re" "$@" | sort | head -1); fi
  date -d "${line%% *}" +%s.%N
}

run_size() {
  local nodes=$1 mib=$2
  local work id
  work=$(mktemp -d /tmp/lanup-sizes.XXXX)
  id="ls$$"
  [ "${DISK:-}" = tmpfs ] && mount -t tmpfs -o size=75% "lanup-sizes" "$work"
  # shellcheck disable=SC2064
  trap "testbed_down; umount '$work' 2> /dev/null; [ -n '${KEEP:-}' ] || rm -rf '$work'" EXIT
  testbed_up "$id"
  local origin_ns="$id-o" origin_ip=10.77.1.2 proxy_ns="$id-p" proxy_ip=10.77.1.9
  attach "$origin_ns" "$origin_ip" po
  tc -n "$origin_ns" qdisc add dev eth0 root tbf rate "$uplink" burst 32kb latency 100ms
  attach "$proxy_ns" "$proxy_ip" pp
  local hosts=() i
  for i in $(seq 0 "$nodes"); do # one more host, for the node that joins
    attach "$id-h$i" "10.77.1.$((10 + i))" "p$i"
    hosts+=("$id-h$i")
  done
  served() { in_ns "${hosts[0]}" curl -s "http://$origin_ip:8080/_lanup/stats" | sed 's/.*"bytes_served":\([0-9]*\).*/\1/'; }

  mkdir -p "$work/app/bin" "$work/www"
  local public
  public=$("$lanup" keygen --out "$work/publisher.key" 2> /dev/null)
  echo "level = 1" > "$work/app/app.conf"
  publish() { # VERSION
    "$lanup" publish --dir "$work/app" --version "$1" --app app --url "http://$origin_ip:8080/" \
      --key "$work/publisher.key" --out "$work/www" > /dev/null 2>&1
  }
  head -c $((mib << 20)) /dev/urandom > "$work/app/bin/app"
  publish 1.0
  local S
  S=$(stat -c %s "$work/app/bin/app" "$work/app/app.conf" | awk '{s+=$1} END {print s}')
  in_ns "$origin_ns" "$lanup" origin --dir "$work/www" --listen "$origin_ip:8080" > /dev/null 2> "$work/origin.log" &
  for _ in $(seq 50); do served > /dev/null 2>&1 && break; sleep 0.1; done

  # floor: one download of S through the uplink.
  local t0 floor
  t0=$(now)
  in_ns "${hosts[0]}" curl -s -o /dev/null "http://$origin_ip:8080/bin/app"
  floor=$(calc "($(now) - $t0) * $S / $(stat -c %s "$work/app/bin/app")")

  start_node() { # I
    LANUP_LOG=info in_ns "${hosts[$1]}" "$lanup" node --state "$work/n$1" \
      --origin "http://$origin_ip:8080/" --trust-publisher "$public" --site bench \
      --poll-interval 1h 2>> "$work/n$1.log" &
  }
  # Waits until nodes 0..N-1 logged VERSION staged; prints when the last did.
  wait_staged() { # VERSION N
    local n=$2 staged deadline
    deadline=$(calc "$(now) + 900")
    while :; do
      staged=0
      for i in $(seq 0 $((n - 1))); do
        grep -q "release staged and verified release=$1 " "$work/n$i.log" 2> /dev/null && staged=$((staged + 1))
      done
      [ "$staged" = "$n" ] && break
      [ "$(calc "($(now) > $deadline)")" = "1.00" ] && { echo "$1: timed out with $staged of $n staged" >&2; exit 1; }
      sleep 0.05
    done
    local logs=()
    for i in $(seq 0 $((n - 1))); do logs+=("$work/n$i.log"); done
    LAST=1 stamp "release staged and verified release=$1 " "${logs[@]}"
  }
  verify_all() { # VERSION N
    for i in $(seq 0 $(($2 - 1))); do
      "$lanup" verify --manifest "$work/www" --dir "$work/n$i/staging/$1" --trust "$public" > /dev/null \
        || { echo "node $i staged wrong bytes of $1" >&2; exit 1; }
    done
  }
  # A node that is not the fetcher (the check's point is that any node works).
  not_fetcher() {
    for i in $(seq 0 $((nodes - 1))); do
      "$lanup" status --state "$work/n$i" --json | python3 -c '
import json, sys
own = [n for n in json.load(sys.stdin)["nodes"] if n.get("self")]
sys.exit(0 if own and own[0].get("fetcher") is False else 1)' && { echo "$i"; return; }
    done
    echo 0
  }
  # Times a release published while the nodes run, picked up by a check.
  rollout() { # VERSION
    publish "$1"
    local before checker t0 done_at fin
    before=$(served)
    checker=$(not_fetcher)
    t0=$(now)
    "$lanup" check --state "$work/n$checker" > /dev/null
    done_at=$(wait_staged "$1" "$nodes")
    verify_all "$1" "$nodes"
    fin=$(LAST=1 stamp "download from the origin finished" "$work"/n*.log)
    echo "$(calc "$done_at - $t0") $(calc "($(served) - $before) / $S") $(calc "$done_at - $fin") $checker"
  }

  # cold: every node started after the release was published.
  local before first cold_done cold
  before=$(served)
  for i in $(seq 0 $((nodes - 1))); do start_node "$i"; done
  cold_done=$(wait_staged 1.0 "$nodes")
  verify_all 1.0 "$nodes"
  first=$(stamp "node starting" "$work"/n*.log)
  cold="$(calc "$cold_done - $first") $(calc "($(served) - $before) / $S")"
  sleep 2

  # steady: a new release, checked from a node that is not the fetcher.
  head -c $((mib << 20)) /dev/urandom > "$work/app/bin/app"
  local steady delta join
  steady=$(rollout 2.0)
  sleep 2
  # delta: three 64 KiB edits.
  for at in 0.2 0.5 0.8; do
    head -c 65536 /dev/urandom | dd of="$work/app/bin/app" bs=65536 seek="$(awk -v m=$mib -v a=$at 'BEGIN {printf "%d", m * 16 * a}')" conv=notrunc status=none
  done
  delta=$(rollout 3.0)
  sleep 2
  # join: a new release; one more node starts 3 s into its download.
  head -c $((mib << 20)) /dev/urandom > "$work/app/bin/app"
  publish 4.0
  before=$(served)
  t0=$(now)
  "$lanup" check --state "$work/n$(not_fetcher)" > /dev/null
  sleep 3
  start_node "$nodes"
  local join_done
  join_done=$(wait_staged 4.0 $((nodes + 1)))
  verify_all 4.0 $((nodes + 1))
  join="$(calc "$join_done - $t0") $(calc "($(served) - $before) / $S")"
  for ns in "${hosts[@]}"; do for p in $(ip netns pids "$ns"); do kill "$p" 2> /dev/null || true; done; done
  sleep 1

  # proxy: every host through a caching proxy, cold cache.
  caching_proxy "$proxy_ns" "$work/nginx" "$proxy_ip:8081" "http://$origin_ip:8080"
  sleep 1
  before=$(served)
  t0=$(now)
  local pids=()
  for i in $(seq 0 $((nodes - 1))); do
    in_ns "${hosts[$i]}" curl -s -o "$work/proxy-$i.bin" "http://$proxy_ip:8081/bin/app" &
    pids+=($!)
  done
  wait "${pids[@]}"
  local proxy good=0
  proxy="$(calc "$(now) - $t0") $(calc "($(served) - $before) / $(stat -c %s "$work/app/bin/app")")"
  for i in $(seq 0 $((nodes - 1))); do cmp -s "$work/proxy-$i.bin" "$work/app/bin/app" && good=$((good + 1)); done
  [ "$good" = "$nodes" ] || { echo "proxy: $good of $nodes copies intact" >&2; exit 1; }

  read -r c_t c_b <<< "$cold"
  read -r s_t s_b s_tail s_who <<< "$steady"
  read -r d_t d_b d_tail _ <<< "$delta"
  read -r j_t j_b <<< "$join"
  read -r p_t p_b <<< "$proxy"
  echo "== $nodes nodes x $mib MiB, uplink $uplink, disk ${DISK:-shared}: floor ${floor}s (S = $S bytes)"
  echo "steady  ${s_t}s = floor + $(calc "$s_t - $floor")s, proxy ${p_t}s (lanup - proxy $(calc "$s_t - $p_t")s); tail ${s_tail}s; origin ${s_b} x S; checked on node $s_who"
  echo "cold    ${c_t}s = floor + $(calc "$c_t - $floor")s; origin ${c_b} x S"
  local d_floor
  d_floor=$(calc "$d_b * $floor")
  echo "delta   ${d_t}s = its floor (${d_b} x S: ${d_floor}s) + $(calc "$d_t - $d_floor")s (a proxy moves the whole file again: ${p_t}s); tail ${d_tail}s"
  echo "join    ${j_t}s = floor + $(calc "$j_t - $floor")s with a node started 3 s into the download; origin ${j_b} x S"
  echo "proxy   ${p_t}s = floor + $(calc "$p_t - $floor")s; origin ${p_b} x S"
  testbed_down
  if [ -n "${KEEP:-}" ]; then
    [ "${DISK:-}" = tmpfs ] && cp -r "$work" "$work.kept" && umount "$work" && work=$work.kept
    echo "logs kept in $work"
  else
    umount "$work" 2> /dev/null || true
    rm -rf "$work"
  fi
  trap - EXIT
}

for size in "${sizes[@]}"; do
  run_size "${size%x*}" "${size#*x}"
done
