#!/bin/bash
# Baked into the system test's rootfs as /usr/local/sbin/systest-boot (systest.service): mounts
# the 9p payload the host shares, runs its guest.sh, and powers the VM off.
exec >/dev/console 2>&1
modprobe 9pnet_virtio && modprobe 9p || echo "systest: 9p modules missing"
mkdir -p /payload
if mount -t 9p -o trans=virtio,version=9p2000.L,msize=1048576,cache=none payload /payload; then
  cut -d' ' -f1 /proc/uptime >/payload/results/boot_s
  bash /payload/guest.sh /payload >/payload/results/guest.log 2>&1
  echo "systest: guest.sh exited $?"
  sync
else
  echo "systest: cannot mount the payload"
fi
systemctl poweroff --no-block || poweroff -f
