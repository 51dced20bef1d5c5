#!/usr/bin/env bash
# Builds lanup's Windows installer (an MSI) with wixl, from Debian's
# msitools: lanup.exe under Program Files, the `lanup` service registered
# and disabled until configured, lanup.sample.toml beside it.
#
#   packaging/windows/build.sh [--exe PATH] [--out DIR]
#
# Without --exe it builds lanup.exe in release mode for
# x86_64-pc-windows-gnu first (rustup's target, Debian's
# gcc-mingw-w64-x86-64). The exe is stripped into the package. Prints the
# MSI's path. Needs wixl (apt-get install wixl) and
# x86_64-w64-mingw32-strip (binutils-mingw-w64-x86-64).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
exe=""
out="$root/target/windows-msi"
while (($#)); do
  case "$1" in
    --exe) exe="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "build.sh: unknown argument $1 (use --exe PATH, --out DIR)" >&2; exit 2 ;;
  esac
done
for tool in wixl x86_64-w64-mingw32-strip; do
  command -v "$tool" > /dev/null || { echo "build.sh: $tool is missing (apt-get install wixl binutils-mingw-w64-x86-64)" >&2; exit 1; }
done
version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$root/Cargo.toml")"
[ -n "$version" ] || { echo "build.sh: no version in $root/Cargo.toml [workspace.package]" >&2; exit 1; }
if [ -z "$exe" ]; then
  (cd "$root" && cargo build --release --locked --target x86_64-pc-windows-gnu -p lanup-cli --bin lanup)
  exe="$root/target/x86_64-pc-windows-gnu/release/lanup.exe"
fi
tree="$(mktemp -d)"
trap 'rm -rf "$tree"' EXIT
x86_64-w64-mingw32-strip -o "$tree/lanup.exe" "$exe"
cp "$root/lanup.sample.toml" "$tree/lanup.sample.toml"
# wixl finds sources by names relative to the folder it runs in.
sed -e "s|@VERSION@|$version|" -e "s|@EXE@|lanup.exe|" -e "s|@SAMPLE@|lanup.sample.toml|" \
  "$here/lanup.wxs" > "$tree/lanup.wxs"
mkdir -p "$out"
msi="$(cd "$out" && pwd)/lanup-$version-x64.msi"
(cd "$tree" && wixl --arch x64 -o "$msi" lanup.wxs)
echo "$msi"
