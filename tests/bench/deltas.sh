#!/usr/bin/env bash
# What crosses the uplink for real release pairs from public registries
# (downloaded here, not committed), on loopback (no root). For each pair:
#   S            bytes of the new release
#   zstd19       every file of the new release, zstd -19 (summed)
#   patch_from   every changed file, zstd -19 --long --patch-from=old (new
#                files zstd -19), summed: the reference with a base
#   before       lanup's plain chunks the old release lacks (today)
#   with_base    what a real node holding the old release took from the
#                origin for the files (all it took less what it read for
#                the manifest), and its CPU to stage it
#   manifest     the new manifest, compressed, with its signature: what a
#                node without the old one reads for it
#   mf_delta     what the node holding the old manifest read for it (the
#                manifest delta and the signature)
#   no_base      what a fresh node took
#   publish      time of `lanup publish` of the new release over the old
#                (patches from it, packed chunks), and lanup-store's size
# Not part of CI.
#
#   tests/bench/deltas.sh [PAIR...]      (default: every pair below)
#
# CORPUS=dir keeps the downloads (default /tmp/lanup-corpus); LANUP=path
# runs another binary; LEVEL=n publishes at another zstd level; SELF_OLD
# and SELF_NEW add lanup's own update (see below).
set -euo pipefail
cd "$(dirname "$0")/../.."
corpus=${CORPUS:-/tmp/lanup-corpus}
if [ -z "${LANUP:-}" ]; then
  cargo build --quiet --release -p lanup-cli
  LANUP=$PWD/target/release/lanup
fi
level=${LEVEL:-19}
mkdir -p "$corpus"

# name  kind  package  old  new  [extra]
pairs=(
  "ruff-exe pypi-win ruff 0.8.0 0.8.1"
  "esbuild-exe npm @esbuild/win32-x64 0.24.0 0.24.1"
  "numpy-dlls pypi-win numpy 2.1.2 2.1.3"
  "django-py pypi django 5.1.3 5.1.4"
  "typescript-js npm typescript 5.6.2 5.6.3"
  "tzdata-data pypi tzdata 2024.1 2024.2"
)
# lanup's own update: SELF_OLD=path SELF_NEW=path add the pair lanup-self
# (two builds of lanup, e.g. of two commits with the version raised).
if [ -n "${SELF_OLD:-}" ] && [ -n "${SELF_NEW:-}" ]; then
  self_old=$("$SELF_OLD" --version | awk '{print $2}')
  self_new=$("$SELF_NEW" --version | awk '{print $2}')
  rm -rf "$corpus/lanup-self"
  pairs+=("lanup-self self lanup $self_old $self_new")
fi

