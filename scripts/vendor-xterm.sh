#!/usr/bin/env bash
# Vendors the dashboard's terminal widget (xterm.js and its fit addon) from the npm
# registry into crates/manager/web/vendor/, where the daemon embeds it at compile time.
# The result is committed: building Vessel and opening the dashboard need neither npm nor
# a CDN. Rerun this only to move to another version (update the pins and hashes below).
set -euo pipefail
cd "$(dirname "$0")/.."

dest=crates/manager/web/vendor
# package@version  sha256 of the tarball npm serves
pins=(
    "@xterm/xterm@5.5.0 bd954fa721872170188cc5d7e83e88db3c83c9a18a4e8d24c2783d26491f59d2"
    "@xterm/addon-fit@0.10.0 917ac44972453d5eed52edc1e50260c76398ce48cf2290c2e60671102bba0b33"
)
command -v npm >/dev/null 2>&1 || {
    echo "vendor-xterm.sh: npm not found: apt-get install npm" >&2
    exit 1
}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$dest"
for pin in "${pins[@]}"; do
    read -r spec sum <<<"$pin"
    tgz=$(cd "$tmp" && npm pack --silent "$spec")
    echo "$sum  $tmp/$tgz" | sha256sum --check --quiet || {
        echo "vendor-xterm.sh: $spec does not match its pinned sha256" >&2
        exit 1
    }
    name=${spec%@*}
    name=${name#@xterm/}
    mkdir -p "$tmp/$name"
    tar xzf "$tmp/$tgz" -C "$tmp/$name"
    case "$name" in
    xterm)
        cp "$tmp/$name/package/lib/xterm.js" "$dest/xterm.js"
        cp "$tmp/$name/package/css/xterm.css" "$dest/xterm.css"
        ;;
    addon-fit)
        cp "$tmp/$name/package/lib/addon-fit.js" "$dest/addon-fit.js"
        ;;
    esac
    cp "$tmp/$name/package/LICENSE" "$dest/LICENSE.$name"
    echo "vendor-xterm.sh: $spec -> $dest"
done
