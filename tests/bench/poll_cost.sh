#!/usr/bin/env bash
# What the fetcher's polling costs the uplink (root): a node in one network
# namespace polls `lanup origin` in another over a veth pair every INTERVAL
# while nothing changes; the veth's byte counters (whole Ethernet frames,
# both ways: HTTP, TCP, IP, connection set-ups) are divided by the polls
# the origin answered, and scaled to a day at the default interval. The
# stats requests this script makes go over the origin's loopback, not the
# veth. Not part of CI.
#
#   tests/bench/poll_cost.sh [INTERVAL] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
interval=${1:-2s} seconds=${2:-120}
if [ -z "${LANUP:-}" ]; then
  cargo build --quiet --release -p lanup-cli
  LANUP=$PWD/target/release/lanup
fi
. tests/bench/testbed.sh
id=lpc$$
work=$(mktemp -d /tmp/lanup-poll.XXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done
  wait 2> /dev/null || true
  testbed_down
  rm -rf "$work"
}
trap cleanup EXIT
linked_pair "$id" 10.97.0

public=$("$LANUP" keygen --out "$work/publisher.key" 2> /dev/null)
mkdir -p "$work/app" "$work/www"
head -c 300000 /dev/urandom > "$work/app/data"
"$LANUP" publish --dir "$work/app" --version 1.0 --app demo --url "http://10.97.0.1:8080/" \
  --key "$work/publisher.key" --out "$work/www" > /dev/null 2>&1
ip netns exec "$id-o" "$LANUP" origin --dir "$work/www" --listen 0.0.0.0:8080 > "$work/origin.log" 2>&1 &
pids+=($!)
ip netns exec "$id-n" "$LANUP" node --state "$work/node" --listen /ip4/127.0.0.1/tcp/0 --no-mdns \
  --origin "http://10.97.0.1:8080/" --trust-publisher "$public" --poll-interval "$interval" \
  > "$work/node.log" 2>&1 &
pids+=($!)
until [ -d "$work/node/staging/1.0" ]; do sleep 0.2; done
sleep 3
bytes() {
  ip netns exec "$id-n" cat "/sys/class/net/$id-b/statistics/rx_bytes" "/sys/class/net/$id-b/statistics/tx_bytes" |
    paste -sd+ | bc
}
requests() {
  ip netns exec "$id-o" bash -c 'exec 3<>/dev/tcp/127.0.0.1/8080; printf "GET /_lanup/stats HTTP/1.0\r\n\r\n" >&3; cat <&3' |
    sed -n 's/.*"requests":\([0-9]*\).*/\1/p'
}
b0=$(bytes) r0=$(requests)
sleep "$seconds"
b1=$(bytes) r1=$(requests)
# Each poll asks for the manifest and for the fleet rollout file beside it.
polls=$(((r1 - r0) / 2))
per=$(( (b1 - b0) / polls ))
echo "polling every $interval for $seconds s: $polls polls, $((b1 - b0)) bytes on the link, $per bytes per poll"
for every in 60 300; do
  day=$((86400 / every * per))
  echo "every ${every}s: $day bytes a day = $(echo "scale=3; $day * 8 * 100 / (64000 * 86400)" | bc)% of a 64 kbit/s link"
done
