#!/usr/bin/env bash
# How far `lanup status` lags behind what nodes do (root): a site of NODES
# nodes on the loopback of a network namespace of its own (static peers to
# two bootstrap nodes) stages 1.0, then 2.0 is published while `lanup
# status --json` is asked of node 0 every few milliseconds. For each node:
# when its own log says it staged 2.0, and when node 0's status first
# showed it staged; the lag between the two, median and worst. Then the
# same for an apply (`lanup apply 2.0` on the last node: committed in its
# log against "installed" in node 0's status). Not part of CI; needs root,
# iproute2 and python3.
#
#   tests/bench/status_lag.sh [NODES]
set -euo pipefail
cd "$(dirname "$0")/../.."
nodes=${1:-6}
if [ -z "${LANUP:-}" ]; then
  cargo build --quiet --release -p lanup-cli
  LANUP=$PWD/target/release/lanup
fi
work=$(mktemp -d /tmp/lanup-lag.XXXX)
ns="llg$$"
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2> /dev/null || true; done
  wait 2> /dev/null || true
  ip netns pids "$ns" 2> /dev/null | xargs -r kill -9 2> /dev/null || true
  ip netns del "$ns" 2> /dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
ip netns add "$ns"
ip -n "$ns" link set lo up

public=$("$LANUP" keygen --out "$work/publisher.key" 2> /dev/null)
release() { # VERSION SEED
  mkdir -p "$work/app/bin"
  cp /bin/sleep "$work/app/bin/app"
  head -c 2000000 /dev/urandom > "$work/app/data.bin"
  "$LANUP" publish --dir "$work/app" --version "$1" --app app --url "http://127.0.0.1:8080/" \
    --key "$work/publisher.key" --out "$work/www" > /dev/null 2>&1
}
release 1.0
ip netns exec "$ns" "$LANUP" origin --dir "$work/www" --listen 127.0.0.1:8080 > "$work/origin.log" 2>&1 &
pids+=($!)
for i in $(seq 0 $((nodes - 1))); do
  mkdir -p "$work/install$i"
  cat > "$work/node$i.toml" << EOF
[app]
name = "app"
install_dir = "$work/install$i"
start = ["bin/app", "100000"]
health_after = "1s"
EOF
  peers=()
  for j in 0 1; do [ "$j" = "$i" ] || peers+=(--peer "/ip4/127.0.0.1/tcp/$((5100 + j))"); done
  ip netns exec "$ns" "$LANUP" node --config "$work/node$i.toml" --state "$work/n$i" \
    --listen "/ip4/127.0.0.1/tcp/$((5100 + i))" "${peers[@]}" --no-mdns --site lag \
    --origin "http://127.0.0.1:8080/" --trust-publisher "$public" --poll-interval 1s \
    > "$work/n$i.log" 2>&1 &
  pids+=($!)
done
for i in $(seq 0 $((nodes - 1))); do
  until [ -d "$work/n$i/staging/1.0" ]; do sleep 0.2; done
done
sleep 5
release 2.0
ip netns exec "$ns" python3 - "$LANUP" "$work" "$nodes" << 'EOF'
import json, re, statistics, subprocess, sys, time
from datetime import datetime
lanup, work, n = sys.argv[1], sys.argv[2], int(sys.argv[3])

def status():
    out = subprocess.run([lanup, "status", "--state", f"{work}/n0", "--json"],
                         capture_output=True, text=True).stdout
    return json.loads(out)["nodes"]

def log_time(i, pattern):
    for line in open(f"{work}/n{i}.log"):
        if re.search(pattern, line):
            return datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()
    return None

def peer_of(i):
    for line in open(f"{work}/n{i}.log"):
        m = re.search(r"node starting peer=(\S+)", line)
        if m:
            return m.group(1)

def watch(done, count, deadline_s=120):
    first = {}
    end = time.time() + deadline_s
    while len(first) < count and time.time() < end:
        at = time.time()
        for node in status():
            if node["peer_id"] not in first and done(node):
                first[node["peer_id"]] = at
        time.sleep(0.005)
    return first

def report(what, seen, pattern, which):
    lags = []
    for i in which:
        t = log_time(i, pattern)
        p = peer_of(i)
        if t is not None and p in seen:
            lags.append((seen[p] - t) * 1000)
    lags.sort()
    print(f"{what}: {len(lags)} nodes; lag of node 0's status behind each node's log: "
          f"median {statistics.median(lags):.0f} ms, worst {lags[-1]:.0f} ms")

seen = watch(lambda node: node.get("staged_version") == "2.0", n)
report("staged 2.0", seen, r"release staged and verified release=2\.0", range(n))
last = n - 1
subprocess.Popen([lanup, "apply", "2.0", "--state", f"{work}/n{last}"],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
seen = watch(lambda node: node.get("installed_version") == "2.0" and node.get("state") == "installed", 1, 60)
report("installed 2.0", seen, r"committed 2\.0", [last])
EOF
