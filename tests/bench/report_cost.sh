#!/usr/bin/env bash
# What a site's reports to headquarters cost the uplink (root): a site of
# three nodes in one network namespace reports to `lanup origin --reports`
# in another over a veth pair, and every frame to or from the reports port
# is captured there (tcpdump: whole Ethernet frames, both ways: HTTP, TCP,
# IP, connection set-ups). Two phases:
#   rest     nothing changes; a report every INTERVAL (more than reqwest's
#            90 s idle connection, so each opens its own connection, as the
#            hourly report does): bytes per report, scaled to a day at 1 h;
#   rollout  a release published, staged and rolled out on the three nodes
#            in two waves: every report of it, and its bytes.
# Plain HTTP: over https each new connection adds a TLS handshake (a few
# KB, mostly the certificate chain), not measured here. Not part of CI;
# needs root, iproute2 and tcpdump.
#
#   tests/bench/report_cost.sh [INTERVAL]
set -euo pipefail
cd "$(dirname "$0")/../.."
interval=${1:-95s}
command -v tcpdump > /dev/null || { echo "needs tcpdump" >&2; exit 2; }
if [ -z "${LANUP:-}" ]; then
  cargo build --quiet --release -p lanup-cli
  LANUP=$PWD/target/release/lanup
fi
. tests/bench/testbed.sh
id=lrc$$
work=$(mktemp -d /tmp/lanup-report.XXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done
  pkill -f "$work/install" 2> /dev/null || true
  wait 2> /dev/null || true
  testbed_down
  rm -rf "$work"
}
trap cleanup EXIT
linked_pair "$id" 10.98.0

public=$("$LANUP" keygen --out "$work/publisher.key" 2> /dev/null)
admin=$("$LANUP" keygen --out "$work/admin.key" 2> /dev/null)
# The application: a copy of sleep, so its process has the app's name.
release() { # VERSION
  mkdir -p "$work/app/bin"
  cp /bin/sleep "$work/app/bin/app"
  echo "$1" > "$work/app/VERSION"
  "$LANUP" publish --dir "$work/app" --version "$1" --app app --url "http://10.98.0.1:8080/" \
    --key "$work/publisher.key" --out "$work/www" > /dev/null 2>&1
}
release 1.0
ip netns exec "$id-o" "$LANUP" origin --dir "$work/www" --listen 0.0.0.0:8080 > "$work/origin.log" 2>&1 &
pids+=($!)
mkdir -p "$work/hq-www"
ip netns exec "$id-o" "$LANUP" origin --dir "$work/hq-www" --listen 0.0.0.0:8081 --reports "$work/reports" > "$work/hq.log" 2>&1 &
pids+=($!)
ip netns exec "$id-o" tcpdump -i "$id-a" -nn -q -e -l 'tcp port 8081' > "$work/frames" 2> /dev/null &
pids+=($!)
for i in 0 1 2; do
  mkdir -p "$work/install$i"
  cat > "$work/node$i.toml" << EOF
trust_admin = ["$admin"]
[app]
name = "app"
install_dir = "$work/install$i"
start = ["bin/app", "100000"]
health_after = "1s"
EOF
  peers=()
  for j in 0 1 2; do [ "$j" = "$i" ] || peers+=(--peer "/ip4/127.0.0.1/tcp/$((4800 + j))"); done
  ip netns exec "$id-n" "$LANUP" node --config "$work/node$i.toml" --state "$work/node$i" \
    --listen "/ip4/127.0.0.1/tcp/$((4800 + i))" "${peers[@]}" --no-mdns --site branch-7 \
    --origin "http://10.98.0.1:8080/" --trust-publisher "$public" --poll-interval 2s \
    --report-to "http://10.98.0.1:8081/" --report-interval "$interval" > "$work/node$i.log" 2>&1 &
  pids+=($!)
done
taken() { [ -f "$work/reports/history.jsonl" ] && wc -l < "$work/reports/history.jsonl" || echo 0; }
bytes() { awk '{for (i = 1; i < NF; i++) if ($i == "length") { sub(":", "", $(i+1)); s += $(i+1); break }} END {print s + 0}' "$work/frames"; }
for i in 0 1 2; do
  until [ -d "$work/node$i/staging/1.0" ]; do sleep 0.2; done
  ip netns exec "$id-n" "$LANUP" apply 1.0 --state "$work/node$i" > /dev/null
done
echo "site of 3 nodes up, 1.0 installed; waiting for the reports to settle"
sleep 15

# rest: the reports of two intervals, nothing changing.
r0=$(taken) b0=$(bytes)
secs=$(($(echo "$interval" | tr -dc 0-9) * 2 + 5))
sleep "$secs"
r1=$(taken) b1=$(bytes)
n=$((r1 - r0))
((n > 0)) || { echo "no report at rest in $secs s" >&2; exit 1; }
per=$(((b1 - b0) / n))
body=$(tail -1 "$work/reports/history.jsonl" | python3 -c 'import json,sys; print(len(json.dumps(json.load(sys.stdin)["signed"])))')
echo "rest: $n reports in $secs s, $((b1 - b0)) bytes on the link: $per bytes per report (body about $body bytes)"
echo "rest: hourly reports: $((per * 24)) bytes a day = $(echo "scale=4; $per * 24 * 8 * 100 / (64000 * 86400)" | bc)% of a 64 kbit/s link"

# rollout: 2.0 published, staged, rolled out in two waves.
r0=$(taken) b0=$(bytes)
release 2.0
for i in 0 1 2; do until [ -d "$work/node$i/staging/2.0" ]; do sleep 0.2; done; done
ip netns exec "$id-n" "$LANUP" rollout 2.0 --key "$work/admin.key" --state "$work/node0" --waves 1,100% --wait > /dev/null
# How long after the last node committed headquarters' view shows it (the
# fleet view asked over the origin's own loopback, not the veth).
until ip netns exec "$id-o" "$LANUP" fleet --reports http://127.0.0.1:8081/ --json |
  python3 -c 'import json,sys; v=json.load(sys.stdin); sys.exit(0 if v["sites"][0]["versions"].get("2.0") == 3 else 1)'; do
  sleep 0.1
done
seen=$(date +%s.%N)
last=$(grep -h "committed 2.0" "$work"/node*.log | sort | tail -1)
committed=$(date -d "${last%% *}" +%s.%N)
echo "rollout: headquarters showed every node on 2.0 $(echo "$seen - $committed" | bc) s after the last node committed"
sleep 12
r1=$(taken) b1=$(bytes)
echo "rollout: publish to every node installed + 12 s: $((r1 - r0)) reports, $((b1 - b0)) bytes on the link"