# Downloads and unpacks one version into $corpus/NAME/VERSION.
fetch() {
  local name=$1 kind=$2 package=$3 version=$4
  local dir="$corpus/$name/$version"
  [ -d "$dir" ] && return
  local dl="$corpus/$name/dl-$version"
  rm -rf "$dl" && mkdir -p "$dl"
  case $kind in
    pypi-win)
      pip download --quiet --no-deps --only-binary=:all: --platform win_amd64 \
        --python-version 3.12 -d "$dl" "$package==$version" ;;
    pypi)
      pip download --quiet --no-deps --only-binary=:all: -d "$dl" "$package==$version" ;;
    npm)
      (cd "$dl" && npm pack --silent "$package@$version" > /dev/null) ;;
    self)
      if [ "$version" = "$self_old" ]; then cp "$SELF_OLD" "$dl/lanup"; else cp "$SELF_NEW" "$dl/lanup"; fi ;;
  esac
  mkdir -p "$dir.part"
  for f in "$dl"/*; do
    case $f in
      *.whl) python3 -m zipfile -e "$f" "$dir.part" ;;
      *.tgz) tar xzf "$f" -C "$dir.part" ;;
      *) cp "$f" "$dir.part/" ;;
    esac
  done
  chmod -R u+rwX,go+rX "$dir.part"
  mv "$dir.part" "$dir"
  rm -rf "$dl"
}

# Sum of the sizes of the files under a folder.
size_of() { find "$1" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }'; }

# zstd -19 of every file of the new release, summed.
zstd_alone() {
  (cd "$1" && find . -type f -print0 | xargs -0 -n1 sh -c 'zstd -q -19 -c "$0" | wc -c') |
    awk '{ s += $1 } END { print s + 0 }'
}

# zstd -19 --long --patch-from for every changed file, from the old file of
# the same path or else of the same name (folders named after the version,
# as wheels have), as lanup publish picks it; new files zstd -19 alone.
zstd_patch_from() {
  local old=$1 new=$2 total=0 n base
  while IFS= read -r -d '' f; do
    base="$old/$f"
    [ -f "$base" ] || base=$(find "$old" -type f -name "$(basename "$f")" -print -quit)
    if [ -n "$base" ] && [ -f "$base" ]; then
      cmp -s "$base" "$new/$f" && continue
      n=$(zstd -q -19 --long=30 --patch-from="$base" -c "$new/$f" 2> /dev/null | wc -c)
    else
      n=$(zstd -q -19 -c "$new/$f" | wc -c)
    fi
    total=$((total + n))
  done < <(cd "$new" && find . -type f -print0)
  echo "$total"
}

# Bytes of the new manifest's chunks that the old one lacks.
plain_delta() {
  python3 - "$1" "$2" << 'EOF'
import sys, xml.etree.ElementTree as ET
def chunks(p):
    return {c.get("Hash"): int(c.get("Size")) for c in ET.parse(p).iter("Chunk")}
old, new = chunks(sys.argv[1]), chunks(sys.argv[2])
print(sum(s for h, s in new.items() if h not in old))
EOF
}

# utime + stime of a process, in seconds.
cpu_of() { awk '{ printf "%.2f", ($14 + $15) / 100 }' "/proc/$1/stat"; }

# Body bytes the origin served so far.
# (The count grows as answers finish: read until it holds still.)
served() {
  local a="" b
  b=$(curl -s "${url}_lanup/stats" | python3 -c 'import json, sys; print(json.load(sys.stdin)["bytes_served"])')
  until [ "$a" = "$b" ]; do
    sleep 1
    a=$b
    b=$(curl -s "${url}_lanup/stats" | python3 -c 'import json, sys; print(json.load(sys.stdin)["bytes_served"])')
  done
  echo "$b"
}

# The manifest and its signature, which each fetch of a release reads.
# (a node reads the compressed copy when there is one).
manifest_bytes() {
  local m="$work/www/AutoUpdater.xml"
  [ -f "$m.zst" ] && m="$m.zst"
  cat "$m" "$work/www/AutoUpdater.xml.sig" | wc -c
}
# What a node holding 1.0's manifest reads for 2.0's: the delta from it
# when publish wrote one (the only base is 1.0), else the whole.
manifest_delta_bytes() {
  local d
  d=$(find "$work/www" -maxdepth 1 -name 'AutoUpdater.xml.from-*.zst' -print -quit)
  if [ -n "$d" ]; then
    cat "$d" "$work/www/AutoUpdater.xml.sig" | wc -c
  else
    manifest_bytes
  fi
}

wait_staged() {
  local state=$1 version=$2 t0
  t0=$(date +%s)
  # Staged means verified: the folder exists while it is being filled.
  until grep -q "release staged and verified release=$version " "$state.log"; do
    [ $(($(date +%s) - t0)) -gt 900 ] && { echo "$version not staged in 900 s" >&2; return 1; }
    sleep 0.2
  done
}

printf '%-14s %11s %9s %9s %9s %9s %9s %9s %8s %8s %9s %9s %9s\n' pair S zstd19 patch_from before with_base no_base ratio_pf publish cpu_node store manifest mf_delta
selected=("$@")
for pair in "${pairs[@]}"; do
  read -r name kind package old new <<< "$pair"
  if ((${#selected[@]})) && [[ ! " ${selected[*]} " == *" $name "* ]]; then continue; fi
  fetch "$name" "$kind" "$package" "$old"
  fetch "$name" "$kind" "$package" "$new"
  old_dir="$corpus/$name/$old" new_dir="$corpus/$name/$new"
  work=$(mktemp -d /tmp/lanup-deltas.XXXX)
  pids=()
  port=$((20000 + RANDOM % 20000))
  url="http://127.0.0.1:$port/"
  public=$("$LANUP" keygen --out "$work/publisher.key" 2> /dev/null)
  mkdir -p "$work/www"
  "$LANUP" origin --dir "$work/www" --listen "127.0.0.1:$port" > "$work/origin.log" 2>&1 &
  pids+=($!)
  "$LANUP" publish --dir "$old_dir" --version 1.0 --app bench --url "$url" --key "$work/publisher.key" \
    --out "$work/www" --level "$level" 2> /dev/null > /dev/null
  cp "$work/www/AutoUpdater.xml" "$work/old.xml"
  node() {
    "$LANUP" node --state "$work/$1" --listen "/ip4/127.0.0.1/tcp/$2" --no-mdns \
      --origin "$url" --trust-publisher "$public" --site "$1" --poll-interval 1h > "$work/$1.log" 2>&1 &
    pids+=($!)
  }
  node based $((port + 1))
  based_pid=${pids[-1]}
  wait_staged "$work/based" 1.0
  before_bytes=$(served)
  t0=$(date +%s.%N)
  "$LANUP" publish --dir "$new_dir" --version 2.0 --app bench --url "$url" --key "$work/publisher.key" \
    --out "$work/www" --level "$level" 2> "$work/publish.log" > /dev/null
  publish_s=$(echo "$(date +%s.%N) - $t0" | bc)
  cpu0=$(cpu_of "$based_pid")
  "$LANUP" check --state "$work/based" > /dev/null
  wait_staged "$work/based" 2.0
  sleep 1
  cpu_node=$(echo "$(cpu_of "$based_pid") - $cpu0" | bc)
  manifest_read=$(manifest_delta_bytes)
  with_base=$(($(served) - before_bytes - manifest_read))
  before_bytes=$(served)
  node fresh $((port + 2))
  wait_staged "$work/fresh" 2.0
  sleep 1
  no_base=$(($(served) - before_bytes - $(manifest_bytes)))
  S=$(size_of "$new_dir")
  z19=$(zstd_alone "$new_dir")
  pf=$(zstd_patch_from "$old_dir" "$new_dir")
  plain=$(plain_delta "$work/old.xml" "$work/www/AutoUpdater.xml")
  store=$(du -sb "$work/www/lanup-store" | cut -f1)
  printf '%-14s %11d %9d %9d %9d %9d %9d %9s %7.1fs %7.1fs %9d %9d %9d\n' "$name" "$S" "$z19" "$pf" "$plain" \
    "$with_base" "$no_base" "$(echo "scale=3; $with_base / ($pf + 1)" | bc)" "$publish_s" "$cpu_node" "$store" \
    "$(manifest_bytes)" "$manifest_read"
  for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done
  wait 2> /dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$work"
done
