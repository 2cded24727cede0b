#!/usr/bin/env bash
# Builds the Ferry test guest from Debian packages only: the kernel of
# linux-image-cloud-amd64 and a busybox-static initramfs holding the virtio
# modules that kernel needs and ./init (the workload). No downloads.
#
#   tests/interop/guests/build.sh [BUILD_DIR]      (default: <repo>/build/guest)
#
# The result lands in BUILD_DIR/<kernel release>-<digest of this script and
# init>/ (vmlinuz, initrd.img, kernel-release); a rerun with the same inputs
# finds it there and only prints its path. The last line of stdout is always
# that directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
build_root=${1:-$repo/build/guest}

# The Debian packages: installed when root, else the one command that does it.
"$repo/.ci/system-packages" >&2

release=$(dpkg-query -W -f='${Depends}' linux-image-cloud-amd64 |
    sed -n 's/.*linux-image-\([^ ,]*-cloud-amd64\).*/\1/p')
[ -n "$release" ] || { echo "cannot tell the kernel of linux-image-cloud-amd64" >&2; exit 1; }
kernel=/boot/vmlinuz-$release
moddir=/lib/modules/$release
[ -r "$kernel" ] || { echo "$kernel is missing or unreadable" >&2; exit 1; }

digest=$(cat "$here/build.sh" "$here/init" | sha256sum | cut -c1-16)
out=$build_root/$release-$digest
if [ -f "$out/initrd.img" ] && [ -f "$out/vmlinuz" ]; then
    echo "$out"
    exit 0
fi

# What the guest needs: virtio over PCI, virtio-blk, ext4 (with crc32c for its
# checksums). Whatever this kernel builds in needs nothing; the rest is copied
# with every dependency modules.dep names, loaded dependencies first.
wanted=(virtio_pci virtio_blk ext4 crc32c_generic)
declare -A seen=()
order=()
module_path() {
    grep -E "^(kernel/)?([^:]*/)?$1\.ko(\.[a-z]+)?:" "$moddir/modules.dep" | cut -d: -f1 || true
}
builtin() {
    grep -qE "(^|/)$1\.ko$" "$moddir/modules.builtin"
}
add_module() {
    local rel=$1 deps dep
    [ -n "${seen[$rel]:-}" ] && return 0
    seen[$rel]=1
    deps=$(grep -E "^$rel:" "$moddir/modules.dep" | cut -d: -f2)
    # modules.dep lists dependencies so that loading them last-to-first works.
    for dep in $(echo "$deps" | tr ' ' '\n' | tac); do
        add_module "$dep"
    done
    order+=("$rel")
}
for name in "${wanted[@]}"; do
    if builtin "$name"; then
        continue
    fi
    rel=$(module_path "$name")
    [ -n "$rel" ] || { echo "$name is neither built into $release nor a module" >&2; exit 1; }
    add_module "$rel"
done

mkdir -p "$build_root"
work=$(mktemp -d "$build_root/.tmp.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys,mnt,lib/modules} "$work/result"
if ldd /bin/busybox >/dev/null 2>&1; then
    echo "/bin/busybox is dynamically linked: install busybox-static" >&2
    exit 1
fi
cp /bin/busybox "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done
: >"$root/lib/modules/load-order"
for rel in "${order[@]}"; do
    name=$(basename "$rel")
    case "$name" in
        *.ko) cp "$moddir/$rel" "$root/lib/modules/$name" ;;
        *.ko.xz) xz -dc "$moddir/$rel" >"$root/lib/modules/${name%.xz}"; name=${name%.xz} ;;
        *.ko.zst) zstd -qdc "$moddir/$rel" >"$root/lib/modules/${name%.zst}"; name=${name%.zst} ;;
        *) echo "unknown module format $rel" >&2; exit 1 ;;
    esac
    echo "$name" >>"$root/lib/modules/load-order"
done
cp "$here/init" "$root/init"
chmod 0755 "$root/init"
(cd "$root" && find . -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc --owner=0:0 --quiet) | gzip -1 >"$work/result/initrd.img"
cp "$kernel" "$work/result/vmlinuz"
echo "$release" >"$work/result/kernel-release"
# One rename publishes the whole result; a concurrent build that got there
# first built the same bytes, so losing the race is fine.
mv -T "$work/result" "$out" 2>/dev/null || [ -f "$out/initrd.img" ]
echo "built the guest: kernel $release, modules: ${order[*]:-none}" >&2
echo "$out"
