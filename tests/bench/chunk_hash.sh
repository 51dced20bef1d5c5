#!/usr/bin/env bash
# Benchmark: chunk + hash a 1 GiB file with lanup's chunker, next to
# `b3sum --num-threads 1` on the same file in the same run, and the peak RSS
# of each. Not part of CI.
#
#   tests/bench/chunk_hash.sh [SIZE_MIB] [RUNS]
#
# Needs b3sum (`cargo install b3sum`) and /usr/bin/time.
set -euo pipefail
cd "$(dirname "$0")/../.."
size_mib=${1:-1024}
runs=${2:-5}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
file=$work/release.bin
head -c "$((size_mib * 1024 * 1024))" /dev/urandom > "$file"
cargo build --quiet --release -p lanup-protocol --example digest
digest=target/release/examples/digest

# Warm the page cache so both read from memory.
cat "$file" > /dev/null

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
lanup_times=() b3_times=() lanup_rss=() b3_rss=()
for i in $(seq "$runs"); do
  # Alternate the two so drift on a shared machine hits both alike.
  /usr/bin/time -v -o "$work/t1" "$digest" "$file" > "$work/o1"
  /usr/bin/time -v -o "$work/t2" b3sum --num-threads 1 "$file" > "$work/o2"
  lanup_times+=("$(awk '/Elapsed/ {n=split($NF,p,":"); s=0; for(i=1;i<=n;i++) s=s*60+p[i]; print s}' "$work/t1")")
  b3_times+=("$(awk '/Elapsed/ {n=split($NF,p,":"); s=0; for(i=1;i<=n;i++) s=s*60+p[i]; print s}' "$work/t2")")
  lanup_rss+=("$(awk '/Maximum resident/ {print $NF}' "$work/t1")")
  b3_rss+=("$(awk '/Maximum resident/ {print $NF}' "$work/t2")")
  # Same whole-file hash as b3sum prints.
  [ "$(awk '{print $NF}' "$work/o1")" = "$(awk '{print $1}' "$work/o2")" ] || { echo "hash differs from b3sum"; exit 1; }
done
bytes=$((size_mib * 1024 * 1024))
lt=$(printf '%s\n' "${lanup_times[@]}" | median)
bt=$(printf '%s\n' "${b3_times[@]}" | median)
lr=$(printf '%s\n' "${lanup_rss[@]}" | sort -n | tail -1)
br=$(printf '%s\n' "${b3_rss[@]}" | sort -n | tail -1)
echo "file: $size_mib MiB, $runs runs each, medians of wall time"
echo "lanup chunk+hash : $(awk -v b=$bytes -v t=$lt 'BEGIN{printf "%.0f MB/s (%.2f s)", b/t/1e6, t}'), peak RSS $((lr / 1024)) MiB"
echo "b3sum 1 thread   : $(awk -v b=$bytes -v t=$bt 'BEGIN{printf "%.0f MB/s (%.2f s)", b/t/1e6, t}'), peak RSS $((br / 1024)) MiB"
ratios=$(for i in "${!lanup_times[@]}"; do awk -v a="${lanup_times[$i]}" -v b="${b3_times[$i]}" 'BEGIN{printf "%.3f\n", b/a}'; done)
echo "ratio lanup/b3sum: $(awk -v a=$lt -v b=$bt 'BEGIN{printf "%.2f", b/a}') of medians; per-run ratios $(echo $ratios), median $(echo "$ratios" | median) (the issue asks >= 1.00)"
echo "$(cat "$work/o1")"
