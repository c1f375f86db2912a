#!/bin/sh
# init of dom0's initramfs: load the Xen and virtio-9p modules, mount this
# machine's root read-only (QEMU -virtfs, tag "hostroot") with writable tmpfs
# where the Xen tools keep state, and run the harness (dom0.py) chrooted in
# it.  The command comes in a file of this machine named on the kernel
# command line as realxen.cmd=PATH: one word per line, the first the Python
# interpreter (a file, since QEMU's multiboot -initrd splits at commas).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

fail() {
    echo "REALXEN RESULT FAIL dom0-init: $*"
    poweroff -f
}

for m in $(cat /lib/modules/order); do
    insmod /lib/modules/$m || fail "insmod $m"
done

cmdfile=""
repo=""
for word in $(cat /proc/cmdline); do
    case "$word" in
        realxen.cmd=*) cmdfile="${word#realxen.cmd=}" ;;
        realxen.repo=*) repo="${word#realxen.repo=}" ;;
    esac
done
[ -n "$cmdfile" ] || fail "no realxen.cmd= on the kernel command line"

# dom0's only network: loopback, where the backend's peers listen.
ip link set lo up || fail "ip link set lo up"

H=/mnt
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot $H \
    || fail "mount 9p hostroot"
# The checkout (code, .venv, cache) may live below a directory that gets a
# tmpfs next (CI clones into a temporary directory): keep a handle on it.
if [ -n "$repo" ]; then
    mkdir -p /keep && mount -o bind "$H$repo" /keep || fail "bind $repo"
fi
mount -t proc proc $H/proc
mount -t sysfs sysfs $H/sys
mount -t devtmpfs devtmpfs $H/dev
mkdir -p $H/dev/pts $H/dev/shm
mount -t devpts devpts $H/dev/pts
mount -t tmpfs tmpfs $H/dev/shm
for d in run tmp var/lib var/log; do
    mount -t tmpfs tmpfs $H/$d || fail "tmpfs on /$d"
done
mkdir -p $H/run/xen $H/run/xenstored $H/var/lib/xen $H/var/lib/xenstored \
    $H/var/log/xen/console
mount -t xenfs xenfs $H/proc/xen || fail "mount xenfs"
if [ -n "$repo" ] && [ ! -d "$H$repo/tests/realxen" ]; then
    mkdir -p "$H$repo" && mount -o bind /keep "$H$repo" || fail "bind $repo back"
fi

cmd="$(cat $H$cmdfile)" || fail "cannot read $cmdfile"
echo "REALXEN DOM0 up"
chroot $H /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 $cmd
echo "REALXEN DOM0 harness exited rc=$?"
poweroff -f
