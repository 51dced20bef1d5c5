#!/usr/bin/env bash
# A release of many small files on loopback (no root): FILES files of
# 1-4 KiB in FILES/100 folders (100,000 by default), published, staged on
# two nodes and applied on one, then a release changing 100 of them.
# Prints publish time beside `tar | zstd -1` of the same tree, the
# manifest's text and compressed size, the origin's requests and bytes,
# each node's peak RSS, and the files copied and downtime of the change.
# Not part of CI.
#
#   tests/bench/small_files.sh [FILES]
#
# LANUP=path runs another binary; WRAP0="heaptrack -o FILE" runs node 0
# under a profiler (WRAP1 node 1).
set -euo pipefail
cd "$(dirname "$0")/../.."
files=${1:-100000}
if [ -z "${LANUP:-}" ]; then
  cargo build --quiet --release -p lanup-cli
  LANUP=$PWD/target/release/lanup
fi
work=$(mktemp -d /tmp/lanup-small.XXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done
  pkill -f "$work/install/bin/app" 2> /dev/null || true
  # A node under a profiler is its child, not in pids.
  pkill -f -- "--state $work/n" 2> /dev/null || true
  wait 2> /dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

# The tree: half random bytes, half text of a few words, seeded.
gen() {
  python3 - "$@" << 'EOF'
import os, random, sys
n, d = int(sys.argv[1]), sys.argv[2]
changed = int(sys.argv[3]) if len(sys.argv) > 3 else None
words = [b"alpha", b"beta", b"gamma", b"config", b"value", b"name", b"=", b"true", b"false"]
def body(r):
    size = r.randint(1024, 4096)
    if r.random() < 0.5:
        return r.randbytes(size)
    out = bytearray()
    while len(out) < size:
        out += r.choice(words) + b" " + str(r.randint(0, 99999)).encode() + b"\n"
    return bytes(out[:size])
folders = max(1, n // 100)
path = lambda i: os.path.join(d, "share", f"dir{i % folders:04d}", f"file{i:06d}.dat")
if changed is None:
    r = random.Random(0)
    for i in range(n):
        os.makedirs(os.path.dirname(path(i)), exist_ok=True)
        open(path(i), "wb").write(body(r))
else:
    r = random.Random(2)
    for i in r.sample(range(n), changed):
        open(path(i), "wb").write(body(r))
EOF
}
mkdir -p "$work/v1/bin" "$work/install" "$work/p"
gen "$files" "$work/v1"
# The application runs under its own name, so lanup finds it to stop it.
cp /bin/sleep "$work/v1/bin/app"
size=$(du -sb --apparent-size "$work/v1/share" | cut -f1)

# Publish beside tar | zstd -1, each into a folder of its own.
t0=$(date +%s.%N)
tar -C "$work" -cf - v1 | zstd -1 -q > "$work/v1.tar.zst"
tar_s=$(echo "$(date +%s.%N) - $t0" | bc)
port=$((20000 + RANDOM % 20000))
url="http://127.0.0.1:$port/"
public=$("$LANUP" keygen --out "$work/publisher.key" 2> /dev/null)
t0=$(date +%s.%N)
"$LANUP" publish --dir "$work/v1" --version 1.0 --app app --app-exe bin/app --url "$url" \
  --key "$work/publisher.key" --out "$work/www" > /dev/null
publish_s=$(echo "$(date +%s.%N) - $t0" | bc)
text=$(stat -c %s "$work/www/AutoUpdater.xml")
packed=$(stat -c %s "$work/www/AutoUpdater.xml.zst")
echo "tree: $files files, $size bytes; publish ${publish_s}s, tar | zstd -1 ${tar_s}s"
echo "manifest: $text bytes of text, $packed compressed"

"$LANUP" origin --dir "$work/www" --listen "127.0.0.1:$port" > "$work/origin.log" 2>&1 &
pids+=($!)
stats() { curl -s "${url}_lanup/stats" | python3 -c "import json, sys; s = json.load(sys.stdin); print(s['requests'], s['bytes_served'])"; }
cat > "$work/lanup.toml" << EOF
[app]
name = "app"
install_dir = "$work/install"
start = ["bin/app", "100000"]
health_after = "300ms"
EOF
node() {
  local i=$1 wrap=
  shift
  [ "$i" = 0 ] && wrap=${WRAP0:-}
  [ "$i" = 1 ] && wrap=${WRAP1:-}
  $wrap "$LANUP" node --state "$work/n$i" --listen "/ip4/127.0.0.1/tcp/$((port + 1 + i))" --no-mdns \
    --peer "/ip4/127.0.0.1/tcp/$((port + 2 - i))" --origin "$url" --trust-publisher "$public" \
    --site small$$ --poll-interval 1h "$@" > "$work/n$i.log" 2>&1 &
  pids+=($!)
}
node 0 --config "$work/lanup.toml"
n0=$!
node 1
n1=$!
wait_staged() {
  local t0 f
  t0=$(date +%s)
  for f in "$work/n0.log" "$work/n1.log"; do
    until grep -q "release staged and verified release=$1 " "$f"; do
      [ $(($(date +%s) - t0)) -gt 1800 ] && { echo "$1 not staged in 1800 s on $f" >&2; exit 1; }
      sleep 0.5
    done
  done
  echo "$1 staged on both nodes in $(($(date +%s) - t0)) s"
}
t0=$(date +%s)
wait_staged 1.0
read -r req1 bytes1 <<< "$(stats)"
echo "1.0 from the origin: $req1 requests, $bytes1 bytes"
hwm() { awk '/VmHWM/ { print int($2 / 1024) }' "/proc/$1/status"; }
echo "peak RSS staging 1.0: node 0 $(hwm $n0) MiB, node 1 $(hwm $n1) MiB"
"$LANUP" apply 1.0 --state "$work/n0" | tail -2

cp -a "$work/v1" "$work/v2"
gen "$files" "$work/v2" 100
t0=$(date +%s.%N)
"$LANUP" publish --dir "$work/v2" --version 2.0 --app app --app-exe bin/app --url "$url" \
  --key "$work/publisher.key" --out "$work/www" > /dev/null
echo "publish of 2.0 (100 files changed): $(echo "$(date +%s.%N) - $t0" | bc)s"
for d in "$work"/www/AutoUpdater.xml.from-*.zst; do
  [ -e "$d" ] && echo "manifest delta: $(stat -c %s "$d") bytes ($(basename "$d"))"
done
"$LANUP" check --state "$work/n1" > /dev/null
wait_staged 2.0
read -r req2 bytes2 <<< "$(stats)"
echo "2.0 (100 files changed) from the origin: $((req2 - req1)) requests, $((bytes2 - bytes1)) bytes"
"$LANUP" apply 2.0 --state "$work/n0" | grep -E "files \(|stop|start|committed"
echo "peak RSS overall: node 0 $(hwm $n0) MiB, node 1 $(hwm $n1) MiB"
