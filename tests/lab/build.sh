#!/usr/bin/env bash
# Builds the lab's guest boot files once: Debian's cloud kernel and a busybox initramfs holding the
# kernel modules the lab needs (NFS and SMB clients, md RAID1, device mapper, pmem, virtio) and
# tests/lab/init. Output: $OUT/vmlinuz and $OUT/initramfs.cpio.gz ($OUT defaults to target/lab).
# Cached: nothing is done when both exist and are newer than this script and the init script.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../target/lab}
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [[ -s $out/vmlinuz && -s $out/initramfs.cpio.gz && $out/initramfs.cpio.gz -nt $here/build.sh && $out/initramfs.cpio.gz -nt $here/init ]]; then
    exit 0
fi
work=$out/build
rm -rf "$work"
mkdir -p "$work/debs" "$work/x" "$work/root"
cd "$work/debs"
# The kernel the cloud image metapackage points at (its unsigned twin has the same modules).
kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[[ -n $kernel_pkg ]] || { apt-get update -qq; kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'); }
apt-get download "$kernel_pkg" busybox-static >/dev/null 2>&1 || { apt-get update -qq; apt-get download "$kernel_pkg" busybox-static >/dev/null; }
for deb in *.deb; do dpkg -x "$deb" "$work/x"; done
version=$(ls "$work/x/lib/modules")
depmod -b "$work/x" "$version"
cp "$work/x/boot/vmlinuz-$version" "$out/vmlinuz.new"

# Modules in load order: each wanted module after everything it depends on (from modules.dep).
wanted=(virtio_pci virtio_net virtio_blk nfsv3 nfsv4 nfsd cifs md-mod raid1 dm-mod dm-writecache dm-flakey
        dm-delay nd_pmem nd_e820 nfit overlay tun veth loop
        cmac ccm gcm ctr ghash-generic gf128mul ecb nls_utf8 sha512_generic sha256_generic hmac md5 aes_generic af_packet)
moddir=$work/x/lib/modules/$version
declare -A placed=()
order=()
place() {
    local name=$1 path dep
    path=$(awk -v n="$name" -F: '{ f=$1; sub(".*/", "", f); sub("\\.ko(\\.[a-z]+)?$", "", f); gsub("-", "_", f); m=n; gsub("-", "_", m); if (f == m) { print $1; exit } }' "$moddir/modules.dep")
    [[ -n $path ]] || return 0   # built in
    [[ -n ${placed[$path]:-} ]] && return 0
    for dep in $(awk -v p="$path" -F: '$1 == p { print $2 }' "$moddir/modules.dep"); do
        place "$(basename "$dep" | sed -E 's/\.ko(\.[a-z]+)?$//')"
    done
    placed[$path]=1
    order+=("$path")
}
for name in "${wanted[@]}"; do place "$name"; done

root=$work/root
mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,mnt,etc,lib/modules,newroot,host,run}
cp "$work/x/bin/busybox" "$root/bin/busybox"
for path in "${order[@]}"; do
    file=$(basename "$path")
    case $file in
        *.xz) xz -dc "$moddir/$path" >"$root/lib/modules/${file%.xz}"; file=${file%.xz} ;;
        *.zst) zstd -dqc "$moddir/$path" >"$root/lib/modules/${file%.zst}"; file=${file%.zst} ;;
        *) cp "$moddir/$path" "$root/lib/modules/$file" ;;
    esac
    echo "$file" >>"$root/lib/modules/order"
done
cp "$here/init" "$root/init"
chmod 755 "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$out/initramfs.cpio.gz.new"
mv "$out/vmlinuz.new" "$out/vmlinuz"
mv "$out/initramfs.cpio.gz.new" "$out/initramfs.cpio.gz"
rm -rf "$work"
echo "lab: kernel $version, ${#order[@]} modules"
