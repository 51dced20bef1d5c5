#!/usr/bin/env bash
# lanup's package under a real systemd. Boots a Debian root (made once with
# debootstrap) as a container with systemd-nspawn on the host's network,
# installs the package, configures it with `lanup setup` against an origin
# on the host's loopback, and measures:
#   - what the package enables and starts by itself (nothing);
#   - `systemctl enable --now lanup` until READY=1 (Type=notify);
#   - the node's RSS and CPU under systemd once idle (over WINDOW s);
#   - with NEW=path of a newer lanup binary: that lanup published as a lanup
#     release and rolled out; the service's main pid, restarts and version
#     after it;
#   - the watchdog: a frozen node (SIGSTOP) restarted by systemd;
#   - `systemctl stop lanup`.
# Needs root, debootstrap and systemd-container. Not part of CI.
#
#   tests/bench/service.sh [DEB] [WINDOW]     (NEW=path to try a lanup update)
set -euo pipefail
cd "$(dirname "$0")/../.."
deb=${1:-}
window=${2:-60}
root=${ROOTFS:-/var/tmp/lanup-nspawn-root}
host_lanup=${LANUP:-$PWD/target/release/lanup}
if [ -z "$deb" ]; then
  deb=$(packaging/deb/build.sh)
fi
[ -d "$root/usr" ] || debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,procps \
  bookworm "$root" http://deb.debian.org/debian > /dev/null
work=$(mktemp -d /tmp/lanup-service.XXXX)
port=$((20000 + RANDOM % 20000))
pids=()
nspawn=""
cleanup() {
  [ -z "$nspawn" ] || kill "$nspawn" 2> /dev/null || true
  for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done
  wait 2> /dev/null || true
  rm -rf "$work" "$root/opt/demo" "$root/root/lanup.deb" "$root/root/admin.key"
}
trap cleanup EXIT
now() { date +%s.%N; }
began=$(date +%s)
since() { echo "$(now) - $1" | bc; }

# The origin, on the host, with a release of a small application.
public=$("$host_lanup" keygen --out "$work/publisher.key" 2> /dev/null)
admin=$("$host_lanup" keygen --out "$work/admin.key" 2> /dev/null)
mkdir -p "$work/www" "$work/app/bin"
head -c 8388608 /dev/urandom > "$work/app/bin/data"
printf '#!/bin/sh\nwhile :; do sleep 5; done\n' > "$work/app/bin/demo"
chmod 755 "$work/app/bin/demo"
"$host_lanup" publish --dir "$work/app" --version 1.0.0 --app demo --url "http://127.0.0.1:$port/" \
  --key "$work/publisher.key" --out "$work/www" > /dev/null
"$host_lanup" origin --dir "$work/www" --listen "127.0.0.1:$port" > "$work/origin.log" 2>&1 &
pids+=($!)

# The machine: its own systemd as pid 1.
systemd-nspawn -D "$root" --boot --register=no --keep-unit > "$work/boot.log" 2>&1 &
nspawn=$!
inside() { nsenter --target "$init" --mount --uts --ipc --pid -- "$@"; }
for _ in $(seq 100); do
  init=$(pgrep -P "$nspawn" | head -1 || true)
  if [ -n "$init" ] && inside systemctl is-system-running 2> /dev/null | grep -qE 'running|degraded'; then
    break
  fi
  sleep 0.3
done
echo "container booted (its systemd is host pid $init)"

# A clean machine: an earlier run's package, configuration and state go.
inside dpkg --purge lanup > /dev/null 2>&1 || true
cp "$deb" "$root/root/lanup.deb"
inside dpkg -i /root/lanup.deb | sed 's/^/  dpkg: /'
echo "after install: enabled=$(inside systemctl is-enabled lanup || true) active=$(inside systemctl is-active lanup || true)"
echo "installed size: $(inside dpkg-query -W -f='${Installed-Size}' lanup) KiB; package: $(stat -c %s "$deb") bytes"
mkdir -p "$root/opt/demo"
inside lanup setup --origin "http://127.0.0.1:$port/" --trust-publisher "$public" --trust-admin "$admin" \
  --site service-bench --app-name demo --install-dir /opt/demo --start bin/demo | sed 's/^/  setup: /'

