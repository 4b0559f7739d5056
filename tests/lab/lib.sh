# Shell functions for lab jobs (prepended to every job's run.sh by the harness).
# The host's NFS server is 10.0.2.100 and its SMB server 10.0.2.101 (QEMU guestfwd to loopback).
NFS_SERVER=${NFS_SERVER:-10.0.2.100}
SMB_SERVER=${SMB_SERVER:-10.0.2.101}
MY_IP=$(ip -4 addr show eth0 | sed -n 's/.*inet \([0-9.]*\).*/\1/p')

fail() { echo "LAB-FAIL $*"; dmesg | tail -n 15; exit 1; }

# A root for programs (argument: the NFSv4 minor version; the volume's if it is NFSv4, since one
# client mixing 4.1 and 4.2 mounts of one ganesha hangs the first once the second is used):
# the host's /usr, /etc, ... read-only over NFS, in a tmpfs root (ganesha
# refuses mounts over its junctions, so proc, dev, sys and tmp are fresh directories).
host_root() {
    minor=${1:-1}
    mount -t nfs4 -o ro,vers=4.$minor,addr=$NFS_SERVER,clientaddr=$MY_IP $NFS_SERVER:/host /host || fail "mounting the host root"
    mount -t tmpfs tmpfs /newroot
    for dir in usr etc opt srv; do
        mkdir -p /newroot/$dir
        mount --bind /host/$dir /newroot/$dir
    done
    for link in bin sbin lib lib64; do ln -s usr/$link /newroot/$link; done
    mkdir -p /newroot/proc /newroot/sys /newroot/dev /newroot/tmp /newroot/root /newroot/var/tmp /newroot/run
    mount -t proc proc /newroot/proc
    mount -t sysfs sys /newroot/sys
    mount --bind /dev /newroot/dev
    # The guest's own name resolves without DNS (smbd looks it up for every connection).
    printf '127.0.0.1 localhost\n127.0.1.1 %s\n' "$(hostname)" >/tmp/hosts
    mount --bind /tmp/hosts /newroot/etc/hosts
}

# Makes a host directory (read-only) appear at the same path in the root.
bind_host() {
    mkdir -p "/newroot$1"
    mount --bind "/host$1" "/newroot$1" || fail "binding $1"
}

# Mounts the FTSS volume at /newroot$VOLUME: kind is nfs3, nfs4.1, nfs4.2 or smb3; the options of
# a default mount unless more are given.
mount_volume() {
    kind=$1
    shift
    mkdir -p "/newroot$VOLUME"
    case $kind in
        nfs4.*) mount -t nfs4 -o "vers=${kind#nfs},addr=$NFS_SERVER,clientaddr=$MY_IP${1:+,$1}" "$NFS_SERVER:/vol" "/newroot$VOLUME" ;;
        nfs3) mount -t nfs -o "vers=3,nolock,addr=$NFS_SERVER,mountaddr=$NFS_SERVER${1:+,$1}" "$NFS_SERVER:$NFS3_EXPORT" "/newroot$VOLUME" ;;
        smb3) mount -t cifs -o "ip=$SMB_SERVER,username=guest,password=,vers=3.0${1:+,$1}" "//$SMB_SERVER/vol" "/newroot$VOLUME" ;;
        *) fail "unknown volume kind $kind" ;;
    esac || fail "mounting the volume ($kind)"
    echo "LAB-MOUNT $(grep " /newroot$VOLUME " /proc/mounts)"
}

# Runs a command inside the root.
in_root() {
    chroot /newroot /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/usr/sbin HOME=/root "$@"
}

# Starts a command inside the root in the background; $! is then its pid (not a subshell's).
bg_root() {
    chroot /newroot /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/usr/sbin HOME=/root "$@" &
}
