#!/bin/sh
# run-in-rootfs.sh ROOTFS CACHE UID:GID WORKDIR [NAME=VALUE...] COMMAND [ARG...]
#
# Runs COMMAND from an image's filesystem the way a container runtime runs the image: the root read-only (as with
# Kubernetes' readOnlyRootFilesystem), fresh /proc, /dev, /tmp, the host's /sys read-only, the cache volume
# writable, as the image's numeric user, with exactly the environment given. It must run in a mount namespace of
# its own (`ip netns exec` makes one, and the network namespace too), so that every mount here vanishes with the
# process. The script ends by exec-ing the command, so its process id is the command's.
set -eu
rootfs=$1 cache=$2 user=$3 workdir=$4
shift 4

mount --make-rslave /
mount --bind "$rootfs" "$rootfs"
mount -o remount,bind,ro "$rootfs"
mount -t proc proc "$rootfs/proc"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$rootfs/tmp"
mount -t tmpfs -o mode=755,nosuid tmpfs "$rootfs/dev"
for node in null zero full random urandom tty; do
    touch "$rootfs/dev/$node"
    mount --bind "/dev/$node" "$rootfs/dev/$node"
done
mkdir "$rootfs/dev/shm" "$rootfs/dev/pts"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$rootfs/dev/shm"
ln -s /proc/self/fd "$rootfs/dev/fd"
ln -s /proc/self/fd/0 "$rootfs/dev/stdin"
ln -s /proc/self/fd/1 "$rootfs/dev/stdout"
ln -s /proc/self/fd/2 "$rootfs/dev/stderr"
mount --rbind /sys "$rootfs/sys"
mount -o remount,bind,ro "$rootfs/sys"
mount --bind "$cache" "$rootfs/cache"

exec chroot --userspec="$user" "$rootfs" /usr/bin/env -i --chdir="$workdir" "$@"
