#!/bin/sh
# init of the domU's initramfs: load pvshim (pvcalls-front plus the scenario,
# which runs inside insmod and reports on the console), then power off, which
# makes pvcalls-front close the connection the way a guest shutdown does.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo 7 > /proc/sys/kernel/printk

# Module parameters come on the kernel command line as pvshim.NAME=VALUE.
args=""
for word in $(cat /proc/cmdline); do
    case "$word" in
        pvshim.*) args="$args ${word#pvshim.}" ;;
    esac
done
insmod /lib/modules/pvshim.ko $args
echo "PVSHIM INSMOD rc=$?"
poweroff -f
