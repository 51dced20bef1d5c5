#!/usr/bin/env bash
# Benchmark: how closely `lanup origin --rate` holds its cap over a ~10 s
# transfer, for a byte rate and a bit rate, plus one run with four parallel
# clients sharing the cap. Not part of CI.
#
#   tests/bench/origin_rate.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-3}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
cargo build --quiet --release -p lanup-cli
lanup=target/release/lanup

start_origin() { # RATE -> sets $url and $origin_pid
  "$lanup" origin --dir "$work/www" --listen 127.0.0.1:0 --rate "$1" > "$work/origin.out" 2> /dev/null &
  origin_pid=$!
  pids+=("$origin_pid")
  for _ in $(seq 50); do grep -q http "$work/origin.out" 2>/dev/null && break; sleep 0.1; done
  url=$(grep -o 'http://[^ ]*' "$work/origin.out")
}

mkdir -p "$work/www"
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for spec in "2MiB:2097152" "16mbit:2000000"; do
  rate=${spec%%:*} bps=${spec##*:}
  size=$((bps * 10))
  head -c "$size" /dev/urandom > "$work/www/file.bin"
  start_origin "$rate"
  measured=()
  for _ in $(seq "$runs"); do
    measured+=("$(curl -s -o /dev/null -w '%{speed_download}' "${url}file.bin")")
  done
  m=$(printf '%s\n' "${measured[@]}" | median)
  echo "--rate $rate ($bps B/s): single client, $((size / 1000000)) MB, median of $runs: $(awk -v m=$m -v b=$bps 'BEGIN{printf "%.0f B/s, %+.1f%% of cap", m, (m/b-1)*100}')"
  # Four clients at once share the cap.
  t0=$(date +%s.%N)
  clients=()
  for i in 1 2 3 4; do
    curl -s -o /dev/null -r "$(( (i-1) * size / 4 ))-$(( i * size / 4 - 1 ))" "${url}file.bin" &
    clients+=($!)
  done
  wait "${clients[@]}"
  t1=$(date +%s.%N)
  echo "--rate $rate: four parallel clients, total $(awk -v s=$size -v a=$t0 -v b=$t1 -v bps=$bps 'BEGIN{r=s/(b-a); printf "%.0f B/s, %+.1f%% of cap", r, (r/bps-1)*100}')"
  echo "origin stats: $(curl -s "${url}_lanup/stats")"
  kill "$origin_pid"; wait "$origin_pid" 2>/dev/null || true
done