t=$(now)
inside systemctl enable --now lanup 2> /dev/null
echo "enable --now until READY=1: $(since "$t") s; active=$(inside systemctl is-active lanup)"
for _ in $(seq 200); do
  inside lanup status --json | grep -q '"staged_version":"1.0.0"' && break
  sleep 0.3
done
echo "staged 1.0.0: $(since "$t") s after the start"
inside lanup apply 1.0.0 | tail -1 | sed 's/^/  apply: /'
inside journalctl -u lanup --since "@$began" --no-pager -o short-precise | grep -E "READY|node starting|staged" | head -5 | sed 's/^/  journal: /'

sleep 30
main=$(inside systemctl show -p MainPID --value lanup)
stat_cpu() { inside cat "/proc/$main/stat" | awk '{print $14 + $15}'; }
c0=$(stat_cpu)
sleep "$window"
c1=$(stat_cpu)
tck=$(getconf CLK_TCK)
echo "idle under systemd: RSS $(inside grep VmRSS "/proc/$main/status" | awk '{print $2}') KiB, CPU $(echo "scale=3; ($c1 - $c0) * 100 / $tck / $window" | bc) % of a core over $window s, threads $(inside ls "/proc/$main/task" | wc -l), fds $(inside ls "/proc/$main/fd" | wc -l)"

if [ -n "${NEW:-}" ]; then
  new_version=$("$NEW" --version | awk '{print $2}')
  mkdir -p "$work/new"
  cp "$NEW" "$work/new/lanup"
  rm -rf "$work/www"/*
  "$host_lanup" publish --dir "$work/new" --version "$new_version" --app lanup --url "http://127.0.0.1:$port/" \
    --key "$work/publisher.key" --out "$work/www" > /dev/null
  inside lanup check > /dev/null
  for _ in $(seq 300); do
    inside lanup status --json | grep -q "\"staged_version\":\"$new_version\"" && break
    sleep 0.3
  done
  cp "$work/admin.key" "$root/root/admin.key"
  t=$(now)
  inside lanup rollout "$new_version" --key /root/admin.key --waves 100% --wait --timeout 5m | tail -1 | sed 's/^/  rollout: /'
  sleep 2
  echo "lanup $new_version rolled out under systemd in $(since "$t") s: main pid $main -> $(inside systemctl show -p MainPID --value lanup), restarts $(inside systemctl show -p NRestarts --value lanup), active=$(inside systemctl is-active lanup), /usr/bin/lanup says '$(inside /usr/bin/lanup --version)'"
  inside lanup status | sed 's/^/  status: /'
  inside systemctl status lanup --no-pager | head -4 | sed 's/^/  systemctl: /'
  inside journalctl -u lanup --since "@$began" --no-pager -o cat -p notice | tail -3 | sed 's/^/  journal (notice and worse): /'
  inside journalctl -u lanup --since "@$began" --no-pager -o short-precise | grep -E "upgrade|hand over" | sed 's/^/  journal: /'
  main=$(inside systemctl show -p MainPID --value lanup)
fi

restarts=$(inside systemctl show -p NRestarts --value lanup)
t=$(now)
inside kill -STOP "$main"
for _ in $(seq 300); do
  [ "$(inside systemctl show -p NRestarts --value lanup)" != "$restarts" ] && break
  sleep 0.5
done
echo "frozen node restarted by the watchdog after $(since "$t") s (WatchdogSec=30s): restarts $restarts -> $(inside systemctl show -p NRestarts --value lanup), main pid $main -> $(inside systemctl show -p MainPID --value lanup)"
for _ in $(seq 100); do
  [ "$(inside systemctl is-active lanup)" = active ] && break
  sleep 0.3
done
t=$(now)
inside systemctl stop lanup
echo "systemctl stop: $(since "$t") s; the application still runs: $(inside pgrep -x demo > /dev/null && echo yes || echo no)"
inside systemctl poweroff 2> /dev/null || true
