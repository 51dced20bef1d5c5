#!/usr/bin/env bash
# Builds lanup's Debian package with Debian's own dpkg-deb: /usr/bin/lanup,
# the systemd unit, /etc/lanup/lanup.toml as a conffile, and maintainer
# scripts that enable or start nothing.
#
#   packaging/deb/build.sh [--binary PATH] [--out DIR] [--compress xz|zstd|gzip]
#
# Without --binary it builds lanup in release mode first. xz (the default)
# makes the smallest package any dpkg installs; zstd builds in a tenth of a
# second for tests (dpkg >= 1.21.18 installs it). The package's
# version is the workspace's; the binary must say the same (lanup --version),
# or nothing is built. Needs dpkg-deb (dpkg), strip and objdump (binutils).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
binary=""
out="$root/target/debian"
compress=xz
while (($#)); do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --compress) compress="$2"; shift 2 ;;
    *) echo "build.sh: unknown argument $1 (use --binary PATH, --out DIR, --compress xz|zstd|gzip)" >&2; exit 2 ;;
  esac
done
for tool in dpkg-deb strip objdump; do
  command -v "$tool" > /dev/null || { echo "build.sh: $tool is missing (apt-get install dpkg binutils)" >&2; exit 1; }
done
version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$root/Cargo.toml")"
[ -n "$version" ] || { echo "build.sh: no version in $root/Cargo.toml [workspace.package]" >&2; exit 1; }
if [ -z "$binary" ]; then
  (cd "$root" && cargo build --release --locked -p lanup-cli --bin lanup)
  binary="$root/target/release/lanup"
fi
says="$("$binary" --version)"
if [ "$says" != "lanup $version" ]; then
  echo "build.sh: $binary says '$says', the workspace is $version" >&2
  exit 1
fi
arch="$(dpkg --print-architecture)"
tree="$(mktemp -d)"
chmod 755 "$tree"
trap 'rm -rf "$tree"' EXIT
install -d "$tree/DEBIAN" "$tree/usr/bin" "$tree/lib/systemd/system" "$tree/etc/lanup" \
  "$tree/usr/share/doc/lanup"
strip -o "$tree/usr/bin/lanup" "$binary"
chmod 755 "$tree/usr/bin/lanup"
install -m 644 "$root/packaging/systemd/lanup.service" "$tree/lib/systemd/system/lanup.service"
install -m 644 "$here/lanup.toml" "$tree/etc/lanup/lanup.toml"
install -m 644 "$root/lanup.sample.toml" "$tree/usr/share/doc/lanup/lanup.sample.toml"
cat > "$tree/usr/share/doc/lanup/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: lanup

Files: *
License: MIT OR Apache-2.0
COPYRIGHT
for script in postinst prerm postrm; do
  install -m 755 "$here/$script" "$tree/DEBIAN/$script"
done
echo /etc/lanup/lanup.toml > "$tree/DEBIAN/conffiles"
# The newest glibc symbol version the binary needs.
glibc="$(objdump -T "$tree/usr/bin/lanup" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -1)"
installed_kib="$(du -sk --exclude=DEBIAN "$tree" | cut -f1)"
cat > "$tree/DEBIAN/control" <<CONTROL
Package: lanup
Version: $version
Architecture: $arch
Maintainer: lanup maintainers <lanup@example.invalid>
Installed-Size: $installed_kib
Depends: libc6 (>= $glibc)
Section: admin
Priority: optional
Homepage: https://example.invalid/lanup
Description: peer-to-peer update distributor for remote sites
 Every machine at a site runs a lanup node. The nodes find each other on
 the LAN; one downloads a signed release from the central origin, the others
 take it from their peers, verifying every chunk; each node then replaces and
 restarts the application it manages and rolls back if it is not healthy.
CONTROL
mkdir -p "$out"
deb="$out/lanup_${version}_${arch}.deb"
dpkg-deb --root-owner-group "-Z$compress" --build "$tree" "$deb" > /dev/null
echo "$deb"
