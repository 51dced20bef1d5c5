#!/usr/bin/env bash
# How long lanup takes to update itself across a site, on loopback (no
# root): NODES nodes run OLD (each from its own copy, as from /usr/bin),
# NEW is published as a lanup release, staged everywhere, and rolled out in
# WAVES; the time is from the rollout command to every node reporting the
# new lanup (`lanup rollout --wait`), then each node's pid, binary and
# version are checked. Not part of CI.
#
#   OLD=path NEW=path tests/bench/self_update.sh [NODES] [WAVES] [RUNS]
#
# NEW must say a newer version than OLD (`lanup --version`), e.g. a build of
# the workspace with its version raised.
set -euo pipefail
cd "$(dirname "$0")/../.."
nodes=${1:-6} waves=${2:-1,100%} runs=${3:-3}
old=${OLD:?OLD=path of the running lanup} new=${NEW:?NEW=path of the newer lanup}
new_version=$("$new" --version | awk '{print $2}')
for run in $(seq "$runs"); do
  work=$(mktemp -d /tmp/lanup-self.XXXX)
  base=$((20000 + RANDOM % 20000))
  origin="127.0.0.1:$base"
  pids=()
  cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done
    wait 2> /dev/null || true
    rm -rf "$work"
  }
  trap cleanup EXIT
  public=$("$old" keygen --out "$work/publisher.key" 2> /dev/null)
  admin=$("$old" keygen --out "$work/admin.key" 2> /dev/null)
  mkdir -p "$work/www" "$work/release"
  cp "$new" "$work/release/lanup"
  "$old" publish --dir "$work/release" --version "$new_version" --app lanup --url "http://$origin/" \
    --key "$work/publisher.key" --out "$work/www" > /dev/null 2>&1
  "$old" origin --dir "$work/www" --listen "$origin" > "$work/origin.log" 2>&1 &
  pids+=($!)
  for i in $(seq 0 $((nodes - 1))); do
    peers=()
    for j in $(seq 0 $((nodes - 1))); do
      [ "$j" = "$i" ] || peers+=(--peer "/ip4/127.0.0.1/tcp/$((base + 1 + j))")
    done
    mkdir -p "$work/bin$i"
    cp "$old" "$work/bin$i/lanup"
    "$work/bin$i/lanup" node --state "$work/n$i" --listen "/ip4/127.0.0.1/tcp/$((base + 1 + i))" \
      "${peers[@]}" --no-mdns --origin "http://$origin/" --trust-publisher "$public" \
      --trust-admin "$admin" --site self > "$work/n$i.log" 2>&1 &
    pids+=($!)
  done
  until [ "$(ls -d "$work"/n*/staging/"$new_version" 2> /dev/null | wc -l)" -ge "$nodes" ]; do sleep 0.3; done
  sleep 2
  t0=$(date +%s.%N)
  "$old" rollout "$new_version" --key "$work/admin.key" --state "$work/n0" --waves "$waves" --wait \
    --timeout 5m > "$work/rollout.log" 2>&1
  took=$(echo "$(date +%s.%N) - $t0" | bc)
  ok=0
  for i in $(seq 0 $((nodes - 1))); do
    pid=${pids[$((i + 1))]}
    if [ "$(readlink "/proc/$pid/exe")" = "$work/bin$i/lanup" ] && cmp -s "$work/bin$i/lanup" "$new" \
      && "$old" status --state "$work/n$i" --json | python3 -c "import json,sys; s=json.load(sys.stdin); sys.exit(0 if [n['lanup_version'] for n in s['nodes'] if n.get('self')] == ['$new_version'] else 1)"; then
      ok=$((ok + 1))
    fi
  done
  echo "run $run: lanup $new_version rolled out to $nodes nodes in waves $waves: ${took} s; $ok of $nodes nodes run it in the same process"
  cleanup
  trap - EXIT
done
